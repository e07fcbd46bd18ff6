-- Where each projection has read to, per topic partition. A projection writes its rows and
-- its offsets in one transaction, and seeks to these offsets when partitions are assigned.
CREATE TABLE projection_offsets (
    projection  text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
