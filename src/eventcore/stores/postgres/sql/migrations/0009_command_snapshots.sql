-- description: commands' folded state (command_snapshots)
--
-- The latest snapshot of a command's state over its streams (see eventcore.snapshots): the state
-- version it was made under, what it covers (stream -> [version, event id] of the last event folded,
-- as JSON; and as two arrays, from which a command's read computes where each stream's events start
-- without parsing anything, so no stored value can make that read fail) and the state (msgpack).
-- An optimisation only: a row may be removed at any time.
CREATE TABLE {s}.command_snapshots (
    key           text        PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 1000),
    command       text        NOT NULL,
    state_version int         NOT NULL,
    covers        text        NOT NULL,
    streams       text[]      NOT NULL,
    versions      bigint[]    NOT NULL,
    state         bytea       NOT NULL,
    events        bigint      NOT NULL,
    written_at    timestamptz NOT NULL DEFAULT now(),
    -- What read_after_snapshot computes with: one stream per covered version.
    CHECK (array_ndims(streams) = 1 AND array_ndims(versions) = 1 AND cardinality(streams) = cardinality(versions))
);
