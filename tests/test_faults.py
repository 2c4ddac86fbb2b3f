"""Faults with real processes and a real server: what a writer killed with SIGKILL, a PostgreSQL server
stopped with `pg_ctl stop -m immediate`, a connection lost after COMMIT and a statement past its timeout
leave behind.

The invariants checked after every fault: no partial batch and no half-applied multi-stream command is
visible; every command the store acknowledged is present exactly once (with the event ids, versions
and positions it was acknowledged with); stream versions are gap-free; money is conserved; a re-run
with the same idempotency keys (or the same ingest) applies nothing twice. Timings are measured and
printed (`-s`), never asserted; a generous watchdog fails only on a hang.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

import eventcore as ec
from conftest import BACKENDS
from fault_worker import Credited, Debited, Transfer, transfer_command
from optional import require

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fault_worker.py"
#: Bounds a hang, never a speed: every wait in this file gives up (and fails) after this long.
WATCHDOG = 60.0
ACCOUNTS = [f"acct-{i}" for i in range(12)]
SEED = int(os.environ.get("EVENTCORE_FAULT_SEED", random.randrange(1 << 30)))


def wait_until(cond, what: str, timeout: float = WATCHDOG):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (seed {SEED})")
        time.sleep(0.01)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_store(request):
    s = BACKENDS[request.param](request)
    yield s
    s.close()


@pytest.fixture
def rng(request):
    # Printed so a failing run can be replayed with EVENTCORE_FAULT_SEED.
    print(f"\n{request.node.name}: EVENTCORE_FAULT_SEED={SEED}")
    return random.Random(SEED)


# -- talking to the store behind the library's back ---------------------------------------------------


def child_url(store, application_name: str | None = None) -> str:
    """A URL another process can open the same store with; on PostgreSQL its connections carry
    `application_name`, so the test can wait until the server has finished with them."""
    if store.scheme == "sqlite":
        return store.url
    dsn = store._dsn
    url = f"{dsn}{'&' if '?' in dsn else '?'}schema={store.schema}"
    return url + (f"&application_name={application_name}" if application_name else "")


def raw_rows(store, query: str, params=()) -> list:
    """Rows of `query` ({events} stands for the events table) on a connection of the test's own."""
    if store.scheme == "postgresql":
        psycopg = require("psycopg")
        from psycopg import sql

        table = sql.SQL("{}.events").format(sql.Identifier(store.schema))
        with psycopg.connect(store._dsn, autocommit=True) as conn:
            return conn.execute(sql.SQL(query).format(events=table), params).fetchall()
    with sqlite3.connect(store.path) as conn:
        return conn.execute(query.format(events="events"), params).fetchall()


def event_count(store) -> int:
    return raw_rows(store, "SELECT count(*) FROM {events}")[0][0]


def wait_for_backends_gone(store, application_name: str) -> None:
    """A killed client's backend may still be finishing a statement (and commit it): wait for it, so
    what the checks read is final."""
    if store.scheme != "postgresql":
        return
    psycopg = require("psycopg")
    with psycopg.connect(store._dsn, autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = %s",
                                        (application_name,)).fetchone()[0],
                   f"the killed process's backends ({application_name}) to end")


def check_sqlite_file(store) -> None:
    """The file a killed writer left: SQLite's own consistency check passes, and it opens and takes writes."""
    if store.scheme != "sqlite":
        return
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with ec.connect(store.url) as reopened:
        before = reopened.stream_version("sqlite-reopened")
        reopened.append([ec.emit("sqlite-reopened", Credited(transfer="probe", amount=0))], {"sqlite-reopened": before})
        assert reopened.stream_version("sqlite-reopened") == before + 1


# -- transfers: the plan, the acknowledgements, the invariants ----------------------------------------


def make_plan(rng, prefix: str, n: int) -> list:
    plan = []
    for i in range(n):
        source, target = rng.sample(ACCOUNTS, 2)
        plan.append([f"{prefix}-{i}", source, target, rng.randint(1, 100)])
    return plan


def read_acks(path: Path) -> dict:
    """transfer id -> ack. A line cut short by the kill was never a complete acknowledgement."""
    if not path.exists():
        return {}
    acks = {}
    for line in path.read_bytes().split(b"\n"):
        if line:
            try:
                ack = json.loads(line)
            except ValueError:
                continue
            assert ack["t"] not in acks, f"transfer {ack['t']} acknowledged twice"
            acks[ack["t"]] = ack
    return acks


