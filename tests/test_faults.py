"""Faults with real processes and a real server: what a writer killed with SIGKILL (a process running
commands, or `eventcore ingest`), a PostgreSQL server stopped with `pg_ctl stop -m immediate` (or frozen
with SIGSTOP), a connection lost after COMMIT (a proxy swallows the server's answer) and a statement past
its timeout leave behind, on SQLite and PostgreSQL. The server-stopping tests use a private cluster.

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
import waiting
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
    return waiting.wait_until(cond, f"{what} (seed {SEED})", timeout)


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
        reopened.append([ec.emit("sqlite-reopened", Credited(transfer="probe", amount=0))],
                        {"sqlite-reopened": before})
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
    try:
        wait_until(lambda: ack_count(ack_file) >= min_acks or proc.poll() is not None,
                   f"{min_acks} acknowledgements")
        time.sleep(rng.uniform(0, max_extra_delay))
        assert proc.poll() is None, f"the worker ended before the kill: {proc.communicate()}"
    finally:
        proc.send_signal(signal.SIGKILL)  # also when the test failed: never leave the worker running
        proc.communicate(timeout=WATCHDOG)


def kill_ingest_after(proc, store, target: int, rng) -> None:
    """SIGKILL `eventcore ingest` a random moment after `target` events are committed (a number of
    batches, so the moment does not depend on the machine's speed)."""
    try:
        wait_until(lambda: proc.poll() is not None or event_count(store) >= target, f"{target} events to commit")
        time.sleep(rng.uniform(0, 0.05))
        assert proc.poll() is None, f"the ingest ended before the kill: {proc.communicate()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WATCHDOG)


def finish(proc) -> str:
    try:
        out, err = proc.communicate(timeout=WATCHDOG)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
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


def test_writer_killed_mid_commands_then_rerun_with_keys_applies_each_command_once(durable_store, rng, tmp_path):
    """The killed process's plan is run again from the start by a new process, with the same keys:
    what had committed (acknowledged or not) comes back replayed with its original events, the rest
    is applied, and every transfer ends up in the store exactly once."""
    store = durable_store
    plan = make_plan(rng, "k", 300)
    plan_by_id = {item[0]: item for item in plan}
    name = f"fault-keys-{os.getpid()}"
    proc, ack_file = spawn_transfers(store, plan, tmp_path, name, keys=True)
    kill_after_acks(proc, ack_file, rng, min_acks=20, max_extra_delay=0.1)
    wait_for_backends_gone(store, name)
    acks = read_acks(ack_file)
    before = committed_transfers(store, plan_by_id)
    assert_acks_stored(acks, before)
    check_sqlite_file(store)

    rerun, rerun_acks_file = spawn_transfers(store, plan, tmp_path, name + "-rerun", keys=True)
    assert "done" in finish(rerun)
    rerun_acks = read_acks(rerun_acks_file)
    after = committed_transfers(store, plan_by_id)
    assert set(after) == set(plan_by_id) == set(rerun_acks)
    assert_acks_stored(rerun_acks, after)
    for tid, events in before.items():
        assert [e.event_id for e in after[tid]] == [e.event_id for e in events], f"{tid} applied again"
    assert {tid for tid, ack in rerun_acks.items() if ack["r"]} == set(before), \
        "replayed=True must come back for exactly the transfers committed before the re-run"
    print(f"killed after {len(acks)} acknowledged ({len(before)} committed); the re-run replayed "
          f"{len(before)} and applied {len(plan) - len(before)}")


# -- 2. `eventcore ingest` killed in the middle of a file, then run again ---------------------------


class Item(ec.Event):
    __event_type__ = "faults.Item"
    n: int


INGEST_EVENTS = 40_000
INGEST_BATCH = 4_000
INGEST_STREAMS = 500


def write_ingest_file(path: Path) -> None:
    # Line n goes to stream n % 500 as that stream's version n // 500 + 1.
    with open(path, "w") as f:
        for n in range(INGEST_EVENTS):
            f.write(f'{{"stream": "ing-{n % INGEST_STREAMS}", "type": "faults.Item", "data": {{"n": {n}}}}}\n')


def ingest_command(store, path: Path, name: str, parallel: int) -> list:
    return [sys.executable, "-m", "eventcore", "ingest", str(path), "--dsn", child_url(store, name),
            "--batch-size", str(INGEST_BATCH), "--parallel", str(parallel), "--json", "--no-progress"]


def assert_streams_are_file_prefixes(store, count: int, in_file_order: bool) -> None:
    """The store holds `count` of the file's events, each once, and each stream exactly the first
    events the file has for it; with one lane, also the file's first `count` lines in file order."""
    feed = [(e.stream_id, e.version, e.data.n) for e in store.read_all(types=[Item], page_size=10_000)]
    assert len(feed) == count
    by_stream = defaultdict(list)
    for sid, version, n in feed:
        by_stream[sid].append((version, n))
    for sid, got in by_stream.items():
        s = int(sid.removeprefix("ing-"))
        assert got == [(v, s + INGEST_STREAMS * (v - 1)) for v in range(1, len(got) + 1)], \
            f"stream {sid} is not a prefix of its events in the file"
    if in_file_order:
        assert [n for _, _, n in feed] == list(range(count)), "the committed events are not the file's first lines"


@pytest.mark.parametrize("kind,parallel", [("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2)])
def test_ingest_killed_mid_file_commits_whole_batches_and_resumes_without_duplicates(kind, parallel, request, rng,
                                                                                     tmp_path):
    store = BACKENDS[kind](request)
    request.addfinalizer(store.close)
    data = tmp_path / "events.jsonl"
    write_ingest_file(data)
    name = f"fault-ingest-{os.getpid()}"
    command = ingest_command(store, data, name, parallel)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_ingest_after(proc, store, rng.randint(1, 5) * INGEST_BATCH, rng)
    wait_for_backends_gone(store, name)

    committed = event_count(store)
    print(f"killed after {committed:,} of {INGEST_EVENTS:,} events")
    assert 0 < committed < INGEST_EVENTS
    # Each lane commits whole batches, and none reached the file's end (where a last batch is short).
    assert committed % INGEST_BATCH == 0, f"{committed} events committed: a partial batch is visible"
    assert_streams_are_file_prefixes(store, committed, in_file_order=parallel == 1)
    check_sqlite_file(store)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=WATCHDOG * 2)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["skipped"], summary["events"]) == (committed, INGEST_EVENTS - committed)
    assert_streams_are_file_prefixes(store, INGEST_EVENTS, in_file_order=parallel == 1)


# -- 3. the PostgreSQL server killed under concurrent command load, then restarted -------------------


def pg_ctl(cluster, *args: str) -> None:
    """pg_ctl on a private cluster, as its owner (TemporaryCluster runs the server as `postgres` under root)."""
    cluster._run("pg_ctl", *args, "-D", str(cluster.dir / "data"))


def restart(cluster) -> None:
    pg_ctl(cluster, "start", "-w", "-t", "60", "-l", str(cluster.dir / "server.log"))
    cluster.pid = int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])  # stop() ends this one


