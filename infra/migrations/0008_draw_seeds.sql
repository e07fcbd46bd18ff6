-- The secret seed of each pre-queue sale's draw, kept until the sale clock reveals it at the
-- start. Only its SHA-256 (the commitment) goes into the log before then. Whoever can read
-- this table before the reveal can predict the draw: see the README's threat model.
CREATE TABLE draw_seeds (
    sale_id     text        PRIMARY KEY,
    skus        text[]      NOT NULL,
    seed        text        NOT NULL,
    commitment  text        NOT NULL,
    reveal_at   timestamptz NOT NULL,
    revealed_at timestamptz
);
CREATE INDEX draw_seeds_due ON draw_seeds (reveal_at) WHERE revealed_at IS NULL;
