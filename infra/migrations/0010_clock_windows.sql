-- How long the sale clock must keep ticking for a sale whose deadlines are judged on log
-- time (holds: until its end plus the payment window and grace), per namespace. The clock
-- ticks while a row here, or an unrevealed or open pre-queue sale in draw_seeds, needs it.
CREATE TABLE clock_windows (
    namespace  text        NOT NULL,
    sale_id    text        NOT NULL,
    tick_until timestamptz NOT NULL,
    PRIMARY KEY (namespace, sale_id)
);
