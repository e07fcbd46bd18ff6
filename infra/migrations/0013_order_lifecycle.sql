-- The order lifecycle and the operator's controls, projected: every such fact once, keyed by
-- its place in its (sale, SKU)'s numbering, so a replay or a repeated batch adds nothing.
-- Orders, their status and the lifecycle counters are views over it (lifecycle facts are a
-- few per order, and orders are at most the allocation: no counters to keep in step).
CREATE TABLE lifecycle_events (
    sale_id    text        NOT NULL,
    sku        text        NOT NULL,
    sequence   bigint      NOT NULL,
    kind       text        NOT NULL,
    order_id   text        NULL,
    intent_id  text        NULL,
    attempt_id text        NULL,
    user_id    text        NULL,
    quantity   integer     NULL,
    detail     text        NULL,
    decided_at timestamptz NOT NULL,
    PRIMARY KEY (sale_id, sku, sequence)
);
CREATE INDEX lifecycle_events_order ON lifecycle_events (order_id) WHERE order_id IS NOT NULL;

-- An order's status from its facts: a released or settled order never moves again (the
-- writer's rules, checked by the audit), so the final facts win over the payment attempts;
-- among those the latest says whether a payment is in progress.
CREATE VIEW order_status AS
SELECT order_id, sale_id, sku,
       CASE WHEN bool_or(kind = 'OrderRefunded') THEN 'refunded'
            WHEN bool_or(kind = 'OrderPaid') THEN 'paid'
            WHEN bool_or(kind = 'HoldExpired') THEN 'expired'
            WHEN bool_or(kind = 'HoldCancelled') THEN 'cancelled'
            WHEN (array_agg(kind ORDER BY sequence DESC)
                  FILTER (WHERE kind IN ('PaymentStarted', 'PaymentDeclined')))[1]
                 = 'PaymentStarted' THEN 'paying'
            ELSE 'held' END AS status,
       max(decided_at) AS changed_at
FROM lifecycle_events
WHERE kind IN ('PaymentStarted', 'PaymentDeclined', 'OrderPaid', 'HoldExpired',
               'HoldCancelled', 'OrderRefunded')
GROUP BY order_id, sale_id, sku;

-- Orders gain their status: 'confirmed' in a sale without holds (accepted is final), else
-- 'held' until a lifecycle fact moves it; and the payment deadline of a held order.
CREATE OR REPLACE VIEW orders AS
SELECT o.order_id, o.intent_id, o.sale_id, o.sku, o.user_id, o.quantity, o.decided_at,
       o.sequence,
       coalesce(st.status, CASE WHEN s.hold_ms IS NULL THEN 'confirmed' ELSE 'held' END)
           AS status,
       o.decided_at + s.hold_ms * interval '1 millisecond' AS pay_by
FROM intent_outcomes o
LEFT JOIN order_status st ON st.order_id = o.order_id
LEFT JOIN sales s ON s.sale_id = o.sale_id AND s.sku = o.sku
WHERE o.outcome = 'accepted';

-- Per (sale, SKU): what the lifecycle and the operator did. Held units are the accepted
-- units (sale_counters) less those paid, expired and cancelled; paid for good, those paid
-- less those refunded.
CREATE VIEW lifecycle_counters AS
SELECT e.sale_id, e.sku,
       count(*) FILTER (WHERE kind = 'OrderPaid') AS paid_orders,
       coalesce(sum(quantity) FILTER (WHERE kind = 'OrderPaid'), 0) AS paid_units,
       count(*) FILTER (WHERE kind = 'HoldExpired') AS expired_orders,
       coalesce(sum(quantity) FILTER (WHERE kind = 'HoldExpired'), 0) AS expired_units,
       count(*) FILTER (WHERE kind = 'HoldCancelled') AS cancelled_orders,
       coalesce(sum(quantity) FILTER (WHERE kind = 'HoldCancelled'), 0) AS cancelled_units,
       count(*) FILTER (WHERE kind = 'OrderRefunded') AS refunded_orders,
       coalesce(sum(quantity) FILTER (WHERE kind = 'OrderRefunded'), 0) AS refunded_units,
       count(*) FILTER (WHERE kind = 'PaymentDeclined') AS declined_payments,
       count(*) FILTER (WHERE kind = 'PaymentVoided') AS voided_payments,
       count(*) FILTER (WHERE kind = 'Waitlisted') AS waitlisted_intents,
       count(*) FILTER (WHERE kind = 'IntentDeferred') AS deferred_intents,
       coalesce(sum(quantity) FILTER (WHERE kind = 'UnitsAdded'), 0) AS added_units,
       bool_or(kind = 'SaleCancelled') AS cancelled,
       coalesce((array_agg(kind ORDER BY sequence DESC)
                 FILTER (WHERE kind IN ('SalePaused', 'SaleResumed')))[1] = 'SalePaused',
                false) AS paused
FROM lifecycle_events e
GROUP BY e.sale_id, e.sku;
