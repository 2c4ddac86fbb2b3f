-- description: projections: checkpoints, dead letters, NOTIFY on append
--
-- One row per projector: the position of the last event it has processed (0: none).
-- A projector writes its checkpoint in the same transaction as its read model, with a
-- compare-and-set on the old position (see eventcore.stores.postgres.projections).
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

-- Live projections LISTEN on 'eventcore_events_' || (the events table's oid): one wake-up per
-- committed writing statement (an append or a batch COPY), delivered at commit, while a listening
-- projector's lease lasts (functions/notify_events.sql).
CREATE TRIGGER events_notify AFTER INSERT ON {s}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_events();
