"""Security: hostile values and names, the least-privilege PostgreSQL role, and passwords.

1. Every value is a parameter: stream ids, type names, metadata, idempotency keys, projection
   names and read filters made of SQL, placeholders, quotes, backslashes, LIKE/GLOB wildcards,
   unicode and maximal lengths are stored and read back exactly, on every backend, and touch
   nothing else.
2. Every identifier is quoted: odd schema names work end to end; names that would break the
   migrations or collide after PostgreSQL's 63-byte truncation are refused before connecting.
3. The role made by `least_privilege_grants` (LOGIN, no superuser, not the owner) runs the
   whole application and cannot rewrite history or change the schema.
4. A DSN's password never appears in errors (also pickled), reprs, health(), metrics gauges (the
   exporters' only source of the store URL), logs at DEBUG, or the CLI's output.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
import types
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
import pytest

import eventcore as ec
from waiting import wait_until
from eventcore.cli import main
from eventcore.jsonl import JsonLinesReader
from pgserver import url_as as _url_as

DEADLINE = 60.0

#: Values that would do harm if any were pasted into SQL, or matched as a pattern.
HOSTILE = [
    "'; DROP TABLE events; --",
    '"); DROP SCHEMA public CASCADE; --',
    "' OR '1'='1",
    "%s",
    "%(x)s",
    "{}",
    "{s}",
    "$1",
    "$$",
    "?",
    ":name",
    "a_b",
    "a%b",
    "*[x]?",
    "\\",
    "\\x00 \\' \\\\",
    "quote'\"`",
    "ünïcødé ✓ 名前 🙂 \u202eRTL e\u0301",
    "x" * 255,
]


class Said(ec.Event):
    __event_type__ = "sectest.Said"
    text: str


def _hostile_type(i: int, name: str) -> type:
    """An event class whose stored type name is `name`."""
    def body(ns):
        ns["__event_type__"] = name
        ns["__annotations__"] = {"text": str}
        ns["__module__"] = __name__

    return types.new_class(f"Hostile{i}", (ec.Event,), exec_body=body)


HOSTILE_TYPES = [_hostile_type(i, h) for i, h in enumerate(HOSTILE)]


class WriteNote(ec.Command):
    stream: ec.StreamId
    text: str

    def handle(self, state):
        return [ec.emit(self.stream, Said(self.text))]


def _metadata(h: str) -> ec.Metadata:
    return ec.Metadata(correlation_id=h, causation_id=h, user_id=h,
                       custom={h: h, "nested": [h, {"k": h + "\n\t\r\u2028"}]})


def _envelopes(events) -> list:
    return [(e.stream_id, e.version, e.position, e.event_id, e.type, e.data, e.metadata) for e in events]


# -- 1. hostile values, every backend ----------------------------------------------------------------


def test_hostile_values_are_stored_and_read_back_exactly(store, tmp_path):
    canary = store.append([ec.emit("canary", Said("untouched"))], metadata=ec.Metadata(user_id="c"))
    for i, h in enumerate(HOSTILE):
        written = store.append([ec.emit(h, HOSTILE_TYPES[i](h)), ec.emit(h, Said(h))], metadata=_metadata(h),
                               idempotency_key=h)
        # The same idempotency key again: recognised by value, nothing new is written.
        with pytest.raises(ec.DuplicateCommandError) as info:
            store.append([ec.emit(h, Said("never"))], idempotency_key=h)
        assert [e.event_id for e in info.value.events] == [e.event_id for e in written]
        store.append_batch([ec.emit(h, HOSTILE_TYPES[i](h + "|batch"))], metadata=_metadata(h))
    store.ingest([(h, HOSTILE_TYPES[i](h + "|ingest"), _metadata(h)) for i, h in enumerate(HOSTILE)], batch_size=7,
                 resume_key=HOSTILE[0])
    lines = tmp_path / "hostile.jsonl"
    lines.write_bytes(b"".join(
        msgspec.json.encode({"stream": h, "type": h, "data": {"text": h + "|jsonl"}, "metadata": _metadata(h)}) + b"\n"
        for h in HOSTILE))
    with JsonLinesReader(str(lines)) as reader:
        assert store.ingest(reader, batch_size=5).events == len(HOSTILE)

    everything = list(store.read_all())
    assert len(everything) == 1 + 5 * len(HOSTILE)
    assert _envelopes(everything[:1]) == _envelopes(store.read_stream("canary")) == _envelopes(canary)
    by_stream = store.read_streams(HOSTILE)
    for i, h in enumerate(HOSTILE):
        events = store.read_stream(h)
        assert _envelopes(events) == _envelopes(by_stream[h])
        assert [(e.stream_id, e.version) for e in events] == [(h, v) for v in range(1, 6)]
        assert [e.type for e in events] == [h, "sectest.Said", h, h, h]
        assert [e.data.text for e in events] == [h, h, h + "|batch", h + "|ingest", h + "|jsonl"]
        assert all(e.metadata == _metadata(h) for e in events)
        assert store.stream_version(h) == 5
        # Filters match exactly and literally: a type name is never a pattern, a prefix never one either.
        assert _envelopes(store.read_all(types=[h])) == _envelopes([e for e in everything if e.type == h])
        assert _envelopes(store.read_all(stream_prefix=h)) == _envelopes(
            [e for e in everything if e.stream_id.startswith(h)])



def test_very_long_hostile_payload_and_metadata_round_trip(store):
    text = "'; DROP TABLE events; -- %s {} $$ \\ \"\u00e9🙂" * 20_000  # ~0.6 MB
    md = ec.Metadata(user_id=text[:10_000], custom={"k" * 1000: text})
    store.append([ec.emit("long", Said(text))], metadata=md)
    store.append_batch([ec.emit("long", Said(text[::-1]))], metadata=md)
    [first, second] = store.read_stream("long")
    assert (first.data.text, second.data.text) == (text, text[::-1])
    assert first.metadata == second.metadata == md

PREFIX_STREAMS = ["a_b-1", "axb-1", "aXYZb-1", "a%b-1", "a\\b-1", "a\\\\b-1", "A_B-1", "a*b-1", "a?b-1", "a[b]-1",
                  "ab-1"]


@pytest.mark.parametrize("prefix, expected", [
    ("a_b", ["a_b-1"]),
    ("a%", ["a%b-1"]),
    ("a%b", ["a%b-1"]),
    ("a\\", ["a\\b-1", "a\\\\b-1"]),
    ("a\\\\", ["a\\\\b-1"]),
    ("a*", ["a*b-1"]),
    ("a?", ["a?b-1"]),
    ("a[b]", ["a[b]-1"]),
    ("a[", ["a[b]-1"]),
    ("A_", ["A_B-1"]),
    ("%", []),
    ("_", []),
    ("*", []),
    ("'; DROP TABLE events; --", []),
])
def test_stream_prefix_wildcards_match_literally(store, prefix, expected):
    for sid in PREFIX_STREAMS:
        store.append([ec.emit(sid, Said(sid))])
    assert [e.stream_id for e in store.read_all(stream_prefix=prefix)] == expected
    # Type filters neither: a pattern-looking name matches only a type of that very name.
    for pattern in ("%", "_", "sectest.%", "sectest.Sai_", "sectest.*", "SECTEST.SAID"):
        assert list(store.read_all(types=[pattern])) == []
    assert len(list(store.read_all())) == len(PREFIX_STREAMS)


def test_projections_with_hostile_names_and_filters(store):
    name = "'; DROP TABLE projection_checkpoints; -- %s {} $$ \\ ünï"
    twin = name.upper()  # a different projector: its own checkpoint and dead letters
    for sid in ("p_1", "p%1", "pX1", "p_1"):
        store.append([ec.emit(sid, Said(sid))])
    store.append([ec.emit("p_1", Said("poison"))])
    # Sets: a batch with a failing event is rolled back and its events handled again one by one.
    seen: dict = {name: set(), twin: set()}

    def handler_for(projector_name):
        def handle(event, ctx):
            if event.data.text == "poison":
                raise ValueError("poison; DROP TABLE x; --")
            seen[projector_name].add((event.stream_id, event.version))
        return handle

    for n in (name, twin):
        proj = ec.Projector(n, handler_for(n), types=[Said], stream_prefix="p_", on_error="skip")
        ec.run_projection(store, proj, until_caught_up=True, poll_interval=0.01)
    assert seen[name] == seen[twin] == {("p_1", 1), ("p_1", 2)}
    [dead] = ec.dead_letters(store, name)
    assert (dead.projector, dead.stream_id, dead.version) == (name, "p_1", 3)
    assert "DROP TABLE x" in dead.error
    assert [d.projector for d in ec.dead_letters(store, twin)] == [twin]
    status = {s.name: s for s in ec.projection_status(store)}
    assert set(status) == {name, twin}
    assert status[name].position == status[twin].position == store.read_stream("p_1")[-1].position
    assert [s.name for s in ec.projection_status(store, name)] == [name]
    assert len(list(store.read_all())) == 5



def test_projector_names_that_cannot_be_stored_are_refused_alike_on_every_backend(store):
    for name in ["", "x" * 256, "a\x00b", "lone \udc80", "new\nline", 7]:
        with pytest.raises(ec.ValidationError, match="a projector needs a name"):
            ec.Projector(name, lambda event, ctx: None)
        if isinstance(name, str):  # a lookup of a name no projector can have finds nothing
            assert ec.dead_letters(store, name) == [] and ec.projection_status(store, name) == []

# -- 2. schema names (PostgreSQL) ---------------------------------------------------------------------------

#: Unreachable on purpose: a ValidationError shows the name was refused before any connection.
UNREACHABLE = "postgresql://app@127.0.0.1:1/db"


@pytest.mark.parametrize("schema", [
    "", "a$$b", "$", "fn$body$", "a%s", "%(x)s", "100%", "x" * 64, "é" * 32, "a\x00b", "pg_x", "pg_catalog",
    "information_schema",
    "\udc80", 7, None,
], ids=repr)
def test_schema_names_that_would_break_or_collide_are_refused(schema):
    pytest.importorskip("psycopg")
    with pytest.raises(ec.ValidationError, match="schema must be"):
        ec.connect(UNREACHABLE, schema=schema, connect_timeout=1)
    if isinstance(schema, str) and schema != "\udc80":
        with pytest.raises(ec.ValidationError, match="schema must be"):
            ec.connect(f"{UNREACHABLE}?schema={quote(schema, safe='')}&connect_timeout=1")


def test_migrate_command_refuses_a_schema_name_with_dollars(capsys):
    pytest.importorskip("psycopg")
    assert main(["migrate", "--dsn", UNREACHABLE, "--schema", "a$$b"]) == 2
    assert "schema must be" in capsys.readouterr().err


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _url_with(dsn: str, **query) -> str:
    """`dsn` with parameters added to its query string (values percent-encoded)."""
    parts = urlsplit(dsn)
    extra = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


ODD_SCHEMAS = [
    'Ev"il \'; DROP TABLE events; --',
    "Mixed Case ünï 名前 🙂 \\ {s} {} ?:/#&=",
    "x" * 63,
    "é" * 31 + "x",  # 63 bytes
]


@pytest.fixture
def odd_schema(request, pg_dsn):
    yield request.param
    _drop_schema(pg_dsn, request.param)


@pytest.mark.parametrize("odd_schema", ODD_SCHEMAS, ids=["quotes-sql", "unicode-spaces", "63-ascii", "63-bytes"],
                         indirect=True)
def test_odd_schema_names_work_end_to_end(pg_dsn, odd_schema, tmp_path, capsys):
    """Migrations, both append paths, COPY (batch and ingest), commands, projections with a checkpoint,
    dead letters and LISTEN, and the CLI, in a schema whose name needs quoting."""
    schema = odd_schema
    store = ec.connect(pg_dsn, schema=schema)
    try:
        assert store.schema_version() >= 3
        store.append([ec.emit("s-1", Said("one"))], {"s-1": ec.NO_STREAM})
        threads = [threading.Thread(target=lambda k=k: store.append([ec.emit(f"g-{k}", Said("group"))]))
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        store.append_batch([ec.emit("s-1", Said("batch")), ec.emit("s-2", Said("batch"))])
        store.ingest([("s-2", Said("ingest")), ("s-3", Said("poison"))], batch_size=1)
        assert ec.execute(store, WriteNote(ec.StreamId("s-3"), "command")).stream_versions == {"s-3": 2}
        assert [e.data.text for e in store.read_stream("s-1")] == ["one", "batch"]
        assert len(list(store.read_all(stream_prefix="g-"))) == 8

        def handle(event, ctx):
            if event.data.text == "poison":
                raise ValueError("poison")
            ctx.connection.execute("SELECT 1")  # the read model's own statement, in the batch transaction

        proj = ec.Projector("odd", handle, types=[Said], on_error="skip")
        ec.run_projection(store, proj, until_caught_up=True)
        assert [d.stream_id for d in ec.dead_letters(store, "odd")] == ["s-3"]
        assert ec.projection_status(store, "odd")[0].pending == 0

        # Live: a poll interval far beyond the deadline, so only a NOTIFY on the schema's channel wakes it.
        live_seen = []
        live = ec.Projector("live", lambda e, ctx: live_seen.append(e.data.text), types=[Said])
        runner = ec.ProjectionRunner(store, live, poll_interval=600).start()
        try:
            wait_until(lambda: runner.leading.is_set() and runner.caught_up.is_set(), "the live projector")
            store.append([ec.emit("s-4", Said("live"))])
            wait_until(lambda: "live" in live_seen, "the NOTIFY-woken projector")
        finally:
            runner.stop()
            runner.join(DEADLINE)
    finally:
        store.close()
    url = _url_with(pg_dsn, schema=schema)
    capsys.readouterr()
    assert main(["status", "--dsn", url]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith("OK")
    assert main(["tail", "--dsn", url, "--prefix", "s-4"]) == 0
    assert [json.loads(x)["data"] for x in capsys.readouterr().out.splitlines()] == [{"text": "live"}]


def test_long_schema_names_never_share_a_schema(pg_dsn):
    """Names of 63 bytes that differ in their last character are distinct schemas (nothing is truncated)."""
    names = ["é" * 31 + "a", "é" * 31 + "b", "y" * 62 + "a", "y" * 62 + "b"]
    stores = []
    try:
        for n in names:
            stores.append(ec.connect(pg_dsn, schema=n, pool_size=1))
        for n, s in zip(names, stores):
            s.append([ec.emit("only", Said(n))])
        for n, s in zip(names, stores):
            assert [e.data.text for e in s.read_all()] == [n]
    finally:
        for s in stores:
            s.close()
        for n in names:
            _drop_schema(pg_dsn, n)


# -- 3. the least-privilege role (PostgreSQL) ------------------------------------------------------------


@pytest.fixture
def app_role(pg_dsn, pg_schema):
    """(URL, role name) of a role with only `least_privilege_grants` on a schema the admin migrated."""
    import psycopg
    from psycopg import sql

    from eventcore.stores.postgres import least_privilege_grants

    ec.connect(pg_dsn, schema=pg_schema, pool_size=1).close()  # the owner migrates
    role, password = f"app_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        for statement in least_privilege_grants(pg_schema, role):
            admin.execute(statement)
    try:
        yield _url_as(pg_dsn, role, password), role
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_least_privilege_role_runs_the_whole_application(app_role, pg_schema, capsys):
    import psycopg

    url, role = app_role
    with psycopg.connect(url, autocommit=True) as conn:  # really that role, without superuser powers
        assert conn.execute("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user"
                            ).fetchone() == (role, False)
    app = ec.connect(url, schema=pg_schema, migrate=False)
    single = ec.connect(url, schema=pg_schema, migrate=False, group_commit=False)
    try:
        single.append([ec.emit("lp-a", Said("alone"))], {"lp-a": ec.NO_STREAM})
        app.append([ec.emit("lp-a", Said("grouped")), ec.emit("lp-b", Said("grouped"))], {"lp-a": 1})
        errors: list = []

        def writer(k):
            try:
                for j in range(5):
                    app.append([ec.emit(f"lp-t{k}", Said(f"{j}"))])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert errors == []
        with pytest.raises(ec.ConcurrencyError):
            app.append([ec.emit("lp-a", Said("stale"))], {"lp-a": 1})
        app.append_batch([ec.emit("lp-c", Said("copy")), ec.emit("lp-a", Said("copy"))])
        assert app.ingest([("lp-d", Said("ingest")), ("lp-d", Said("poison"))], resume_key="lp-ingest").events == 2
        assert app.ingest([("lp-d", Said("ingest")), ("lp-d", Said("poison"))], resume_key="lp-ingest").skipped == 2
        first = ec.execute(app, WriteNote(ec.StreamId("lp-e"), "command"), idempotency_key="lp-cmd")
        again = ec.execute(app, WriteNote(ec.StreamId("lp-e"), "command"), idempotency_key="lp-cmd")
        assert again.replayed and again.events == first.events
        assert [e.data.text for e in single.read_stream("lp-a")] == ["alone", "grouped", "copy"]
        assert {k: len(v) for k, v in app.read_streams(["lp-b", "lp-d"]).items()} == {"lp-b": 1, "lp-d": 2}
        assert app.stream_versions(["lp-a", "lp-t3"]) == {"lp-a": 3, "lp-t3": 5}
        assert len(list(app.read_all(types=[Said], stream_prefix="lp-t"))) == 40

        seen = []

        def handle(event, ctx):
            if event.data.text == "poison":
                raise ValueError("poison")
            seen.append(event.position)

        proj = ec.Projector("lp-proj", handle, types=[Said], on_error="skip")
        ec.run_projection(app, proj, until_caught_up=True)
        ec.run_projection(app, proj, until_caught_up=True, rebuild=True)  # checkpoint reset, dead letters cleared
        [dead] = ec.dead_letters(app, "lp-proj")
        assert dead.stream_id == "lp-d"
        [status] = ec.projection_status(app, "lp-proj")
        assert (status.pending, status.dead_letters) == (0, 1)

        live_seen = []
        live = ec.Projector("lp-live", lambda e, ctx: live_seen.append(e.data.text), types=[Said])
        runner = ec.ProjectionRunner(app, live, poll_interval=600).start()  # only a NOTIFY wakes it in time
        try:
            wait_until(lambda: runner.leading.is_set() and runner.caught_up.is_set(), "the live projector")
            app.append([ec.emit("lp-f", Said("live"))])
            wait_until(lambda: "live" in live_seen, "the NOTIFY-woken projector")
            app.append_batch([ec.emit("lp-f", Said("live copy"))])  # COPY as the role fires the NOTIFY trigger
            wait_until(lambda: "live copy" in live_seen, "a NOTIFY after a COPY")
        finally:
            runner.stop()
            runner.join(DEADLINE)
        assert app.health().ok
    finally:
        app.close()
        single.close()
    cli_url = _url_with(url, schema=pg_schema)
    capsys.readouterr()
    assert main(["status", "--dsn", cli_url]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith("OK")
    assert main(["projections", "--dsn", cli_url]) == 0
    assert main(["tail", "--dsn", cli_url, "--prefix", "lp-f"]) == 0
    assert [json.loads(x)["data"]["text"] for x in capsys.readouterr().out.splitlines()[-2:]] == ["live", "live copy"]


#: What the application role must not do ({s}: its schema, {o}: another eventcore schema it has no grants on).
FORBIDDEN = [
    "UPDATE {s}.events SET type = 'x'",
    "DELETE FROM {s}.events",
    "TRUNCATE {s}.events",
    "UPDATE {s}.streams SET version = 0",
    "INSERT INTO {s}.streams VALUES ('forged', 99)",
    "DELETE FROM {s}.streams",
    "DELETE FROM {s}.projection_checkpoints",
    "TRUNCATE {s}.projection_dead_letters",
    "INSERT INTO {s}.command_keys (key, first_position, event_count) VALUES ('forged', 1, 1)",
    "UPDATE {s}.command_keys SET first_position = 1",
    "DELETE FROM {s}.command_keys",
    "DELETE FROM {s}.ingest_progress",
    "INSERT INTO {s}.schema_migrations (version, description) VALUES (99, 'forged')",
    "DELETE FROM {s}.schema_migrations",
    "CREATE TABLE {s}.evil (x int)",
    "CREATE FUNCTION {s}.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "DROP TABLE {s}.events",
    "ALTER TABLE {s}.events DISABLE TRIGGER events_are_immutable",
    "DROP TRIGGER events_are_immutable ON {s}.events",
    "ALTER FUNCTION {s}.append_group(jsonb) SECURITY INVOKER",
    "CREATE OR REPLACE FUNCTION {s}.reject_event_change() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'",
    "SELECT {s}.lock_streams(ARRAY['x'], ARRAY[true])",
    "SELECT count(*) FROM {o}.events",
    "INSERT INTO {o}.events (position, stream_id, version, event_id, type, data) "
    "VALUES (1, 'x', 1, gen_random_uuid(), 't', '{{}}')",
    "UPDATE {o}.projection_checkpoints SET position = 0",
    "SELECT * FROM {o}.append_group('{{\"n\": 0, \"g\": []}}')",
]


@pytest.fixture
def other_schema(pg_dsn):
    name = f"t_{uuid.uuid4().hex[:12]}"
    ec.connect(pg_dsn, schema=name, pool_size=1).close()
    yield name
    _drop_schema(pg_dsn, name)


def test_least_privilege_role_cannot_rewrite_history_or_change_the_schema(app_role, pg_schema, other_schema):
    import psycopg
    from psycopg import sql

    url, role = app_role
    app = ec.connect(url, schema=pg_schema, migrate=False)
    try:
        app.append([ec.emit("h-1", Said("kept"))])
        ec.execute(app, WriteNote(ec.StreamId("h-2"), "kept"), idempotency_key="h-key")
        ec.run_projection(app, ec.Projector("h-proj", lambda e, ctx: None), until_caught_up=True)
        before = _envelopes(app.read_all())
    finally:
        app.close()
    not_refused = []  # (statement, what happened) for each that was not refused for lack of privilege
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in FORBIDDEN:
            query = sql.SQL(statement).format(s=sql.Identifier(pg_schema), o=sql.Identifier(other_schema))
            try:
                conn.execute(query)
                not_refused.append((statement, "succeeded"))
            except psycopg.errors.InsufficientPrivilege:
                pass
            except psycopg.Error as exc:
                not_refused.append((statement, f"{type(exc).__name__}: {exc}"))
    assert not_refused == []
    app = ec.connect(url, schema=pg_schema, migrate=False)
    try:
        assert _envelopes(app.read_all()) == before
        assert ec.projection_status(app, "h-proj")[0].position == before[-1][2]
    finally:
        app.close()


def test_least_privilege_role_cannot_insert_events_around_the_append_functions(app_role, pg_schema):
    """The role needs INSERT on events for the batch writer's COPY; the database (migration 4's
    statement trigger) refuses any row that does not fill a slot reserve_append reserved in the
    same transaction, so that INSERT right writes nothing else."""
    import psycopg
    from psycopg import sql

    url, _ = app_role
    s = sql.Identifier(pg_schema)
    insert = sql.SQL("INSERT INTO {}.events (position, stream_id, version, event_id, type, data) "
                     "VALUES ({}, %s, %s, gen_random_uuid(), 'sectest.Said', '{{\"text\": \"x\"}}')")
    own_range = sql.SQL("(pg_current_xact_id()::text::bigint << 20) + 1")
    app = ec.connect(url, schema=pg_schema, migrate=False)
    try:
        app.append([ec.emit("owned", Said(text="real"))])
        with psycopg.connect(url) as conn:
            for position, stream, version in [
                (sql.Literal(1), "forged", 7),      # below every reader's cursor, no head
                (own_range, "forged", 1),           # its own range, but nothing reserved
                (own_range, "owned", 2),            # past the stream's head
                (sql.Literal(1), "owned", 1),       # a version already taken
                (own_range, "owned", 1),            # the same, in its own range
            ]:
                with pytest.raises(psycopg.Error):
                    with conn.transaction():
                        conn.execute(insert.format(s, position), (stream, version))
            # A reservation, then a row outside the reserved position range: refused too.
            with pytest.raises(psycopg.Error, match="not the slots reserve_append reserved"):
                with conn.transaction():
                    conn.execute(sql.SQL("SELECT {}.reserve_append(%s, %s, %s, %s)").format(s),
                                 (["forged"], [ec.NO_STREAM], [1], 1))
                    conn.execute(insert.format(s, sql.Literal(5)), ("forged", 1))
            # Half of a reservation: refused (the rows must be exactly the reserved versions).
            with pytest.raises(psycopg.Error, match="not the slots reserve_append reserved"):
                with conn.transaction():
                    conn.execute(sql.SQL("SELECT {}.reserve_append(%s, %s, %s, %s)").format(s),
                                 (["holed"], [ec.NO_STREAM], [2], 2))
                    conn.execute(insert.format(s, own_range), ("holed", 1))
        assert app.stream_version("forged") == 0 and app.stream_version("owned") == 1
        # The role's own batch writer and ingest (COPY into reserved slots) still work.
        app.append_batch([ec.emit("batch", Said(text=str(i))) for i in range(50)])
        app.ingest([("ingested", Said(text=str(i))) for i in range(50)], batch_size=20)
        assert app.stream_version("batch") == 50 and app.stream_version("ingested") == 50
    finally:
        app.close()



def test_least_privilege_role_cannot_reserve_versions_it_never_writes(app_role, pg_schema):
    """reserve_append records what it reserved; a deferred check at COMMIT refuses a transaction that
    did not write it (migration 4), so the head can never run ahead of the stream's events."""
    import psycopg
    from psycopg import sql

    url, _ = app_role
    s = sql.Identifier(pg_schema)
    app = ec.connect(url, schema=pg_schema, migrate=False)
    try:
        app.append([ec.emit("gap", Said("v1"))])
        with psycopg.connect(url) as conn:
            with pytest.raises(psycopg.Error, match="its events were not written"):
                with conn.transaction():  # versions 2 and 3 reserved, nothing written, then commit
                    conn.execute(sql.SQL("SELECT {}.reserve_append(%s, %s, %s, %s)").format(s),
                                 (["gap"], [ec.ANY], [2], 2))
        app.append([ec.emit("gap", Said("next"))])
        assert [e.version for e in app.read_stream("gap")] == [1, 2]
    finally:
        app.close()


