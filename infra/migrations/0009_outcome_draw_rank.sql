-- A drawn intent's rank k of n in its pre-queue's draw (NULL when it was not drawn), so
-- GET /v1/intents/{id} still says it once the decision has left the live feed's window.
ALTER TABLE intent_outcomes ADD COLUMN draw_rank integer, ADD COLUMN draw_size integer;
