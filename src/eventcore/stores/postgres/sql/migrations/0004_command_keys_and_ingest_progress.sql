-- description: idempotency keys (command_keys), resumable ingest (ingest_progress); append_group records keys
--
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

-- Event rows inserted with the writer's own rights (the batch writer's COPY, or a role bypassing
-- the library) must be the slots reserve_append reserved in this transaction: checked once per
-- statement (functions/check_inserted_events.sql).
CREATE TRIGGER events_check_inserted AFTER INSERT ON {s}.events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION {s}.check_inserted_events();

-- A reservation must be written. reserve_append (the batch writer's lock-check-advance) moves the
-- stream heads; the rows come after it, in the caller's COPY. A role calling it directly could
-- commit without writing them, leaving heads ahead of their events. So reserve_append also records
-- the reservation (one row per transaction), and a deferred constraint trigger checks at COMMIT
-- that it was written, then deletes the row (functions/check_reservation_written.sql). The table
-- is private: only those functions (SECURITY DEFINER) touch it. append_group, which writes its
-- rows itself, does not use it.
CREATE TABLE {s}.reservations (
    xid      xid8     PRIMARY KEY,
    streams  text[]   NOT NULL,
    versions bigint[] NOT NULL
);

CREATE CONSTRAINT TRIGGER reservation_written AFTER INSERT ON {s}.reservations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.check_reservation_written();