# -- 4. passwords -------------------------------------------------------------------------------------------

PASSWORD = "S3cr3t-pw"


def _everything_said_about(exc: BaseException) -> str:
    """The error as a user or a log could see it: message, repr, the traceback with its whole chain,
    and the error pickled (e.g. sent back from a worker process) and unpickled."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    try:
        data = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an error that cannot be pickled shows nothing that way
        data = b""
    texts.append(data.decode("latin-1"))
    if data:
        again = pickle.loads(data)
        texts += [str(again), repr(again)]
    return "\n".join(texts)


def _assert_hidden(text: str, password: str = PASSWORD) -> None:
    for form in {password, quote(password, safe="")}:
        assert form not in text, text


@pytest.mark.parametrize("url, options", [
    (f"postgresql://app:{PASSWORD}@127.0.0.1:1/db", {}),
    (f"postgresql://app@127.0.0.1:1/db?password={PASSWORD}", {}),
    (f"postgresql://app@127.0.0.1:1/db?sslpassword={PASSWORD}", {}),
    (f"postgresql://app:{PASSWORD}@127.0.0.1:1/db?bogus=1", {}),  # libpq refuses the parameter
    (f"postgresql://app:{PASSWORD}%zz@127.0.0.1:1/db", {}),  # libpq quotes the invalid percent-encoded token
    (f"postgresql://app:{PASSWORD}@[::1/db", {}),  # malformed host
    (f"postgresql://app:{PASSWORD}@127.0.0.1:1/db", {"pool_size": "many"}),
    (f"postgresq://app:{PASSWORD}@127.0.0.1:1/db", {}),  # a typo in the scheme
    (f"host=127.0.0.1 port=1 user=app password={PASSWORD}", {}),  # libpq's key=value form
    ("postgresql://app@127.0.0.1:1/db", {"password": PASSWORD}),  # not an option: refused by name
], ids=["userinfo", "query", "sslpassword", "bad-param", "bad-percent", "bad-host", "bad-option", "scheme-typo",
        "keyword-form", "keyword-option"])
def test_password_is_not_shown_when_connecting_fails(url, options, caplog):
    pytest.importorskip("psycopg")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ec.EventCoreError) as info:
        ec.connect(url, connect_timeout=1, **options)
    _assert_hidden(_everything_said_about(info.value))
    _assert_hidden(caplog.text)



@pytest.mark.parametrize("dsn", [
    f"postgresql://app:{PASSWORD}%zz@127.0.0.1:1/db",
    f"host=127.0.0.1 port=1 password={PASSWORD} bogus=1",
    f"host=127.0.0.1 port=1 password {PASSWORD}",  # no '=': libpq quotes the words around it
    f"host=127.0.0.1 port=1 password='{PASSWORD}",  # unterminated quote
], ids=["bad-percent", "keyword-bad-param", "keyword-no-equals", "keyword-open-quote"])
def test_password_is_not_shown_when_a_store_is_made_from_a_bad_dsn(dsn, caplog):
    """PostgresStore(dsn) directly (no URL parsing first): refused before its pool tries to connect and
    logs libpq's message at every attempt."""
    postgres = pytest.importorskip("eventcore.stores.postgres")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ec.ValidationError) as info:
        postgres.PostgresStore(dsn, connect_timeout=1)
    _assert_hidden(_everything_said_about(info.value))
    _assert_hidden(caplog.text)