def ack_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def committed_transfers(store, plan_by_id: dict) -> dict:
    """transfer id -> its stored events, after checking every invariant of the whole store:
    each transfer whole (one debit on its source, one credit on its target, consecutive
    positions) or absent, versions gap-free, money conserved."""
    events = list(store.read_all())
    positions = [e.position for e in events]
    assert positions == sorted(set(positions)), "feed positions not strictly increasing"
    by_transfer = defaultdict(list)
    by_stream = defaultdict(list)
    for e in events:
        by_stream[e.stream_id].append(e.version)
        if isinstance(e.data, (Debited, Credited)) and e.data.transfer in plan_by_id:
            by_transfer[e.data.transfer].append(e)
    for sid, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), f"versions of {sid} not gap-free: {versions}"
        assert [e.version for e in store.read_stream(sid)] == versions
    balance = 0
    for tid, stored in by_transfer.items():
        _, source, target, amount = plan_by_id[tid]
        assert [(type(e.data), e.stream_id, e.data.amount) for e in stored] == \
            [(Debited, source, amount), (Credited, target, amount)], f"transfer {tid} half-applied or duplicated"
        assert stored[1].position == stored[0].position + 1, f"transfer {tid}'s events not one atomic write"
        balance += sum(e.data.amount if isinstance(e.data, Credited) else -e.data.amount for e in stored)
    assert balance == 0, "money not conserved"
    return dict(by_transfer)


def assert_acks_stored(acks: dict, stored: dict) -> None:
    """Every acknowledged transfer is in the store exactly once, as acknowledged."""
    for tid, ack in acks.items():
        assert tid in stored, f"acknowledged transfer {tid} is missing"
        assert [[e.event_id.hex, e.stream_id, e.version, e.position] for e in stored[tid]] == ack["e"], \
            f"transfer {tid} stored differently from its acknowledgement"


def spawn_transfers(store, plan: list, tmp: Path, name: str, keys: bool = False, threads: int = 4):
    plan_file, ack_file = tmp / f"{name}.plan.json", tmp / f"{name}.acks.jsonl"
    plan_file.write_text(json.dumps(plan))
    args = [sys.executable, str(WORKER), child_url(store, name), str(plan_file), str(ack_file),
            "--threads", str(threads)] + (["--keys"] if keys else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ack_file


def kill_after_acks(proc, ack_file: Path, rng, min_acks: int, max_extra_delay: float) -> None:
    """SIGKILL the worker a random moment after it acknowledged `min_acks` transfers, with commands
    in flight (the worker must still be running: it had more of the plan to do)."""
    wait_until(lambda: ack_count(ack_file) >= min_acks or proc.poll() is not None, f"{min_acks} acknowledgements")
    time.sleep(rng.uniform(0, max_extra_delay))
    assert proc.poll() is None, f"the worker ended before the kill: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(WATCHDOG)
    proc.stdout.close()
    proc.stderr.close()


def finish(proc) -> str:
    out, err = proc.communicate(timeout=WATCHDOG)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}): {err}"
    return out


# -- 1. a writer killed in the middle of a stream of multi-stream commands ---------------------------


def test_writer_killed_mid_commands_leaves_whole_commands_and_every_ack(durable_store, rng, tmp_path):
    store = durable_store
    plan_by_id: dict = {}
    acked: dict = {}
    for round_ in range(3):  # three kills at random moments; the store must stay whole after each
        plan = make_plan(rng, f"r{round_}", 20_000)  # far more than runs before the kill
        plan_by_id.update((item[0], item) for item in plan)
        name = f"fault-kill-{round_}-{os.getpid()}"
        proc, ack_file = spawn_transfers(store, plan, tmp_path, name)
        kill_after_acks(proc, ack_file, rng, min_acks=20, max_extra_delay=0.3)
        wait_for_backends_gone(store, name)
        acks = read_acks(ack_file)
        acked.update(acks)
        stored = committed_transfers(store, plan_by_id)
        assert_acks_stored(acked, stored)
        # Commands in flight at the kill may have committed without an ack; never more than the threads.
        assert len(stored) - len(acked) <= 4 * (round_ + 1)
        print(f"round {round_}: {len(acks)} acknowledged, {len(stored) - len(acked)} committed unacknowledged")
        check_sqlite_file(store)


# -- 5. a statement past its timeout: a typed error, nothing written ---------------------------------


def _store_state(store, streams) -> tuple:
    return store.stream_versions(streams), store.head_position(), event_count(store)


