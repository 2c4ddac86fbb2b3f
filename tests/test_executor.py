"""The command executor: read, fold, decide, append with every stream read version-checked."""
from __future__ import annotations

import re
import threading
import uuid
from typing import Any

import pytest

import eventcore as ec
from eventcore.stores.memory import MemoryStore
from domain import (
    Deposit,
    Deposited,
    Noted,
    OrderPlaced,
    StockAdded,
    StockReserved,
    Transfer,
    Withdrawn,
    balance,
    feed_positions,
    ordinals,
)

SID = ec.StreamId


def _snapshot(store):
    """Everything observable about the store's contents."""
    return store.head_position(), [(e.position, e.stream_id, e.version, e.event_id) for e in store.read_all()]


# -- results ----------------------------------------------------------------------------


def test_execute_returns_execution_result(store):
    other = store.append([ec.emit("other", Noted())])[0]
    md = ec.Metadata(user_id="alice", correlation_id="c-1")
    result = ec.execute(store, Deposit(account=SID("acct-1"), amount=10), metadata=md)
    assert isinstance(result, ec.ExecutionResult)
    assert result.attempts == 1
    assert len(result.events) == 1
    e = result.events[0]
    assert (e.stream_id, e.version, e.data) == ("acct-1", 1, Deposited(amount=10, balance=10))
    assert e.metadata == md
    assert result.stream_versions == {"acct-1": 1}
    # The 2nd event of the feed, after the earlier append's.
    assert e.position > other.position
    assert result.position == e.position == store.head_position()
    assert feed_positions(store) == [other.position, e.position]
    assert store.read_stream("acct-1") == result.events
    assert store.read_stream("acct-1")[0].metadata == md

    result = ec.execute(store, Deposit(account=SID("acct-1"), amount=5))
    assert (result.events[0].version, result.stream_versions) == (2, {"acct-1": 2})
    assert result.position == result.events[0].position > e.position
    assert feed_positions(store) == [other.position, e.position, result.position]
    assert balance(store, "acct-1") == 15


def test_execute_multi_stream_result(store):
    opened = ec.execute(store, Deposit(account=SID("a"), amount=10))
    result = ec.execute(store, Transfer(source=SID("a"), target=SID("b"), amount=4))
    assert [(e.stream_id, e.version) for e in result.events] == [("a", 2), ("b", 1)]
    # One append: consecutive positions, in emit order, after the earlier command's.
    first = result.events[0].position
    assert first > opened.position
    assert [e.position for e in result.events] == [first, first + 1]
    assert result.stream_versions == {"a": 2, "b": 1}
    assert result.position == first + 1
    assert feed_positions(store) == [opened.position, first, first + 1]
    assert (balance(store, "a"), balance(store, "b")) == (6, 4)


def test_plain_str_stream_field_is_validated(store):
    # msgspec does not validate on construction; the executor must.
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Deposit(account="", amount=1))
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Deposit(account="a\x00", amount=1))
    result = ec.execute(store, Deposit(account="plain", amount=1))
    assert result.events[0].stream_id == "plain"
    assert feed_positions(store) == [result.position]
    assert store.head_position() == result.position


def test_execute_rejects_non_commands_and_bad_metadata(store):
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Deposited(amount=1))
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Deposit(account=SID("a"), amount=1), metadata={"user_id": "x"})
    with pytest.raises(ec.ValidationError):
        ec.RetryPolicy(max_retries=-1)
    assert store.head_position() == 0


BAD_EXECUTE_ARGUMENTS = [
    ("store", None), ("store", "memory://"), ("store", object()), ("store", MemoryStore),
    ("command", None), ("command", Deposited(amount=1)), ("command", Deposit), ("command", {"amount": 1}),
    ("retry", 3), ("retry", "fast"), ("retry", {"max_retries": 3}), ("retry", True),
    ("metadata", {"user_id": "x"}), ("metadata", "teller-7"),
    ("timeout", "5"), ("timeout", True), ("timeout", False), ("timeout", 0), ("timeout", -1), ("timeout", float("inf")),
    ("timeout", float("nan")), ("timeout", [5]), ("timeout", 2**1024),
    ("cache", {}), ("cache", True), ("cache", ec.RetryPolicy()),
    ("metrics", object()), ("metrics", True), ("metrics", {}),
    ("idempotency_key", 5), ("idempotency_key", b"key"), ("idempotency_key", ""), ("idempotency_key", "k" * 256),
]


