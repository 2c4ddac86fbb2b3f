"""What a user's type checker sees: checked by mypy and pyright (tests/test_typing.py), never run by pytest.

Each line marked `# type: ignore[...]` must be an error: both checkers report an ignore comment that
silences nothing (mypy's warn_unused_ignores, pyright's reportUnnecessaryTypeIgnoreComment), so a
mistake the types stop catching fails the test. mypy's error codes are named; pyright takes any
`# type: ignore` comment as its own.
"""
from __future__ import annotations

import sqlite3
import threading
from typing import Any

from typing_extensions import assert_type

import eventcore as ec
from eventcore.stores.base import EventStore


class Deposited(ec.Event):
    __event_type__ = "typing.Deposited"
    amount: int


class Withdrawn(ec.Event):
    __event_type__ = "typing.Withdrawn"
    amount: int


class Deposit(ec.Command):
    account: ec.StreamId
    amount: int

    def initial_state(self) -> int:
        return 0

    # The hooks' parameters are positional-only in ec.Command: any names will do, and the event may be
    # declared as what this command's streams hold.
    def apply(self, balance: int, recorded: ec.RecordedEvent[Deposited]) -> int:
        return balance + recorded.data.amount

    def handle(self, balance: int) -> list[ec.EventToWrite]:
        ec.require(self.amount > 0, "amount must be positive")
        return [ec.emit(self.account, Deposited(amount=self.amount))]


class Totals(ec.Projector):
    name = "typing-totals"

    def handle(self, recorded: ec.RecordedEvent, context: ec.ProjectionContext[sqlite3.Connection]) -> None:
        assert_type(context.connection, sqlite3.Connection)
        assert_type(context.store, EventStore)
        context.connection.execute("SELECT 1")
        context.connection.no_such_method()  # type: ignore[attr-defined]


def typed_reads(store: EventStore) -> int:
    total = 0
    for e in store.read_all(types=[Deposited]):
        assert_type(e, ec.RecordedEvent[Deposited])
        total += e.data.amount
        e.data.no_such_field  # type: ignore[attr-defined]
    for either in store.read_all(types=[Deposited, Withdrawn]):
        if isinstance(either.data, Withdrawn):
            total -= either.data.amount
    for raw in store.read_all(decode=False):
        assert_type(raw.data, dict[str, Any])
    for any_event in store.read_all(types=["typing.Deposited"]):
        assert_type(any_event.data, Any)   # names, not classes: the type checker cannot know
    for event in store.read_stream("account-1"):
        assert_type(event, ec.RecordedEvent[Any])
    for stored in store.read_stream("account-1", decode=False):
        assert_type(stored.data, dict[str, Any])
    store.read_stram("account-1")  # type: ignore[attr-defined]
    store.read_stream(1)  # type: ignore[call-overload]
    return total


def recorded_events_are_covariant(e: ec.RecordedEvent[Deposited]) -> ec.RecordedEvent[ec.Event]:
    return e


def stores_in_with() -> None:
    with ec.connect("memory://") as s:
        assert_type(s, EventStore)
        result = ec.execute(s, Deposit(account=ec.StreamId("account-1"), amount=5))
        assert_type(result, ec.ExecutionResult)
        s.read_stram("account-1")  # type: ignore[attr-defined]
    with ec.connect("sqlite:///bank.db", migrate=False, timeout=5.0, synchronous="normal"):
        pass
    ec.connect("postgresql://db/bank", schema="bank", pool_size=4, statement_timeout=0)
    ec.connect("sqlite:///bank.db", migrat=False)  # type: ignore[call-arg]
    ec.connect("sqlite:///bank.db", timeout="soon")  # type: ignore[arg-type]
    ec.connect(b"memory://")  # type: ignore[arg-type]


def projections(store: EventStore) -> None:
    stop = threading.Event()
    runner = ec.run_projection(store, Totals(), stop_event=stop, until_caught_up=True, poll_interval=0.5)
    assert_type(runner, ec.ProjectionRunner)
    ec.run_projection(store, Totals(), until_caught_upp=True)  # type: ignore[call-arg]
    ec.Projector("p", handler=lambda event, ctx: None, types=[Deposited])
    ec.Projector("p", handler=one_argument)  # type: ignore[arg-type]


def one_argument(event: ec.RecordedEvent) -> None:
    pass
