-- The locks of every append: exclusive for streams it writes (p_written), shared for
-- streams it only reads (a read-only stream cannot change before the append commits:
-- no write skew; readers of one stream do not queue behind each other). Advisory locks,
-- taken in one global order (the key), so no two writers deadlock; they assign no
-- transaction id, so callers take them before their first write (see reserve_append),
-- and they also cover streams that do not exist yet. Every append first takes the
-- store-wide key shared; one naming more than {BULK_STREAMS} streams (a bulk batch) takes it
-- exclusive instead of one lock per stream, since PostgreSQL's lock table holds only
-- 64 locks per connection by default (max_locks_per_transaction; 50,000 per-stream
-- locks ran out of shared memory), and so waits for the appends in progress.
-- append_group takes the same locks in its own statement (see there).
CREATE OR REPLACE FUNCTION {s}.lock_streams(p_streams text[], p_written boolean[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lock record;
BEGIN
    IF coalesce(array_length(p_streams, 1), 0) > {BULK_STREAMS} THEN
        PERFORM pg_advisory_xact_lock({STORE_LOCK_KEY});  -- 'eventcor' in ASCII: the store-wide key
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared({STORE_LOCK_KEY});
    FOR v_lock IN
        SELECT hashtextextended(p.stream_id, 0) AS k, bool_or(p.w) AS exclusive
        FROM unnest(p_streams, p_written) AS p(stream_id, w)
        GROUP BY 1 ORDER BY 1
    LOOP
        IF v_lock.exclusive THEN
            PERFORM pg_advisory_xact_lock(v_lock.k);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(v_lock.k);
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION {s}.lock_streams(text[], boolean[]) FROM PUBLIC;
