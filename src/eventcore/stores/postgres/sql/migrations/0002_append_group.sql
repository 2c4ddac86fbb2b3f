-- description: append_group: one set-based append function for single and group commits
--
-- No table changes: this version replaced the first append functions (append_events, one append;
-- append_many, a group commit) with append_group (functions/append_group.sql). A schema made at
-- version 1 still holds them; a schema made since never had them.
DROP FUNCTION IF EXISTS {s}.append_events(text[], bigint[], text[], uuid[], text[], text[], text[]);
DROP FUNCTION IF EXISTS {s}.append_many(int[], text[], bigint[], int[], text[], uuid[], text[], text[], text[]);
