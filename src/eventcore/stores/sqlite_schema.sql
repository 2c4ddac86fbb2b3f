-- The SQLite store's schema (SCHEMA_VERSION in sqlite.py), applied in one transaction by
-- SQLiteStore on a new file and on a file of an older schema version: every statement is
-- idempotent (IF NOT EXISTS), so an upgrade runs the whole file. Statements end with ';' (the
-- loader splits with sqlite3.complete_statement, so the triggers' inner ';' stay whole).

CREATE TABLE IF NOT EXISTS events (
    position    INTEGER PRIMARY KEY,
    stream_id   TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    event_id    BLOB    NOT NULL UNIQUE,
    type        TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    metadata    BLOB,
    recorded_at INTEGER NOT NULL,
    -- The event type's version the payload is in (schema 4; added to older stores by SQLiteStore,
    -- their events being version 1).
    type_version INTEGER NOT NULL DEFAULT 1 CHECK (type_version BETWEEN 1 AND 32767),
    UNIQUE (stream_id, version)
);

CREATE TRIGGER IF NOT EXISTS events_are_immutable_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'eventcore: events are immutable (UPDATE rejected)'); END;

CREATE TRIGGER IF NOT EXISTS events_are_immutable_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'eventcore: events are immutable (DELETE rejected)'); END;

-- An append's idempotency key, written in the append's transaction: its events are the
-- event_count positions from first_position (one append's positions are consecutive).
CREATE TABLE IF NOT EXISTS command_keys (
    key            TEXT    PRIMARY KEY,
    first_position INTEGER NOT NULL,
    event_count    INTEGER NOT NULL,
    recorded_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- How far each lane of a resumable ingest has committed its input, written with each batch.
CREATE TABLE IF NOT EXISTS ingest_progress (
    key        TEXT    NOT NULL,
    lane       INTEGER NOT NULL,
    lanes      INTEGER NOT NULL,
    items      INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (key, lane)
) WITHOUT ROWID;

-- Input items a resumable ingest passed over (a rejected or blank line) below a lane's committed
-- count, per lane: written by the lane's batch whose count passes them, deleted by the lane's batch
-- that writes one after all. (A passed-over item has no stream, so no lane: only a lane whose count
-- passed it while it was passed over may write it later, so an item is never written twice.)
CREATE TABLE IF NOT EXISTS ingest_holes (
    key  TEXT    NOT NULL,
    lane INTEGER NOT NULL,
    item INTEGER NOT NULL,
    PRIMARY KEY (key, lane, item)
) WITHOUT ROWID;

-- Commands' folded state (schema 6; see eventcore.snapshots): the latest per command and streams,
-- with what it covers (stream -> [version, event id] of the last event folded, as JSON).
CREATE TABLE IF NOT EXISTS command_snapshots (
    key           TEXT    PRIMARY KEY,
    command       TEXT    NOT NULL,
    state_version INTEGER NOT NULL,
    covers        TEXT    NOT NULL,
    state         BLOB    NOT NULL,
    events        INTEGER NOT NULL,
    written_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- Projection checkpoints and dead letters (see sqlite_projections).
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name       TEXT PRIMARY KEY,
    position   INTEGER NOT NULL DEFAULT 0,
    state      TEXT NOT NULL DEFAULT 'idle',
    error      TEXT,
    owner      TEXT,
    updated_at TEXT
);

CREATE TABLE IF NOT EXISTS projection_dead_letters (
    projector   TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    stream_id   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    event_id    BLOB    NOT NULL,
    type        TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    metadata    BLOB,
    recorded_at INTEGER NOT NULL,
    type_version INTEGER NOT NULL DEFAULT 1,
    error       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   TEXT    NOT NULL,
    PRIMARY KEY (projector, position)
);
