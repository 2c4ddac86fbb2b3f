-- The reservation_written constraint trigger (migration 4), deferred to COMMIT: each stream
-- reserve_append reserved (one reservations row per transaction) must hold its event at the new
-- head version, checked in one set-based query (check_inserted_events makes a statement's rows
-- per stream exactly the reserved versions, so the top one being there means all are); then the
-- row is deleted. Honest cost: one small insert, one probe per written stream and one delete per
-- batch.
CREATE OR REPLACE FUNCTION {s}.check_reservation_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_missing text;
BEGIN
    SELECT format('%L up to version %s', r.s, r.v) INTO v_missing
      FROM unnest(NEW.streams, NEW.versions) AS r(s, v)
     -- a scalar subquery per stream (an index probe), never an anti-join that could read the events table
     WHERE (SELECT true FROM {s}.events e WHERE e.stream_id = r.s AND e.version = r.v LIMIT 1) IS NULL
     LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: stream % was reserved by reserve_append but its events were not written',
            v_missing USING ERRCODE = 'EC403';
    END IF;
    DELETE FROM {s}.reservations WHERE xid = NEW.xid;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION {s}.check_reservation_written() FROM PUBLIC;
