-- Orders become a view over the accepted outcomes (the projector ~12,000 -> 20,000+
-- decisions/s here: the orders table repeated every accepted outcome in a second heap row and
-- three index entries, which cost the projection's PostgreSQL backend ~40% of its time).
-- Every order row was written in the same transaction as its outcome, so the view shows
-- exactly the rows the table held. Reads by intent id use the outcomes' primary key, by sale
-- the (sale_id, sku) index; "a user's orders" go through the edge's intents (indexed by
-- user) joined on intent id. When orders gain a lifecycle (holds, payment, expiry) they
-- become a table of their own again, keyed by what that lifecycle reads.
DROP TABLE orders;
CREATE VIEW orders AS
SELECT order_id, intent_id, sale_id, sku, user_id, quantity, decided_at, sequence
FROM intent_outcomes
WHERE outcome = 'accepted';
