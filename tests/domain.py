"""Shared test domain: events and commands used across the test suite.

Every event pins a unique `__event_type__` under the `test.` prefix, so no test
class can collide with another one (or with a user's) in eventcore's registry.
"""
from __future__ import annotations

from typing import Any

import eventcore as ec


# -- events --------------------------------------------------------------------


class Deposited(ec.Event):
    __event_type__ = "test.Deposited"
    amount: int
    #: The account's balance after this event, as the deciding command computed it (None: not tracked).
    balance: int | None = None


class Withdrawn(ec.Event):
    __event_type__ = "test.Withdrawn"
    amount: int
    balance: int | None = None


class Noted(ec.Event):
    __event_type__ = "test.Noted"
    text: str = ""


class Opaque(ec.Event):
    """An event whose payload can hold anything, including values JSON cannot encode."""

    __event_type__ = "test.Opaque"
    value: Any = None


class OrderPlaced(ec.Event):
    __event_type__ = "test.OrderPlaced"
    products: list[str]


class StockAdded(ec.Event):
    __event_type__ = "test.StockAdded"
    quantity: int


class StockReserved(ec.Event):
    __event_type__ = "test.StockReserved"
    order: str
    quantity: int


# -- commands ------------------------------------------------------------------


class Deposit(ec.Command):
    """Single-stream command: the account's balance grows by `amount`."""

    account: ec.StreamId
    amount: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + event.data.amount

    def handle(self, state):
        ec.require(self.amount > 0, "amount must be positive")
        return [ec.emit(self.account, Deposited(amount=self.amount, balance=state + self.amount))]


def _balances_apply(state: dict, event) -> dict:
    data = event.data
    if isinstance(data, Deposited):
        state[event.stream_id] = state.get(event.stream_id, 0) + data.amount
    elif isinstance(data, Withdrawn):
        state[event.stream_id] = state.get(event.stream_id, 0) - data.amount
    return state


class Transfer(ec.Command):
    """Two-stream command with a business rule: the source cannot go below zero."""

    source: ec.StreamId
    target: ec.StreamId
    amount: int

    def initial_state(self):
        return {}

    def apply(self, state, event):
        return _balances_apply(state, event)

    def handle(self, state):
        ec.require(self.amount > 0, "amount must be positive")
        source = state.get(self.source, 0)
        ec.require(source >= self.amount, "insufficient funds")
        target = state.get(self.target, 0)
        return [
            ec.emit(self.source, Withdrawn(amount=self.amount, balance=source - self.amount)),
            ec.emit(self.target, Deposited(amount=self.amount, balance=target + self.amount)),
        ]


def balance(store, stream: str) -> int:
    """An account's balance, folded straight from its stream."""
    total = 0
    for e in store.read_stream(stream):
        if isinstance(e.data, Deposited):
            total += e.data.amount
        elif isinstance(e.data, Withdrawn):
            total -= e.data.amount
    return total


def assert_decisions_saw_every_prior_event(store, stream: str) -> None:
    """Each event's recorded `balance` equals the running balance: no decision was made on stale state."""
    running = 0
    for e in store.read_stream(stream):
        running += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
        if e.data.balance is not None:
            assert e.data.balance == running, (stream, e.version, e.data, running)


def assert_gap_free(store, streams=None) -> None:
    """Every stream's versions are 1..n, each once; the feed's positions are 1..head, each once."""
    feed = list(store.read_all(page_size=97))
    assert [e.position for e in feed] == list(range(1, len(feed) + 1))
    assert store.head_position() == len(feed)
    by_stream: dict[str, list[int]] = {}
    for e in feed:
        by_stream.setdefault(e.stream_id, []).append(e.version)
    for sid, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), sid
        assert [e.version for e in store.read_stream(sid)] == versions
        assert store.stream_version(sid) == len(versions)
    for sid in streams or ():
        assert sid in by_stream or store.stream_version(sid) == 0


def deposit_worker(url: str, streams: list[str], count: int, worker: int) -> tuple[int, int]:
    """Run `count` Deposit commands round-robin over `streams` in a fresh process.

    Returns (succeeded, retries). Module-level so a 'spawn' child can import it.
    """
    store = ec.connect(url)
    succeeded = retries = 0
    policy = ec.RetryPolicy(max_retries=10_000, base_delay=0.0005, max_delay=0.02)
    try:
        for i in range(count):
            sid = ec.StreamId(streams[(i + worker) % len(streams)])
            result = ec.execute(store, Deposit(account=sid, amount=1), retry=policy, timeout=None)
            succeeded += 1
            retries += result.attempts - 1
    finally:
        store.close()
    return succeeded, retries
