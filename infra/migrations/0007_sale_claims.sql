-- A sale id is claimed once, before its OpenSale commands are written: two admins opening
-- the same id at once get one 201 and one 409 sale_exists (both used to get 201, and the
-- second one's terms never took effect). The terms are kept so that a retry of the same
-- opening (its first answer was lost) is recognised and goes on.
CREATE TABLE sale_claims (
    sale_id    text        PRIMARY KEY,
    terms      jsonb       NOT NULL,
    claimed_by text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
