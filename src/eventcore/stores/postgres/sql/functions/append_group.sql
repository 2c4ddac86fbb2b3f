-- One write path for every command append, alone or sharing a transaction with
-- others (the client's group commit). Two SQL statements per call whatever the
-- number of members: every statement plpgsql runs costs tens of microseconds of
-- server CPU (a version of this function that ran eight cost 3x a plain INSERT).
-- The first takes the locks, the second reads the heads under them, checks, writes
-- and reports. The locks need a statement of their own: the write's snapshot must
-- be taken after them, and the transaction id (positions) assigned after them (see
-- reserve_append).
--
-- p_group: a JSON object, "n" = participants in all, "g" = [member, ...]; member =
-- [participants, events, idempotency key] (the key may be null or left out);
-- participant = [stream_id, expected version, written (0/1)]; event = [stream_id,
-- event id (hex), type, data (JSON), metadata (JSON or null), ordinal in the group
-- (1, 2, ...; positions are base + ordinal), type version (1 when left out)]. One JSON parameter instead of nine
-- arrays: the client encodes it in one msgspec call with the payloads embedded
-- verbatim, and the server parses it once per statement.
--
-- Members must not share a stream (the client groups disjoint appends; a second
-- append on a stream waits for the next group), so each member's check is
-- independent of the others: a member whose expectations fail is reported and
-- skipped, the others are written. The "written" flags only choose lock modes: a
-- caller that lies about them can make its own append fail on the (stream_id,
-- version) key, never write out of order.
CREATE OR REPLACE FUNCTION {s}.append_group(p_group jsonb)
RETURNS TABLE (member int, versions bigint[], base_position bigint, conflict text, recorded_at_us bigint)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Plans cached per connection (planning statement 2 anew costs more than running it), and made
-- with index access only: every lookup here is by key, and a plan cached while the tables were
-- small would otherwise stay a sequential scan as they grow (seen: an append 1.2 -> 2.1 ms).
-- jit off: with sequential scans disabled, estimated costs are huge and would trigger JIT.
SET plan_cache_mode = auto SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_bulk     boolean := (p_group->>'n')::int > {BULK_STREAMS};
    v_parts    bigint;
    v_distinct bigint;
    v_void     text;
    v_at       timestamptz;
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

    -- 1. Lock every participant before the first write (see lock_streams): the
    --    store-wide key, then one key per stream in key order, exclusive if written.
    --    Over {BULK_STREAMS} participants: the store-wide key alone, exclusive. A member's
    --    idempotency key is locked too (exclusive, in the same key order), so two
    --    appends with one key run one after the other and the second sees the first's.
    IF v_bulk THEN
        v_void := pg_advisory_xact_lock({STORE_LOCK_KEY})::text;
    ELSE
        v_void := pg_advisory_xact_lock_shared({STORE_LOCK_KEY})::text;
    END IF;
    -- The locks are taken in the ordered subquery's select list (PostgreSQL evaluates a volatile
    -- expression there after the sort), not in an aggregate's argument: PostgreSQL 16 and later may sort
    -- an aggregate's input for a DISTINCT or ordered aggregate (the count(DISTINCT ...) here), which would
    -- take them in stream-id order instead of the key order every other append path uses.
    SELECT count(*) FILTER (WHERE NOT o.is_key), count(DISTINCT o.s) FILTER (WHERE NOT o.is_key), count(o.locked)
      INTO v_parts, v_distinct
      FROM (SELECT u.s, u.is_key,
                   CASE WHEN v_bulk AND NOT u.is_key THEN NULL
                        WHEN u.w THEN pg_advisory_xact_lock(u.k)::text
                        ELSE pg_advisory_xact_lock_shared(u.k)::text END AS locked
              FROM (SELECT p.doc->>0 AS s, hashtextextended(p.doc->>0, 0) AS k, (p.doc->>2)::int > 0 AS w,
                           false AS is_key
                      FROM jsonb_array_elements(p_group->'g') AS m(doc), jsonb_array_elements(m.doc->0) AS p(doc)
                    UNION ALL
                    SELECT m.doc->>2, hashtextextended('eventcore idempotency key:' || (m.doc->>2), 0), true, true
                      FROM jsonb_array_elements(p_group->'g') AS m(doc)
                     WHERE m.doc->>2 IS NOT NULL) AS u
             ORDER BY u.k OFFSET 0) AS o;
    IF v_distinct <> v_parts OR v_parts <> (p_group->>'n')::int THEN
        RAISE EXCEPTION 'eventcore: append_group participants must be distinct streams, "n" of them'
            USING ERRCODE = 'EC400';
    END IF;

    -- 2. Under the locks: heads, each member's check, then the heads and events of the
    --    members that pass, and one row per member: heads as they were, its conflict (JSON,
    --    or NULL), and the base position (0: nothing written). An event's position is base +
    --    its ordinal in the whole group: a member that fails leaves a gap, which the
    --    position contract allows (strictly increasing, never skipping, not dense). Its
    --    version is its stream's head + its rank in the stream; an event whose stream is not
    --    a participant of its member gets no version, which NOT NULL refuses. A member whose
    --    idempotency key is recorded already (or taken by an earlier member of the group) is
    --    reported with conflict (JSON) duplicate = key and writes nothing; a member that writes
    --    records its key with its first position and event count. The events' time is the clock
    --    now that the streams are locked (not now(), the transaction's start, which may precede
    --    that of a writer that locked the same streams first): a stream's later versions never
    --    carry an earlier time (reserve_append's does the same).
    v_at := clock_timestamp();
    RETURN QUERY
    WITH heads AS (
        SELECT m.ord::int AS m, p.ord AS o, p.doc->>0 AS s, (p.doc->>1)::bigint AS e,
               coalesce((SELECT st.version FROM {s}.streams st WHERE st.stream_id = p.doc->>0), 0) AS h
          FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord),
               jsonb_array_elements(m.doc->0) WITH ORDINALITY AS p(doc, ord)
    ), keys AS (
        -- A scalar subquery with LIMIT, not EXISTS: the planner turned that EXISTS into a hashed
        -- subplan reading every recorded key (an append with a key got slower with each key stored).
        SELECT m.ord::int AS m, m.doc->>2 AS key,
               m.doc->>2 IS NOT NULL
                   AND coalesce((SELECT true FROM {s}.command_keys ck WHERE ck.key = m.doc->>2 LIMIT 1), false) AS dup
          FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord)
    ), checked AS (
        SELECT h.m, array_agg(h.h ORDER BY h.o) AS heads, min(k.key) AS key,
               CASE WHEN bool_or(k.dup) THEN json_build_object('duplicate', min(k.key))::text
                    ELSE (array_agg(json_build_object('stream_id', h.s, 'expected', h.e, 'actual', h.h)::text
                                    ORDER BY h.o)
                            FILTER (WHERE h.e <> -1 AND ((h.e = -2 AND h.h = 0) OR (h.e >= 0 AND h.h <> h.e))))[1]
               END AS conflict
          FROM heads h JOIN keys k ON k.m = h.m GROUP BY h.m
    ), members AS (
        -- A key shared by members of this group (the client never groups them; a caller could): only
        -- the first member with it that passes its checks writes; the later ones are duplicates of it.
        SELECT c.m, c.heads, c.key,
               CASE WHEN c.conflict IS NULL AND c.key IS NOT NULL AND EXISTS (
                        SELECT 1 FROM checked e WHERE e.key = c.key AND e.m < c.m AND e.conflict IS NULL)
                    THEN json_build_object('duplicate', c.key)::text
                    ELSE c.conflict END AS conflict
          FROM checked c
    ), numbered AS (
        SELECT ev.m, ev.n, ev.s, ev.id, ev.t, ev.d, ev.md, ev.tv,
               (SELECT h.h FROM heads h WHERE h.m = ev.m AND h.s = ev.s)
                   + row_number() OVER (PARTITION BY ev.s ORDER BY ev.n) AS v
          -- An ordinal outside 1 .. {MAX_EVENTS_PER_TRANSACTION} would spill into another transaction's positions:
          -- it becomes NULL, which the position's NOT NULL refuses (the client never sends one).
          FROM (SELECT m.ord::int AS m,
                       CASE WHEN (e.doc->>5)::bigint BETWEEN 1 AND {MAX_EVENTS_PER_TRANSACTION} THEN (e.doc->>5)::bigint END AS n,
                       e.doc->>0 AS s, (e.doc->>1)::uuid AS id,
                       e.doc->>2 AS t, e.doc->3 AS d, nullif(e.doc->4, 'null'::jsonb) AS md,
                       coalesce((e.doc->>6)::smallint, 1::smallint) AS tv
                  FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord),
                       jsonb_array_elements(m.doc->1) AS e(doc)) AS ev
         WHERE ev.m IN (SELECT mb.m FROM members mb WHERE mb.conflict IS NULL)
    ), base AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM numbered) THEN (pg_current_xact_id()::text::bigint) << {POSITION_SHIFT}
                    ELSE 0 END AS b
    ), moved AS (
        INSERT INTO {s}.streams AS st (stream_id, version)
        SELECT x.s, max(x.v) FROM numbered x GROUP BY x.s
        ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version
    ), inserted AS (
        INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at,
                                type_version)
        SELECT base.b + x.n, x.s, x.v, x.id, x.t, x.d, x.md, v_at, x.tv FROM numbered x, base
    ), keyed AS (
        INSERT INTO {s}.command_keys (key, first_position, event_count)
        SELECT mb.key, min(base.b + x.n), count(*)
          FROM numbered x JOIN members mb ON mb.m = x.m, base
         WHERE mb.key IS NOT NULL
         GROUP BY mb.key
    )
    SELECT mb.m, mb.heads, (SELECT base.b FROM base), mb.conflict, (extract(epoch FROM v_at) * 1000000)::bigint
      FROM members mb
     ORDER BY mb.m;
END $$;
REVOKE ALL ON FUNCTION {s}.append_group(jsonb) FROM PUBLIC;
