-- The events_check_inserted trigger (migration 4). Event rows inserted with the writer's own
-- rights, i.e. not through the SECURITY DEFINER append functions: the batch writer's COPY, or a
-- role bypassing the library. Checked once per statement: the rows must be the slots
-- reserve_append reserved in this transaction. Every position inside this transaction's own
-- range (xid << {POSITION_SHIFT} ...; a position outside it could land behind a position a feed reader
-- has already passed, and be skipped for ever); per stream, its head moved by this transaction
-- (the head row's xmin) and the rows exactly the versions just below and up to that head, once
-- each (the batch writer sends all of a transaction's rows in one COPY). Rows written by the
-- append functions (run as the tables' owner) and by the owner itself are trusted and not
-- checked: the owner could drop the trigger anyway. A role calling reserve_append directly and
-- committing without writing any row is caught at COMMIT (check_reservation_written).
-- SECURITY INVOKER (the default): current_user must be the writer's (the append functions' owner
-- inside them), and the application role may read stream heads anyway.
-- Lookups by key only (enable_seqscan off, scalar subqueries): a hash join could read the
-- whole streams table for one COPY.
CREATE OR REPLACE FUNCTION {s}.check_inserted_events() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_base bigint;
    v_bad  text;
BEGIN
    IF current_user = (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = TG_RELID) THEN
        RETURN NULL;
    END IF;
    v_base := (pg_current_xact_id()::text::bigint) << {POSITION_SHIFT};
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
     WHERE r.pmin < v_base OR r.pmax >= v_base + {POSITIONS_PER_TRANSACTION}
        OR r.head IS DISTINCT FROM format('(%s,t)', r.hi) OR r.lo <> r.hi - r.k + 1
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: event rows (%) are not the slots reserve_append reserved in this transaction; '
                        'write events through eventcore', v_bad USING ERRCODE = 'EC403';
    END IF;
    RETURN NULL;
END $$;
