-- The analytics projection (projections/analytics.py): what happened in each second of a sale,
-- per SKU, from the command and decision topics. Every count is added per batch inside the
-- projection runner's transaction (so a replay from offset 0 rebuilds the same rows); the
-- stock gauge follows the fact with the greatest sequence, so it does not depend on the
-- order batches arrive in. Counts are of records: received counts intent records appended
-- (a client's retry of a lost answer appends its intent again; the writer decides it once).
--
-- at: the second of log time (a command's append time, a decision's log time).
-- queued / drawn: pre-queue entries queued, and drawn entries answered (the queue's length
--   and progress are their running totals).
-- latency_ms: counts per fixed bucket of the latency of every answer to an intent (the log
--   time of the command that caused it to the answer's), bounds in
--   projections.analytics_rows.LATENCY_BUCKETS_MS, then overflow.
CREATE TABLE analytics_seconds (
    sale_id            text        NOT NULL,
    sku                text        NOT NULL,
    at                 timestamptz NOT NULL,
    received           bigint      NOT NULL DEFAULT 0,
    accepted           bigint      NOT NULL DEFAULT 0,
    accepted_units     bigint      NOT NULL DEFAULT 0,
    rejected           bigint      NOT NULL DEFAULT 0,
    rejected_by_reason jsonb       NOT NULL DEFAULT '{}'::jsonb,
    queued             bigint      NOT NULL DEFAULT 0,
    drawn              bigint      NOT NULL DEFAULT 0,
    deferred           bigint      NOT NULL DEFAULT 0,
    held               bigint      NOT NULL DEFAULT 0,
    waitlisted         bigint      NOT NULL DEFAULT 0,
    paid               bigint      NOT NULL DEFAULT 0,
    expired            bigint      NOT NULL DEFAULT 0,
    cancelled          bigint      NOT NULL DEFAULT 0,
    refunded           bigint      NOT NULL DEFAULT 0,
    latency_ms         bigint[]    NOT NULL,
    remaining          integer,
    remaining_sequence bigint      NOT NULL DEFAULT -1,
    PRIMARY KEY (sale_id, sku, at)
);
CREATE INDEX analytics_seconds_at ON analytics_seconds (at);

-- Intents received per person and sale: distinct users, and how many intents each sent.
CREATE TABLE analytics_users (
    sale_id  text   NOT NULL,
    user_id  text   NOT NULL,
    intents  bigint NOT NULL,
    PRIMARY KEY (sale_id, user_id)
);