def test_pgpassword_is_not_shown_when_connecting_fails(monkeypatch, caplog):
    pytest.importorskip("psycopg")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ec.StoreUnavailableError) as info:
        ec.connect("postgresql://app@127.0.0.1:1/db", connect_timeout=1)
    _assert_hidden(_everything_said_about(info.value))
    _assert_hidden(caplog.text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _password_checked(admin_dsn: str, url_as) -> bool:
    """Whether the server behind `url_as(user, password)` refuses a wrong password."""
    import psycopg
    from psycopg import sql

    probe = f"probe_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right'").format(sql.Identifier(probe)))
    try:
        psycopg.connect(url_as(probe, "wrong"), connect_timeout=5).close()
        return False
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(probe)))


@pytest.fixture(scope="module")
def password_server(pg_dsn):
    """url_as(user, password) -> URL of a server that checks passwords over TCP, and a superuser role
    (user, password) on it. The test server when it checks them (CI's); else a private cluster listening
    on 127.0.0.1 with scram-sha-256 for TCP (the test cluster is Unix-socket and trust only)."""
    import psycopg
    from psycopg import sql

    cluster = None
    admin = pg_dsn

    def url_as(user, password):
        return _url_as(pg_dsn, user, password)

    if not _password_checked(admin, url_as):
        from eventcore.testing.pgcluster import TemporaryCluster

        port = _free_port()
        cluster = TemporaryCluster(settings={"listen_addresses": "'127.0.0.1'", "port": port,
                                             "max_connections": 60})
        cluster.start()
        hba = cluster.dir / "data" / "pg_hba.conf"
        hba.write_text(f"host all all 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        admin = f"postgresql://postgres@/postgres?host={cluster.dir}&port={port}"

        def url_as(user, password):
            return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/postgres"

        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: _password_checked(admin, url_as), "pg_hba.conf to be reloaded")
    user = f"pw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(user), sql.Literal(PASSWORD)))
    try:
        yield url_as, user
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (user,))
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(user)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))
        if cluster is not None:
            cluster.stop()


