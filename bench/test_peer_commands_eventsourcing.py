"""Peer comparison for the reference report's command workloads: single-account deposits and
two-account transfers written with the `eventsourcing` library (https://pypi.org/project/eventsourcing/,
9.5.6, PostgreSQL persistence through psycopg 3), on the same server as eventcore's side
(bench/test_commands.py, recorded as cmd_deposit_eventcore / cmd_transfer_eventcore, `_c8` for 8 threads).

Set-up: the library's recommended style. A `Bank` Application subclass holds the command methods
and an `Account` Aggregate class holds the events:

* `Account(opening_balance)` -> `Account.Created`; `deposit(amount)` -> `Deposited(amount)`;
  `withdraw(amount)` checks the balance, then records `Withdrawn(amount)`.
* `Bank.deposit(id, amount)`: `repository.get(id)`, `account.deposit(amount)`, `save(account)`.
* `Bank.transfer(src, dst, amount)`: get both, withdraw from one, deposit into the other, then
  `save(a, b)`. eventsourcing writes every pending event of one save() call in a single
  transaction. The (originator_id, originator_version) primary key is its optimistic
  concurrency check, so a transfer is all-or-nothing.

Persistence settings, two configurations (CONFIGS): the library defaults, and its fastest,
POSTGRES_ENABLE_DB_FUNCTIONS=y (the ratios compare eventcore with that one); both with where the
server is and a fresh schema per round (POSTGRES_SCHEMA). No aggregate cache, no snapshots. In the
default mode, each
save() runs one pipelined transaction: SET LOCAL lock_timeout, LOCK TABLE ... IN EXCLUSIVE MODE,
NOTIFY, INSERT ... RETURNING notification_id. Holding the table lock means concurrent writers
commit notification ids in order, so a reader that follows the notification log never skips an
event that commits late. It also means the saves of all threads commit one at a time. The
DB-function mode (es_insert_events_uuid, 9.5.6) runs only NOTIFY + INSERT, with no table lock. It
is faster, but concurrent writers can then commit notification ids out of order, so it is not the
setting that is safe for concurrent writers.

Concurrency c (1 or 8): one Application per round, shared by c threads, each taking the next op
index from one itertools.count() (conftest.run_split; c = 1 runs in the benchmark's thread, for
c = 8 starting and joining the threads is timed). Sharing is how the library is meant to be used:
without an aggregate cache, Repository.get and save() keep no shared mutable state, and each call
takes its own connection from the datastore's psycopg_pool pool (default POSTGRES_POOL_SIZE 5 +
POSTGRES_MAX_OVERFLOW 10 = up to 15 connections, enough for 8 threads, so both are left at their
defaults; the pool opens connections 6..8 when threads first wait for one). Two threads that read
the same account and both save: the second INSERT violates the primary key and save() raises
eventsourcing.persistence.IntegrityError (the library's own threaded test retries on it); the
command is then run again from the get(), up to 50 times, with no delay (the table lock means the
winner has committed by then). Retries are counted in the JSON's extra_info.

Timed, per round: OPS commands, OPS = EVENTCORE_BENCH_OPS (default 1,000).
* deposit: op i deposits 1 into account i % 100.
* transfer: op i moves 1 between the i-th (source, target) pair of a plan drawn once, in setup,
  from random.Random(7) (conftest.transfer_pairs: the same plan as eventcore's and the raw side's).
Untimed, done in setup: a fresh schema, the Application (which creates its table there), and the
100 accounts saved with an opening balance of 1,000,000,000 (eventcore's bench uses the same
balance, so no transfer is refused). Afterwards, also untimed: check the table holds exactly
100 Created events plus OPS Deposited (deposit) or OPS Withdrawn + OPS Deposited (transfer), and
that each account's versions are 1..n with no gap. For deposit, each account's count must match
the round robin; for transfer, 1 + the number of plan transfers it is in. The balances must sum
to the opening total (+ OPS for deposit). Then drop the schema.
"""
from __future__ import annotations

import os
import uuid
from collections import Counter

import pytest

pytest.importorskip("eventsourcing")
pytest.importorskip("eventsourcing.postgres")  # needs the [postgres] extra (psycopg 3)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from eventsourcing.application import Application  # noqa: E402
from eventsourcing.domain import Aggregate, event  # noqa: E402
from eventsourcing.persistence import IntegrityError  # noqa: E402

