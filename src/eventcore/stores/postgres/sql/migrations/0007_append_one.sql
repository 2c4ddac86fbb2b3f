-- description: append_one: the append of a lone command in plain statements
--
-- functions/append_one.sql (applied before the migrations) serves every append that shares no
-- transaction with others; append_group keeps serving groups. Nothing in the tables changes: this
-- version exists so that an upgrade grants the application roles EXECUTE on the new function
-- (migrations.regrant runs least_privilege_grants after an upgrade), and so that an older eventcore,
-- which knows nothing of it, is told the schema is newer than it understands.
COMMENT ON FUNCTION {s}.append_one(jsonb) IS
    'eventcore: the append of one command (one member); append_group serves groups of several';