class CommandLoad:
    """Threads running transfers on one store, each call recorded: (thread, item, started, ended, outcome).
    Threads numbered `keyed_from` and up run every command under an idempotency key (its transfer id)."""

    def __init__(self, store, threads: int, keyed_from: int) -> None:
        self.store, self.keyed_from = store, keyed_from
        self.calls: list = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, thread: int) -> None:
        rng = random.Random(SEED + thread)
        policy = ec.RetryPolicy(max_retries=20, max_delay=0.05)
        i = 0
        while not self.stopping.is_set():
            i += 1
            source, target = rng.sample(ACCOUNTS, 2)
            item = [f"s{thread}-{i}", source, target, rng.randint(1, 100)]
            started = time.monotonic()
            try:
                outcome = ec.execute(self.store, transfer_command(item), retry=policy,
                                     timeout=KILL_TEST_COMMAND_TIMEOUT,
                                     idempotency_key=item[0] if thread >= self.keyed_from else None)
            except Exception as exc:  # noqa: BLE001 - recorded; the test checks which errors came
                outcome = exc
            with self.lock:
                self.calls.append((thread, item, started, time.monotonic(), outcome))
            if isinstance(outcome, Exception):
                time.sleep(0.02)  # no busy loop against a server that is down

    def snapshot(self) -> list:
        with self.lock:
            return list(self.calls)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(WATCHDOG)
            assert not t.is_alive(), "a command thread hung"