@pytest.mark.parametrize("argument, value", BAD_EXECUTE_ARGUMENTS,
                         ids=[f"{a}={v!r:.30}" for a, v in BAD_EXECUTE_ARGUMENTS])
def test_execute_checks_every_argument_before_reading_or_writing(store, argument, value):
    collector = ec.MetricsCollector()
    store.attach(collector)
    arguments = {"store": store, "command": Deposit(account=SID("a"), amount=1)}
    arguments[argument] = value
    store_, command = arguments.pop("store"), arguments.pop("command")
    with pytest.raises(ec.ValidationError) as info:
        ec.execute(store_, command, **arguments)
    assert argument.replace("_", " ") in str(info.value).replace("_", " "), str(info.value)
    assert collector.operations == {} and collector.commands == {}  # nothing read, nothing written
    assert store.head_position() == 0


def test_execute_accepts_every_kind_of_valid_argument(store):
    from fractions import Fraction

    cmd = Deposit(account=SID("a"), amount=1)
    for timeout in (None, 5, 0.5, Fraction(1, 2), 10**6):
        ec.execute(store, cmd, timeout=timeout)
    ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=0), metadata=ec.Metadata(user_id="u"),
               cache=ec.StateCache(), metrics=ec.MetricsCollector(), idempotency_key=uuid.uuid4())
    assert store.stream_version("a") == 6


# -- business rules and bad decisions ---------------------------------------------------------


class CountingTransfer(Transfer):
    calls: int = 0

    def handle(self, state):
        self.calls += 1
        return super().handle(state)


def test_business_rule_violation_writes_nothing_and_is_not_retried(store):
    ec.execute(store, Deposit(account=SID("a"), amount=3))
    before = _snapshot(store)
    assert len(before[1]) == 1
    cmd = CountingTransfer(source=SID("a"), target=SID("b"), amount=5)
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds"):
        ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=5))
    assert cmd.calls == 1
    assert _snapshot(store) == before
    assert store.read_stream("b") == []
    with pytest.raises(ec.BusinessRuleViolation, match="positive"):
        ec.execute(store, Deposit(account=SID("a"), amount=0))
    assert _snapshot(store) == before


def test_require():
    ec.require(True, "fine")
    ec.require(1, "fine")
    with pytest.raises(ec.BusinessRuleViolation, match="^nope$"):
        ec.require(False, "nope")
    with pytest.raises(ec.EventCoreError):
        ec.require([], "empty")


class EmitsUndeclared(ec.Command):
    account: ec.StreamId

    def handle(self, state):
        return [ec.emit(self.account, Noted()), ec.emit("somewhere-else", Noted())]


def test_undeclared_stream_writes_nothing(store):
    with pytest.raises(ec.UndeclaredStreamError) as info:
        ec.execute(store, EmitsUndeclared(account=SID("a")))
    err = info.value
    assert err.stream_id == "somewhere-else"
    assert err.command == "EmitsUndeclared"
    assert "a" in err.declared
    assert "somewhere-else" in str(err)
    assert store.head_position() == 0
    assert store.read_stream("a") == []


class ReturnsJunk(ec.Command):
    account: ec.StreamId
    junk: Any = None

    def handle(self, state):
        return [ec.emit(self.account, Noted()), self.junk]


@pytest.mark.parametrize("junk", [Noted(), ("a", Noted()), "a", None], ids=repr)
def test_handle_returning_non_emit_items_writes_nothing(store, junk):
    with pytest.raises(ec.ValidationError):
        ec.execute(store, ReturnsJunk(account=SID("a"), junk=junk))
    assert store.head_position() == 0


class DoesNothing(ec.Command):
    account: ec.StreamId
    result: Any = None

    def handle(self, state):
        return self.result


