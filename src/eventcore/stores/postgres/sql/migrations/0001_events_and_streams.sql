-- description: events, streams, append function, immutability triggers
--
-- (Descriptions are as recorded in schema_migrations; the functions a version defined live in
-- functions/, one file each, applied before the migrations.)
--
-- Stream heads and the events table. Events are immutable: the triggers reject UPDATE, DELETE
-- and TRUNCATE for every role, the owner included (functions/reject_event_change.sql).
CREATE TABLE {s}.streams (
    stream_id text PRIMARY KEY CHECK (length(stream_id) BETWEEN 1 AND 255),
    version   bigint NOT NULL CHECK (version >= 0)
);

-- position: (transaction id << {POSITION_SHIFT}) + ordinal within the transaction (see the fence in queries.sql).
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

CREATE TRIGGER events_are_immutable BEFORE UPDATE OR DELETE ON {s}.events
    FOR EACH ROW EXECUTE FUNCTION {s}.reject_event_change();
CREATE TRIGGER events_are_immutable_truncate BEFORE TRUNCATE ON {s}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.reject_event_change();
