-- description: event type versions: events.type_version (and in dead letters)
--
-- The version of its event type each payload is in (the class's __event_version__ when written),
-- read by eventcore.evolution to run the upcasters of older versions. Events written before it are
-- version 1: a constant default makes ADD COLUMN a change of the catalog alone, no row rewritten,
-- however many events the table holds. smallint: 1 .. 32767 versions, two bytes a row. The check
-- is added NOT VALID: it holds for every row written from now on, and the rows already there (all 1,
-- the default) are not scanned under the migration's exclusive lock (a CHECK in ADD COLUMN reads
-- the whole table: 360 ms per 3M events, appends and reads waiting).
ALTER TABLE {s}.events ADD COLUMN type_version smallint NOT NULL DEFAULT 1;
ALTER TABLE {s}.events ADD CONSTRAINT events_type_version_check CHECK (type_version >= 1) NOT VALID;
ALTER TABLE {s}.projection_dead_letters ADD COLUMN type_version smallint NOT NULL DEFAULT 1;
