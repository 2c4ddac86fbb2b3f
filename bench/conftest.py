"""Benchmark session set-up: one PostgreSQL server for every benchmark, ratios printed at the end.

Run:  python -m pytest bench/ -p no:cacheprovider --benchmark-columns=median,min,max,rounds
(needs `pip install -e '.[bench]'`). PostgreSQL: EVENTCORE_BENCH_DSN, else a throwaway
cluster started from the installed binaries with default durability (fsync on).
EVENTCORE_BENCH_EVENTS scales the ingest benchmarks (default 1,000,000 events).
"""
from __future__ import annotations

import itertools
import os
import platform
import random
import threading
import uuid

import pytest

import eventcore as ec

class Measured(ec.Event):
    """The benchmarks' event: a sensor reading (a short string, a float and an int)."""

    __event_type__ = "bench.Measured"
    sensor: str
    value: float
    seq: int


#: name -> median seconds (or any "lower is better" figure), filled by the benchmarks.
MEDIANS: dict[str, float] = {}
#: name -> (value, unit) for figures that are not timings (throughputs, memory).
FIGURES: dict[str, tuple[float, str]] = {}
#: (label, numerator, denominator, target) ratios of rates: denominator_time / numerator_time.
RATIOS: list[tuple[str, str, str, str]] = []

_cluster = None


@pytest.fixture(scope="session")
def pg_dsn():
    global _cluster
    dsn = os.environ.get("EVENTCORE_BENCH_DSN") or os.environ.get("EVENTCORE_TEST_DSN")
    if dsn:
        yield dsn
        return
    from eventcore.testing.pgcluster import TemporaryCluster

    _cluster = TemporaryCluster(settings={"max_connections": 100})
    yield _cluster.start()
    _cluster.stop()


@pytest.fixture
def fresh_schema(pg_dsn):
    """A new, migrated eventcore schema per call (same table and indexes for every contender)."""
    import psycopg
    from psycopg import sql

    made = []

    def make() -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        ec.connect(pg_dsn, schema=name, pool_size=1).close()
        made.append(name)
        return name

    yield make
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def eventsourcing_env(pg_dsn: str, schema: str, **settings: str) -> dict[str, str]:
    """The `eventsourcing` library's settings for the benchmark server (Unix socket dir or TCP host)."""
    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(pg_dsn)
    user = p.get("user") or os.environ.get("PGUSER") or "postgres"
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": p.get("dbname") or user,
        "POSTGRES_HOST": p.get("host") or "localhost",
        "POSTGRES_PORT": str(p.get("port") or "5432"),
        "POSTGRES_USER": user,
        "POSTGRES_PASSWORD": p.get("password") or "",
        "POSTGRES_SCHEMA": schema,
        **settings,
    }


#: Threads the command benchmarks (test_commands.py, test_peer_commands_eventsourcing.py) split a round over.
CONCURRENCY = (1, 8)


def transfer_pairs(ops: int, accounts: int) -> list[tuple[int, int]]:
    """The transfer workload's plan, the same for every contender and concurrency: for op i, the
    (source, target) account indexes, two distinct picks of random.Random(7)."""
    rng = random.Random(7)
    return [tuple(rng.sample(range(accounts), 2)) for _ in range(ops)]


def run_split(concurrency: int, ops: int, op) -> None:
    """Call op(worker, i) once for each i in range(ops), on `concurrency` threads (worker = 0..concurrency-1).

    The threads take indexes from one shared itertools.count(), so each is done exactly once, in
    roughly increasing order. Concurrency 1 runs in the calling thread; otherwise the threads are
    started and joined here, and the first exception a thread raised is raised again.
    """
    counter = itertools.count()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in counter:
                if i >= ops or errors:
                    return
                op(w, i)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    if concurrency == 1:
        worker(0)
    else:
        threads = [threading.Thread(target=worker, args=(w,), name=f"bench-{w}") for w in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def record(name: str, benchmark) -> None:
    MEDIANS[name] = benchmark.stats.stats.median


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS and not FIGURES:
        return
    tr = terminalreporter
    tr.section("eventcore benchmark summary")
    tr.write_line(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                  f"eventcore impl {ec.__impl__}")
    for name, (value, unit) in FIGURES.items():
        tr.write_line(f"  {name:<68} {value:>14,.1f} {unit}")
    for label, num, den, target in RATIOS:
        if num in MEDIANS and den in MEDIANS and MEDIANS[num] > 0:
            ratio = MEDIANS[den] / MEDIANS[num]
            tr.write_line(f"  {label:<68} {ratio:>14.2f}x   (target {target})")
