-- Events are immutable: the events_are_immutable triggers (migration 1) call this before every
-- UPDATE, DELETE or TRUNCATE of the events table, whoever runs it.
CREATE OR REPLACE FUNCTION {s}.reject_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'eventcore: events are immutable (% rejected)', TG_OP USING ERRCODE = 'EC405';
END $$;
