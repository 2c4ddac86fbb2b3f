"""Commands on PostgreSQL through eventcore.aio on one event loop, against the threaded sync API, in one session.

* cmd_aio_*_t{n}     `await eca.execute(...)` from n tasks (1, 64, 256) on one event loop: each task
                     takes the next op index from one shared counter, so every op is done once;
* cmd_threads_*_c{n} `ec.execute(...)` from n threads (1, 8, 16), split the same way (conftest.run_split);
                     thread 1 is the benchmark's own.

OPS = EVENTCORE_BENCH_OPS (default 1,000) operations over 100 accounts (opening balance 10**9), medians of
3 rounds, each round in a fresh schema on the same cluster: the workloads of bench/test_commands.py
(deposit: op i deposits 1 into account i % 100; transfer: op i moves 1 between the i-th pair of
conftest.transfer_pairs). Both APIs run with the store's defaults (group commit, the exact command
cache) and `retry=ec.RetryPolicy(max_retries=50, base_delay=0.001, max_delay=0.05)`; the pool is
opened whole in setup, `pool_size = pool_min_size = POOL_SIZE` (16) for every contender, so the one
with more workers than connections queues for them, in the pool.

Printed per contender: ops/s (OPS / the median round), p50/p95/p99 latency of one execute (all
rounds' commands, nearest rank), and the client's CPU per command (time.process_time() over the timed
rounds / their ops: this whole process, event loop or threads plus the pool's own). Ratios, same run:
tasks vs threads at 1 vs 1, 64 vs 8 and 256 vs 16, in throughput (aio's ops/s over the threads') and
in CPU per command (the threads' over aio's: above 1 is less CPU per command through asyncio).

Untimed: setup (schema, store, the 100 AccountOpened events) and, after each round, the check of
test_commands (every account's versions gap-free and as many as the plan says, the money total).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict

import pytest

import eventcore as ec
import eventcore.aio as eca
from eventcore.bench.workloads import AccountOpened, DepositMoney, MoneyWithdrawn, TransferMoney

from conftest import FIGURES, MEDIANS, RATIOS, record, run_split, transfer_pairs
from test_commands import ACCOUNTS, OPENING_BALANCE, OPS, RETRY, _check

#: Tasks on the event loop, and the threads each is compared with (same index).
TASKS = (1, 64, 256)
THREADS = (1, 8, 16)
#: Connections of every contender's pool: the threaded API's largest thread count.
POOL_SIZE = 16


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _accounts() -> list[ec.StreamId]:
    return [ec.StreamId(f"acct-{k}") for k in range(ACCOUNTS)]


def _command(workload: str, accounts, pairs, i: int) -> ec.Command:
    if workload == "deposit":
        return DepositMoney(accounts[i % ACCOUNTS], 1)
    a, b = pairs[i]
    return TransferMoney(accounts[a], accounts[b], 1)


def _opening(accounts):
    return [ec.emit(a, AccountOpened(OPENING_BALANCE)) for a in accounts], {a: ec.NO_STREAM for a in accounts}


def _check_feed(workload, pairs, accounts, events) -> None:
    """test_commands' check of a round, on the events of the whole feed."""
    versions, total = defaultdict(list), 0
    for e in events:
        versions[e.stream_id].append(e.version)
        data = e.data
        if type(data) is AccountOpened:
            total += data.initial_balance
        elif type(data) is MoneyWithdrawn:
            total -= data.amount
        else:
            total += data.amount
    _check(workload, pairs, [str(a) for a in accounts], versions, total)


def _percentile(latencies: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds (as `eventcore bench` reports them)."""
    data = sorted(latencies)
    rank = max(1, min(len(data), int(-(-q * len(data) // 100))))
    return data[rank - 1] * 1000.0


class _Measure:
    """What the rounds of one contender measured, beyond the time pytest-benchmark keeps."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.cpu_s = 0.0
        self.ops = 0
        self.retried = 0

    def report(self, name: str, what: str, benchmark) -> None:
        record(name, benchmark)
        cpu_per_op = self.cpu_s / self.ops
        MEDIANS[f"cpu_{name}"] = cpu_per_op
        p50, p95, p99 = (_percentile(self.latencies, q) for q in (50, 95, 99))
        benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, pool_size=POOL_SIZE, retries_all_rounds=self.retried,
                                    p50_ms=p50, p95_ms=p95, p99_ms=p99, client_cpu_us_per_op=cpu_per_op * 1e6)
        FIGURES[f"{what} ({ec.__impl__}): ops/s"] = (
            OPS / MEDIANS[name],
            f"ops/s   p50 {p50:.2f}  p95 {p95:.2f}  p99 {p99:.2f} ms   CPU {cpu_per_op * 1e6:,.0f} µs/op")