@pytest.mark.parametrize("returned", [None, [], ()], ids=repr)
def test_handle_returning_nothing_writes_nothing(store, returned):
    store.append([ec.emit("a", Noted())])
    before = _snapshot(store)
    result = ec.execute(store, DoesNothing(account=SID("a"), result=returned))
    assert result.events == []
    assert result.position is None
    assert result.attempts == 1
    assert result.stream_versions == {"a": 1}
    assert _snapshot(store) == before


def test_handle_may_return_a_generator(store):
    class Gen(ec.Command):
        a: ec.StreamId

        def handle(self, state):
            yield ec.emit(self.a, Noted(text="1"))
            yield ec.emit(self.a, Noted(text="2"))

    result = ec.execute(store, Gen(a=SID("g")))
    assert [e.version for e in result.events] == [1, 2]


# -- conflicts and retries --------------------------------------------------------------


class Interfering(ec.Command):
    """Reads `watched` (read-only) and `target`; writes `target` only.

    On the first `interfere` calls of handle() it appends directly to `watched`,
    as a concurrent writer would between the executor's read and its append.
    """

    watched: ec.StreamId
    target: ec.StreamId
    store: Any = None
    interfere: int = 1
    calls: int = 0

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [(event.stream_id, event.version)]

    def handle(self, state):
        self.calls += 1
        if self.calls <= self.interfere:
            self.store.append([ec.emit(self.watched, Noted(text=f"interference {self.calls}"))])
        return [ec.emit(self.target, Noted(text=f"seen {len(state)}"))]


def test_read_only_participant_change_causes_retry(store):
    store.append([ec.emit("limits", Noted())])
    cmd = Interfering(watched=SID("limits"), target=SID("acct"), store=store, interfere=1)
    result = ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=3, base_delay=0))
    assert result.attempts == 2
    assert cmd.calls == 2
    # The retry decided on fresh state: it saw the interfering event.
    assert result.events[0].data.text == "seen 2"
    assert result.stream_versions == {"limits": 2, "acct": 1}
    assert [e.version for e in store.read_stream("acct")] == [1]
    assert store.stream_version("limits") == 2


def test_retries_exhausted_raises_concurrency_error(store):
    cmd = Interfering(watched=SID("limits"), target=SID("acct"), store=store, interfere=10)
    with pytest.raises(ec.ConcurrencyError) as info:
        ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=0))
    assert cmd.calls == 1
    err = info.value
    assert (err.stream_id, err.expected, err.actual) == ("limits", 0, 1)
    assert store.read_stream("acct") == []

    cmd = Interfering(watched=SID("limits2"), target=SID("acct"), store=store, interfere=10)
    with pytest.raises(ec.ConcurrencyError):
        ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=2, base_delay=0))
    assert cmd.calls == 3  # one attempt plus two retries
    assert store.read_stream("acct") == []
    assert store.stream_version("limits2") == 3


def test_retry_policy_delay_is_bounded():
    policy = ec.RetryPolicy(max_retries=10, base_delay=0.01, max_delay=0.05)
    for n in range(1, 12):
        assert 0 <= policy.delay(n) <= min(0.05, 0.01 * 2 ** (n - 1))
    fixed = ec.RetryPolicy(base_delay=0.01, max_delay=0.05, jitter=False)
    assert [fixed.delay(n) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.04, 0.05]


@pytest.mark.parametrize("field, value", [
    ("max_retries", -1), ("max_retries", 2.0), ("max_retries", True), ("max_retries", "3"), ("max_retries", None),
    ("base_delay", float("inf")), ("base_delay", float("nan")), ("base_delay", -0.1), ("base_delay", "0.1"),
    ("base_delay", None), ("base_delay", True), ("max_delay", float("inf")), ("max_delay", -1), ("max_delay", "1"),
    ("jitter", "no"), ("jitter", 0),
], ids=repr)
def test_retry_policy_refuses_what_it_cannot_wait_for(field, value):
    with pytest.raises(ec.ValidationError) as info:
        ec.RetryPolicy(**{field: value})
    assert f"RetryPolicy.{field}" in str(info.value)