from conftest import CONCURRENCY, FIGURES, RATIOS, eventsourcing_env, record, run_split, transfer_pairs  # noqa: E402

OPS = int(os.environ.get("EVENTCORE_BENCH_OPS", "1000"))
ACCOUNTS = 100
OPENING_BALANCE = 1_000_000_000
MAX_RETRIES = 50


class InsufficientFunds(Exception):
    pass


class Account(Aggregate):
    @event("Created")
    def __init__(self, opening_balance: int):
        self.balance = opening_balance

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise InsufficientFunds(self.id)
        self._withdraw(amount)

    @event("Withdrawn")
    def _withdraw(self, amount: int) -> None:
        self.balance -= amount


class Bank(Application):
    """The peer's application: its events table is <schema>.bank_events."""

    def open_accounts(self, n: int) -> list[uuid.UUID]:
        accounts = [Account(opening_balance=OPENING_BALANCE) for _ in range(n)]
        self.save(*accounts)
        return [a.id for a in accounts]

    def deposit(self, account_id: uuid.UUID, amount: int) -> None:
        account = self.repository.get(account_id)
        account.deposit(amount)
        self.save(account)

    def transfer(self, source_id: uuid.UUID, target_id: uuid.UUID, amount: int) -> None:
        source = self.repository.get(source_id)
        target = self.repository.get(target_id)
        source.withdraw(amount)
        target.deposit(amount)
        self.save(source, target)  # one transaction for both accounts' events

    def balance(self, account_id: uuid.UUID) -> int:
        return self.repository.get(account_id).balance


TABLE = "bank_events"


#: The peer's two configurations: its defaults, and its fastest (its stored insert function,
#: POSTGRES_ENABLE_DB_FUNCTIONS=y, with psycopg's C or binary implementation as installed). The
#: ratios compare eventcore with the fastest.
CONFIGS = {"defaults": {}, "db_functions": {"POSTGRES_ENABLE_DB_FUNCTIONS": "y"}}


def _env(pg_dsn: str, schema: str, config: str) -> dict[str, str]:
    """Where the server is and which schema to use, and the configuration's settings; every other
    setting is the library default."""
    return eventsourcing_env(pg_dsn, schema, **CONFIGS[config])


def _name(workload: str, config: str, concurrency: int) -> str:
    return f"cmd_{workload}_eventsourcing{'_fastest' if config == 'db_functions' else ''}{_suffix(concurrency)}"


def _topic_counts(pg_dsn: str, schema: str) -> tuple[Counter, dict[uuid.UUID, int]]:
    """Events per topic suffix (Created/Deposited/Withdrawn) and per account; check version runs."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        table = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(TABLE))
        topics = Counter()
        for topic, n in conn.execute(sql.SQL("SELECT topic, count(*) FROM {} GROUP BY topic").format(table)):
            topics[topic.rsplit(".", 1)[-1]] += n
        per_account = {}
        for oid, n, lo, hi in conn.execute(sql.SQL(
                "SELECT originator_id, count(*), min(originator_version), max(originator_version) "
                "FROM {} GROUP BY originator_id").format(table)):
            assert (lo, hi) == (1, n), (oid, n, lo, hi)
            per_account[oid] = n
    return topics, per_account


class _Rounds:
    """Per-round set-up (fresh schema, app, 100 accounts) and the untimed check/clean-up after it."""

    def __init__(self, pg_dsn: str, check, config: str):
        self.pg_dsn = pg_dsn
        self.check = check
        self.config = config
        self.schemas: list[str] = []
        self.current: dict = {}

    def setup(self):
        self.finish_round()
        schema = f"bench_es_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self.schemas.append(schema)
        app = Bank(env=_env(self.pg_dsn, schema, self.config))  # creates its table in the schema; opens the pool
        self.current.update(app=app, schema=schema)
        ids = app.open_accounts(ACCOUNTS)
        self.current["ids"] = ids
        return (app, ids), {}

    def finish_round(self) -> None:
        app = self.current.pop("app", None)
        if app is None:
            return
        schema = self.current.pop("schema")
        ids = self.current.pop("ids")
        try:
            self.check(app, ids, *_topic_counts(self.pg_dsn, schema))
            with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            self.schemas.remove(schema)
        finally:
            app.close()

    def cleanup(self) -> None:
        if "app" in self.current:
            self.current["app"].close()
        if self.schemas:
            with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
                for schema in self.schemas:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _retrying(retried: list, command, *args) -> None:
    """Run an application command; on a version clash (IntegrityError from save()) run it again."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            command(*args)
            return
        except IntegrityError:
            if attempt == MAX_RETRIES:
                raise
            retried.append(1)