def test_wrong_password_is_not_shown(password_server, caplog):
    url_as, user = password_server
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + PASSWORD
    with pytest.raises(ec.StoreUnavailableError) as info:
        ec.connect(url_as(user, wrong), connect_timeout=1)
    assert "password authentication failed" in str(info.value)  # a real authentication failure, said so
    _assert_hidden(_everything_said_about(info.value), wrong)
    _assert_hidden(caplog.text, wrong)


@pytest.mark.parametrize("where", ["userinfo", "query", "PGPASSWORD"])
def test_password_of_an_open_store_is_shown_nowhere(password_server, where, monkeypatch, caplog, pg_schema):
    url_as, user = password_server
    url = url_as(user, PASSWORD)
    if where == "query":
        url = _url_with(_url_as(url, user, None), password=PASSWORD)
    elif where == "PGPASSWORD":
        url = _url_as(url, user, None)
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
    caplog.set_level(logging.DEBUG)
    collector = ec.MetricsCollector()
    store = ec.connect(url, schema=pg_schema, metrics=collector)
    try:
        store.append([ec.emit("pw-1", Said("x"))])
        ec.execute(store, WriteNote(ec.StreamId("pw-2"), "y"))
        ec.run_projection(store, ec.Projector("pw-proj", lambda e, ctx: None), until_caught_up=True)
        health = store.health()
        assert health.ok
        shown = [repr(store), str(store), store.url, repr(health), json.dumps(health.as_dict()),
                 repr(collector.gauges()), json.dumps(collector.summary(), default=str), collector.format_summary(),
                 repr(ec.projection_status(store))]
    finally:
        store.close()
    assert user in store.url  # the URL is shown, just not its password
    for text in shown:
        _assert_hidden(text)
    _assert_hidden(caplog.text)
    # The schema is the test's own; the module's superuser role owns it, so drop it here.
    _drop_schema(url_as(user, PASSWORD), pg_schema)


