-- description: resumable ingest: holes recorded per lane (ingest_holes.lane)
--
-- A passed-over input item has no stream, so no lane. Recorded once for the whole ingest, a hole
-- told a later run to write the item whichever lane it went to, even when the lane it went to had
-- committed it before it was passed over: an item committed, blanked in a second run and restored
-- in a third was written twice with several lanes. Recorded per lane, a hole says "this lane's
-- count passed the item while it was passed over": the item is written only by a lane that holds
-- such a hole for it, so never twice.
--
-- A hole recorded before this version holds for every lane of its key, as it did: it is copied to
-- each of them (a key's rows all have one lane count, ingest_progress.lanes).
ALTER TABLE {s}.ingest_holes ADD COLUMN lane integer NOT NULL DEFAULT 0 CHECK (lane >= 0);
ALTER TABLE {s}.ingest_holes DROP CONSTRAINT ingest_holes_pkey;
INSERT INTO {s}.ingest_holes (key, lane, item)
SELECT h.key, l.lane, h.item
FROM {s}.ingest_holes h
JOIN (SELECT key, max(lanes) AS lanes FROM {s}.ingest_progress GROUP BY key) p ON p.key = h.key
CROSS JOIN LATERAL generate_series(1, p.lanes - 1) AS l(lane);
ALTER TABLE {s}.ingest_holes ADD PRIMARY KEY (key, lane, item);
ALTER TABLE {s}.ingest_holes ALTER COLUMN lane DROP DEFAULT;
