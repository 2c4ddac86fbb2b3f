-- Every statement the PostgreSQL store runs, by name (`-- name: NAME` starts a section; the
-- comment lines under it are for the reader). In braces: s is the quoted schema, a name in
-- capitals a constant of eventcore.stores.postgres.sql, the name of another section that
-- section's text (a fragment). Every value is a parameter (%s).

-- name: columns
-- A stored event as formats.ROW_COLUMNS reads it (a fragment of the reads below).
position, stream_id, version, uuid_send(event_id), type, data::text, metadata::text,
(extract(epoch FROM recorded_at) * 1000000)::bigint, type_version::int

-- name: fence
-- Global order. `position` is (transaction id << {POSITION_SHIFT}) + index within the transaction.
-- Readers of the feed only see positions below this: every transaction with an id under xmin has
-- finished, so nothing can later appear below a position a reader has passed. Transactions commit
-- out of order; the fence makes readers wait for the oldest one still running instead of skipping
-- it (any transaction of the cluster that holds an id: keep transactions short). Within one
-- stream, positions rise with versions because every stream lock is taken before the
-- transaction's first write, which is when PostgreSQL assigns its id (see reserve_append).
-- {POSITION_SHIFT} bits leave {MAX_EVENTS_PER_TRANSACTION} events per transaction and 2^43 transaction ids
-- (28 years at a sustained 10,000 write transactions per second) within a bigint.
(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {POSITION_SHIFT})

-- name: append_group
SELECT member, versions, base_position, conflict, recorded_at_us FROM {s}.append_group(%s::jsonb)

-- name: append_one
-- The same for a group of one member (functions/append_one.sql: fewer plan nodes, less server time).
SELECT member, versions, base_position, conflict, recorded_at_us FROM {s}.append_one(%s::jsonb)

-- name: reserve
SELECT versions, first_position, recorded_at_us
FROM {s}.reserve_append(%s::text[], %s::bigint[], %s::int[], %s::int)

-- name: copy_events
-- The row layout of the COPY encoders (eventcore._pure.copy).
COPY {s}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version)
FROM STDIN (FORMAT BINARY)

-- name: copy_columns
-- A stored event as the store's reads send it: the table's own columns in their binary forms
-- (int8, text, int8, uuid, text, jsonb, jsonb or NULL, timestamptz, int2 or NULL), the layout of the
-- COPY writer, decoded by eventcore._pure.copy.decode_copy. No conversion on the server: jsonb's
-- binary form is a version byte and the JSON text, a timestamptz microseconds since 2000. The type
-- version is sent as NULL when it is 1 (the decoders read NULL as 1): the server then calls no send
-- function for it, which kept a COPY of 1M version-1 events 4 % slower than without the column
-- instead of 10 %.
position, stream_id, version, event_id, type, data, metadata, recorded_at, nullif(type_version, 1)

-- name: column_columns
-- What read_columns reads of each event (eventcore.columns: decode_copy_columns), in a COPY of the
-- statements of read_all below (copy_read_columns_sql in sql/__init__.py puts these columns in place
-- of copy_columns): the envelope, the payload and its type version; not the event id and the metadata,
-- which no column holds. The server then sends 170 bytes a row of the benchmark's events instead of
-- 198, and a COPY of 1M of them, read and dropped, went from 0.68-0.73M to 0.75-0.80M rows/s here.
position, stream_id, version, type, data, recorded_at, nullif(type_version, 1)

-- name: envelope_columns
-- The same when read_columns reads no field of the payloads: the payload is sent as NULL, and the
-- server leaves out the conversion of each jsonb to text (the same COPY: 0.88-0.89M rows/s).
position, stream_id, version, type, NULL::jsonb, recorded_at, nullif(type_version, 1)

