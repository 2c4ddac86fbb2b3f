"""Peer comparison for the reference report's command workloads: single-account deposits and
two-account transfers written with the `eventsourcing` library (https://pypi.org/project/eventsourcing/,
9.5.6, PostgreSQL persistence through psycopg 3), on the same server as eventcore's side
(bench/test_commands.py, recorded as cmd_deposit_eventcore / cmd_transfer_eventcore).

Set-up: the library's recommended style. A `Bank` Application subclass holds the command methods
and an `Account` Aggregate class holds the events:

* `Account(opening_balance)` -> `Account.Created`; `deposit(amount)` -> `Deposited(amount)`;
  `withdraw(amount)` checks the balance, then records `Withdrawn(amount)`.
* `Bank.deposit(id, amount)`: `repository.get(id)`, `account.deposit(amount)`, `save(account)`.
* `Bank.transfer(src, dst, amount)`: get both, withdraw from one, deposit into the other, then
  `save(a, b)`. eventsourcing writes every pending event of one save() call in a single
  transaction. The (originator_id, originator_version) primary key is its optimistic
  concurrency check, so a transfer is all-or-nothing.

Persistence settings: the library defaults, apart from where the server is and a fresh schema
per round (POSTGRES_SCHEMA). No aggregate cache, no snapshots. POSTGRES_ENABLE_DB_FUNCTIONS is
left at its default (off), unlike bench/test_peer_eventsourcing.py. In the default mode, each
save() runs one pipelined transaction: SET LOCAL lock_timeout, LOCK TABLE ... IN EXCLUSIVE MODE,
NOTIFY, INSERT ... RETURNING notification_id. Holding the table lock means concurrent writers
commit notification ids in order, so a reader that follows the notification log never skips an
event that commits late. The DB-function mode (es_insert_events_uuid, 9.5.6) runs only NOTIFY +
INSERT, with no table lock. It is faster, but concurrent writers can then commit notification
ids out of order, so it is not the setting that is safe for concurrent writers. Both workloads
here are sequential (one thread), but the peer is configured as a concurrent application would be.

Timed, per round: OPS commands, OPS = EVENTCORE_BENCH_OPS (default 1,000).
* deposit: account i % 100 gets a deposit of 1, round robin.
* transfer: random.Random(0) picks 2 distinct accounts of the 100 and an amount in 1..100.
  The picks are drawn in setup, and each round replays the same sequence.
Untimed, done in setup: a fresh schema, the Application (which creates its table there), and the
100 accounts saved with an opening balance of 1,000,000,000 (eventcore's bench uses the same
balance, so no transfer is refused). Afterwards, also untimed: check the table holds exactly
100 Created events plus OPS Deposited (deposit) or OPS Withdrawn + OPS Deposited (transfer), and
that each account's versions are 1..n with no gap. For deposit, each account's count must match
the round robin. For transfer, the balances must sum to the opening total. Then drop the schema.
"""
from __future__ import annotations

import os
import random
import uuid
from collections import Counter

import pytest

pytest.importorskip("eventsourcing")
pytest.importorskip("eventsourcing.postgres")  # needs the [postgres] extra (psycopg 3)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from eventsourcing.application import Application  # noqa: E402
from eventsourcing.domain import Aggregate, event  # noqa: E402

from conftest import FIGURES, RATIOS, eventsourcing_env, record  # noqa: E402

OPS = int(os.environ.get("EVENTCORE_BENCH_OPS", "1000"))
ACCOUNTS = 100
OPENING_BALANCE = 1_000_000_000
SEED = 0


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


def _env(pg_dsn: str, schema: str) -> dict[str, str]:
    """Where the server is and which schema to use; every other setting is the library default."""
    return eventsourcing_env(pg_dsn, schema)


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

    def __init__(self, pg_dsn: str, check):
        self.pg_dsn = pg_dsn
        self.check = check
        self.schemas: list[str] = []
        self.current: dict = {}

    def setup(self):
        self.finish_round()
        schema = f"bench_es_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self.schemas.append(schema)
        app = Bank(env=_env(self.pg_dsn, schema))  # creates its table in the schema; opens the pool
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


def _run_rounds(benchmark, rounds: _Rounds, run) -> None:
    try:
        benchmark.pedantic(run, setup=rounds.setup, rounds=3, iterations=1)
        rounds.finish_round()
    finally:
        rounds.cleanup()


@pytest.mark.benchmark(group="commands")
def test_cmd_deposit_eventsourcing(benchmark, pg_dsn):
    def run(app: Bank, ids: list[uuid.UUID]) -> None:
        deposit = app.deposit
        for i in range(OPS):
            deposit(ids[i % ACCOUNTS], 1)

    def check(app, ids, topics, per_account):
        assert topics == Counter(Created=ACCOUNTS, Deposited=OPS), topics
        assert sorted(per_account) == sorted(ids)
        for k, account_id in enumerate(ids):
            expected = 1 + OPS // ACCOUNTS + (1 if k < OPS % ACCOUNTS else 0)
            assert per_account[account_id] == expected, (k, per_account[account_id], expected)
        assert sum(app.balance(a) for a in ids) == ACCOUNTS * OPENING_BALANCE + OPS

    _run_rounds(benchmark, _Rounds(pg_dsn, check), run)
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, mode="Application + Aggregate, default settings")
    record("cmd_deposit_eventsourcing", benchmark)
    FIGURES["cmd_deposit_eventsourcing"] = (OPS / benchmark.stats.stats.median, "ops/s")


def _transfer_plan(n: int) -> list[tuple[int, int, int]]:
    rng = random.Random(SEED)
    plan = []
    for _ in range(n):
        source, target = rng.sample(range(ACCOUNTS), 2)
        plan.append((source, target, rng.randint(1, 100)))
    return plan


@pytest.mark.benchmark(group="commands")
def test_cmd_transfer_eventsourcing(benchmark, pg_dsn):
    plan = _transfer_plan(OPS)

    def run(app: Bank, ids: list[uuid.UUID]) -> None:
        transfer = app.transfer
        for source, target, amount in plan:
            transfer(ids[source], ids[target], amount)

    def check(app, ids, topics, per_account):
        assert topics == Counter(Created=ACCOUNTS, Withdrawn=OPS, Deposited=OPS), topics
        assert sorted(per_account) == sorted(ids)
        touched = Counter()
        for source, target, _ in plan:
            touched[source] += 1
            touched[target] += 1
        for k, account_id in enumerate(ids):
            assert per_account[account_id] == 1 + touched[k], (k, per_account[account_id])
        assert sum(app.balance(a) for a in ids) == ACCOUNTS * OPENING_BALANCE

    _run_rounds(benchmark, _Rounds(pg_dsn, check), run)
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, seed=SEED,
                                mode="Application + Aggregate, save(a, b), default settings")
    record("cmd_transfer_eventsourcing", benchmark)
    FIGURES["cmd_transfer_eventsourcing"] = (OPS / benchmark.stats.stats.median, "ops/s")


RATIOS.append(("deposit: eventcore vs eventsourcing", "cmd_deposit_eventcore", "cmd_deposit_eventsourcing", ">= 10x"))
RATIOS.append(("transfer: eventcore vs eventsourcing", "cmd_transfer_eventcore", "cmd_transfer_eventsourcing", ">= 10x"))