def test_retry_policy_delay_never_overflows_however_many_retries():
    policy = ec.RetryPolicy(max_retries=10**30, base_delay=0.001, max_delay=0.005, jitter=False)
    assert [policy.delay(n) for n in (1, 1024, 1025, 5000, 10**6)] == [0.001, 0.005, 0.005, 0.005, 0.005]
    big = threading.TIMEOUT_MAX
    assert 0 <= ec.RetryPolicy(base_delay=big, max_delay=big).delay(10**6) <= big
    assert ec.RetryPolicy(base_delay=0, max_delay=0).delay(10**6) == 0


def test_timeout_with_a_command_that_always_conflicts(store):
    cmd = Interfering(watched=SID("busy"), target=SID("acct"), store=store, interfere=10**9)
    policy = ec.RetryPolicy(max_retries=10**9, base_delay=0.001, max_delay=0.005)
    with pytest.raises(ec.CommandTimeoutError) as info:
        ec.execute(store, cmd, retry=policy, timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ec.EventCoreError)
    assert cmd.calls >= 1
    assert store.read_stream("acct") == []


# -- declared, dynamic and discovered streams -------------------------------------------------


class ListStreams(ec.Command):
    main: ec.StreamId
    others: list[ec.StreamId]
    more: tuple[ec.StreamId, ...] = ()

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [event.stream_id]

    def handle(self, state):
        return [ec.emit(s, Noted(text=",".join(state))) for s in [self.main, *self.others, *self.more]]


def test_list_of_stream_ids_fields_are_declared(store):
    store.append([ec.emit("x", Noted()), ec.emit("y", Noted())])
    result = ec.execute(store, ListStreams(main=SID("m"), others=[SID("x"), SID("y")], more=(SID("z"),)))
    assert [e.stream_id for e in result.events] == ["m", "x", "y", "z"]
    assert result.stream_versions == {"m": 1, "x": 2, "y": 2, "z": 1}
    assert result.events[0].data.text == "x,y"
    with pytest.raises(ec.ValidationError):
        ec.execute(store, ListStreams(main=SID("m"), others=[SID("x"), ""]))


def test_list_stream_fields_take_part_in_version_check(store):
    class Watch(ListStreams):
        store: Any = None
        calls: int = 0

        def handle(self, state):
            self.calls += 1
            if self.calls == 1:
                self.store.append([ec.emit(self.others[1], Noted())])
            return [ec.emit(self.main, Noted())]

    cmd = Watch(main=SID("m"), others=[SID("r1"), SID("r2")], store=store)
    result = ec.execute(store, cmd, retry=ec.RetryPolicy(base_delay=0))
    assert result.attempts == 2
    assert result.stream_versions == {"m": 1, "r1": 0, "r2": 1}


class Ledger(ec.Command):
    """Declares its streams only through streams()."""

    names: list[str]

    def streams(self):
        return [f"ledger-{n}" for n in self.names]

    def handle(self, state):
        return [ec.emit(f"ledger-{n}", Noted(text=n)) for n in self.names]


def test_dynamic_streams(store):
    result = ec.execute(store, Ledger(names=["a", "b", "c"]))
    assert [e.stream_id for e in result.events] == ["ledger-a", "ledger-b", "ledger-c"]
    assert result.stream_versions == {"ledger-a": 1, "ledger-b": 1, "ledger-c": 1}
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Ledger(names=["ok", "bad\n"]))
    assert feed_positions(store) == [e.position for e in result.events]
    assert store.head_position() == result.position


class ReserveStock(ec.Command):
    """An order command: the order stream reveals which product streams to read."""

    order: ec.StreamId
    quantity: int = 1
    store: Any = None
    interfere_with: str | None = None
    calls: int = 0

    def initial_state(self):
        return {"products": [], "stock": {}, "reserved": False}

    def apply(self, state, event):
        d = event.data
        if isinstance(d, OrderPlaced):
            state["products"] = list(d.products)
        elif isinstance(d, StockAdded):
            state["stock"][event.stream_id] = state["stock"].get(event.stream_id, 0) + d.quantity
        elif isinstance(d, StockReserved):
            state["stock"][event.stream_id] = state["stock"].get(event.stream_id, 0) - d.quantity
            if d.order == self.order:
                state["reserved"] = True
        return state

    def discover(self, state):
        return [f"product-{p}" for p in state["products"]]

    def handle(self, state):
        self.calls += 1
        if self.calls == 1 and self.interfere_with:
            self.store.append([ec.emit(self.interfere_with, StockAdded(quantity=1))])
        ec.require(state["products"], "unknown order")
        ec.require(not state["reserved"], "already reserved")
        out = []
        for p in state["products"]:
            sid = f"product-{p}"
            ec.require(state["stock"].get(sid, 0) >= self.quantity, f"out of stock: {p}")
            out.append(ec.emit(sid, StockReserved(order=self.order, quantity=self.quantity)))
        return out


