-- A sale's payment window (NULL: no holds). With holds, "remaining 0" is not final: a held
-- unit may come back, so the edge does not reject an intent early as sold out.
ALTER TABLE sales ADD COLUMN hold_ms integer;
