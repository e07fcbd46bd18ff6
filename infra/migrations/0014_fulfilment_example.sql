-- The example downstream service's sink (projections/fulfilment.py): a fulfilment team's
-- consumer group records every paid order once, whatever its consumers redeliver. Keyed by
-- order (and namespace: tests share the database); deliveries counts how often the order's
-- facts reached the sink (above 1: a redelivery after a crash, absorbed by the key).
CREATE TABLE fulfilment_orders (
    namespace    text        NOT NULL,
    order_id     text        NOT NULL,
    sale_id      text        NOT NULL,
    sku          text        NOT NULL,
    user_id      text        NOT NULL,
    quantity     integer     NOT NULL,
    paid_at      timestamptz NOT NULL,
    refunded_at  timestamptz,
    recorded_by  text        NOT NULL,
    deliveries   integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (namespace, order_id)
);
