"""Commands on long streams, with and without snapshots, against `eventsourcing`'s snapshots, in one session.

One account stream of N events (N = 100, 10,000, 100,000; EVENTCORE_BENCH_SNAPSHOT_SIZES to change),
written untimed; then K deposit commands on it, each timed alone (median reported):

* eventcore, no snapshots    ec.execute with the store's defaults: a stream over 1,000 events is longer
                             than the command cache keeps, so every command reads and folds all N;
* eventcore, snapshots       the same command class with `__snapshots__ = ec.SnapshotPolicy()` (every
                             200 events): the first command folds all N and stores the state, the
                             others load it and fold the events after it;
* eventcore, snapshots,      the same with `cache=None`: every command reads the snapshot and the events
  uncached                   after it (one statement), as the first command of a new process does;
* eventsourcing, snapshots   (PostgreSQL only) eventsourcing 9.5.6 in its fastest configuration (DB
                             functions, psycopg) with `snapshotting_intervals = {Account: 200}`, a
                             snapshot taken after the N events are written; each command is
                             repository.get + deposit + save.

PostgreSQL (the session's cluster, fsync on) and SQLite (synchronous=FULL, the default). Figures:
median ms per command, and the ratio of each contender's median at N to its median at 100 events
(the goal: within 1.5x at 100,000) and eventcore's to eventsourcing's at the same N.
"""
from __future__ import annotations

import os
import statistics
import time
import uuid

import eventcore as ec

from conftest import FIGURES, eventsourcing_env

SIZES = [int(x) for x in os.environ.get("EVENTCORE_BENCH_SNAPSHOT_SIZES", "100,10000,100000").split(",")]
#: Commands timed per contender and size: enough for a stable median, fewer where each folds 100k events.
COMMANDS = int(os.environ.get("EVENTCORE_BENCH_SNAPSHOT_COMMANDS", "60"))


class Credited(ec.Event):
    __event_type__ = "bench.snapshots.Credited"
    amount: int


class Credit(ec.Command):
    account: ec.StreamId
    amount: int = 1

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + event.data.amount

    def handle(self, state):
        return [ec.emit(self.account, Credited(amount=self.amount))]


class SnapshottedCredit(Credit):
    __snapshots__ = ec.SnapshotPolicy()
    __snapshot_name__ = "bench.SnapshottedCredit"


def _time(fn, n: int) -> float:
    """Median seconds of n calls (the first, which may fold everything and store a snapshot, excluded)."""
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _eventcore(store, results: dict, backend: str) -> None:
    for size in SIZES:
        for cls, label, kw in ((Credit, "eventcore, no snapshots", {}),
                               (SnapshottedCredit, "eventcore, snapshots", {}),
                               (SnapshottedCredit, "eventcore, snapshots, uncached", {"cache": None})):
            account = ec.StreamId(f"acct-{uuid.uuid4().hex[:8]}")
            store.ingest(((account, Credited(amount=1)) for _ in range(size)), batch_size=20_000)
            n = COMMANDS if cls is SnapshottedCredit or size <= 10_000 else max(5, COMMANDS // 6)
            results[(backend, label, size)] = _time(
                lambda: ec.execute(store, cls(account=account), **kw), n)


def _eventsourcing(pg_dsn: str, schema: str, results: dict) -> None:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):
        @event("Created")
        def __init__(self):
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int) -> None:
            self.balance += amount

    class Bank(Application):
        snapshotting_intervals = {Account: 200}

        def deposit(self, account_id):
            account = self.repository.get(account_id)
            account.deposit(1)
            self.save(account)

    app = Bank(env=eventsourcing_env(pg_dsn, schema, POSTGRES_ENABLE_DB_FUNCTIONS="y"))
    try:
        for size in SIZES:
            account = Account()
            for _ in range(size - 1):
                account.deposit(1)
            app.save(account)
            if size % 200:  # else save() took it (snapshotting_intervals)
                app.take_snapshot(account.id)
            results[("postgres", "eventsourcing, snapshots", size)] = _time(lambda: app.deposit(account.id), COMMANDS)
    finally:
        app.close()


def _commit_floor(pg_dsn: str, schema: str, results: dict) -> None:
    """The floor of any durable command on this server: hand-written psycopg inserting one event row and
    committing (one round trip, one WAL flush), on one connection, no read."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {schema}.floor (stream text, version bigint, data jsonb, "
                     "PRIMARY KEY (stream, version))")
        version = iter(range(1, 1_000_000))
        results[("postgres", "psycopg: INSERT + COMMIT", SIZES[0])] = _time(
            lambda: conn.execute(f"INSERT INTO {schema}.floor VALUES ('a', %s, '{{\"amount\": 1}}')",
                                 (next(version),)), COMMANDS)


def test_commands_on_long_streams(pg_dsn, fresh_schema, tmp_path):
    results: dict = {}
    _commit_floor(pg_dsn, fresh_schema(), results)
    with ec.connect(pg_dsn, schema=fresh_schema()) as store:
        _eventcore(store, results, "postgres")
    with ec.connect(f"sqlite:///{tmp_path / 'snapshots.db'}") as store:
        _eventcore(store, results, "sqlite")
    import importlib.util

    if importlib.util.find_spec("eventsourcing") is not None:
        _eventsourcing(pg_dsn, fresh_schema(), results)
    print(f"\ncommands on one stream of N events, median ms per command (impl {ec.__impl__})")
    print(f"{'backend':<9} {'contender':<31}" + "".join(f"{f'N={n:,}':>14}" for n in SIZES) + "   at max N / at min N")
    for backend in ("postgres", "sqlite"):
        for label in ("eventcore, no snapshots", "eventcore, snapshots", "eventcore, snapshots, uncached",
                      "eventsourcing, snapshots"):
            row = [results.get((backend, label, n)) for n in SIZES]
            if row[0] is None:
                continue
            for n, value in zip(SIZES, row):
                FIGURES[f"snapshots_{backend}_{label.replace(', ', '_').replace(' ', '_')}_{n}"] = (value * 1000, "ms")
            print(f"{backend:<9} {label:<31}" + "".join(f"{v * 1000:>14.3f}" for v in row)
                  + f"   {row[-1] / row[0]:>6.2f}x")
    top = SIZES[-1]
    ours = results.get(("postgres", "eventcore, snapshots", top))
    theirs = results.get(("postgres", "eventsourcing, snapshots", top))
    floor = results[("postgres", "psycopg: INSERT + COMMIT", SIZES[0])]
    FIGURES["snapshots_postgres_insert_commit_floor"] = (floor * 1000, "ms")
    print(f"postgres  {'floor: psycopg INSERT + COMMIT':<31}{floor * 1000:>14.3f}")
    if ours and theirs:
        print(f"PostgreSQL, N={top:,}: eventcore with snapshots is {theirs / ours:.2f}x eventsourcing's snapshotted "
              f"command (goal >= 5x), {floor / ours:.2f}x the INSERT + COMMIT floor; eventsourcing is "
              f"{theirs / floor:.2f}x that floor")
    for backend in ("postgres", "sqlite"):
        plain = results.get((backend, "eventcore, no snapshots", top))
        snap = results.get((backend, "eventcore, snapshots", top))
        if plain and snap:
            print(f"{backend}, N={top:,}: snapshots make a command {plain / snap:.1f}x faster")
    assert results