def _seed_order(store, order="order-1", products=("p1", "p2")):
    store.append([ec.emit(f"product-{p}", StockAdded(quantity=2)) for p in products])
    store.append([ec.emit(order, OrderPlaced(products=list(products)))])


def test_discovered_streams_are_read_and_writable(store):
    _seed_order(store)
    result = ec.execute(store, ReserveStock(order=SID("order-1")))
    assert [e.stream_id for e in result.events] == ["product-p1", "product-p2"]
    assert result.stream_versions == {"order-1": 1, "product-p1": 2, "product-p2": 2}
    with pytest.raises(ec.BusinessRuleViolation, match="already reserved"):
        ec.execute(store, ReserveStock(order=SID("order-1")))
    with pytest.raises(ec.BusinessRuleViolation, match="unknown order"):
        ec.execute(store, ReserveStock(order=SID("order-404")))


def test_discovered_streams_take_part_in_version_check(store):
    _seed_order(store)
    cmd = ReserveStock(order=SID("order-1"), store=store, interfere_with="product-p2")
    result = ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=3, base_delay=0))
    assert result.attempts == 2
    assert result.stream_versions == {"order-1": 1, "product-p1": 2, "product-p2": 3}

    _seed_order(store, "order-2", ("p3",))
    cmd = ReserveStock(order=SID("order-2"), store=store, interfere_with="product-p3")
    with pytest.raises(ec.ConcurrencyError) as info:
        ec.execute(store, cmd, retry=ec.RetryPolicy(max_retries=0))
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("product-p3", 1, 2)
    assert [type(e.data) for e in store.read_stream("product-p3")] == [StockAdded, StockAdded]


def test_discovered_stream_read_only_participant(store):
    """A discovered stream that is read but not written is still version-checked."""

    class Audit(ReserveStock):
        def handle(self, state):
            self.calls += 1
            if self.calls == 1:
                self.store.append([ec.emit("product-p1", StockAdded(quantity=5))])
            return [ec.emit(self.order, Noted(text=str(sorted(state["stock"].items()))))]

    _seed_order(store)
    cmd = Audit(order=SID("order-1"), store=store)
    result = ec.execute(store, cmd, retry=ec.RetryPolicy(base_delay=0))
    assert result.attempts == 2
    assert result.events[0].data.text == str([("product-p1", 7), ("product-p2", 2)])


class MultiRoundDiscovery(ec.Command):
    """Each stream names the next one: discovery runs one round per hop."""

    start: ec.StreamId

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [event.data.text]

    def discover(self, state):
        return [s for s in state if s]

    def handle(self, state):
        return [ec.emit(s, Noted()) for s in [self.start, *[s for s in state if s]]]


def test_multi_round_discovery(store):
    store.append([ec.emit("hop-0", Noted(text="hop-1")), ec.emit("hop-1", Noted(text="hop-2"))])
    store.append([ec.emit("hop-2", Noted(text=""))])
    result = ec.execute(store, MultiRoundDiscovery(start=SID("hop-0")))
    assert result.stream_versions == {"hop-0": 2, "hop-1": 2, "hop-2": 2}


class Unbounded(ec.Command):
    start: ec.StreamId

    def discover(self, state):
        return [f"endless-{uuid.uuid4()}"]

    def handle(self, state):
        return [ec.emit(self.start, Noted())]


def test_unbounded_discovery_raises_validation_error(store):
    with pytest.raises(ec.ValidationError, match="discover"):
        ec.execute(store, Unbounded(start=SID("s")))
    assert store.head_position() == 0