def first_per_thread(calls, n_threads: int, pred) -> dict:
    found: dict = {}
    for call in calls:
        if call[0] not in found and pred(call):
            found[call[0]] = call
    return found if len(found) == n_threads else {}


@pytest.fixture(scope="module")
def module_cluster():
    """A PostgreSQL server of this module's own: the server-kill tests stop it (never the session's)."""
    require("psycopg")
    from eventcore.testing.pgcluster import TemporaryCluster

    try:
        cluster = TemporaryCluster()
        cluster.start()
    except ec.StoreUnavailableError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL server binaries needed: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL server binaries needed: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def private_cluster(module_cluster):
    """The module's cluster, running again after the test whatever the test did to it."""
    yield module_cluster
    if not (module_cluster.dir / "data" / "postmaster.pid").exists():
        restart(module_cluster)


#: Store timeouts of the server-kill test (seconds), and the commands' overall timeout.
KILL_TEST_TIMEOUTS = {"connect_timeout": 2, "pool_timeout": 3, "statement_timeout": 5}
KILL_TEST_COMMAND_TIMEOUT = 5


def test_postgres_server_killed_under_load_fails_fast_recovers_and_keeps_every_success(private_cluster):
    """8 threads run transfers on one store (4 of them under idempotency keys) when the server is
    stopped with `pg_ctl stop -m immediate`; then it is restarted on the same directory and socket."""
    cluster = private_cluster
    n_threads, keyed_from = 8, 4
    store = ec.connect(cluster.dsn, schema="faults_kill", pool_size=n_threads, **KILL_TEST_TIMEOUTS)
    try:
        load = CommandLoad(store, n_threads, keyed_from)
        try:
            wait_until(lambda: sum(isinstance(c[4], ec.ExecutionResult) for c in load.snapshot()) >= 100,
                       "100 commands before the kill")
            killed = time.monotonic()
            pg_ctl(cluster, "stop", "-m", "immediate", "-w", "-t", "30")
            down = time.monotonic()
            # Every thread gets a typed error, promptly: the watchdog fails only a hang.
            errors = wait_until(lambda: first_per_thread(
                load.snapshot(), n_threads, lambda c: c[3] >= killed and isinstance(c[4], Exception)),
                "every command thread to get an error after the server was killed", timeout=30)
            restarting = time.monotonic()
            restart(cluster)
            up = time.monotonic()  # pg_ctl start -w returns a little after the server accepts connections
            # The same store object serves commands again: its pool reconnects by itself.
            recovered = wait_until(lambda: first_per_thread(
                load.snapshot(), n_threads, lambda c: c[2] >= up and isinstance(c[4], ec.ExecutionResult)),
                "every command thread to succeed again after the restart")
        finally:
            load.stop()
        calls = load.snapshot()

        error_after_kill = sorted(c[3] - max(c[2], killed) for c in errors.values())
        recovery = sorted(c[3] - up for c in recovered.values())
        print(f"{len(calls)} calls; pg_ctl stop -m immediate took {down - killed:.2f} s; first error per thread "
              f"{error_after_kill[0]:.2f}..{error_after_kill[-1]:.2f} s after the kill; first success per thread "
              f"{recovery[0]:.2f}..{recovery[-1]:.2f} s after the restart")
        unexpected = [c for c in calls if isinstance(c[4], Exception)
                      and not isinstance(c[4], (ec.StoreUnavailableError, ec.CommandTimeoutError))]
        assert not unexpected, f"errors other than StoreUnavailableError/CommandTimeoutError: {unexpected[:3]}"
        assert not [c for c in calls if down <= c[2] and c[3] <= restarting and isinstance(c[4], ec.ExecutionResult)], \
            "a command succeeded while the server was down"

        plan_by_id = {c[1][0]: c[1] for c in calls}
        stored = committed_transfers(store, plan_by_id)
        successes = {c[1][0]: c[4] for c in calls if isinstance(c[4], ec.ExecutionResult)}
        assert_acks_stored({tid: {"e": [[e.event_id.hex, e.stream_id, e.version, e.position] for e in r.events]}
                            for tid, r in successes.items()}, stored)
        failures = [c for c in calls if isinstance(c[4], Exception)]
        for keyed in (False, True):
            mine = [c for c in failures if (c[0] >= keyed_from) is keyed]
            ambiguous = [c for c in mine if c[4].maybe_committed]
            print(f"{'with' if keyed else 'without'} keys: {len(mine)} failed "
                  f"{sorted({type(c[4]).__name__ for c in mine})}, {len(ambiguous)} maybe committed, "
                  f"{sum(c[1][0] in stored for c in ambiguous)} of those committed")
        wrongly_not_written = [c[1][0] for c in failures if not c[4].maybe_committed and c[1][0] in stored]
        assert not wrongly_not_written, f"failed saying nothing was written, but stored: {wrongly_not_written}"

        # Whatever the failure, running the same command with the same key again applies it once.
        keyed_failures = [c[1] for c in failures if c[0] >= keyed_from]
        for item in keyed_failures:
            before = stored.get(item[0])
            result = ec.execute(store, transfer_command(item), idempotency_key=item[0], timeout=30)
            assert result.replayed is (before is not None)
            if before is not None:
                assert [e.event_id for e in result.events] == [e.event_id for e in before]
        stored = committed_transfers(store, plan_by_id)
        assert {item[0] for item in keyed_failures} <= set(stored), "a command run again under its key is missing"
    finally:
        store.close()


