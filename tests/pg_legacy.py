"""The PostgreSQL schema as eventcore versions 1 to 5 left it, for upgrade tests.

`MIGRATIONS` is what those versions of eventcore applied, verbatim: each migration made its tables
and (re)defined the functions of its time in the same text. Today's migrations hold table changes
only and the functions live in their own files (eventcore/stores/postgres/sql/), so a schema an
earlier eventcore made can only be rebuilt from this record. `make(conn, schema, version)` builds
one as it did, with its bookkeeping rows and no function digest.
"""
from __future__ import annotations

from psycopg import sql

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "events, streams, append function, immutability triggers",
        """
CREATE TABLE {s}.streams (
    stream_id text PRIMARY KEY CHECK (length(stream_id) BETWEEN 1 AND 255),
    version   bigint NOT NULL CHECK (version >= 0)
);

CREATE TABLE {s}.events (
    position    bigint PRIMARY KEY,
    stream_id   text        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 1),
    event_id    uuid        NOT NULL UNIQUE,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);

CREATE FUNCTION {s}.reject_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'eventcore: events are immutable (% rejected)', TG_OP USING ERRCODE = 'EC405';
END $$;

CREATE TRIGGER events_are_immutable BEFORE UPDATE OR DELETE ON {s}.events
    FOR EACH ROW EXECUTE FUNCTION {s}.reject_event_change();
CREATE TRIGGER events_are_immutable_truncate BEFORE TRUNCATE ON {s}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.reject_event_change();

-- The locks of every append: exclusive for streams it writes (p_written), shared for
-- streams it only reads (a read-only stream cannot change before the append commits:
-- no write skew; readers of one stream do not queue behind each other). Advisory locks,
-- taken in one global order (the key), so no two writers deadlock; they assign no
-- transaction id, so callers take them before their first write (see reserve_append),
-- and they also cover streams that do not exist yet. Every append first takes the
-- store-wide key shared; one naming more than 2,048 streams (a bulk batch) takes it
-- exclusive instead of one lock per stream, since PostgreSQL's lock table holds only
-- 64 locks per connection by default (max_locks_per_transaction; 50,000 per-stream
-- locks ran out of shared memory), and so waits for the appends in progress.
CREATE FUNCTION {s}.lock_streams(p_streams text[], p_written boolean[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lock record;
BEGIN
    IF coalesce(array_length(p_streams, 1), 0) > 2048 THEN
        PERFORM pg_advisory_xact_lock(7311142570156060530);  -- 'eventcor' in ASCII: the store-wide key
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(7311142570156060530);
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

-- Steps shared by both write paths. p_streams: every participant (written or
-- read-only), p_counts: how many events each gets (0: read-only), p_n: their sum.
-- Locks every participant, checks every expectation before writing anything,
-- advances the heads, and returns the heads as they were, the first position
-- for this append's events and the commit timestamp. The caller inserts the
-- events (append_events below, or the batch writer's COPY) in the same transaction.
CREATE FUNCTION {s}.reserve_append(
    p_streams  text[],
    p_expected bigint[],
    p_counts   int[],
    p_n        int
) RETURNS TABLE (versions bigint[], first_position bigint, recorded_at_us bigint)
LANGUAGE plpgsql
-- Runs with the owner's rights, so application roles need no UPDATE on stream heads;
-- a fixed search_path keeps a caller's objects from being resolved inside it.
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
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
    IF p_n > 1048575 THEN
        RAISE EXCEPTION 'more than 1048575 events in one transaction' USING ERRCODE = 'EC413';
    END IF;

    -- 4. Advance the heads of the written streams: the first write, so the transaction id is assigned now.
    INSERT INTO {s}.streams AS s (stream_id, version)
    SELECT c.stream_id, c.n FROM unnest(p_streams, p_counts) AS c(stream_id, n) WHERE c.n > 0
    ON CONFLICT (stream_id) DO UPDATE SET version = s.version + excluded.version;

    -- 5. Positions: this transaction's id, shifted (see the module docstring).
    v_base := (pg_current_xact_id()::text::bigint) << 20;
    RETURN QUERY SELECT v_versions, v_base + 1, (extract(epoch FROM now()) * 1000000)::bigint;
END $$;

-- One round trip per append, whatever the number of streams. Per-stream counts
-- are computed here from the events themselves, and every event must belong to
-- a listed participant.
CREATE FUNCTION {s}.append_events(
    p_streams       text[],
    p_expected      bigint[],
    p_event_streams text[],
    p_event_ids     uuid[],
    p_types         text[],
    p_data          text[],
    p_metadata      text[]
) RETURNS TABLE (versions bigint[], first_position bigint, recorded_at_us bigint)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_counts   int[];
    v_versions bigint[];
    v_first    bigint;
    v_at       bigint;
    v_n        int := coalesce(array_length(p_event_streams, 1), 0);
    v_rows     bigint;
BEGIN
    SELECT array_agg(coalesce(c.n, 0) ORDER BY p.ord) INTO v_counts
    FROM unnest(p_streams) WITH ORDINALITY AS p(stream_id, ord)
    LEFT JOIN (SELECT e.stream_id, count(*)::int AS n FROM unnest(p_event_streams) AS e(stream_id) GROUP BY 1) c
           ON c.stream_id = p.stream_id;

    SELECT r.versions, r.first_position, r.recorded_at_us INTO v_versions, v_first, v_at
    FROM {s}.reserve_append(p_streams, p_expected, v_counts, v_n) r;

    -- The events, with per-stream versions following the heads as they were.
    INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at)
    SELECT v_first - 1 + e.ord,
           e.stream_id,
           h.version + row_number() OVER (PARTITION BY e.stream_id ORDER BY e.ord),
           e.event_id, e.type, e.data::jsonb, e.metadata::jsonb, now()
    FROM unnest(p_event_streams, p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS e(stream_id, event_id, type, data, metadata, ord)
    JOIN unnest(p_streams, v_versions) AS h(stream_id, version) ON h.stream_id = e.stream_id;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_rows <> v_n THEN
        RAISE EXCEPTION 'eventcore: % event(s) name a stream missing from the participants', v_n - v_rows
            USING ERRCODE = 'EC400';
    END IF;

    RETURN QUERY SELECT v_versions, v_first, v_at;
END $$;

-- Group commit: several independent appends in one transaction, one WAL flush for all.
-- Member m's participants are the p_streams entries whose p_member is m; its events
-- are those whose p_event_member is m. Every participant of every member is locked
-- first (as in reserve_append), then each member is checked and written on its own:
-- a member whose expectations fail is reported and skipped, never failing the others.
CREATE FUNCTION {s}.append_many(
    p_member        int[],
    p_streams       text[],
    p_expected      bigint[],
    p_event_member  int[],
    p_event_streams text[],
    p_event_ids     uuid[],
    p_types         text[],
    p_data          text[],
    p_metadata      text[]
) RETURNS TABLE (member int, versions bigint[], first_position bigint, conflict text, recorded_at_us bigint)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_members  int := coalesce((SELECT max(m) FROM unnest(p_member) m), 0);
    v_streams  text[];
    v_expected bigint[];
    v_versions bigint[];
    v_n        int;
    v_base     bigint := NULL;
    v_next     bigint := 1;
    v_conflict text;
    v_at       bigint := (extract(epoch FROM now()) * 1000000)::bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: one append per transaction (this transaction has already written)'
            USING ERRCODE = 'EC412';
    END IF;
    IF coalesce(array_length(p_event_streams, 1), 0) > 1048575 THEN
        RAISE EXCEPTION 'more than 1048575 events in one transaction' USING ERRCODE = 'EC413';
    END IF;

    -- 1. Every lock of every member, before the first write (see lock_streams): a participant
    --    is written if its member has an event for it.
    PERFORM {s}.lock_streams(p_streams, (
        SELECT array_agg(EXISTS (SELECT 1 FROM unnest(p_event_member, p_event_streams) AS e(em, es)
                                 WHERE e.em = x.m AND e.es = x.s) ORDER BY x.o)
        FROM unnest(p_member, p_streams) WITH ORDINALITY AS x(m, s, o)));

    -- 2. Each member on its own: check, then write (heads first, then events).
    FOR m IN 1 .. v_members LOOP
        SELECT array_agg(x.s ORDER BY x.ord), array_agg(x.e ORDER BY x.ord) INTO v_streams, v_expected
        FROM unnest(p_member, p_streams, p_expected) WITH ORDINALITY AS x(mm, s, e, ord) WHERE x.mm = m;
        SELECT array_agg(coalesce(st.version, 0) ORDER BY x.ord) INTO v_versions
        FROM unnest(v_streams) WITH ORDINALITY AS x(s, ord) LEFT JOIN {s}.streams st ON st.stream_id = x.s;
        v_conflict := NULL;
        FOR i IN 1 .. coalesce(array_length(v_streams, 1), 0) LOOP
            IF v_expected[i] <> -1 AND (
                   (v_expected[i] = -2 AND v_versions[i] = 0)
                OR (v_expected[i] >= 0 AND v_versions[i] <> v_expected[i])) THEN
                v_conflict := json_build_object('stream_id', v_streams[i], 'expected', v_expected[i],
                                                'actual', v_versions[i])::text;
                EXIT;
            END IF;
        END LOOP;
        SELECT count(*) INTO v_n FROM unnest(p_event_member) AS e(mm) WHERE e.mm = m;
        IF v_conflict IS NOT NULL OR v_n = 0 THEN
            RETURN QUERY SELECT m, v_versions, 0::bigint, v_conflict, v_at;
            CONTINUE;
        END IF;
        INSERT INTO {s}.streams AS st (stream_id, version)
        SELECT e.s, count(*) FROM unnest(p_event_member, p_event_streams) AS e(mm, s) WHERE e.mm = m GROUP BY e.s
        ON CONFLICT (stream_id) DO UPDATE SET version = st.version + excluded.version;
        IF v_base IS NULL THEN
            v_base := (pg_current_xact_id()::text::bigint) << 20;  -- assigned by the write above
        END IF;
        INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at)
        SELECT v_base + v_next - 1 + row_number() OVER (ORDER BY e.ord),
               e.s,
               h.version + row_number() OVER (PARTITION BY e.s ORDER BY e.ord),
               e.id, e.t, e.d::jsonb, e.md::jsonb, now()
        FROM unnest(p_event_member, p_event_streams, p_event_ids, p_types, p_data, p_metadata)
                 WITH ORDINALITY AS e(mm, s, id, t, d, md, ord)
        JOIN unnest(v_streams, v_versions) AS h(s, version) ON h.s = e.s
        WHERE e.mm = m;
        RETURN QUERY SELECT m, v_versions, v_base + v_next, NULL::text, v_at;
        v_next := v_next + v_n;
    END LOOP;
END $$;

REVOKE ALL ON FUNCTION {s}.lock_streams(text[], boolean[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION {s}.reserve_append(text[], bigint[], int[], int) FROM PUBLIC;
REVOKE ALL ON FUNCTION {s}.append_events(text[], bigint[], text[], uuid[], text[], text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION {s}.append_many(int[], text[], bigint[], int[], text[], uuid[], text[], text[], text[]) FROM PUBLIC;
""",
    ),
    (
        2,
        "append_group: one set-based append function for single and group commits",
        """
-- One write path for every command append, alone or sharing a transaction with
-- others (the client's group commit). Two SQL statements per call whatever the
-- number of members: every statement plpgsql runs costs tens of microseconds of
-- server CPU (a first version of this function ran eight and cost 3x a plain
-- INSERT). The first takes the locks, the second reads the heads under them,
-- checks, writes and reports. The locks need a statement of their own: the
-- write's snapshot must be taken after them, and the transaction id (positions)
-- assigned after them (see reserve_append).
--
-- p_group: a JSON object, "n" = participants in all, "g" = [member, ...]; member = [participants,
-- events]; participant = [stream_id, expected version, written (0/1)]; event =
-- [stream_id, event id (hex), type, data (JSON), metadata (JSON or null), ordinal in the
-- group (1, 2, ...; positions are base + ordinal)]. One JSON
-- parameter instead of nine arrays: the client encodes it in one msgspec call with
-- the payloads embedded verbatim, and the server parses it once per statement.
--
-- Members must not share a stream (the client groups disjoint appends; a second
-- append on a stream waits for the next group), so each member's check is
-- independent of the others: a member whose expectations fail is reported and
-- skipped, the others are written. The "written" flags only choose lock modes: a
-- caller that lies about them can make its own append fail on the (stream_id,
-- version) key, never write out of order.
CREATE FUNCTION {s}.append_group(p_group jsonb)
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
    v_bulk     boolean := (p_group->>'n')::int > 2048;
    v_parts    bigint;
    v_distinct bigint;
    v_void     text;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: one append per transaction (this transaction has already written)'
            USING ERRCODE = 'EC412';
    END IF;

    -- 1. Lock every participant before the first write (see lock_streams): the
    --    store-wide key, then one key per stream in key order, exclusive if written.
    --    Over 2,048 participants: the store-wide key alone, exclusive.
    IF v_bulk THEN
        v_void := pg_advisory_xact_lock(7311142570156060530)::text;
    ELSE
        v_void := pg_advisory_xact_lock_shared(7311142570156060530)::text;
    END IF;
    SELECT count(*), count(DISTINCT o.s),
           count(CASE WHEN v_bulk THEN NULL
                      WHEN o.w THEN pg_advisory_xact_lock(o.k)::text
                      ELSE pg_advisory_xact_lock_shared(o.k)::text END)
      INTO v_parts, v_distinct
      FROM (SELECT p.doc->>0 AS s, hashtextextended(p.doc->>0, 0) AS k, (p.doc->>2)::int > 0 AS w
              FROM jsonb_array_elements(p_group->'g') AS m(doc), jsonb_array_elements(m.doc->0) AS p(doc)
             ORDER BY 2 OFFSET 0) AS o;
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
    --    a participant of its member gets no version, which NOT NULL refuses.
    RETURN QUERY
    WITH heads AS (
        SELECT m.ord::int AS m, p.ord AS o, p.doc->>0 AS s, (p.doc->>1)::bigint AS e,
               coalesce((SELECT st.version FROM {s}.streams st WHERE st.stream_id = p.doc->>0), 0) AS h
          FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord),
               jsonb_array_elements(m.doc->0) WITH ORDINALITY AS p(doc, ord)
    ), members AS (
        SELECT h.m, array_agg(h.h ORDER BY h.o) AS heads,
               (array_agg(json_build_object('stream_id', h.s, 'expected', h.e, 'actual', h.h)::text ORDER BY h.o)
                   FILTER (WHERE h.e <> -1 AND ((h.e = -2 AND h.h = 0) OR (h.e >= 0 AND h.h <> h.e))))[1] AS conflict
          FROM heads h GROUP BY h.m
    ), numbered AS (
        SELECT ev.n, ev.s, ev.id, ev.t, ev.d, ev.md,
               (SELECT h.h FROM heads h WHERE h.m = ev.m AND h.s = ev.s)
                   + row_number() OVER (PARTITION BY ev.s ORDER BY ev.n) AS v
          -- An ordinal outside 1 .. 1,048,575 would spill into another transaction's positions:
          -- it becomes NULL, which the position's NOT NULL refuses (the client never sends one).
          FROM (SELECT m.ord::int AS m,
                       CASE WHEN (e.doc->>5)::bigint BETWEEN 1 AND 1048575 THEN (e.doc->>5)::bigint END AS n,
                       e.doc->>0 AS s, (e.doc->>1)::uuid AS id,
                       e.doc->>2 AS t, e.doc->3 AS d, nullif(e.doc->4, 'null'::jsonb) AS md
                  FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord),
                       jsonb_array_elements(m.doc->1) AS e(doc)) AS ev
         WHERE ev.m IN (SELECT mb.m FROM members mb WHERE mb.conflict IS NULL)
    ), base AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM numbered) THEN (pg_current_xact_id()::text::bigint) << 20
                    ELSE 0 END AS b
    ), moved AS (
        INSERT INTO {s}.streams AS st (stream_id, version)
        SELECT x.s, max(x.v) FROM numbered x GROUP BY x.s
        ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version
    ), inserted AS (
        INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at)
        SELECT base.b + x.n, x.s, x.v, x.id, x.t, x.d, x.md, now() FROM numbered x, base
    )
    SELECT mb.m, mb.heads, (SELECT base.b FROM base), mb.conflict, (extract(epoch FROM now()) * 1000000)::bigint
      FROM members mb
     ORDER BY mb.m;
END $$;

REVOKE ALL ON FUNCTION {s}.append_group(jsonb) FROM PUBLIC;
-- The batch writer's lock-and-check: the same plan settings as append_group.
ALTER FUNCTION {s}.reserve_append(text[], bigint[], int[], int)
    SET plan_cache_mode = auto SET enable_seqscan = off SET jit = off;
-- Replaced by append_group.
DROP FUNCTION {s}.append_events(text[], bigint[], text[], uuid[], text[], text[], text[]);
DROP FUNCTION {s}.append_many(int[], text[], bigint[], int[], text[], uuid[], text[], text[], text[]);
""",
    ),
    (
        3,
        "projections: checkpoints, dead letters, NOTIFY on append",
        """
-- One row per projector: the position of the last event it has processed (0: none).
-- A projector writes its checkpoint in the same transaction as its read model, with a
-- compare-and-set on the old position (see eventcore.stores.pg_projections).
CREATE TABLE {s}.projection_checkpoints (
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 255),
    position   bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    state      text NOT NULL DEFAULT 'idle',
    error      text,
    owner      text,
    listening_until timestamptz,  -- a running, LISTENing projector's lease: appends notify until then (see below)
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events a projector skipped (error strategy "skip", or "retry" that gave up): the event as
-- stored and the error, written in the transaction that moves the checkpoint past it.
CREATE TABLE {s}.projection_dead_letters (
    projector   text        NOT NULL,
    position    bigint      NOT NULL,
    stream_id   text        NOT NULL,
    version     bigint      NOT NULL,
    event_id    uuid        NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb,
    recorded_at timestamptz NOT NULL,
    error       text        NOT NULL,
    attempts    int         NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, position)
);

-- Live projections LISTEN on 'eventcore_events_' || (the events table's oid): one wake-up
-- per committed writing statement (an append or a batch COPY), delivered at commit. Sent only
-- while a listening projector's lease lasts (listening_until: renewed every few seconds while it
-- runs, cleared when it stops; a killed or hung process's lease just expires): a transaction that
-- sent NOTIFY commits under one cluster-wide lock, which appends should not pay for when nobody
-- listens. Listeners renew before they read and also poll, so a missed notification only delays them. SECURITY DEFINER: the batch writer's
-- COPY runs as the application role, which must not need rights on the projection tables.
CREATE FUNCTION {s}.notify_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {s}.projection_checkpoints WHERE listening_until > now()) THEN
        PERFORM pg_notify('eventcore_events_' || TG_RELID::text, '');
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION {s}.notify_events() FROM PUBLIC;

CREATE TRIGGER events_notify AFTER INSERT ON {s}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_events();
""",
    ),
    (
        4,
        "idempotency keys (command_keys), resumable ingest (ingest_progress); append_group records keys",
        """
-- An append's idempotency key (ec.execute(..., idempotency_key=...)), written by append_group in
-- the append's own transaction, so a key is recorded if and only if its events are. The events
-- are the event_count positions from first_position (one member's events have consecutive
-- ordinals, so consecutive positions).
CREATE TABLE {s}.command_keys (
    key            text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    first_position bigint NOT NULL,
    event_count    int    NOT NULL CHECK (event_count >= 1),
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

-- How far each lane of a resumable ingest (store.ingest(..., resume_key=...)) has committed its
-- input: written in the transaction of each batch it counts.
CREATE TABLE {s}.ingest_progress (
    key        text   NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    lane       int    NOT NULL CHECK (lane >= 0),
    lanes      int    NOT NULL CHECK (lanes >= 1),
    items      bigint NOT NULL CHECK (items >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, lane)
);

-- Event rows inserted with the writer's own rights, i.e. not through the SECURITY DEFINER append
-- functions: the batch writer's COPY, or a role bypassing the library. Checked once per statement:
-- the rows must be the slots reserve_append reserved in this transaction. Every position inside
-- this transaction's own range (xid << 20 ...; a position outside it could land behind a position
-- a feed reader has already passed, and be skipped for ever); per stream, its head moved by this
-- transaction (the head row's xmin) and the rows exactly the versions just below and up to that
-- head, once each (the batch writer sends all of a transaction's rows in one COPY). Rows written
-- by the append functions (run as the tables' owner) and by the owner itself are trusted and not
-- checked: the owner could drop the trigger anyway. Left open: a role calling reserve_append
-- directly can commit without writing any row, leaving its stream's head ahead of its events
-- until a later reservation on that stream writes them.
-- SECURITY INVOKER (the default): current_user must be the writer's (the append functions' owner
-- inside them), and the application role may read stream heads anyway.
-- Lookups by key only (enable_seqscan off, scalar subqueries): a hash join could read the
-- whole streams table for one COPY.
CREATE FUNCTION {s}.check_inserted_events() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_base bigint;
    v_bad  text;
BEGIN
    IF current_user = (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = TG_RELID) THEN
        RETURN NULL;
    END IF;
    v_base := (pg_current_xact_id()::text::bigint) << 20;
    -- One pass over the rows, grouped by stream; then one head lookup per stream. Per stream the
    -- rows' versions must be hi - k + 1 .. hi with hi its head, moved by this transaction (a
    -- version twice is refused by the (stream_id, version) key itself, so k rows span that range).
    SELECT format('stream %L, versions %s..%s, positions %s..%s', r.stream_id, r.lo, r.hi, r.pmin, r.pmax)
      INTO v_bad
      FROM (SELECT g.*, (SELECT row(st.version, st.xmin = pg_current_xact_id()::xid)::text
                           FROM {s}.streams st WHERE st.stream_id = g.stream_id) AS head
              FROM (SELECT n.stream_id, min(n.version) AS lo, max(n.version) AS hi, count(*) AS k,
                           min(n.position) AS pmin, max(n.position) AS pmax
                      FROM new_events n GROUP BY n.stream_id) AS g) AS r
     -- head: "(version,moved by this transaction)", or NULL when the stream has no head
     WHERE r.pmin < v_base OR r.pmax >= v_base + 1048576
        OR r.head IS DISTINCT FROM format('(%s,t)', r.hi) OR r.lo <> r.hi - r.k + 1
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: event rows (%) are not the slots reserve_append reserved in this transaction; '
                        'write events through eventcore', v_bad USING ERRCODE = 'EC403';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_check_inserted AFTER INSERT ON {s}.events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION {s}.check_inserted_events();

-- A reservation must be written. reserve_append (the batch writer's lock-check-advance) moves the
-- stream heads; the rows come after it, in the caller's COPY. A role calling it directly could
-- commit without writing them, leaving heads ahead of their events. So reserve_append also records
-- the reservation (one row per transaction), and a deferred constraint trigger checks at COMMIT, in
-- one set-based query, that each reserved stream's event at its new head version exists (the insert
-- check above makes a statement's rows per stream exactly the reserved versions, so the top one
-- being there means all are), then deletes the row. The table is private: only these functions
-- (SECURITY DEFINER) touch it. Honest cost: one small insert, one probe per written stream and one
-- delete per batch; append_group, which writes its rows itself, does not use it.
CREATE TABLE {s}.reservations (
    xid      xid8     PRIMARY KEY,
    streams  text[]   NOT NULL,
    versions bigint[] NOT NULL
);

CREATE FUNCTION {s}.check_reservation_written() RETURNS trigger
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

CREATE CONSTRAINT TRIGGER reservation_written AFTER INSERT ON {s}.reservations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.check_reservation_written();

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
SET plan_cache_mode = auto SET enable_seqscan = off SET jit = off  -- as migration 2 set them
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
    IF p_n > 1048575 THEN
        RAISE EXCEPTION 'more than 1048575 events in one transaction' USING ERRCODE = 'EC413';
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

    -- 5. Positions: this transaction's id, shifted (see the module docstring).
    v_base := (pg_current_xact_id()::text::bigint) << 20;
    RETURN QUERY SELECT v_versions, v_base + 1, (extract(epoch FROM now()) * 1000000)::bigint;
END $$;

-- append_group of migration 2 plus idempotency keys: member = [participants, events, key or null]
-- (a member without the third element has no key, as before).
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
    v_bulk     boolean := (p_group->>'n')::int > 2048;
    v_parts    bigint;
    v_distinct bigint;
    v_void     text;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: one append per transaction (this transaction has already written)'
            USING ERRCODE = 'EC412';
    END IF;

    -- 1. Lock every participant before the first write (see lock_streams): the
    --    store-wide key, then one key per stream in key order, exclusive if written.
    --    Over 2,048 participants: the store-wide key alone, exclusive. A member's
    --    idempotency key is locked too (exclusive, in the same key order), so two
    --    appends with one key run one after the other and the second sees the first's.
    IF v_bulk THEN
        v_void := pg_advisory_xact_lock(7311142570156060530)::text;
    ELSE
        v_void := pg_advisory_xact_lock_shared(7311142570156060530)::text;
    END IF;
    SELECT count(*) FILTER (WHERE NOT o.is_key), count(DISTINCT o.s) FILTER (WHERE NOT o.is_key),
           count(CASE WHEN v_bulk AND NOT o.is_key THEN NULL
                      WHEN o.w THEN pg_advisory_xact_lock(o.k)::text
                      ELSE pg_advisory_xact_lock_shared(o.k)::text END)
      INTO v_parts, v_distinct
      FROM (SELECT u.s, u.k, u.w, u.is_key
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
    --    records its key with its first position and event count.
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
        SELECT ev.m, ev.n, ev.s, ev.id, ev.t, ev.d, ev.md,
               (SELECT h.h FROM heads h WHERE h.m = ev.m AND h.s = ev.s)
                   + row_number() OVER (PARTITION BY ev.s ORDER BY ev.n) AS v
          -- An ordinal outside 1 .. 1,048,575 would spill into another transaction's positions:
          -- it becomes NULL, which the position's NOT NULL refuses (the client never sends one).
          FROM (SELECT m.ord::int AS m,
                       CASE WHEN (e.doc->>5)::bigint BETWEEN 1 AND 1048575 THEN (e.doc->>5)::bigint END AS n,
                       e.doc->>0 AS s, (e.doc->>1)::uuid AS id,
                       e.doc->>2 AS t, e.doc->3 AS d, nullif(e.doc->4, 'null'::jsonb) AS md
                  FROM jsonb_array_elements(p_group->'g') WITH ORDINALITY AS m(doc, ord),
                       jsonb_array_elements(m.doc->1) AS e(doc)) AS ev
         WHERE ev.m IN (SELECT mb.m FROM members mb WHERE mb.conflict IS NULL)
    ), base AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM numbered) THEN (pg_current_xact_id()::text::bigint) << 20
                    ELSE 0 END AS b
    ), moved AS (
        INSERT INTO {s}.streams AS st (stream_id, version)
        SELECT x.s, max(x.v) FROM numbered x GROUP BY x.s
        ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version
    ), inserted AS (
        INSERT INTO {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at)
        SELECT base.b + x.n, x.s, x.v, x.id, x.t, x.d, x.md, now() FROM numbered x, base
    ), keyed AS (
        INSERT INTO {s}.command_keys (key, first_position, event_count)
        SELECT mb.key, min(base.b + x.n), count(*)
          FROM numbered x JOIN members mb ON mb.m = x.m, base
         WHERE mb.key IS NOT NULL
         GROUP BY mb.key
    )
    SELECT mb.m, mb.heads, (SELECT base.b FROM base), mb.conflict, (extract(epoch FROM now()) * 1000000)::bigint
      FROM members mb
     ORDER BY mb.m;
END $$;

""",
    ),
    (
        5,
        "resumable ingest: input items passed over (ingest_holes)",
        """
-- Input items a resumable ingest passed over (a blank or rejected line) below a lane's committed
-- count (ingest_progress.items): written by the batch whose count passes them, deleted by the batch
-- that writes the item after all (the line was fixed), each in that batch's transaction.
CREATE TABLE {s}.ingest_holes (
    key  text   NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    item bigint NOT NULL CHECK (item >= 0),
    PRIMARY KEY (key, item)
);
""",
    ),
]


def make(conn, schema: str, version: int) -> None:
    """Schema `schema` as eventcore left it at `version` (1..5), in one transaction on `conn`."""
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version int PRIMARY KEY, description text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())").format(s))
        for number, description, body in MIGRATIONS[:version]:
            conn.execute(sql.SQL(body).format(s=s))
            conn.execute(sql.SQL("INSERT INTO {}.schema_migrations (version, description) VALUES (%s, %s)").format(s),
                         (number, description))