class BadDiscovery(ec.Command):
    start: ec.StreamId

    def discover(self, state):
        return ["bad\x00id"]

    def handle(self, state):
        return [ec.emit(self.start, Noted())]


def test_bad_discovered_stream_id_rejected(store):
    with pytest.raises(ec.ValidationError):
        ec.execute(store, BadDiscovery(start=SID("s")))
    assert store.head_position() == 0


# -- folding ---------------------------------------------------------------------------


class Recorder(ec.Command):
    first: ec.StreamId
    second: ec.StreamId

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [event.position]

    def handle(self, state):
        return [ec.emit(self.first, Noted(text=",".join(map(str, state))))]


def test_fold_order_follows_global_position(store):
    store.append([ec.emit("B", Noted())])  # 1st event of the feed
    store.append([ec.emit("A", Noted())])  # 2nd
    store.append([ec.emit("B", Noted()), ec.emit("A", Noted())])  # 3rd, 4th
    store.append([ec.emit("other", Noted())])  # 5th
    store.append([ec.emit("A", Noted())])  # 6th
    store.append([ec.emit("B", Noted())])  # 7th
    first = ec.execute(store, Recorder(first=SID("A"), second=SID("B")))  # writes the 8th
    second = ec.execute(store, Recorder(first=SID("B"), second=SID("A")))
    ords = ordinals(store)

    def folded(result):
        """The feed places of the events the command folded, in fold order."""
        return [ords[int(p)] for p in result.events[0].data.text.split(",")]

    assert folded(first) == [1, 2, 3, 4, 6, 7]
    assert ords[first.position] == 8
    assert folded(second) == [1, 2, 3, 4, 6, 7, 8]


def test_fold_sees_recorded_envelopes(store):
    seen = []

    class Inspect(ec.Command):
        a: ec.StreamId

        def apply(self, state, event):
            seen.append(event)
            return state

        def handle(self, state):
            return None

    md = ec.Metadata(user_id="u")
    written = store.append([ec.emit("env", Deposited(amount=1))], metadata=md)
    ec.execute(store, Inspect(a=SID("env")))
    assert seen == written
    assert isinstance(seen[0], ec.RecordedEvent) and seen[0].metadata == md


def test_per_event_metadata_from_handle(store):
    class Tagged(ec.Command):
        a: ec.StreamId

        def handle(self, state):
            return [
                ec.emit(self.a, Noted(text="plain")),
                ec.emit(self.a, Noted(text="tagged"), metadata=ec.Metadata(causation_id="evt-9")),
            ]

    md = ec.Metadata(correlation_id="req-1", user_id="alice", custom={"k": "v"})
    ec.execute(store, Tagged(a=SID("t")), metadata=md)
    read = store.read_stream("t")
    assert read[0].metadata == md
    assert read[1].metadata == ec.Metadata(causation_id="evt-9")


def test_withdrawn_and_deposited_fold_across_streams(store):
    ec.execute(store, Deposit(account=SID("a"), amount=10))
    ec.execute(store, Transfer(source=SID("a"), target=SID("b"), amount=10))
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Transfer(source=SID("a"), target=SID("b"), amount=1))
    ec.execute(store, Transfer(source=SID("b"), target=SID("a"), amount=3))
    assert (balance(store, "a"), balance(store, "b")) == (3, 7)
    assert [type(e.data) for e in store.read_all()] == [Deposited, Withdrawn, Deposited, Withdrawn, Deposited]


class _Gate(ec.Command):
    """Deposits 1, but its decision waits until the test opens the gate (holding its stream meanwhile)."""

    account: ec.StreamId
    entered: Any
    gate: Any

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + event.data.amount

    def handle(self, state):
        self.entered.set()
        assert self.gate.wait(10)
        return [ec.emit(self.account, Deposited(amount=1, balance=state + 1))]


