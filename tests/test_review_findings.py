"""Defects found by the review of idempotency keys, resumable ingest and the client-side deadline.

Each test states the promised behaviour; each failed before its fix (they were strict xfails).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import eventcore as ec
from domain import Deposited
from eventcore.stores.prepare import prepare_append


def _cli_ingest(db: str, path: str) -> None:
    subprocess.run([sys.executable, "-m", "eventcore", "ingest", "--dsn", f"sqlite:///{db}", path,
                    "--no-progress", "--batch-size", "2"], capture_output=True, text=True, timeout=60)


def _line(i: int) -> str:
    return '{"stream": "s", "type": "T", "data": {"i": %d}}\n' % i


def test_cli_rerun_on_a_small_file_that_grew_writes_only_the_new_lines(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines(_line(i) for i in range(3))
    _cli_ingest(db, path)
    with open(path, "a") as f:
        f.write(_line(3))
    _cli_ingest(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 4


def test_cli_rerun_after_fixing_the_bad_line_writes_each_line_once(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines([_line(0), _line(1), _line(2), '{"stream": "s", "type": "T", "data": {"i": 3}\n', _line(4)])
    _cli_ingest(db, path)  # stops at line 4: the batch of lines 1-2 is committed
    with open(path) as f:
        text = f.read().replace('"i": 3}\n', '"i": 3}}\n')
    with open(path, "w") as f:
        f.write(text)
    _cli_ingest(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 5


def test_resumed_ingest_with_expected_finishes():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(5)]

    def killed_after(n):
        for i, item in enumerate(items):
            if i == n:
                raise RuntimeError("killed")
            yield item

    with pytest.raises(RuntimeError):
        store.ingest(killed_after(4), batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    store.ingest(items, batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    assert store.stream_version("a") == 5


def test_two_overlapping_runs_under_one_resume_key_write_each_item_once():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(6)]
    second_done = threading.Event()
    first_reading = threading.Event()  # set once the first run has read the recorded progress

    def first_input():
        first_reading.set()
        for i, item in enumerate(items):
            if i == 2:
                second_done.wait(30)
            yield item

    outcome: list = []

    def run_first():
        try:
            outcome.append(store.ingest(first_input(), batch_size=2, resume_key="r"))
        except ec.IngestError as exc:
            outcome.append(exc)

    first = threading.Thread(target=run_first)
    first.start()
    assert first_reading.wait(30)
    try:
        outcome.append(store.ingest(items, batch_size=2, resume_key="r"))
    except ec.IngestError as exc:
        outcome.append(exc)
    finally:
        second_done.set()
    first.join(30)
    assert not first.is_alive()
    # Whichever run's batch came second on a lane was refused (nothing of it written); the other
    # finished, or a rerun finishes: every item once.
    refused = [o for o in outcome if isinstance(o, ec.IngestError)]
    assert len(refused) == 1 and "must not overlap" in str(refused[0]), outcome
    store.ingest(items, batch_size=2, resume_key="r")
    assert [e.data.amount for e in store.read_stream("a")] == list(range(6))


def test_group_member_with_the_key_of_a_refused_member_is_written(pg_dsn, pg_schema):
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit("s1", Deposited(amount=1, balance=1))])
        refused = prepare_append([ec.emit("s1", Deposited(amount=2, balance=2))], {"s1": ec.NO_STREAM}, None)
        refused.key = "K"
        valid = prepare_append([ec.emit("s2", Deposited(amount=3, balance=3))], None, None)
        valid.key = "K"
        out = store._append_group([refused, valid])
        assert isinstance(out[0], ec.ConcurrencyError)
        assert not isinstance(out[1], BaseException), out[1]  # now: DuplicateCommandError('K'), events None
        assert store.recorded_command("K") is not None


def test_a_forked_child_never_shuts_the_parents_connections(pg_dsn, pg_schema):
    import psycopg

    with ec.connect(pg_dsn, schema=pg_schema, statement_timeout=1, pool_size=1, pool_min_size=1) as store:
        store.head_position()
        slow = threading.Thread(target=lambda: store._fetch("SELECT pg_sleep(0.8)", ()))
        slow.start()
        time.sleep(0.2)  # the parent's call is in flight (registered with the watchdog) when it forks
        pid = os.fork()
        if pid == 0:
            try:
                with psycopg.connect(pg_dsn) as own:  # the child's first watched call of its own
                    store._watchdog.done(store._watchdog.watch(own))
                time.sleep(4)  # past the parent's call's deadline (1 s + 2 s margin)
            finally:
                os._exit(0)
        slow.join()
        os.waitpid(pid, 0)
        assert store.head_position() >= 0  # now: StoreUnavailableError, server closed the connection


def test_an_upgraded_schema_grants_its_application_role_the_new_tables(pg_dsn, pg_schema):
    """A deployment at schema version 3 whose application role got the grants of that time: migrating
    to the current version grants it what the new tables need (idempotency keys, resumable ingest)."""
    import uuid

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
            if not any(table in statement.as_string(admin) for table in ("command_keys", "ingest_progress",
                                                                            "ingest_holes")):
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
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
