-- Per-user keys: the log carries pseudonyms, never people's ids. A user's pseudonym is
-- HMAC-SHA256(their key, their id) (flashsale.pseudonyms); the key is made on their first
-- request and lives only here, never in a topic. Erasing a user deletes their row: their
-- records stay in the log (kept forever, never rewritten), but nobody can tie them to the
-- person any more. Not a projection: a replay neither needs nor rebuilds it.
-- One row per (namespace, user): each namespace has its own topics and its own people.
CREATE TABLE user_keys (
    namespace  text        NOT NULL,
    user_id    text        NOT NULL,
    key        bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, user_id)
);