def test_commands_of_one_process_on_a_stream_queue_instead_of_conflicting(store):
    """Threads of one process on one stream run one after the other: none fails its version
    check, so no retry is needed, and every deposit is there."""
    import threading

    acct = ec.StreamId("q-1")
    errors = []

    def work():
        try:
            for _ in range(15):
                ec.execute(store, Deposit(acct, 1), retry=ec.RetryPolicy(max_retries=0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [e.version for e in store.read_stream(acct)] == list(range(1, 61))


def test_waiting_for_a_stream_held_in_the_process_respects_the_timeout(store):
    import threading

    acct = ec.StreamId("q-2")
    entered, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: ec.execute(store, _Gate(acct, entered, gate)))
    holder.start()
    try:
        assert entered.wait(10)
        with pytest.raises(ec.CommandTimeoutError, match="waiting for other commands of this process"):
            ec.execute(store, Deposit(acct, 5), timeout=0.2)
        assert store.stream_version(acct) == 0
    finally:
        gate.set()
        holder.join()
    assert [e.data.amount for e in store.read_stream(acct)] == [1]
    ec.execute(store, Deposit(acct, 5), timeout=5)  # free again
    assert store.stream_version(acct) == 2


class Paired(ec.Event):
    __event_type__ = "test.executor.Paired"


class Checked(ec.Event):
    __event_type__ = "test.executor.Checked"


class CheckPairs(ec.Command):
    """Reads `left`, discovers `right` from it, and refuses unless both hold as many Paired events
    (true at every point in time: writers append one to each, atomically)."""

    left: ec.StreamId

    def initial_state(self):
        return {}

    def apply(self, state, event):
        if isinstance(event.data, Paired):
            state[event.stream_id] = state.get(event.stream_id, 0) + 1
        return state

    def discover(self, state):
        return ["pair-right"] if state.get(self.left) else []

    def handle(self, state):
        ec.require(state.get(self.left, 0) == state.get("pair-right", 0), f"unpaired: {state}")
        return [ec.emit(self.left, Checked())]


def test_refusal_on_state_read_in_several_rounds_is_confirmed_current(store):
    """Discovered streams are read later than declared ones: a pair written in between makes a state
    that never existed. A refusal decided on it must not be final."""
    store.append([ec.emit("pair-left", Paired()), ec.emit("pair-right", Paired())])
    real = store.read_streams
    calls = []

    def racing(ids):
        calls.append(list(ids))
        if len(calls) == 2:  # between the declared read and the discovered one: a pair is written
            store.append([ec.emit("pair-left", Paired()), ec.emit("pair-right", Paired())])
        return real(ids)

    store.read_streams = racing
    try:
        result = ec.execute(store, CheckPairs(ec.StreamId("pair-left")))
    finally:
        del store.read_streams
    assert result.attempts == 2 and [type(e.data) for e in result.events] == [Checked]
    assert result.stream_versions == {"pair-left": 3, "pair-right": 2}


@pytest.mark.parametrize("timeout", [1e10, 2**62, 1e300])
def test_a_finite_timeout_longer_than_a_lock_can_wait_runs_the_command(store, timeout):
    from domain import Deposit

    result = ec.execute(store, Deposit(ec.StreamId("long-timeout"), 1), timeout=timeout)
    assert result.stream_versions == {"long-timeout": 1}


def test_a_retry_delay_longer_than_a_sleep_can_wait_is_refused():
    with pytest.raises(ec.ValidationError, match="max_delay"):
        ec.RetryPolicy(max_delay=1e300)


class StrStreams(ec.Command):
    accounts: list[ec.StreamId] = []
    extra: object = None
    found: object = None

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def streams(self):
        return self.extra

    def discover(self, state):
        return self.found

    def handle(self, state):
        return []


@pytest.mark.parametrize("fields, where", [
    (dict(accounts="abc"), "StrStreams.accounts"),
    (dict(accounts=["a"], extra="bc"), "StrStreams.streams()"),
    (dict(accounts=["a"], found="bc"), "StrStreams.discover()"),
])
def test_a_str_where_stream_ids_are_expected_is_refused_not_read_letter_by_letter(store, fields, where):
    with pytest.raises(ec.ValidationError, match=re.escape(where)):
        ec.execute(store, StrStreams(**fields))
    with pytest.raises(ec.ValidationError, match=re.escape(where)):
        ec.execute(store, StrStreams(**fields), cache=ec.StateCache())
    assert store.head_position() == 0