def test_postgres_write_past_statement_timeout_is_typed_and_leaves_nothing(pg_dsn, pg_schema):
    psycopg = require("psycopg")
    store = ec.connect(pg_dsn, schema=pg_schema, statement_timeout=0.2)
    try:
        store.append([ec.emit("to-a", Credited(transfer="seed", amount=1)), ec.emit("to-b", Credited(transfer="seed", amount=1))])
        before = _store_state(store, ["to-a", "to-b"])
        with psycopg.connect(pg_dsn) as blocker:
            # The append's lock on stream to-a (see pg_sql.lock_streams), held as a long writer would.
            blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('to-a', 0))")
            with pytest.raises(ec.StoreTimeoutError):
                store.append([ec.emit("to-a", Debited(transfer="t1", amount=1))], {"to-a": 1})
            with pytest.raises(ec.StoreTimeoutError):
                ec.execute(store, Transfer(source=ec.StreamId("to-a"), target=ec.StreamId("to-b"), amount=1,
                                           transfer="t2"), retry=ec.RetryPolicy(max_retries=5))
            with pytest.raises(ec.IngestError) as info:
                store.ingest([("to-a", Debited(transfer="t3", amount=1))] * 3)
            assert isinstance(info.value.__cause__, ec.StoreTimeoutError)
            assert info.value.committed == 0
            assert _store_state(store, ["to-a", "to-b"]) == before
            blocker.rollback()
        assert _store_state(store, ["to-a", "to-b"]) == before
        result = ec.execute(store, Transfer(source=ec.StreamId("to-a"), target=ec.StreamId("to-b"), amount=1,
                                            transfer="t4"))
        assert result.stream_versions == {"to-a": 2, "to-b": 2}
    finally:
        store.close()


def test_postgres_read_past_statement_timeout_is_typed(pg_dsn, pg_schema):
    psycopg = require("psycopg")
    from psycopg import sql

    store = ec.connect(pg_dsn, schema=pg_schema, statement_timeout=0.2)
    try:
        store.append([ec.emit("tr-a", Credited(transfer="seed", amount=1))])
        before = _store_state(store, ["tr-a", "tr-b"])
        with psycopg.connect(pg_dsn) as blocker:
            blocker.execute(sql.SQL("LOCK TABLE {}.events IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(pg_schema)))
            for read in (lambda: store.read_stream("tr-a"), lambda: store.read_streams(["tr-a", "tr-b"]),
                         lambda: list(store.read_all()), store.head_position):
                with pytest.raises(ec.StoreTimeoutError):
                    read()
            with pytest.raises(ec.StoreTimeoutError):
                ec.execute(store, Transfer(source=ec.StreamId("tr-a"), target=ec.StreamId("tr-b"), amount=1,
                                           transfer="t1"), retry=ec.RetryPolicy(max_retries=5))
            blocker.rollback()
        assert _store_state(store, ["tr-a", "tr-b"]) == before
        assert [e.version for e in store.read_stream("tr-a")] == [1]
    finally:
        store.close()


def test_sqlite_write_lock_held_past_timeout_is_typed_and_leaves_nothing(tmp_path):
    path = tmp_path / "events.db"
    store = ec.connect(f"sqlite:///{path}?timeout=0.2")
    try:
        store.append([ec.emit("sl-a", Credited(transfer="seed", amount=1))])
        before = _store_state(store, ["sl-a", "sl-b"])
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # the database write lock, held by another connection
            with pytest.raises(ec.StoreTimeoutError):
                store.append([ec.emit("sl-a", Debited(transfer="t1", amount=1))], {"sl-a": 1})
            with pytest.raises(ec.StoreTimeoutError):
                ec.execute(store, Transfer(source=ec.StreamId("sl-a"), target=ec.StreamId("sl-b"), amount=1,
                                           transfer="t2"), retry=ec.RetryPolicy(max_retries=5))
            with pytest.raises(ec.IngestError) as info:
                store.ingest([("sl-a", Debited(transfer="t3", amount=1))] * 3)
            assert isinstance(info.value.__cause__, ec.StoreTimeoutError)
            assert [e.version for e in store.read_stream("sl-a")] == [1]  # WAL: reads go on meanwhile
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert _store_state(store, ["sl-a", "sl-b"]) == before
        result = ec.execute(store, Transfer(source=ec.StreamId("sl-a"), target=ec.StreamId("sl-b"), amount=1,
                                            transfer="t4"))
        assert result.stream_versions == {"sl-a": 2, "sl-b": 1}
    finally:
        store.close()