def test_postgres_server_killed_mid_ingest_then_the_rerun_completes_the_file_once(private_cluster, rng, tmp_path):
    """`pg_ctl stop -m immediate` while `eventcore ingest` writes: the CLI exits with an error (no hang),
    the committed part is whole batches of the file's start, and after a restart the same command
    finishes the file without writing anything twice."""
    cluster = private_cluster
    with ec.connect(cluster.dsn, schema="faults_ingest") as store:
        data = tmp_path / "events.jsonl"
        write_ingest_file(data)
        command = ingest_command(store, data, "fault-ingest-server", 1)
        command[command.index("--dsn") + 1] += "&connect_timeout=2&pool_timeout=3&statement_timeout=5"
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            target = rng.randint(1, 5) * INGEST_BATCH
            wait_until(lambda: proc.poll() is not None or event_count(store) >= target, f"{target} events to commit")
            assert proc.poll() is None, f"the ingest ended before the kill: {proc.communicate()}"
            killed = time.monotonic()
            pg_ctl(cluster, "stop", "-m", "immediate", "-w", "-t", "30")
            out, err = proc.communicate(timeout=WATCHDOG)  # the watchdog fails a hang
            exited = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        restart(cluster)
        assert proc.returncode != 0
        summary = json.loads(out)
        assert summary["error"], summary
    with ec.connect(cluster.dsn, schema="faults_ingest") as store:
        committed = event_count(store)
        print(f"server killed after {committed:,} events; the CLI exited {exited:.2f} s later: {summary['error']}")
        assert committed % INGEST_BATCH == 0, f"{committed} events committed: a partial batch is visible"
        assert committed <= INGEST_EVENTS
        assert_streams_are_file_prefixes(store, committed, in_file_order=True)
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=WATCHDOG * 2)
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert (summary["skipped"], summary["events"]) == (committed, INGEST_EVENTS - committed)
        assert_streams_are_file_prefixes(store, INGEST_EVENTS, in_file_order=True)


def server_processes(cluster) -> list:
    out = subprocess.run(["pgrep", "-P", str(cluster.pid)], capture_output=True, text=True).stdout
    return [cluster.pid] + [int(pid) for pid in out.split()]


