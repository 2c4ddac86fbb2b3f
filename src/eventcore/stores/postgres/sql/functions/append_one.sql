-- The append of a group of one member: what every append that shares no transaction runs (a command
-- on one thread, a lone `store.append`). The same argument, result, locks, checks and rows as
-- append_group, which serves groups of several members; tests/test_append_one.py runs both on the
-- same inputs and compares. Why a second function: append_group's one set-based statement builds a
-- plan of some forty nodes (members, keys, heads, a window, three writing CTEs) whose executor
-- start-up alone cost about as much as the writes; for one member, plain statements do the same in
-- fewer nodes. Measured here with pgbench, one connection, fsync on: a deposit (one stream, one
-- event) 2,100 appends/s against append_group's 1,650 (~125 us less server time per append), where a
-- bare INSERT of the event commits at ~3,600/s.
--
-- p_group: as for append_group (a JSON object, "n" = participants in all, "g" = [member]), with one
-- member exactly; anything else is refused (EC400). The locks come in a
-- statement before any read of a head (the reads' snapshot must be taken after them) and before the
-- transaction id is assigned (positions: see reserve_append).
CREATE OR REPLACE FUNCTION {s}.append_one(p_group jsonb)
RETURNS TABLE (member int, versions bigint[], base_position bigint, conflict text, recorded_at_us bigint)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- As append_group: plans cached per connection and made with index access only (a plan cached while
-- the tables were small would otherwise stay a sequential scan as they grow), jit off.
SET plan_cache_mode = auto SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_parts    jsonb := p_group->'g'->0->0;
    v_events   jsonb := p_group->'g'->0->1;
    v_key      text  := p_group->'g'->0->>2;
    v_np       int   := coalesce(jsonb_array_length(p_group->'g'->0->0), 0);
    v_ne       int   := coalesce(jsonb_array_length(p_group->'g'->0->1), 0);
    v_streams  text[];
    v_expected bigint[];  -- each participant's, read (and cast: a malformed one fails) before any check
    v_distinct bigint;
    v_version  bigint;
    v_ordinal  bigint;
    v_at       timestamptz;
    i          int;
BEGIN
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
    IF jsonb_typeof(p_group->'g') IS DISTINCT FROM 'array' OR jsonb_array_length(p_group->'g') <> 1
       OR (p_group->>'n')::int IS DISTINCT FROM v_np OR v_np = 0 THEN
        RAISE EXCEPTION 'eventcore: append_one takes one member with its participants, "n" of them'
            USING ERRCODE = 'EC400';
    END IF;
    member := 1;
    base_position := 0;

    -- 1. Locks, as append_group takes them: the store-wide key shared, then one key per participant
    --    (and the idempotency key) in key order, exclusive if written; over {BULK_STREAMS} participants the
    --    store-wide key alone, exclusive. One participant and no key, the common case, needs no sort.
    IF v_np = 1 AND v_key IS NULL THEN
        v_streams := ARRAY[v_parts->0->>0];
        v_expected := ARRAY[(v_parts->0->>1)::bigint];
        IF v_streams[1] IS NULL THEN
            RAISE EXCEPTION 'eventcore: append_one participants must be distinct streams, "n" of them'
                USING ERRCODE = 'EC400';
        END IF;
        PERFORM pg_advisory_xact_lock_shared({STORE_LOCK_KEY});
        IF (v_parts->0->>2)::int > 0 THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(v_streams[1], 0));
        ELSE
            PERFORM pg_advisory_xact_lock_shared(hashtextextended(v_streams[1], 0));
        END IF;
        versions := ARRAY[coalesce((SELECT st.version FROM {s}.streams st WHERE st.stream_id = v_streams[1]), 0)];
    ELSE
        IF v_np > {BULK_STREAMS} THEN
            PERFORM pg_advisory_xact_lock({STORE_LOCK_KEY});
        ELSE
            PERFORM pg_advisory_xact_lock_shared({STORE_LOCK_KEY});
        END IF;
        -- The locks in key order (every append path takes them in that order, so no two appends
        -- deadlock): taken in the ordered subquery's select list, where PostgreSQL evaluates a volatile
        -- expression after the sort, and with no DISTINCT or ordered aggregate, for which PostgreSQL 16
        -- and later may sort an aggregate's input.
        PERFORM count(o.locked)
          FROM (SELECT CASE WHEN v_np > {BULK_STREAMS} AND NOT u.is_key THEN NULL
                            WHEN u.w THEN pg_advisory_xact_lock(u.k)::text
                            ELSE pg_advisory_xact_lock_shared(u.k)::text END AS locked
                  FROM (SELECT hashtextextended(p.doc->>0, 0) AS k, (p.doc->>2)::int > 0 AS w, false AS is_key
                          FROM jsonb_array_elements(v_parts) AS p(doc)
                        UNION ALL
                        SELECT hashtextextended('eventcore idempotency key:' || v_key, 0), true, true
                         WHERE v_key IS NOT NULL) AS u
                 ORDER BY u.k OFFSET 0) AS o;
        FOR i IN 1 .. v_np LOOP
            v_streams[i] := v_parts->(i - 1)->>0;
            v_expected[i] := (v_parts->(i - 1)->>1)::bigint;
        END LOOP;
        -- 2. Under the locks: the heads, in participant order.
        SELECT array_agg(coalesce((SELECT st.version FROM {s}.streams st WHERE st.stream_id = p.s), 0) ORDER BY p.i),
               count(DISTINCT p.s)
          INTO versions, v_distinct
          FROM unnest(v_streams) WITH ORDINALITY AS p(s, i);
        IF v_distinct <> v_np THEN
            RAISE EXCEPTION 'eventcore: append_one participants must be distinct streams, "n" of them'
                USING ERRCODE = 'EC400';
        END IF;
        IF v_key IS NOT NULL
           AND coalesce((SELECT true FROM {s}.command_keys ck WHERE ck.key = v_key LIMIT 1), false) THEN
            conflict := json_build_object('duplicate', v_key)::text;
        END IF;
    END IF;

    -- 3. The checks, in participant order (the first that fails is reported): a recorded key first.
    IF conflict IS NULL THEN
        FOR i IN 1 .. v_np LOOP
            IF v_expected[i] <> -1 AND ((v_expected[i] = -2 AND versions[i] = 0)
                                        OR (v_expected[i] >= 0 AND versions[i] <> v_expected[i])) THEN
                conflict := json_build_object('stream_id', v_streams[i], 'expected', v_expected[i],
                                              'actual', versions[i])::text;
                EXIT;
            END IF;
        END LOOP;
    END IF;

    -- 4. The writes, stamped with the clock now that the streams are locked (as append_group's). An
    --    event's position is base + its ordinal (an ordinal outside
    --    1 .. {MAX_EVENTS_PER_TRANSACTION} becomes NULL, which the position's NOT NULL refuses), its version its
    --    stream's head + its rank in the stream; an event whose stream is not a participant gets no
    --    version, which NOT NULL refuses.
    v_at := clock_timestamp();
    IF conflict IS NULL AND v_ne > 0 THEN
        base_position := (pg_current_xact_id()::text::bigint) << {POSITION_SHIFT};
        IF v_ne = 1 THEN
            v_ordinal := CASE WHEN (v_events->0->>5)::bigint BETWEEN 1 AND {MAX_EVENTS_PER_TRANSACTION}
                              THEN (v_events->0->>5)::bigint END;
            v_version := versions[array_position(v_streams, v_events->0->>0)] + 1;
            INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at,
                                    type_version)
            VALUES (base_position + v_ordinal, v_events->0->>0, v_version, (v_events->0->>1)::uuid,
                    v_events->0->>2, v_events->0->3, nullif(v_events->0->4, 'null'::jsonb), v_at,
                    coalesce((v_events->0->>6)::smallint, 1::smallint));
            INSERT INTO {s}.streams AS st (stream_id, version) VALUES (v_events->0->>0, v_version)
            ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version;
        ELSE
            WITH inserted AS (
                INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at,
                                        type_version)
                SELECT base_position + x.n, x.s,
                       versions[array_position(v_streams, x.s)] + row_number() OVER (PARTITION BY x.s ORDER BY x.n),
                       x.id, x.t, x.d, x.md, v_at, x.tv
                  FROM (SELECT CASE WHEN (e.doc->>5)::bigint BETWEEN 1 AND {MAX_EVENTS_PER_TRANSACTION}
                                    THEN (e.doc->>5)::bigint END AS n,
                               e.doc->>0 AS s, (e.doc->>1)::uuid AS id, e.doc->>2 AS t, e.doc->3 AS d,
                               nullif(e.doc->4, 'null'::jsonb) AS md, coalesce((e.doc->>6)::smallint, 1::smallint) AS tv
                          FROM jsonb_array_elements(v_events) AS e(doc)) AS x
                RETURNING stream_id, version)
            INSERT INTO {s}.streams AS st (stream_id, version)
            SELECT i.stream_id, max(i.version) FROM inserted i GROUP BY i.stream_id
            ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version;
        END IF;
        IF v_key IS NOT NULL THEN
            INSERT INTO {s}.command_keys (key, first_position, event_count)
            SELECT v_key, base_position + min((e.doc->>5)::bigint), count(*)
              FROM jsonb_array_elements(v_events) AS e(doc);
        END IF;
    END IF;
    recorded_at_us := (extract(epoch FROM v_at) * 1000000)::bigint;
    RETURN NEXT;
END $$;
REVOKE ALL ON FUNCTION {s}.append_one(jsonb) FROM PUBLIC;
