-- The secret seed of each pre-queue sale's draw, kept until the sale clock reveals it at the
-- start. Only its SHA-256 (the commitment) goes into the log before then. Whoever can read
-- this table before the reveal can predict the draw: see the README's threat model.
-- One row per (namespace, sale): each namespace has its own topics and its own sale clock.
-- A seed is revealable once its sale's opening is complete (armed_at: every SKU's SaleOpened
-- is in the log, so the reveal lands behind it) and the broker's clock has passed reveal_at.
CREATE TABLE draw_seeds (
    namespace   text        NOT NULL,
    sale_id     text        NOT NULL,
    skus        text[]      NOT NULL,
    seed        text        NOT NULL,
    commitment  text        NOT NULL,
    reveal_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    armed_at    timestamptz,
    revealed_at timestamptz,
    PRIMARY KEY (namespace, sale_id)
);
CREATE INDEX draw_seeds_due ON draw_seeds (namespace, reveal_at) WHERE revealed_at IS NULL;