def test_postgres_frozen_server_is_a_typed_error_not_a_hang(private_cluster):
    cluster = private_cluster
    timeouts = {"connect_timeout": 1, "pool_timeout": 1, "statement_timeout": 1}
    store = ec.connect(cluster.dsn, schema="faults_frozen", pool_size=2, pool_min_size=2, **timeouts)
    outcomes: dict = {}

    def call(name, fn):
        try:
            outcomes[name] = fn()
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcomes[name] = exc

    frozen = server_processes(cluster)
    try:
        store.append([ec.emit("frozen", Credited(transfer="seed", amount=1))])
        wait_until(lambda: store.pool_stats()["size"] == 2, "a connection for each call")
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        calls = [threading.Thread(target=call, args=("read", lambda: store.read_stream("frozen")), daemon=True),
                 threading.Thread(target=call, args=("write", lambda: store.append(
                     [ec.emit("frozen", Debited(transfer="t", amount=1))])), daemon=True)]
        for t in calls:
            t.start()
        # Watchdog: well past every configured timeout (1 s each), it fails only a hang.
        deadline = time.monotonic() + WATCHDOG
        for t in calls:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [name for name, t in zip(("read", "write"), calls) if t.is_alive()]
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        assert not hung, f"{hung} still waiting on a frozen server past every configured timeout ({outcomes})"
        assert isinstance(outcomes["read"], ec.StoreUnavailableError), outcomes["read"]
        assert isinstance(outcomes["write"], ec.StoreUnavailableError), outcomes["write"]
        wait_until(lambda: store.health().ok, "the store to serve again once the server resumed")
    finally:
        for t in calls:
            t.join(WATCHDOG)
        store.close()


# -- 4. the connection lost after COMMIT: the answer never arrives --------------------------------------


class CuttingProxy:
    """A Unix-socket proxy in front of PostgreSQL, to lose a connection at a chosen moment.

    `hold_replies()`: on the connections open now, the server's bytes stop reaching the client (the
    server goes on and commits; the client waits for an answer); `hold_after = message`: the same, on
    the connection that sends `message` next, from that moment. `cut()`: the connections whose replies
    are held are closed, as a network failure would. `refusing`: new connections are closed at once.
    """

    def __init__(self, dsn: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self.params = conninfo_to_dict(dsn)
        host, port = self.params.get("host") or "localhost", int(self.params.get("port") or 5432)
        self.upstream = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") \
            else (socket.AF_INET, (host, port))
        self.dir = tempfile.mkdtemp(prefix="ecproxy-")  # short: a socket path has ~100 bytes
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(f"{self.dir}/.s.PGSQL.5432")
        self.listener.listen(64)
        self.refusing = False
        #: When set, the first connection whose client sends these bytes has its replies held from then on.
        self.hold_after: bytes | None = None
        self.lock = threading.Lock()
        self.pairs: list = []  # [client socket, server socket, replies held?]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        from urllib.parse import quote, urlencode

        p = self.params
        auth = quote(p.get("user", "postgres")) + (f":{quote(p['password'])}" if p.get("password") else "")
        rest = {k: v for k, v in p.items() if k not in ("host", "port", "user", "password", "dbname")}
        query = urlencode({"host": self.dir, "port": 5432, **rest})
        return f"postgresql://{auth}@/{quote(p.get('dbname', 'postgres'))}?{query}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            server = socket.socket(self.upstream[0])
            server.connect(self.upstream[1])
            pair = [client, server, False]
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, 0, 1), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, 1, 0), daemon=True).start()

    def _pump(self, pair, src: int, dst: int) -> None:
        try:
            while True:
                data = pair[src].recv(65536)
                if not data:
                    break
                if src == 1 and pair[2]:
                    continue  # a held reply: swallowed
                marker = self.hold_after
                if src == 0 and marker is not None and marker in data:
                    self.hold_after = None
                    pair[2] = True  # before the server can have answered
                pair[dst].sendall(data)
        except OSError:
            pass
        self._close(pair)

    def _close(self, pair) -> None:
        for s in pair[:2]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def hold_replies(self) -> None:
        with self.lock:
            for pair in self.pairs:
                pair[2] = True

    def cut(self) -> None:
        with self.lock:
            held = [p for p in self.pairs if p[2]]
            self.pairs = [p for p in self.pairs if not p[2]]
        for pair in held:
            self._close(pair)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            self._close(pair)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def proxied(pg_dsn, pg_schema):
    """(store through a CuttingProxy with one pooled connection, the proxy, a direct psycopg connection)."""
    psycopg = require("psycopg")
    proxy = CuttingProxy(pg_dsn)
    store = ec.connect(proxy.url, schema=pg_schema, pool_size=1, pool_timeout=1, connect_timeout=1)
    direct = psycopg.connect(pg_dsn, autocommit=True)
    try:
        yield store, proxy, direct
    finally:
        proxy.refusing = False
        store.close()
        direct.close()
        proxy.close()


