-- The stub payment provider's own ledger (producers/payment_provider.py): what it charged
-- and refunded, keyed by payment attempt, so charges are counted independently of the log.
-- A real provider keeps this on its side; tests and the demo read it to check
-- "charges = paid + refunded".
CREATE TABLE stub_payment_ledger (
    namespace   text        NOT NULL,
    attempt_id  text        NOT NULL,
    order_id    text        NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('succeeded', 'declined')),
    refunded    boolean     NOT NULL DEFAULT false,
    charged_at  timestamptz NOT NULL DEFAULT now(),
    refunded_at timestamptz,
    PRIMARY KEY (namespace, attempt_id)
);