@pytest.mark.benchmark(group="aio-commands")
@pytest.mark.parametrize("tasks", TASKS, ids=lambda n: f"t{n}")
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_aio(benchmark, pg_dsn, fresh_schema, workload, tasks):
    pairs = transfer_pairs(OPS, ACCOUNTS)
    loop = asyncio.new_event_loop()
    measure = _Measure()
    pending = []  # the store of the round last set up: checked and closed before the next one, or at the end

    async def check_and_close(store, accounts):
        try:
            _check_feed(workload, pairs, accounts, [e async for e in store.read_all()])
        finally:
            await store.aclose()

    def finish():
        while pending:
            loop.run_until_complete(check_and_close(*pending.pop()))

    async def open_round():
        store = await eca.connect(pg_dsn, schema=fresh_schema(), pool_size=POOL_SIZE, pool_min_size=POOL_SIZE)
        accounts = _accounts()
        pending.append((store, accounts))
        await store.append(*_opening(accounts))
        return store, accounts

    def setup():
        finish()
        return loop.run_until_complete(open_round()), {}

    async def round_(store, accounts):
        counter = itertools.count()
        perf = time.perf_counter

        async def worker():
            latencies, retried = [], 0
            for i in counter:
                if i >= OPS:
                    break
                t0 = perf()
                result = await eca.execute(store, _command(workload, accounts, pairs, i), retry=RETRY)
                latencies.append(perf() - t0)
                retried += result.attempts - 1
            measure.latencies.extend(latencies)
            measure.retried += retried

        await asyncio.gather(*(worker() for _ in range(tasks)))

    def run(store, accounts):
        cpu0 = time.process_time()
        loop.run_until_complete(round_(store, accounts))
        measure.cpu_s += time.process_time() - cpu0
        measure.ops += OPS

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        finish()
    finally:
        for store, _ in pending:
            loop.run_until_complete(store.aclose())
        loop.close()
    measure.report(f"cmd_aio_{workload}_t{tasks}",
                   f"{workload}, eventcore.aio, {_plural(tasks, 'task')} on one loop", benchmark)


@pytest.mark.benchmark(group="aio-commands")
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"c{n}")
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_threads(benchmark, pg_dsn, fresh_schema, workload, threads):
    pairs = transfer_pairs(OPS, ACCOUNTS)
    measure = _Measure()
    pending = []

    def finish():
        while pending:
            store, accounts = pending.pop()
            try:
                _check_feed(workload, pairs, accounts, store.read_all())
            finally:
                store.close()

    def setup():
        finish()
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=POOL_SIZE, pool_min_size=POOL_SIZE)
        accounts = _accounts()
        pending.append((store, accounts))
        store.append(*_opening(accounts))
        return (store, accounts), {}

    def run(store, accounts):
        perf = time.perf_counter
        latencies = [[] for _ in range(threads)]
        retried = [0] * threads

        def op(worker, i):
            t0 = perf()
            result = ec.execute(store, _command(workload, accounts, pairs, i), retry=RETRY)
            latencies[worker].append(perf() - t0)
            retried[worker] += result.attempts - 1

        cpu0 = time.process_time()
        run_split(threads, OPS, op)
        measure.cpu_s += time.process_time() - cpu0
        measure.ops += OPS
        measure.latencies.extend(itertools.chain.from_iterable(latencies))
        measure.retried += sum(retried)

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        finish()
    finally:
        for store, _ in pending:
            store.close()
    measure.report(f"cmd_threads_{workload}_c{threads}", f"{workload}, ec.execute, {_plural(threads, 'thread')}",
                   benchmark)


for _workload in ("deposit", "transfer"):
    for _tasks, _threads in zip(TASKS, THREADS):
        _aio, _sync = f"cmd_aio_{_workload}_t{_tasks}", f"cmd_threads_{_workload}_c{_threads}"
        _pair = f"{_workload}, {_plural(_tasks, 'task')} vs {_plural(_threads, 'thread')}"
        RATIOS.append((f"{_pair}: ops/s, aio over threads", _aio, _sync, "none set"))
        RATIOS.append((f"{_pair}: CPU per command, threads over aio", f"cpu_{_aio}", f"cpu_{_sync}", "none set"))