def stored_transfer(direct, schema: str, transfer_id: str) -> list:
    from psycopg import sql

    return direct.execute(sql.SQL("SELECT event_id, position FROM {}.events WHERE data->>'transfer' = %s "
                                  "ORDER BY position").format(sql.Identifier(schema)), (transfer_id,)).fetchall()


def lose_the_answer_to_a_commit(store, proxy, direct, schema: str, key, refuse_during_resolution: bool):
    """Run a transfer whose append commits on the server while its answer is lost: the append waits
    on a lock held by `direct`; the proxy then holds the replies, the lock is released, the commit
    happens, and the connection is cut. Returns what execute returned or raised."""
    item = ["amb-1", "amb-src", "amb-dst", 7]
    store.append([ec.emit("amb-src", Credited(transfer="seed", amount=100))])
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = ec.execute(store, transfer_command(item), idempotency_key=key,
                                           retry=ec.RetryPolicy(max_retries=2), timeout=30)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc

    direct.execute("BEGIN")
    direct.execute("SELECT pg_advisory_xact_lock(hashtextextended('amb-src', 0))")  # the append's stream lock
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_until(lambda: direct.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0],
               "the append to wait on the stream's lock")
    proxy.hold_replies()
    direct.execute("ROLLBACK")  # releases the lock: the append commits, its answer is swallowed
    wait_until(lambda: len(stored_transfer(direct, schema, "amb-1")) == 2, "the append to commit")
    proxy.refusing = refuse_during_resolution
    proxy.cut()
    worker.join(WATCHDOG)
    assert not worker.is_alive(), "execute hung after its connection was cut"
    proxy.refusing = False
    return item, outcome


@pytest.mark.parametrize("key", [None, "amb-key-1"], ids=["no-key", "key"])
def test_ambiguous_commit_is_resolved_to_the_original_result(proxied, pg_schema, key):
    """The connection drops after COMMIT; the store finds the events by id and execute returns them."""
    store, proxy, direct = proxied
    item, outcome = lose_the_answer_to_a_commit(store, proxy, direct, pg_schema, key, refuse_during_resolution=False)
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert (result.replayed, result.attempts) == (False, 1)  # resolved by the store itself, not by a retry
    stored = stored_transfer(direct, pg_schema, "amb-1")
    assert [e.event_id for e in result.events] == [row[0] for row in stored]
    assert [e.position for e in result.events] == [row[1] for row in stored]
    if key is not None:
        again = ec.execute(store, transfer_command(item), idempotency_key=key)
        assert again.replayed is True
        assert [e.event_id for e in again.events] == [e.event_id for e in result.events]
        assert [(e.stream_id, e.version, e.position) for e in again.events] == \
            [(e.stream_id, e.version, e.position) for e in result.events]
    assert stored_transfer(direct, pg_schema, "amb-1") == stored, "the transfer was applied twice"
    assert [e.version for e in store.read_stream("amb-dst")] == [1]


