-- The batch writer's lock-check-advance. p_streams: every participant (written or read-only),
-- p_counts: how many events each gets (0: read-only), p_n: their sum. Locks every participant,
-- checks every expectation before writing anything, advances the heads, records the reservation
-- (checked at COMMIT to have been written: see check_reservation_written), and returns the heads
-- as they were, the first position for this append's events and their timestamp (see 6.). The caller
-- inserts the events (the batch writer's COPY) in the same transaction; check_inserted_events
-- checks them.
CREATE OR REPLACE FUNCTION {s}.reserve_append(
    p_streams  text[],
    p_expected bigint[],
    p_counts   int[],
    p_n        int
) RETURNS TABLE (versions bigint[], first_position bigint, recorded_at_us bigint)
LANGUAGE plpgsql
-- Runs with the owner's rights, so application roles need no UPDATE on stream heads;
-- a fixed search_path keeps a caller's objects from being resolved inside it.
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- The plan settings of append_group (see there).
SET plan_cache_mode = auto SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_versions bigint[];
    v_base     bigint;
BEGIN
    -- Positions come from the transaction id, which PostgreSQL assigns at a
    -- transaction's first write. Every lock below is taken before that write, so
    -- of two writers of one stream the later one (in lock order) always gets the
    -- higher id, and a stream's versions rise with its positions. A transaction
    -- that already wrote has its id, fixed before these locks: refuse it.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: one append per transaction (this transaction has already written)'
            USING ERRCODE = 'EC412';
    END IF;
    -- The heads are read in a statement after the locks, which sees what committed meanwhile in READ
    -- COMMITTED only (in REPEATABLE READ a read-only stream moved while this waited would pass its
    -- check). The store pins READ COMMITTED on its connections; any other caller is refused.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'eventcore: appends run in READ COMMITTED; this transaction is %',
            upper(current_setting('transaction_isolation')) USING ERRCODE = 'EC400';
    END IF;
    IF coalesce(array_length(p_streams, 1), 0) <> coalesce(array_length(p_expected, 1), 0)
       OR coalesce(array_length(p_streams, 1), 0) <> coalesce(array_length(p_counts, 1), 0)
       OR p_n <> coalesce((SELECT sum(c) FROM unnest(p_counts) c), 0) THEN
        RAISE EXCEPTION 'eventcore: reserve_append arguments disagree' USING ERRCODE = 'EC400';
    END IF;

    -- 1. Lock every participant (see lock_streams), before the first write.
    PERFORM {s}.lock_streams(p_streams, (SELECT array_agg(c > 0 ORDER BY o) FROM unnest(p_counts) WITH ORDINALITY AS x(c, o)));

    -- 2. Their versions, read under the locks (0: no such stream).
    SELECT array_agg(coalesce(s.version, 0) ORDER BY p.ord) INTO v_versions
    FROM unnest(p_streams) WITH ORDINALITY AS p(stream_id, ord)
    LEFT JOIN {s}.streams s ON s.stream_id = p.stream_id;

    -- 3. Check every expectation before anything is written.
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        IF p_expected[i] <> -1 AND (
               (p_expected[i] = -2 AND v_versions[i] = 0)
            OR (p_expected[i] >= 0 AND v_versions[i] <> p_expected[i])) THEN
            RAISE EXCEPTION 'version conflict on stream %', p_streams[i]
                USING ERRCODE = 'EC409',
                      DETAIL = json_build_object('stream_id', p_streams[i], 'expected', p_expected[i],
                                                 'actual', v_versions[i])::text;
        END IF;
    END LOOP;

    IF p_n = 0 THEN
        RETURN QUERY SELECT v_versions, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF p_n > {MAX_EVENTS_PER_TRANSACTION} THEN
        RAISE EXCEPTION 'more than {MAX_EVENTS_PER_TRANSACTION} events in one transaction' USING ERRCODE = 'EC413';
    END IF;

    -- 4. Advance the heads of the written streams: the first write, so the transaction id is assigned now.
    INSERT INTO {s}.streams AS s (stream_id, version)
    SELECT c.stream_id, c.n FROM unnest(p_streams, p_counts) AS c(stream_id, n) WHERE c.n > 0
    ON CONFLICT (stream_id) DO UPDATE SET version = s.version + excluded.version;

    -- 4b. Remember what was reserved: checked at COMMIT (reservation_written) to have been written.
    --     Not for a session of the tables' owner (current_user here, as this function runs with its
    --     rights): it can drop the check anyway. session_user cannot be changed without superuser.
    IF session_user <> current_user THEN
        INSERT INTO {s}.reservations (xid, streams, versions)
        SELECT pg_current_xact_id(), array_agg(st.stream_id), array_agg(st.version)
          FROM {s}.streams st
         WHERE st.stream_id IN (SELECT c.stream_id FROM unnest(p_streams, p_counts) AS c(stream_id, n) WHERE c.n > 0);
    END IF;

    -- 5. Positions: this transaction's id, shifted (see the fence in queries.sql).
    v_base := (pg_current_xact_id()::text::bigint) << {POSITION_SHIFT};
    -- 6. The events' timestamp: the clock now that the streams are locked (not now(), the transaction's
    --    start, which may precede that of a transaction that locked the same streams first): so a stream's
    --    later versions never carry an earlier time.
    RETURN QUERY SELECT v_versions, v_base + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
END $$;
REVOKE ALL ON FUNCTION {s}.reserve_append(text[], bigint[], int[], int) FROM PUBLIC;
