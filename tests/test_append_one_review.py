"""Review of append_one (commit 4638424): checks test_append_one.py does not make.

- parity on malformed arguments whose malformed part comes after the first failing check (append_group
  parses every participant before checking; append_one stops at the first failure);
- every append path at once (append_one with and without idempotency keys and read-only participants,
  append_group through the group committer, reserve_append through append_batch) on a few streams: no
  deadlock, versions 1..n, and within each stream positions rising with versions;
- the application role cannot tamper with append_one nor call another schema's;
- append_one carries the plan settings test_postgres checks for append_group.
"""
from __future__ import annotations

import random
import threading
import uuid

import pytest

import eventcore as ec
from optional import require

psycopg = require("psycopg")
from psycopg import sql  # noqa: E402

from test_append_one import ANY, NO_STREAM, _doc, _ev, _run  # noqa: E402,F401 - one set of helpers


class Noted(ec.Event):
    __event_type__ = "append_one_review.Noted"
    k: int


@pytest.mark.parametrize("argument", [
    # the first participant's check fails; the second's expected version is not a number
    _doc([["a", 5, 1], ["b", "x", 1]], [_ev("a", 1)]),
    # a recorded key; the participant's expected version is not a number
    _doc([["a", "zz", 1]], [_ev("a", 1)], key="k"),
], ids=["after a failing participant", "under a recorded key"])
def test_a_malformed_expected_version_is_refused_whatever_comes_first(pg_dsn, pg_schema, argument):
    """append_group refuses these (22P02: every expected version is parsed before any is checked);
    append_one answers with a conflict (ConcurrencyError / DuplicateCommandError for the client) and
    never reads the malformed value, so the two functions disagree on the same arguments."""
    lone, grouped = pg_schema, pg_schema + "_group"
    try:
        for schema in (lone, grouped):
            ec.connect(pg_dsn, schema=schema).close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            history = _doc([["a", NO_STREAM, 1]], [_ev("a", 1)], key="k")
            assert _run(conn, lone, "append_one", history)[0] == "ok"
            assert _run(conn, grouped, "append_group", history)[0] == "ok"
            assert _run(conn, grouped, "append_group", argument)[0] == "error"
            assert _run(conn, lone, "append_one", argument) == _run(conn, grouped, "append_group", argument)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(grouped)))


def test_every_append_path_at_once_on_shared_streams(pg_dsn, pg_schema):
    """Lone appends (append_one: one stream, several, with a key, with a read-only participant), group
    commits (append_group) and batches (reserve_append) over the same six streams: none deadlocks or
    fails but by ConcurrencyError, each stream's versions are 1..n and its positions rise with them."""
    lone = ec.connect(pg_dsn, schema=pg_schema, pool_size=6, group_commit=False)
    grouped = ec.connect(pg_dsn, schema=pg_schema, pool_size=6)
    streams = [f"p-{k}" for k in range(6)]
    errors = []

    def work(seed):
        rng = random.Random(seed)
        for i in range(30):
            kind = rng.randrange(5)
            chosen = rng.sample(streams, rng.randint(1, 3))
            try:
                if kind == 0:  # append_one, the fast path
                    lone.append([ec.emit(chosen[0], Noted(i))])
                elif kind == 1:  # append_one, general path: a key, and a read-only participant at ANY
                    reader = rng.choice([s for s in streams if s not in chosen])
                    lone.append([ec.emit(s, Noted(i)) for s in chosen], {reader: ANY},
                                idempotency_key=f"key-{seed}-{i}")
                elif kind == 2:  # append_one, several written streams
                    lone.append([ec.emit(s, Noted(i)) for s in chosen])
                elif kind == 3:  # the group committer (append_group when appends meet)
                    grouped.append([ec.emit(s, Noted(i)) for s in chosen])
                else:  # reserve_append + COPY
                    lone.append_batch([ec.emit(s, Noted(i)) for s in chosen])
            except ec.ConcurrencyError:
                pass
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for s in streams:
            events = lone.read_stream(s)
            assert [e.version for e in events] == list(range(1, len(events) + 1)), s
            positions = [e.position for e in events]
            assert positions == sorted(positions), s
    finally:
        lone.close()
        grouped.close()


def test_the_application_role_cannot_tamper_with_append_one(pg_dsn, pg_schema):
    """test_security's FORBIDDEN names append_group only: the same for append_one."""
    from eventcore.stores.postgres import least_privilege_grants
    from pgserver import url_as

    other = pg_schema + "_other"
    role, password = f"app_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for schema in (pg_schema, other):
            ec.connect(pg_dsn, schema=schema).close()
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        for statement in least_privilege_grants(pg_schema, role):
            admin.execute(statement)
    try:
        with psycopg.connect(url_as(pg_dsn, role, password), autocommit=True) as conn:
            s, o = sql.Identifier(pg_schema), sql.Identifier(other)
            assert _run(conn, pg_schema, "append_one", _doc([["a", NO_STREAM, 1]], [_ev("a", 1)]))[0] == "ok"
            for statement in (sql.SQL("ALTER FUNCTION {}.append_one(jsonb) SECURITY INVOKER").format(s),
                              sql.SQL("ALTER FUNCTION {}.append_one(jsonb) RESET search_path").format(s),
                              sql.SQL("SELECT * FROM {}.append_one(%s::jsonb)").format(o)):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement, (_doc([["b", NO_STREAM, 1]], [_ev("b", 1)]),)
                                 if "SELECT" in statement.as_string(conn) else None)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other)))