def test_ambiguous_commit_unresolved_is_replayed_by_a_rerun_with_its_key(proxied, pg_schema):
    """The store cannot find out whether the commit happened (no connection); running the command
    again with the same key returns the original events instead of applying it twice."""
    store, proxy, direct = proxied
    item, outcome = lose_the_answer_to_a_commit(store, proxy, direct, pg_schema, "amb-key-2",
                                                refuse_during_resolution=True)
    assert isinstance(outcome.get("error"), (ec.StoreUnavailableError, ec.CommandTimeoutError)), outcome
    stored = stored_transfer(direct, pg_schema, "amb-1")
    again = ec.execute(store, transfer_command(item), idempotency_key="amb-key-2")
    assert again.replayed is True
    assert [e.event_id for e in again.events] == [row[0] for row in stored]
    assert [e.position for e in again.events] == [row[1] for row in stored]
    assert stored_transfer(direct, pg_schema, "amb-1") == stored, "the transfer was applied twice"
    assert [e.version for e in store.read_stream("amb-dst")] == [1]


@pytest.mark.parametrize("key", [None, "amb-key-3"], ids=["no-key", "key"])
def test_ambiguous_commit_unresolved_is_reported_as_maybe_committed(proxied, pg_schema, key):
    """When nobody can tell whether the commit happened, the error must not say nothing was written."""
    store, proxy, direct = proxied
    _, outcome = lose_the_answer_to_a_commit(store, proxy, direct, pg_schema, key, refuse_during_resolution=True)
    error = outcome.get("error")
    assert len(stored_transfer(direct, pg_schema, "amb-1")) == 2  # it did commit
    # Under a key, execute retried the ambiguous attempt; its retries failed too (no connection), and
    # their error must still say the first attempt may have committed.
    assert isinstance(error, (ec.StoreUnavailableError, ec.CommandTimeoutError)), repr(error)
    assert error.maybe_committed, repr(error)


#: psycopg ends a transaction with this simple-protocol Query message ('Q', int32 length, text, NUL).
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


def ingest_items(n: int):
    return ((f"ing-{i % INGEST_STREAMS}", Item(n=i)) for i in range(n))


@pytest.mark.parametrize("resolvable", [True, False], ids=["resolved-by-the-store", "resumed-by-a-rerun"])
def test_ingest_batch_whose_commit_answer_is_lost_is_written_once(proxied, pg_schema, resolvable):
    """An ingest batch's COMMIT reaches the server, the answer does not. Either the store finds the batch
    committed and the ingest goes on, or (no connection to ask) the ingest stops and a re-run under the
    same resume key skips that batch: the store holds every item once."""
    store, proxy, direct = proxied
    n, batch = 3_000, 1_000
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = store.ingest(ingest_items(n), batch_size=batch, resume_key="lost-commit")
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    from psycopg import sql

    count = sql.SQL("SELECT count(*) FROM {}.events").format(sql.Identifier(pg_schema))
    proxy.hold_after = COMMIT_MESSAGE  # the first batch's COMMIT: it commits, its answer is swallowed
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_until(lambda: direct.execute(count).fetchone()[0] == batch, "the first batch to commit")
    assert proxy.hold_after is None, "the COMMIT message was not seen"
    proxy.refusing = not resolvable
    proxy.cut()
    worker.join(WATCHDOG)
    assert not worker.is_alive(), "the ingest hung after its connection was cut"
    proxy.refusing = False
    if resolvable:
        assert "error" not in outcome, outcome
        assert (outcome["result"].events, outcome["result"].skipped) == (n, 0)
    else:
        error = outcome["error"]
        assert isinstance(error, ec.IngestError) and error.committed == 0, repr(error)
        assert getattr(error.__cause__, "maybe_committed", False), repr(error.__cause__)
        # The pool reconnects by itself, after its back-off (which may exceed pool_timeout).
        wait_until(lambda: store.health().ok, "the store's pool to reconnect")
        rerun = store.ingest(ingest_items(n), batch_size=batch, resume_key="lost-commit")
        assert (rerun.events, rerun.skipped) == (n - batch, batch)
    assert_streams_are_file_prefixes(store, n, in_file_order=True)


# -- 5. a statement past its timeout: a typed error, nothing written ---------------------------------