#: The commands that connect; status also through EVENTCORE_DSN (the other way a DSN comes in).
CLI_COMMANDS = [
    (["status"], True),
    (["status", "--json"], False),
    (["tail"], False),
    (["ingest", "{lines}", "--no-progress"], False),
    (["bench", "deposit", "--backend", "postgres", "--ops", "3", "--no-progress"], False),
]


def _run_cli(runs: list) -> list:
    """Run `eventcore` once per (args, dsn, via_env), all at the same time; the (returncode, stdout + stderr) of each."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "EVENTCORE_DSN")}
    procs = []
    for args, dsn, via_env in runs:
        argv = [sys.executable, "-m", "eventcore", *args] + ([] if via_env else ["--dsn", dsn])
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**env, "EVENTCORE_DSN": dsn} if via_env else env))
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=DEADLINE * 2)
        finally:
            proc.kill()
        out.append((proc.returncode, stdout + stderr))
    return out


def test_cli_never_prints_the_password(password_server, tmp_path):
    """The commands that connect, the URL in --dsn (in EVENTCORE_DSN for status): with the right password
    (the commands run), a wrong one (authentication fails) and an unreachable server."""
    url_as, user = password_server
    schema = f"t_{uuid.uuid4().hex[:12]}"
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"stream": "c-1", "type": "sectest.Said", "data": {"text": "x"}}\n')
    urls = {"right": _url_with(url_as(user, PASSWORD), schema=schema),
            "wrong": _url_with(url_as(user, "wrong-" + PASSWORD), schema=schema, connect_timeout=1),
            "unreachable": f"postgresql://{user}:{PASSWORD}@127.0.0.1:1/db?connect_timeout=1"}
    try:
        # The schema first (the monitoring commands do not create it), then everything else at once.
        first = [(["migrate"], urls["right"], False)]
        then = [(["migrate"], urls[kind], False) for kind in ("wrong", "unreachable")]
        then += [(["projections"], urls["right"], False)]
        then += [([a.format(lines=lines) for a in args], url, via_env) for args, via_env in CLI_COMMANDS
                 for url in urls.values()]
        for (args, dsn, via_env), (returncode, output) in zip(first + then, _run_cli(first) + _run_cli(then)):
            kind = next(k for k, u in urls.items() if u == dsn)
            assert (returncode == 0) == (kind == "right"), (kind, args, via_env, output)
            _assert_hidden(output)
    finally:
        _drop_schema(url_as(user, PASSWORD), schema)


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["migrate"], ["tail"], ["projections"]])
def test_cli_never_echoes_a_dsn_in_libpq_key_value_form(args, capsys, caplog):
    """Not a URL, so refused; the refusal must not quote the string, which holds the password."""
    caplog.set_level(logging.DEBUG)
    assert main([*args, "--dsn", f"host=127.0.0.1 port=1 user=app password={PASSWORD}"]) != 0
    captured = capsys.readouterr()
    _assert_hidden(captured.out + captured.err)
    _assert_hidden(caplog.text)


@pytest.mark.parametrize("name", ["a b.db", "a'b\".db", "a;b--.db", "ünï 名前.db", "a%20b.db", "a#b.db", "a\\b.db"])
def test_sqlite_paths_with_odd_characters_open_that_very_file(tmp_path, name):
    folder = tmp_path / "dir 'q' ünï;%#"
    folder.mkdir()
    path = folder / name
    store = ec.connect(f"sqlite:///{path}")
    try:
        store.append([ec.emit("s", Said("x"))])
        assert store.path == str(path)
    finally:
        store.close()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(name + "-")) == [name]


def test_least_privilege_role_connects_with_the_default_migrate_to_a_current_schema(app_role, pg_schema):
    """migrate=True (the default) on a schema already current runs no DDL, so the application's role,
    which may not create schemas, connects without being told migrate=false."""
    url, _ = app_role
    with ec.connect(url, schema=pg_schema) as app:
        app.append([ec.emit("lp-default", Said("hello"))])
        assert [e.data for e in app.read_stream("lp-default")] == [Said("hello")]


def test_an_upgraded_schema_grants_its_application_role_the_new_tables(pg_dsn, pg_schema):
    """A deployment at schema version 3 whose application role got the grants of that time: migrating
    to the current version grants it what the new tables need (idempotency keys, resumable ingest)."""
    import uuid

    from domain import Deposited

    import psycopg
    from psycopg import sql

    import pg_legacy
    from eventcore.stores.postgres import least_privilege_grants
    from pgserver import url_as

    role, password = f"app_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        pg_legacy.make(admin, pg_schema, 3)  # the schema as eventcore 3 left it
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        for statement in least_privilege_grants(pg_schema, role):
            # What version 3 did not have: the tables of migrations 4 and 5, the function of migration 7.
            if not any(name in statement.as_string(admin) for name in ("command_keys", "ingest_progress",
                                                                          "ingest_holes", "append_one",
                                                                          "command_snapshots")):
                admin.execute(statement)
    try:
        ec.connect(pg_dsn, schema=pg_schema).close()  # the owner upgrades
        with ec.connect(url_as(pg_dsn, role, password), schema=pg_schema, migrate=False) as app:
            first = app.append([ec.emit("up", Deposited(amount=1))], idempotency_key="k")
            with pytest.raises(ec.DuplicateCommandError) as info:
                app.append([ec.emit("up", Deposited(amount=1))], idempotency_key="k")
            assert [e.event_id for e in info.value.events] == [e.event_id for e in first]
            items = [("up-ingest", Deposited(amount=i)) for i in range(10)]
            assert app.ingest(items, resume_key="r").events == 10
            assert app.ingest(items, resume_key="r").skipped == 10
            app._save_snapshot("k", "c", 1, '{"up": [1, ""]}', b"\x01", 1)  # migration 9's table
            assert [s.key for s in app.snapshots()] == ["k"] and app.drop_snapshots() == 1
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
