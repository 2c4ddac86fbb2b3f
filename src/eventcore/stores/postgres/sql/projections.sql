-- Every statement the PostgreSQL projection storage runs (eventcore.stores.postgres.projections), by
-- name, read as queries.sql is (its sections, such as fence and columns, are fragments here too).
-- Tables and the NOTIFY trigger: migration 3.

-- name: try_lock
-- A projector's session advisory lock: one active instance per projector. The key is hashed with
-- LOCK_SEED (%s), so no stream id can name it (the append path's locks use seed 0).
SELECT pg_try_advisory_lock(hashtextextended(%s, %s))

-- name: unlock
SELECT pg_advisory_unlock(hashtextextended(%s, %s))

-- name: ensure
INSERT INTO {s}.projection_checkpoints (name) VALUES (%s) ON CONFLICT (name) DO NOTHING

-- name: load
SELECT position FROM {s}.projection_checkpoints WHERE name = %s

-- name: advance
-- Compare-and-set on the old position: an instance that lost the lock cannot move it.
UPDATE {s}.projection_checkpoints SET position = %s, updated_at = now() WHERE name = %s AND position = %s

-- name: reset
UPDATE {s}.projection_checkpoints SET position = 0, updated_at = now() WHERE name = %s

-- name: clear_dead_letters
DELETE FROM {s}.projection_dead_letters WHERE projector = %s

-- name: set_state
UPDATE {s}.projection_checkpoints SET state = %s, error = %s, owner = %s,
    listening_until = CASE WHEN %s THEN now() + make_interval(secs => %s) END,
    updated_at = now()
WHERE name = %s

-- name: renew
UPDATE {s}.projection_checkpoints SET listening_until = now() + make_interval(secs => %s) WHERE name = %s

-- name: beyond
-- Unfenced on purpose: committed events the fenced reads cannot see yet (an index probe).
SELECT EXISTS (SELECT 1 FROM {s}.events WHERE position > %s)

-- name: unlisten
UPDATE {s}.projection_checkpoints SET listening_until = NULL WHERE name = %s

-- name: channel
SELECT 'eventcore_events_' || to_regclass(%s)::oid::text

-- name: count_after
SELECT count(*) FROM (SELECT 1 FROM {s}.events WHERE position > %s AND position < {fence} LIMIT %s) p

-- name: dead_letter
INSERT INTO {s}.projection_dead_letters (projector, position, stream_id, version, event_id, type, data,
    metadata, recorded_at, type_version, error, attempts)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, 'epoch'::timestamptz + %s * interval '1 microsecond', %s,
    %s, %s)
ON CONFLICT (projector, position) DO UPDATE SET error = excluded.error, attempts = excluded.attempts,
    failed_at = now()

-- name: dead_letters
SELECT position, stream_id, version, uuid_send(event_id), type, data::text, metadata::text,
    (extract(epoch FROM recorded_at) * 1000000)::bigint, type_version, error, attempts, failed_at
FROM {s}.projection_dead_letters WHERE projector = %s ORDER BY position

-- name: status
-- Every projector (or one), with the head, its pending count (up to %(cap)s), dead letters and whether
-- its lock is held. The fence as a scalar subquery (an index condition): max() reads one index entry,
-- backwards. A bigint advisory key shows in pg_locks as classid (high 32 bits), objid (low 32 bits),
-- objsubid 1.
WITH f AS MATERIALIZED (SELECT {fence} AS fence),
h AS MATERIALIZED (SELECT coalesce((SELECT max(position) FROM {s}.events
    WHERE position < (SELECT fence FROM f)), 0) AS head)
SELECT c.name, c.position, h.head,
    (SELECT count(*) FROM (SELECT 1 FROM {s}.events e, f WHERE e.position > c.position AND e.position < f.fence
        LIMIT %(cap)s) p),
    c.state, c.error, c.owner, c.updated_at,
    (SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projector = c.name),
    EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%(prefix)s || c.name, %(seed)s))
FROM {s}.projection_checkpoints c, h
WHERE (%(name)s::text IS NULL OR c.name = %(name)s)
ORDER BY c.name

-- name: window
-- A filtered page bounded by a window: `bound` = the position of the %(k)s+1-th event after the
-- cursor when it is below the fence (else NULL: fewer than that many events lie below the fence,
-- the window reaches it), then the matching events up to it. Both ranges are index conditions,
-- so a selective filter costs at most the window, never a scan up to the fence. The window's end
-- is found without the fence (a fence condition whose value the planner cannot see can make it
-- prefer a bitmap scan of the whole range, then a sort). One statement: one snapshot, one fence.
-- The first row always carries the bound (with NULL columns when nothing matched). [filters] is
-- where the type and/or stream prefix conditions go (window_by_type, window_by_prefix).
WITH f AS MATERIALIZED (SELECT {fence} AS fence),
k AS MATERIALIZED (SELECT (SELECT position FROM {s}.events WHERE position > %(after)s
    ORDER BY position OFFSET %(k)s LIMIT 1) AS kth),
w AS MATERIALIZED (SELECT CASE WHEN k.kth < f.fence THEN k.kth END AS bound FROM k, f),
m AS MATERIALIZED (SELECT {columns} FROM {s}.events WHERE position > %(after)s
    AND position < (SELECT fence FROM f)
    AND position <= coalesce((SELECT bound FROM w), 9223372036854775807)
    [filters] ORDER BY position LIMIT %(limit)s)
SELECT w.bound, m.* FROM w LEFT JOIN m ON true ORDER BY m.position

-- name: by_type
AND type = ANY(%(types)s::text[])

-- name: by_prefix
AND starts_with(stream_id, %(prefix)s)