def _store_state(store, streams) -> tuple:
    return store.stream_versions(streams), store.head_position(), event_count(store)


def assert_timeout_not_retried(store, command) -> None:
    """execute raises StoreTimeoutError after one attempt, though its policy would allow retries (a
    server too slow for one attempt is not helped by more load)."""
    metrics = ec.MetricsCollector()
    done = []
    metrics.on_command_complete(done.append)
    with pytest.raises(ec.StoreTimeoutError):
        ec.execute(store, command, retry=ec.RetryPolicy(max_retries=5), metrics=metrics)
    assert [info.attempts for info in done] == [1]
    assert metrics.retry_count() == 0


def test_postgres_write_past_statement_timeout_is_typed_and_leaves_nothing(pg_dsn, pg_schema):
    psycopg = require("psycopg")
    store = ec.connect(pg_dsn, schema=pg_schema, statement_timeout=0.2)
    try:
        store.append([ec.emit("to-a", Credited(transfer="seed", amount=1)), ec.emit("to-b", Credited(transfer="seed", amount=1))])
        before = _store_state(store, ["to-a", "to-b"])
        with psycopg.connect(pg_dsn) as blocker:
            # The append's lock on stream to-a (see functions/lock_streams.sql), held as a long writer would.
            blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('to-a', 0))")
            with pytest.raises(ec.StoreTimeoutError):
                store.append([ec.emit("to-a", Debited(transfer="t1", amount=1))], {"to-a": 1})
            assert_timeout_not_retried(store, Transfer(source=ec.StreamId("to-a"), target=ec.StreamId("to-b"),
                                                       amount=1, transfer="t2"))
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


def test_postgres_timeout_of_a_blocked_append_does_not_fail_a_free_append_grouped_with_it(pg_dsn, pg_schema):
    """Group commit writes concurrent appends in one statement. An append whose streams nobody holds
    must not get the StoreTimeoutError of another append that waits on a lock (execute does not retry
    a timeout: the command would fail for another's lock)."""
    psycopg = require("psycopg")
    store = ec.connect(pg_dsn, schema=pg_schema, statement_timeout=1)  # group commit on: the default
    outcomes: dict = {}

    def append(sid: str) -> None:
        try:
            outcomes[sid] = store.append([ec.emit(sid, Credited(transfer=sid, amount=1))])
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcomes[sid] = exc

    def start(sid: str) -> threading.Thread:
        t = threading.Thread(target=append, args=(sid,), daemon=True)
        t.start()
        return t

    def lock_waiters() -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND datname = current_database()").fetchone()[0]

    try:
        with psycopg.connect(pg_dsn) as blocker:
            for sid in ("held-1", "held-2", "held-3"):
                blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (sid,))
            threads = [start("held-1"), start("held-2")]  # both groups in flight, each waiting on a lock
            wait_until(lambda: lock_waiters() == 2, "two appends waiting on their stream locks")
            # The next appends queue for the next group, the free one behind one that will wait too
            # (the queue is read only to order the race; it is not what is checked).
            threads.append(start("held-3"))
            wait_until(lambda: len(store._group._queue) == 1, "the third append to queue")
            threads.append(start("free"))
            wait_until(lambda: len(store._group._queue) == 2, "the free append to queue")
            for t in threads:
                t.join(WATCHDOG)
            blocker.rollback()
        for sid in ("held-1", "held-2", "held-3"):
            assert isinstance(outcomes[sid], ec.StoreTimeoutError), outcomes[sid]
            assert store.stream_version(sid) == 0
        assert not isinstance(outcomes["free"], Exception), f"the free append failed: {outcomes['free']!r}"
        assert store.stream_version("free") == 1
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
            assert_timeout_not_retried(store, Transfer(source=ec.StreamId("tr-a"), target=ec.StreamId("tr-b"),
                                                       amount=1, transfer="t1"))
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
            assert_timeout_not_retried(store, Transfer(source=ec.StreamId("sl-a"), target=ec.StreamId("sl-b"),
                                                       amount=1, transfer="t2"))
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