-- Reads of streams (a command's read, read_stream): by a prepared statement fetched in binary
-- (copy_reader.read_prepared: the values a binary COPY of the same columns sends, laid out as one
-- for decode_copy by copy_from_result); a longer read goes on by COPY (see PostgresStore._read_stream,
-- _read_streams). Simple statements on purpose: the session plans each call anew (plan_cache_mode),
-- and a statement that asked the heads first how long the read will be cost more to plan than it
-- saved. $n, not %s: the store prepares these statements on each connection itself.

-- name: read_stream_first
-- Parameters: stream id, from version, limit (at most {FIRST_ROWS}). By version: the (stream_id,
-- version) index gives the first rows of a long stream without reading the rest.
SELECT {copy_columns} FROM {s}.events WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3

-- name: read_streams_prepared
-- Several streams: all their events (no LIMIT: with one, the planner could walk the whole feed in
-- position order, filtering, to find the first rows of streams appended last; a per-stream LIMIT
-- through LATERAL cost more to plan than the prepared statement saved). A read that proves long
-- marks its longest streams, whose next reads go by COPY (see PostgresStore._read_streams).
SELECT {copy_columns} FROM {s}.events WHERE stream_id = ANY($1::text[]) ORDER BY position

-- Longer reads, and the feed's, run as COPY (SELECT ...) TO STDOUT (FORMAT BINARY): one message a
-- row, decoded from the bytes straight into events. COPY takes no server-side parameters: psycopg
-- binds these %s on the client, as quoted literals (strings, arrays of text and NULL included).

-- name: read_stream
COPY (SELECT {copy_columns} FROM {s}.events WHERE stream_id = %s AND version >= %s ORDER BY version LIMIT %s)
TO STDOUT (FORMAT BINARY)

-- name: read_streams
COPY (SELECT {copy_columns} FROM {s}.events WHERE stream_id = ANY(%s::text[]) ORDER BY position)
TO STDOUT (FORMAT BINARY)

-- name: stream_versions
SELECT stream_id, version FROM {s}.streams WHERE stream_id = ANY(%s::text[])

-- name: head
SELECT coalesce(max(position), 0) FROM {s}.events WHERE position < {fence}

-- name: read_all
-- The feed, fenced; parameters: after, limit. The three sections below add filters (types, a
-- stream id prefix) before the limit: see read_all_sql and read_all_params.
SELECT {columns} FROM {s}.events WHERE position > %s AND position < {fence}
ORDER BY position LIMIT %s

-- name: read_all_by_type
SELECT {columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND type = ANY(%s::text[])
ORDER BY position LIMIT %s

-- name: read_all_by_prefix
SELECT {columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND starts_with(stream_id, %s)
ORDER BY position LIMIT %s

-- name: read_all_by_type_and_prefix
SELECT {columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND type = ANY(%s::text[]) AND starts_with(stream_id, %s)
ORDER BY position LIMIT %s

-- name: copy_read_all
-- The four statements above as the store's readers run them: the same conditions
-- (tests/test_copy_read.py holds them equal), the columns of copy_columns.
COPY (SELECT {copy_columns} FROM {s}.events WHERE position > %s AND position < {fence}
ORDER BY position LIMIT %s) TO STDOUT (FORMAT BINARY)

-- name: copy_read_all_by_type
COPY (SELECT {copy_columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND type = ANY(%s::text[])
ORDER BY position LIMIT %s) TO STDOUT (FORMAT BINARY)

-- name: copy_read_all_by_prefix
COPY (SELECT {copy_columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND starts_with(stream_id, %s)
ORDER BY position LIMIT %s) TO STDOUT (FORMAT BINARY)

-- name: copy_read_all_by_type_and_prefix
COPY (SELECT {copy_columns} FROM {s}.events WHERE position > %s AND position < {fence}
AND type = ANY(%s::text[]) AND starts_with(stream_id, %s)
ORDER BY position LIMIT %s) TO STDOUT (FORMAT BINARY)

-- name: terminate_backend
-- Ending a lost connection's backend (its own role may end it), then checking that it is gone.
SELECT pg_terminate_backend(%s, %s)

-- name: backend_alive
SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = %s

-- name: type_counts
-- Each stored type name with each of its type versions and how many events hold it (eventcore types).
-- Unfenced: a count, not a feed; it reads every event once.
SELECT type, type_version::int, count(*) FROM {s}.events GROUP BY type, type_version ORDER BY type, type_version

-- name: event_by_id
SELECT position FROM {s}.events WHERE event_id = %s

-- name: committed_rows
-- Unfenced: used only to fetch back a write known to have committed.
SELECT position, stream_id, version, uuid_send(event_id) FROM {s}.events
WHERE position >= %s ORDER BY position LIMIT %s

-- name: recorded_command
-- The append recorded under an idempotency key (committed: its key row is visible), unfenced.
SELECT {columns} FROM {s}.events,
(SELECT first_position AS f, event_count AS c FROM {s}.command_keys WHERE key = %s) AS k
WHERE position >= k.f AND position < k.f + k.c ORDER BY position

-- name: read_streams_from
-- Each stream's events from a version on (a command folding from its snapshot), one statement.
-- Parameters: stream ids, from versions (arrays of one length).
SELECT {columns} FROM unnest(%s::text[], %s::bigint[]) AS f(from_stream, from_version)
JOIN {s}.events ON stream_id = f.from_stream AND version >= f.from_version ORDER BY position

-- name: load_snapshot
SELECT state_version, covers, state FROM {s}.command_snapshots WHERE key = %s

-- name: read_after_snapshot
-- A command's read through its snapshot, one statement (one point in time, one round trip): each
-- stream's events from the version the snapshot covers (1 where it covers none, or there is no
-- snapshot of this state version), then one row holding the snapshot (position NULL: last). Each
-- row also carries the feed's fence: a snapshot covers only events below it, so an event that
-- commits later (at a lower position than some read here) always comes after what it covers.
-- Parameters: key, state version, stream ids.
WITH c AS (SELECT covers, state, streams, versions FROM {s}.command_snapshots WHERE key = %s AND state_version = %s)
SELECT {columns}, NULL::text, NULL::bytea, NULL::text[], NULL::bigint[], {fence}
FROM unnest(%s::text[]) AS f(from_stream) LEFT JOIN c ON true
JOIN {s}.events ON stream_id = f.from_stream
AND version >= greatest(1, coalesce(c.versions[array_position(c.streams, f.from_stream)], 1))
UNION ALL
SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::bytea, NULL::text, NULL::text, NULL::text, NULL::bigint,
NULL::int, covers, state, streams, versions, {fence} FROM c
ORDER BY 1

-- name: save_snapshot
INSERT INTO {s}.command_snapshots (key, command, state_version, covers, streams, versions, state, events, written_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (key) DO UPDATE SET command = excluded.command, state_version = excluded.state_version,
covers = excluded.covers, streams = excluded.streams, versions = excluded.versions, state = excluded.state,
events = excluded.events, written_at = excluded.written_at
-- The latest stays: a slower command's older snapshot (fewer events covered) does not replace it.
WHERE excluded.events >= {s}.command_snapshots.events OR excluded.state_version <> {s}.command_snapshots.state_version

-- name: snapshot_rows
SELECT key, command, state_version, octet_length(state), events, extract(epoch FROM written_at)::float8
FROM {s}.command_snapshots ORDER BY key

-- name: drop_snapshots
-- Parameters: a command name (NULL: every command), a Unix time to drop those written before (NULL: all).
WITH gone AS (DELETE FROM {s}.command_snapshots WHERE (%s::text IS NULL OR command = %s::text)
              AND (%s::float8 IS NULL OR written_at < to_timestamp(%s::float8)) RETURNING 1)
SELECT count(*) FROM gone

-- name: ingest_progress
SELECT lane, lanes, items FROM {s}.ingest_progress WHERE key = %s

-- name: ingest_holes
SELECT lane, item FROM {s}.ingest_holes WHERE key = %s

-- name: resume_keys
SELECT key FROM {s}.ingest_progress WHERE starts_with(key, %s) GROUP BY key ORDER BY max(updated_at) DESC, key

-- name: ingest_key_lock
-- Taken by a lane's first batch of a resumable ingest, before anything else in its transaction: the
-- first batches of one key commit one after the other, so each sees whether a run with another
-- lane count has recorded the key (record_progress refuses it then).
SELECT pg_advisory_xact_lock(hashtextextended('eventcore ingest key:' || %s, 0))

-- name: record_progress
-- One statement (see ingest.IngestProgress): the lane's count as a compare-and-set, written only
-- while no row of the key has another lane count; the items this batch writes deleted as holes of
-- every lane (written once, an item is committed whichever lane it would go to later); the holes
-- its count passes recorded as the lane's own. Parameters: key, lane, lanes, items, key, lanes,
-- before, key, filled, key, lane, holes, lane, key, lanes. Returns (count rows written: 0 -> another
-- run moved this lane's count or records the key with another lane count, this lane's holes
-- deleted: fewer than `filled` -> another run wrote one of them, rows of the key with another lane
-- count).
WITH progress AS (
 INSERT INTO {s}.ingest_progress AS p (key, lane, lanes, items)
 SELECT %s, %s, %s, %s
  WHERE NOT EXISTS (SELECT 1 FROM {s}.ingest_progress q WHERE q.key = %s AND q.lanes <> %s)
 ON CONFLICT (key, lane) DO UPDATE SET lanes = excluded.lanes, items = excluded.items, updated_at = now()
 WHERE p.items = %s AND p.lanes = excluded.lanes RETURNING 1
), filled AS (
 DELETE FROM {s}.ingest_holes WHERE key = %s AND item = ANY(%s::bigint[]) RETURNING lane
), recorded AS (
 INSERT INTO {s}.ingest_holes (key, lane, item) SELECT %s, %s, unnest(%s::bigint[]) ON CONFLICT DO NOTHING
) SELECT (SELECT count(*) FROM progress), (SELECT count(*) FROM filled WHERE lane = %s),
        (SELECT count(*) FROM {s}.ingest_progress q WHERE q.key = %s AND q.lanes <> %s)

-- name: migration_lock
-- Held by migrate for its transaction: concurrent migrations of one schema run one after the other.
SELECT pg_advisory_xact_lock(hashtext(%s))

-- name: schema_state
-- What is in the schema named by the second parameter: whether it exists, which of eventcore's
-- relations (first parameter) it holds, and the columns of its schema_migrations table (NULL
-- without one).
SELECT n.oid IS NOT NULL,
 (SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_class c
   WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relname = ANY(%s::text[])),
 (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
   WHERE c.relnamespace = n.oid AND c.relname = 'schema_migrations' AND a.attnum > 0 AND NOT a.attisdropped)
FROM (SELECT %s::text AS name) AS q LEFT JOIN pg_namespace n ON n.nspname = q.name

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {s}

-- name: create_migrations
-- The migrations applied (version, description), and in the table's comment the digest of the
-- functions applied (see record_functions).
CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
version int PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())

-- name: current_version
SELECT coalesce(max(version), 0) FROM {s}.schema_migrations

-- name: migration_state
-- The version and the functions' digest (parameter: the quoted schema_migrations table name).
SELECT coalesce(max(version), 0), obj_description(%s::regclass, 'pg_class') FROM {s}.schema_migrations

-- name: record_migration
INSERT INTO {s}.schema_migrations (version, description) VALUES (%s, %s)

-- name: record_functions
-- COMMENT takes no parameters: {digest} is a literal, quoted by psycopg.
COMMENT ON TABLE {s}.schema_migrations IS {digest}

-- name: application_roles
-- Roles that may INSERT into the events table (both parameters: its quoted name), other than its
-- owner and superusers: the application roles least_privilege_grants was given to.
SELECT r.rolname FROM pg_roles r WHERE r.rolcanlogin AND NOT r.rolsuper
AND r.oid <> (SELECT c.relowner FROM pg_class c WHERE c.oid = %s::regclass)
AND has_table_privilege(r.oid, %s::regclass, 'INSERT') ORDER BY 1

-- name: least_privilege_grants
-- What an application role ({role}) needs to append and read, and nothing more, one statement a
-- line: SELECT and INSERT events (never UPDATE, DELETE or TRUNCATE them), read stream heads, call
-- the append functions, which move the heads with their owner's rights (SECURITY DEFINER), run
-- projections (their checkpoints and dead letters), look up idempotency keys (written by the
-- append functions) and resume an ingest. Migrations need the schema owner.
GRANT USAGE ON SCHEMA {s} TO {role};
GRANT SELECT, INSERT ON {s}.events TO {role};
GRANT SELECT ON {s}.streams TO {role};
GRANT SELECT ON {s}.schema_migrations TO {role};
GRANT EXECUTE ON FUNCTION {s}.reserve_append(text[], bigint[], int[], int) TO {role};
GRANT EXECUTE ON FUNCTION {s}.append_group(jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {s}.append_one(jsonb) TO {role};
GRANT SELECT, INSERT, UPDATE ON {s}.projection_checkpoints TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.projection_dead_letters TO {role};
GRANT SELECT ON {s}.command_keys TO {role};
GRANT SELECT, INSERT, UPDATE ON {s}.ingest_progress TO {role};
GRANT SELECT, INSERT, DELETE ON {s}.ingest_holes TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.command_snapshots TO {role};