def test_append_one_has_the_plan_settings_and_rights_of_append_group(pg_dsn, pg_schema):
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = dict((r[0], r[1:]) for r in conn.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig, p.provolatile, "
            "has_function_privilege('public', p.oid, 'EXECUTE') FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname IN ('append_group', 'append_one')", (pg_schema,)).fetchall())
    assert rows["append_one"] == rows["append_group"]
    secdef, config, volatile, public = rows["append_one"]
    assert secdef and volatile == "v" and not public
    assert {"search_path=pg_catalog, pg_temp", "plan_cache_mode=auto", "enable_seqscan=off", "jit=off"} <= set(config)


def _advisory_locks(conn, schema, function, argument):
    """The advisory locks one call holds at its end (key, mode), in a transaction rolled back after."""
    with conn.transaction(force_rollback=True):
        conn.execute(sql.SQL("SELECT * FROM {}.{}(%s::jsonb)").format(
            sql.Identifier(schema), sql.Identifier(function)), (argument,)).fetchall()
        return sorted(conn.execute(
            "SELECT (classid::bigint << 32) | objid::bigint, mode FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid = pg_backend_pid()").fetchall())


@pytest.mark.parametrize("participants, events, key", [
    ([["a", ANY, 0]], [], None),
    ([["a", ANY, 1]], [_ev("a", 1)], None),
    ([["a", ANY, 1]], [_ev("a", 1)], "k"),
    ([["a", ANY, 0]], [_ev("a", 1)], None),  # a written flag that lies: a shared lock, as append_group
    ([["a", ANY, 1], ["b", 0, 0], ["c", ANY, 1]], [_ev("c", 1), _ev("a", 2)], "k"),
    ([[f"s{i}", ANY, i % 2] for i in range(2048)], [_ev("s1", 1)], "k"),
    ([[f"s{i}", ANY, i % 2] for i in range(2049)], [_ev("s1", 1)], "k"),
], ids=["read only", "written", "written with a key", "flag 0 with events", "three and a key",
        "2048 participants", "2049 participants (bulk)"])
def test_append_one_takes_the_locks_append_group_takes(pg_dsn, pg_schema, participants, events, key):
    """test_append_one.py compares results and rows, never locks: the lock set (keys and modes) of
    append_one is append_group's, including the fast path and the bulk path."""
    ec.connect(pg_dsn, schema=pg_schema).close()
    argument = _doc(participants, events, key)
    with psycopg.connect(pg_dsn) as conn:
        assert _advisory_locks(conn, pg_schema, "append_one", argument) == \
            _advisory_locks(conn, pg_schema, "append_group", argument)


@pytest.mark.parametrize("function", ["append_one", "append_group"])
def test_a_read_only_participant_that_moves_while_waiting_for_its_lock_is_a_conflict_under_repeatable_read(
        pg_dsn, pg_schema, function):
    """Pre-existing (append_group too), found reviewing append_one: the heads are read in a statement
    after the locks so that their snapshot is taken after them, which holds in READ COMMITTED only. A
    session whose default_transaction_isolation is repeatable read (a DSN's options, ALTER ROLE/DATABASE
    SET) reads every head in the snapshot of the calling SELECT, taken before the locks: a read-only
    participant that another append moved while this one waited for its lock passes its check (write
    skew; a written stream fails on its (stream_id, version) key instead of reporting a conflict).
    Either refuse such a transaction or report the conflict: never pass the check."""
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert _run(conn, pg_schema, function, _doc([["R", NO_STREAM, 1]], [_ev("R", 1)]))[0] == "ok"
    holder = psycopg.connect(pg_dsn)  # moves R to version 2 and holds its lock until it commits
    try:
        assert _run(holder, pg_schema, function, _doc([["R", 1, 1]], [_ev("R", 1)]))[0] == "ok"
        out = {}

        def reader():
            with psycopg.connect(pg_dsn, autocommit=True,
                                 options="-c default_transaction_isolation=repeatable\\ read") as conn:
                out["r"] = _run(conn, pg_schema, function,
                                _doc([["R", 1, 0], ["W", NO_STREAM, 1]], [_ev("W", 1)]))

        t = threading.Thread(target=reader)
        t.start()
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:  # until the reader waits for R's lock
            for _ in range(200):
                if watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                   ).fetchone()[0]:
                    break
                threading.Event().wait(0.05)
        holder.commit()
        t.join(30)
    finally:
        holder.close()
    result = out["r"]
    assert result[0] == "error" or result[1][0][3] == {"stream_id": "R", "expected": 1, "actual": 2}, result