def _suffix(concurrency: int) -> str:
    return "" if concurrency == 1 else f"_c{concurrency}"


def _run_rounds(benchmark, rounds: _Rounds, run) -> None:
    try:
        benchmark.pedantic(run, setup=rounds.setup, rounds=3, iterations=1)
        rounds.finish_round()
    finally:
        rounds.cleanup()


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cmd_deposit_eventsourcing(benchmark, pg_dsn, config, concurrency):
    retried = []

    def run(app: Bank, ids: list[uuid.UUID]) -> None:
        deposit = app.deposit

        def op(_worker, i):
            _retrying(retried, deposit, ids[i % ACCOUNTS], 1)

        run_split(concurrency, OPS, op)

    def check(app, ids, topics, per_account):
        assert topics == Counter(Created=ACCOUNTS, Deposited=OPS), topics
        assert sorted(per_account) == sorted(ids)
        for k, account_id in enumerate(ids):
            expected = 1 + OPS // ACCOUNTS + (1 if k < OPS % ACCOUNTS else 0)
            assert per_account[account_id] == expected, (k, per_account[account_id], expected)
        assert sum(app.balance(a) for a in ids) == ACCOUNTS * OPENING_BALANCE + OPS

    _run_rounds(benchmark, _Rounds(pg_dsn, check, config), run)
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, concurrency=concurrency, retries_all_rounds=len(retried),
                                mode=f"Application + Aggregate, {config}")
    name = _name("deposit", config, concurrency)
    record(name, benchmark)
    FIGURES[name] = (OPS / benchmark.stats.stats.median, "ops/s")


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cmd_transfer_eventsourcing(benchmark, pg_dsn, config, concurrency):
    plan = transfer_pairs(OPS, ACCOUNTS)
    retried = []

    def run(app: Bank, ids: list[uuid.UUID]) -> None:
        transfer = app.transfer

        def op(_worker, i):
            source, target = plan[i]
            _retrying(retried, transfer, ids[source], ids[target], 1)

        run_split(concurrency, OPS, op)

    def check(app, ids, topics, per_account):
        assert topics == Counter(Created=ACCOUNTS, Withdrawn=OPS, Deposited=OPS), topics
        assert sorted(per_account) == sorted(ids)
        touched = Counter()
        for source, target in plan:
            touched[source] += 1
            touched[target] += 1
        for k, account_id in enumerate(ids):
            assert per_account[account_id] == 1 + touched[k], (k, per_account[account_id])
        assert sum(app.balance(a) for a in ids) == ACCOUNTS * OPENING_BALANCE

    _run_rounds(benchmark, _Rounds(pg_dsn, check, config), run)
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, concurrency=concurrency, retries_all_rounds=len(retried),
                                plan="random.Random(7) pairs, amount 1",
                                mode=f"Application + Aggregate, save(a, b), {config}")
    name = _name("transfer", config, concurrency)
    record(name, benchmark)
    FIGURES[name] = (OPS / benchmark.stats.stats.median, "ops/s")


for _c in CONCURRENCY:
    for _workload in ("deposit", "transfer"):
        for _variant, _what in (("", "eventcore (defaults)"), ("_uncached", "eventcore, cache=None"),
                                ("_cache", "eventcore + StateCache()")):
            _threads = "" if _c == 1 else f", {_c} threads"
            # The targets: 2x the peer at its fastest on one thread, 4x on 8.
            RATIOS.append((f"{_workload}{_threads}: {_what} vs eventsourcing at its fastest",
                           f"cmd_{_workload}_eventcore{_variant}{_suffix(_c)}",
                           _name(_workload, "db_functions", _c), ">= 2x" if _c == 1 else ">= 4x"))
