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


class Withdraw(ec.Command):
    account: ec.StreamId
    amount: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + (event.data.amount if isinstance(event.data, Deposited) else -event.data.amount)

    def handle(self, state):
        ec.require(state >= self.amount, f"insufficient funds: {state} < {self.amount}")
        return [ec.emit(self.account, Withdrawn(amount=self.amount, balance=state - self.amount))]


class LimitSet(ec.Event):
    __event_type__ = "test.LimitSet"
    limit: int


class SetLimit(ec.Command):
    """Emits only when the limit changes: a no-op decision when the state already matches."""

    account: ec.StreamId
    limit: int

    def initial_state(self):
        return None

    def apply(self, state, event):
        return event.data.limit if isinstance(event.data, LimitSet) else state

    def handle(self, state):
        return [] if state == self.limit else [ec.emit(self.account, LimitSet(limit=self.limit))]


class LimitedWithdraw(ec.Command):
    """Raises a plain error (not a refusal) when the account has no limit set yet."""

    account: ec.StreamId

    def initial_state(self):
        return None

    def apply(self, state, event):
        return event.data.limit if isinstance(event.data, LimitSet) else state

    def handle(self, state):
        if state is None:
            raise LookupError("no limit set")
        return [ec.emit(self.account, Withdrawn(amount=state))]


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


def feed_positions(store) -> list[int]:
    """The global positions of every event, in feed (`read_all`) order."""
    return [e.position for e in store.read_all()]


def ordinals(store) -> dict[int, int]:
    """position -> its 1-based place in the feed ("the 3rd event").

    Positions are only promised to be unique and increasing, not dense: on
    PostgreSQL they are sparse. Tests that mean "the n-th event" compare ordinals.
    """
    return {p: i for i, p in enumerate(feed_positions(store), start=1)}


def assert_consecutive(events) -> None:
    """The events of one append: positions first, first+1, ..., in the order given."""
    positions = [e.position for e in events]
    assert positions, "an append that wrote something returns its events"
    assert positions[0] >= 1
    assert positions == list(range(positions[0], positions[0] + len(positions))), positions


def assert_feed_positions(store) -> list[int]:
    """The position contract of the feed; returns the feed's positions.

    Strictly increasing (so unique) along `read_all`, whatever the page size;
    `head_position()` is 0 for an empty store, else the last event's position;
    `read_all(after_position=p)` is exactly the feed events above p.
    """
    feed = list(store.read_all())
    positions = [e.position for e in feed]
    assert all(type(p) is int and p >= 1 for p in positions), positions
    assert all(a < b for a, b in zip(positions, positions[1:])), positions
    assert store.head_position() == (positions[-1] if positions else 0)
    for page_size in (1, 97):
        assert list(store.read_all(page_size=page_size)) == feed
    probes = {0, *positions, *(p - 1 for p in positions), *(p + 1 for p in positions)}
    if positions:
        probes.add(positions[-1] + 1000)
    sample = sorted(probes)
    if len(sample) > 40:  # large feeds: a spread of probes, not every one
        sample = sample[:: len(sample) // 40 + 1] + sample[-3:]
    for p in sample:
        assert [e.position for e in store.read_all(after_position=p, page_size=97)] == [q for q in positions if q > p], p
    return positions


def assert_gap_free(store, streams=None) -> None:
    """Every stream's versions are 1..n, each once; the feed's positions obey the contract."""
    assert_feed_positions(store)
    feed = list(store.read_all(page_size=97))
    by_stream: dict[str, list[int]] = {}
    for e in feed:
        by_stream.setdefault(e.stream_id, []).append(e.version)
    for sid, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), sid
        assert store.read_stream(sid) == [e for e in feed if e.stream_id == sid]
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
