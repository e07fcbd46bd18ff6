-- Intents as the HTTP edge received them, written before the intent is produced to Kafka so
-- status and ownership work from the moment the 202 is sent. The edge's own record, not a
-- projection: it is not rebuilt from the log (an intent whose write was never acknowledged
-- may be here without being in the log; its status stays queued until the client retries).
CREATE TABLE intents (
    intent_id       text        PRIMARY KEY,
    user_id         text        NOT NULL,
    sale_id         text        NOT NULL,
    sku             text        NOT NULL,
    quantity        integer     NOT NULL,
    idempotency_key text        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX intents_user ON intents (user_id);
