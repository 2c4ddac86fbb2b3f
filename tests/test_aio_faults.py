"""Faults under the asyncio API (eventcore.aio), with real processes and a real server: a writer process
running `await eca.execute(...)` killed with SIGKILL, the PostgreSQL server stopped and restarted under
a running asyncio store, and the store's connections terminated by the server mid-append.

The invariants are test_faults.py's (and checked by its helpers): no half-applied multi-stream command
is visible, every acknowledged command is stored exactly once as acknowledged, versions are gap-free,
money is conserved, a failure that says nothing was written wrote nothing, and a re-run under the same
idempotency keys applies nothing twice. The PostgreSQL tests wait for eventcore.aio.postgres.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import eventcore as ec
import eventcore.aio as eca
import test_faults
from fault_worker import transfer_command
from optional import require
from test_faults import (
    ACCOUNTS, KILL_TEST_TIMEOUTS, SEED, WATCHDOG, assert_acks_stored, check_sqlite_file, child_url,
    committed_transfers, finish, kill_after_acks, make_plan, pg_ctl, read_acks, restart, wait_for_backends_gone,
)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "aio_fault_worker.py"

# test_faults' fixtures: a store of each durable backend (sync, to check what the asyncio writer left),
# the seeded random source, and a PostgreSQL server of this module's own that tests may stop.
durable_store = test_faults.durable_store
rng = test_faults.rng
module_cluster = test_faults.module_cluster
private_cluster = test_faults.private_cluster


def _need_aio_postgres() -> None:
    if importlib.util.find_spec("eventcore.aio.postgres") is None:
        pytest.skip("eventcore.aio.postgres (AsyncPostgresStore) is not in this build yet")


@pytest.fixture(scope="module")
def aio_postgres():
    """Skips before a server is started for nothing (module scope: set up before module_cluster)."""
    _need_aio_postgres()


@pytest.fixture
def store(durable_store):
    """A durable store (sync: the checks read through it) whose database an asyncio writer can open."""
    if durable_store.scheme == "postgresql":
        _need_aio_postgres()
    return durable_store


def spawn_async_transfers(store, plan: list, tmp: Path, name: str, keys: bool = False, tasks: int = 4):
    plan_file, ack_file = tmp / f"{name}.plan.json", tmp / f"{name}.acks.jsonl"
    plan_file.write_text(json.dumps(plan))
    args = [sys.executable, str(WORKER), child_url(store, name), str(plan_file), str(ack_file),
            "--tasks", str(tasks)] + (["--keys"] if keys else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    return proc, ack_file


# -- a writer process on the asyncio API, killed -----------------------------------------------------------


def test_async_writer_killed_mid_commands_leaves_whole_commands_and_every_ack(store, rng, tmp_path):
    plan_by_id: dict = {}
    acked: dict = {}
    for round_ in range(2):  # two kills at random moments; the store must stay whole after each
        plan = make_plan(rng, f"a{round_}", 20_000)  # far more than runs before the kill
        plan_by_id.update((item[0], item) for item in plan)
        name = f"aio-fault-kill-{round_}-{os.getpid()}"
        proc, ack_file = spawn_async_transfers(store, plan, tmp_path, name)
        kill_after_acks(proc, ack_file, rng, min_acks=20, max_extra_delay=0.3)
        wait_for_backends_gone(store, name)
        acks = read_acks(ack_file)
        acked.update(acks)
        stored = committed_transfers(store, plan_by_id)
        assert_acks_stored(acked, stored)
        # Commands in flight at the kill may have committed without an ack; never more than the tasks.
        assert len(stored) - len(acked) <= 4 * (round_ + 1)
        print(f"round {round_}: {len(acks)} acknowledged, {len(stored) - len(acked)} committed unacknowledged")
        check_sqlite_file(store)


def test_async_writer_killed_then_rerun_with_keys_applies_each_command_once(store, rng, tmp_path):
    plan = make_plan(rng, "ak", 300)
    plan_by_id = {item[0]: item for item in plan}
    name = f"aio-fault-keys-{os.getpid()}"
    proc, ack_file = spawn_async_transfers(store, plan, tmp_path, name, keys=True)
    kill_after_acks(proc, ack_file, rng, min_acks=20, max_extra_delay=0.1)
    wait_for_backends_gone(store, name)
    acks = read_acks(ack_file)
    before = committed_transfers(store, plan_by_id)
    assert_acks_stored(acks, before)
    check_sqlite_file(store)

    rerun, rerun_acks_file = spawn_async_transfers(store, plan, tmp_path, name + "-rerun", keys=True)
    assert "done" in finish(rerun)
    rerun_acks = read_acks(rerun_acks_file)
    after = committed_transfers(store, plan_by_id)
    assert set(after) == set(plan_by_id) == set(rerun_acks)
    assert_acks_stored(rerun_acks, after)
    for tid, events in before.items():
        assert [e.event_id for e in after[tid]] == [e.event_id for e in events], f"{tid} applied again"
    assert {tid for tid, ack in rerun_acks.items() if ack["r"]} == set(before), \
        "replayed=True must come back for exactly the transfers committed before the re-run"


# -- PostgreSQL: the server and its connections taken away under a running asyncio store --------------------------


class AsyncLoad:
    """Tasks running transfers on one asyncio store, each call recorded: (task, item, started, ended, outcome).
    Tasks numbered `keyed_from` and up run every command under an idempotency key (its transfer id)."""

    def __init__(self, store, tasks: int, keyed_from: int, prefix: str = "s") -> None:
        self.store, self.keyed_from, self.prefix = store, keyed_from, prefix
        self.calls: list = []
        self.stopping = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(t)) for t in range(tasks)]

    async def _run(self, task: int) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(SEED + task)
        policy = ec.RetryPolicy(max_retries=20, max_delay=0.05)
        i = 0
        while not self.stopping.is_set():
            i += 1
            source, target = rng.sample(ACCOUNTS, 2)
            item = [f"{self.prefix}{task}-{i}", source, target, rng.randint(1, 100)]
            started = loop.time()
            try:
                outcome = await eca.execute(self.store, transfer_command(item), retry=policy, timeout=5,
                                            idempotency_key=item[0] if task >= self.keyed_from else None)
            except Exception as exc:  # noqa: BLE001 - recorded; the test checks which errors came
                outcome = exc
            self.calls.append((task, item, started, loop.time(), outcome))
            if isinstance(outcome, Exception):
                await asyncio.sleep(0.02)  # no busy loop against a server that is down

    def ok(self) -> int:
        return sum(isinstance(c[4], ec.ExecutionResult) for c in self.calls)

    def first_per_task(self, pred) -> dict:
        found: dict = {}
        for call in self.calls:
            if call[0] not in found and pred(call):
                found[call[0]] = call
        return found if len(found) == len(self.tasks) else {}

    async def stop(self) -> None:
        self.stopping.set()
        done, _ = await asyncio.wait(self.tasks, timeout=WATCHDOG)
        assert len(done) == len(self.tasks), "a command task hung"


async def until(cond, what: str, timeout: float = WATCHDOG):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert loop.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what} (seed {SEED})"
        await asyncio.sleep(0.01)


def check_calls(url: str, schema: str, calls: list, keyed_from: int) -> None:
    """What test_faults checks of a command load after a fault, on a sync store of the same schema: every
    success stored as returned, every command whole or absent, failures typed, a failure that said nothing
    was written never stored, and each failed keyed command, run again (through the asyncio API), applied once."""
    unexpected = [c for c in calls if isinstance(c[4], Exception)
                  and not isinstance(c[4], (ec.StoreUnavailableError, ec.CommandTimeoutError))]
    assert not unexpected, f"errors other than StoreUnavailableError/CommandTimeoutError: {unexpected[:3]}"
    plan_by_id = {c[1][0]: c[1] for c in calls}
    with ec.connect(url, schema=schema) as sync:
        stored = committed_transfers(sync, plan_by_id)
        successes = {c[1][0]: c[4] for c in calls if isinstance(c[4], ec.ExecutionResult)}
        assert_acks_stored({tid: {"e": [[e.event_id.hex, e.stream_id, e.version, e.position] for e in r.events]}
                            for tid, r in successes.items()}, stored)
        failures = [c for c in calls if isinstance(c[4], Exception)]
        wrongly_not_written = [c[1][0] for c in failures if not c[4].maybe_committed and c[1][0] in stored]
        assert not wrongly_not_written, f"failed saying nothing was written, but stored: {wrongly_not_written}"
        keyed = [c[1] for c in failures if c[0] >= keyed_from]

        async def rerun():
            async with await eca.connect(url, schema=schema) as store:
                return [await eca.execute(store, transfer_command(item), idempotency_key=item[0], timeout=30)
                        for item in keyed]

        for item, result in zip(keyed, asyncio.run(rerun())):
            before = stored.get(item[0])
            if before is not None:
                assert result.replayed and [e.event_id for e in result.events] == [e.event_id for e in before]
        after = committed_transfers(sync, plan_by_id)
        assert {item[0] for item in keyed} <= set(after), "a command run again under its key is missing"
        print(f"{len(calls)} calls, {len(failures)} failed, "
              f"{sum(bool(c[4].maybe_committed) for c in failures)} maybe committed, "
              f"{sum(c[1][0] in stored for c in failures)} of the failed committed")


def test_postgres_server_restarted_under_a_running_async_store_recovers(aio_postgres, private_cluster):
    """8 tasks run transfers on one asyncio store (4 under idempotency keys) when the server is stopped
    with `pg_ctl stop -m immediate`; every task gets a typed error promptly, and once the server is
    restarted the same store object serves every task again."""
    _need_aio_postgres()
    cluster = private_cluster
    schema = "aio_faults_kill"

    async def main():
        loop = asyncio.get_running_loop()
        store = await eca.connect(cluster.dsn, schema=schema, pool_size=8, **KILL_TEST_TIMEOUTS)
        try:
            load = AsyncLoad(store, 8, keyed_from=4)
            try:
                await until(lambda: load.ok() >= 100, "100 commands before the kill")
                killed = loop.time()
                await asyncio.to_thread(pg_ctl, cluster, "stop", "-m", "immediate", "-w", "-t", "30")
                down = loop.time()
                await until(lambda: load.first_per_task(lambda c: c[3] >= killed and isinstance(c[4], Exception)),
                            "every task to get an error after the server was killed", timeout=30)
                restarting = loop.time()
                await asyncio.to_thread(restart, cluster)
                up = loop.time()
                await until(lambda: load.first_per_task(
                    lambda c: c[2] >= up and isinstance(c[4], ec.ExecutionResult)),
                    "every task to succeed again after the restart")
            finally:
                await load.stop()
            assert not [c for c in load.calls if down <= c[2] and c[3] <= restarting
                        and isinstance(c[4], ec.ExecutionResult)], "a command succeeded while the server was down"
            return load.calls
        finally:
            await store.aclose()

    calls = asyncio.run(main())
    check_calls(cluster.dsn, schema, calls, keyed_from=4)


def test_connections_terminated_mid_append_leave_every_command_whole_or_absent(aio_postgres, pg_dsn, pg_schema):
    """The server terminates the asyncio store's connections (pg_terminate_backend) again and again while
    8 tasks run transfers, 4 under keys: each command is whole or absent, a failure is maybe_committed
    or wrote nothing, a keyed re-run settles it, and the store serves commands again at the end."""
    _need_aio_postgres()
    psycopg = require("psycopg")
    app = f"aio-term-{os.getpid()}"
    url = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}application_name={app}"
    stop = threading.Event()
    terminated = []

    def terminator():
        rng = random.Random(SEED)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            while not stop.wait(rng.uniform(0.005, 0.03)):
                rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = %s", (app,)).fetchall()
                terminated.append(len(rows))

    async def main():
        store = await eca.connect(url, schema=pg_schema, pool_size=8)
        try:
            load = AsyncLoad(store, 8, keyed_from=4)
            try:
                await until(lambda: load.ok() >= 20, "20 commands before the terminations")
                killer = threading.Thread(target=terminator, daemon=True)
                killer.start()
                try:
                    await asyncio.sleep(2.0)
                finally:
                    stop.set()
                    await asyncio.to_thread(killer.join, WATCHDOG)
                after = load.ok()
                await until(lambda: load.ok() >= after + 20, "commands to succeed again")
            finally:
                await load.stop()
            result = await eca.execute(store, transfer_command(["final", ACCOUNTS[0], ACCOUNTS[1], 1]), timeout=30)
            assert len(result.events) == 2
            return load.calls
        finally:
            await store.aclose()

    calls = asyncio.run(main())
    # The store may absorb a termination (a retry that wrote nothing, an outcome it resolved): then no
    # command fails, and the checks below are about what each of them wrote all the same.
    assert sum(terminated), "no connection was terminated"
    retried = sum(isinstance(c[4], ec.ExecutionResult) and c[4].attempts > 1 for c in calls)
    print(f"\n{sum(terminated)} backends terminated; {retried} commands succeeded after a retry")
    check_calls(url, pg_schema, calls, keyed_from=4)
