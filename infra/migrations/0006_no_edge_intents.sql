-- The HTTP edge no longer writes an intents row before producing an intent (it cost ~420 µs
-- of CPU per 202 and capped the edge near 2,000/s). Retries are answered from each app
-- server's memory, and GET /v1/intents/{id} answers "queued" from the HMAC receipt in the
-- 202's status_url until the projection (intent_outcomes) has the intent.
DROP TABLE IF EXISTS intents;
