"""Hostile review of persistent command snapshots: a snapshot is an optimisation, never a source of truth.

Every test compares what a command sees when folded through snapshots with what it sees when folded from the
first event (a fresh fold: no cache, no snapshot). Each test was written to break it: the test shows
what should happen and fails until it is fixed.
"""
from __future__ import annotations

import datetime
import enum
import json
import os
import subprocess
import sys
import threading
import uuid

import msgspec
import pytest

import eventcore as ec
from eventcore.snapshots import SNAPSHOT_STATS
from domain import Deposited, Noted, Withdrawn

EVERY1 = ec.SnapshotPolicy(every=1)


def _needs_snapshots(store):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store3(request):
    """The store fixture without postgres-single (group commit does not touch snapshots): for the
    many-parameter tests, to keep this file fast."""
    from conftest import BACKENDS

    s = BACKENDS[request.param](request)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    with ec.connect(f"sqlite:///{tmp_path / 'events.db'}") as s:
        yield s


@pytest.fixture
def pg_store(pg_dsn, pg_schema):
    with ec.connect(pg_dsn, schema=pg_schema) as s:
        yield s


def _reopen(store, request):
    if store.scheme == "sqlite":
        return ec.connect(f"sqlite:///{store.path}")
    return ec.connect(store._dsn, schema=store.schema)


SEEN: list = []


class Seer(ec.Command):
    """Records the state handle() is given; emits nothing. The fold keeps every event in order."""

    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Seer"
    __state_type__ = tuple[int, tuple[tuple[str, int, str], ...]]

    account: ec.StreamId
    other: str | None = None

    def streams(self):
        return [self.other] if self.other else []

    def initial_state(self):
        return (0, ())

    def apply(self, state, event):
        balance, seen = state
        sign = 1 if isinstance(event.data, Deposited) else -1 if isinstance(event.data, Withdrawn) else 0
        amount = getattr(event.data, "amount", 0)
        return (balance + sign * amount, seen + ((event.stream_id, event.version, event.event_id.hex),))

    def handle(self, state):
        SEEN.append(state)
        return []


def _seen(store, cmd, **kw):
    SEEN.clear()
    ec.execute(store, cmd, **kw)
    return SEEN[-1]


def _truth(store, cmd):
    """The state `cmd` sees folded from the first event of every stream: no cache, no snapshot."""
    return _seen(store, cmd, cache=None, snapshots=None)


# -- state values that compare equal after a msgpack round trip but are not the same -------------------------


CEST = datetime.timezone(datetime.timedelta(hours=2), "CEST")


class LastDeposit(ec.Command):
    """The local time of the last deposit: a "one deposit per local day" rule. An aware datetime in +02:00
    encodes as a msgpack timestamp and decodes in UTC: equal, yet another day."""

    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.LastDeposit"
    __state_type__ = datetime.datetime | None

    account: ec.StreamId

    def initial_state(self):
        return None

    def apply(self, state, event):
        # 01:30 local (CEST) on 2026-06-02 is 23:30 UTC on 2026-06-01
        return datetime.datetime(2026, 6, 2, 1, 30, tzinfo=CEST)

    def handle(self, state):
        SEEN.append(state)
        return []


def test_an_aware_datetime_state_keeps_its_timezone(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    truth = _truth(store, LastDeposit(account="acct"))
    _seen(store, LastDeposit(account="acct"), cache=None)          # writes the snapshot (if any)
    got = _seen(store, LastDeposit(account="acct"), cache=None)     # folded from it
    assert (got.date(), got.hour, got.utcoffset()) == (truth.date(), truth.hour, truth.utcoffset())


class Currency(str, enum.Enum):
    EUR = "EUR"
    USD = "USD"


class Wallet(ec.Command):
    """A dict keyed by an enum: with the default __state_type__ (dict) the keys come back as plain str,
    equal and hashing alike, but no longer enum members."""

    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Wallet"

    account: ec.StreamId

    def initial_state(self):
        return {}

    def apply(self, state, event):
        return {**state, Currency.EUR: state.get(Currency.EUR, 0) + getattr(event.data, "amount", 0)}

    def handle(self, state):
        SEEN.append(state)
        return []


def test_enum_keys_of_a_dict_state_stay_enum_members(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    truth = _truth(store, Wallet(account="acct"))
    _seen(store, Wallet(account="acct"), cache=None)
    got = _seen(store, Wallet(account="acct"), cache=None)
    assert [type(k) for k in got] == [type(k) for k in truth] == [Currency]


class Totals(msgspec.Struct):
    total: float = 0.0     # declared float, but apply() adds ints: the full fold holds an int
    count: int = 0


class Average(ec.Command):
    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Average"

    account: ec.StreamId

    def initial_state(self):
        return Totals(total=0, count=0)

    def apply(self, state, event):
        return Totals(total=state.total + getattr(event.data, "amount", 0), count=state.count + 1)

    def handle(self, state):
        SEEN.append(state)
        return []


def test_a_struct_field_keeps_the_type_the_fold_gave_it(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    truth = _truth(store, Average(account="acct"))
    _seen(store, Average(account="acct"), cache=None)
    got = _seen(store, Average(account="acct"), cache=None)
    assert repr(got) == repr(truth)


@pytest.mark.parametrize("state", [
    -0.0, {"b": 1, "a": 2}, {1: "int key", "1": "str key"}, [True, 1, 1.0], (1, (2, 3)), {"x": [1.5, -0.0]},
    frozenset({1, 2}), b"\x00\xff", "", 2**63 - 1, -2**63, None,
], ids=["neg0", "key_order", "int_str_keys", "bool_int_float", "nested_tuple", "nested_neg0", "frozenset",
        "bytes", "empty_str", "int64max", "int64min", "none"])
def test_states_that_round_trip_or_are_not_snapshotted_decide_alike(store3, state):
    store = store3
    """Whatever comes back from a snapshot is what the fold gave: same repr, same types, same order."""
    _needs_snapshots(store)

    class Const(ec.Command):
        __snapshots__ = EVERY1
        __snapshot_name__ = "attack.Const"
        account: ec.StreamId

        def initial_state(self):
            return state

        def apply(self, s, event):
            return s

        def handle(self, s):
            SEEN.append(s)
            return []

    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    truth = _truth(store, Const(account="acct"))
    for _ in range(2):
        got = _seen(store, Const(account="acct"), cache=None)
        assert repr(got) == repr(truth) and type(got) is type(truth)


def test_nan_state_is_never_snapshotted_and_never_an_error(store):
    _needs_snapshots(store)

    class NaNs(ec.Command):
        __snapshots__ = EVERY1
        __snapshot_name__ = "attack.NaNs"
        account: ec.StreamId

        def initial_state(self):
            return float("nan")

        def apply(self, s, event):
            return s

        def handle(self, s):
            SEEN.append(s)
            return []

    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    for _ in range(2):
        got = _seen(store, NaNs(account="acct"), cache=None)
        assert got != got
    assert [s.command for s in store.snapshots()] == []


# -- a snapshot handed from one command class to another ------------------------------------------------------


class Parent(ec.Command):
    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Parent"
    account: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + getattr(event.data, "amount", 0)

    def handle(self, state):
        SEEN.append(state)
        return []


class Child(Parent):
    """Another fold (counts events), same state type; it inherits __snapshot_name__ but not apply()."""

    def apply(self, state, event):
        return state + 1


def test_a_subclass_never_folds_from_its_parents_snapshot(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=10)) for _ in range(3)])
    _seen(store, Parent(account="acct"), cache=None)           # snapshot: 30
    assert _seen(store, Child(account="acct"), cache=None) == _truth(store, Child(account="acct")) == 3


def _class_in_module(module: str, step: int):
    ns = {"__module__": module, "__qualname__": "Counter", "__annotations__": {"account": ec.StreamId},
          "__snapshots__": EVERY1,
          "initial_state": lambda self: 0,
          "apply": lambda self, s, e: s + step,
          "handle": lambda self, s: SEEN.append(s) or []}
    return type("Counter", (ec.Command,), ns)


def test_same_qualname_in_two_modules_keeps_two_snapshots(store):
    _needs_snapshots(store)
    one, two = _class_in_module("attack_mod_one", 1), _class_in_module("attack_mod_two", 100)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    _seen(store, one(account="acct"), cache=None)
    assert _seen(store, two(account="acct"), cache=None) == 300
    assert _seen(store, one(account="acct"), cache=None) == 3
    assert sorted(s.command for s in store.snapshots()) == ["attack_mod_one.Counter", "attack_mod_two.Counter"]


def _local_class(step: int):
    class Step(ec.Command):
        __snapshots__ = EVERY1
        account: ec.StreamId

        def initial_state(self):
            return 0

        def apply(self, s, e):
            return s + step

        def handle(self, s):
            SEEN.append(s)
            return []
    return Step


def test_classes_made_by_one_factory_never_share_a_snapshot(store):
    """A class made inside a function shares its qualname with every class the function makes: it must
    name its snapshots itself (refused before anything is read or written); named, they share nothing."""
    _needs_snapshots(store)
    one, hundred = _local_class(1), _local_class(100)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    with pytest.raises(ec.ValidationError, match="__snapshot_name__"):
        _seen(store, one(account="acct"), cache=None)
    assert store.stream_version("acct") == 3 and store.snapshots() == []
    one.__snapshot_name__, hundred.__snapshot_name__ = "attack.Step1", "attack.Step100"
    _seen(store, one(account="acct"), cache=None)
    assert _seen(store, hundred(account="acct"), cache=None) == _truth(store, hundred(account="acct")) == 300


# -- handle() and apply() that mutate -----------------------------------------------------------------------


class Mutator(ec.Command):
    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Mutator"
    account: ec.StreamId

    def initial_state(self):
        return {"n": 0, "log": []}

    def apply(self, state, event):
        state["n"] += 1                      # in place
        state["log"].append(event.version)
        return state

    def handle(self, state):
        SEEN.append(json.loads(json.dumps(state)))
        state["n"] = -999                    # vandalism after the decision
        state["log"].clear()
        return []


def test_handle_mutating_its_state_never_reaches_the_snapshot(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(4)])
    for _ in range(3):
        assert _seen(store, Mutator(account="acct")) == {"n": 4, "log": [1, 2, 3, 4]}
    store.append([ec.emit("acct", Deposited(amount=1))])
    assert _seen(store, Mutator(account="acct")) == {"n": 5, "log": [1, 2, 3, 4, 5]}


# -- bad input: nothing written --------------------------------------------------------------------------------


@pytest.mark.parametrize("attr,value", [
    ("__state_version__", 0), ("__state_version__", True), ("__state_version__", "1"), ("__state_version__", 2**31),
    ("__snapshots__", "every=1"), ("__snapshots__", 5),
    ("__snapshot_name__", ""), ("__snapshot_name__", 7), ("__snapshot_name__", "x" * 100_000),
    ("__state_type__", "int"), ("__state_type__", 42),
])
def test_bad_class_attributes_write_nothing_or_everything(store3, attr, value):
    store = store3
    """A bad snapshot attribute is a ValidationError before anything is written, or it costs only the
    snapshot: never events written and then an error, never a broken store."""
    _needs_snapshots(store)

    class Bad(ec.Command):
        __snapshots__ = EVERY1
        account: ec.StreamId

        def initial_state(self):
            return 0

        def apply(self, s, e):
            return s + 1

        def handle(self, s):
            return [ec.emit(self.account, Noted(text=str(s)))]

    setattr(Bad, attr, value)
    store.append([ec.emit("acct", Deposited(amount=1))])
    try:
        ec.execute(store, Bad(account="acct"), cache=None)
    except ec.ValidationError:
        assert store.stream_version("acct") == 1, "a ValidationError after events were written"
    else:
        assert store.stream_version("acct") == 2
    # the store still works, and a normal command still snapshots
    assert _seen(store, Seer(account="acct"), cache=None)[0] == 1
    assert _seen(store, Seer(account="acct"), cache=None) == _truth(store, Seer(account="acct"))


@pytest.mark.parametrize("kw", [
    {"older_than": float("nan")}, {"older_than": float("inf")}, {"older_than": True}, {"older_than": "10"},
    {"command": 5}, {"command": b"attack.Seer"}, {"older_than": -0.5},
])
def test_drop_snapshots_refuses_bad_arguments_and_drops_nothing(store3, kw):
    store = store3
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1))])
    _seen(store, Seer(account="acct"), cache=None)
    assert len(store.snapshots()) == 1
    with pytest.raises(ec.ValidationError):
        store.drop_snapshots(**kw)
    assert len(store.snapshots()) == 1


def test_bad_per_call_policy_reads_and_writes_nothing(store):
    class Writes(Seer):
        def handle(self, s):
            return [ec.emit(self.account, Noted())]

    store.append([ec.emit("acct", Deposited(amount=1))])
    for bad in (ec.SnapshotPolicy, {"every": 1}, True, 0):
        with pytest.raises(ec.ValidationError):
            ec.execute(store, Writes(account="acct"), snapshots=bad)
    assert store.stream_version("acct") == 1
    assert store.snapshots() == [] if store.supports_snapshots else True
    with pytest.raises(ec.ValidationError):
        ec.SnapshotPolicy(every=True)
    with pytest.raises(ec.ValidationError):
        ec.SnapshotPolicy(every=1.0)


@pytest.mark.parametrize("name", ["a\x00b", "\ud800"], ids=["nul", "lone_surrogate"])
def test_a_snapshot_name_no_store_can_hold_is_refused_cleanly(store, backend, request, name):
    """A __snapshot_name__ the store cannot hold: a ValidationError before anything is read or written (or the
    snapshot is just not used), never a raw UnicodeEncodeError / StoreUnavailableError."""
    _needs_snapshots(store)

    class Named(Seer):
        pass

    Named.__snapshot_name__ = name
    store.append([ec.emit("acct", Deposited(amount=1))])
    try:
        _seen(store, Named(account="acct"), cache=None)
    except ec.ValidationError:
        assert store.stream_version("acct") == 1
    assert store.stream_version("acct") == 1


# -- concurrency: snapshots + the default cache + other writers --------------------------------------------


class Spend(ec.Command):
    """Withdraws 1 if the balance allows; state: (balance, count of events)."""

    __snapshots__ = ec.SnapshotPolicy(every=2)
    __snapshot_name__ = "attack.Spend"
    __state_type__ = tuple[int, int]
    account: ec.StreamId
    other: str | None = None

    def streams(self):
        return [self.other] if self.other else []

    def initial_state(self):
        return (0, 0)

    def apply(self, state, event):
        d = event.data
        return (state[0] + (d.amount if isinstance(d, Deposited) else -d.amount if isinstance(d, Withdrawn) else 0),
                state[1] + 1)

    def handle(self, state):
        ec.require(state[0] >= 1, "insufficient")
        return [ec.emit(self.account, Withdrawn(amount=1, balance=state[0] - 1))]


def _balances_never_negative(store, streams):
    events = sorted((e for s in streams for e in store.read_stream(s)), key=lambda e: e.position)
    balance = 0
    for e in events:
        balance += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
        assert balance >= 0, f"overdrawn at {e.stream_id}@{e.version}"
    return balance


def test_threads_and_two_store_objects_with_snapshots_cache_and_drops(store, backend, request):
    """Six threads on two store objects (each with its own cache) spend from an account whose deposits
    arrive on another stream, while a seventh drops snapshots: nothing is overdrawn, every withdrawal
    records the balance the full fold gives at its position."""
    _needs_snapshots(store)
    other = store if backend == "memory" else _reopen(store, request)
    try:
        store.append([ec.emit("in", Deposited(amount=1)) for _ in range(40)])
        stop = threading.Event()
        errors: list = []

        def spender(s, n):
            try:
                for _ in range(n):
                    try:
                        ec.execute(s, Spend(account="out", other="in"),
                                   retry=ec.RetryPolicy(max_retries=100, max_delay=0.005))
                    except ec.BusinessRuleViolation:
                        pass
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(exc)

        def dropper():
            while not stop.is_set():
                try:
                    store.drop_snapshots()
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                stop.wait(0.003)

        def depositor():
            for _ in range(10):
                other.append([ec.emit("in", Deposited(amount=1))])

        threads = [threading.Thread(target=spender, args=(store if i % 2 else other, 10)) for i in range(6)]
        threads += [threading.Thread(target=depositor)]
        d = threading.Thread(target=dropper)
        d.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        d.join()
        assert errors == []
        assert _balances_never_negative(store, ["in", "out"]) == 50 - store.stream_version("out")
        # each withdrawal recorded the balance a full fold gives just before it
        balance = 0
        for e in sorted(store.read_stream("in") + store.read_stream("out"), key=lambda e: e.position):
            if isinstance(e.data, Withdrawn):
                assert e.data.balance == balance - 1
            balance += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
    finally:
        if other is not store:
            other.close()


def test_two_store_objects_random_walk_matches_the_full_fold(store, backend, request):
    """Deterministic random walk: two store objects (own caches) append to two streams, run an
    order-sensitive multi-stream command through snapshots (every 1..3) with and without cache, drop
    snapshots: what handle() sees is always the full fold."""
    _needs_snapshots(store)
    import random

    rnd = random.Random(7)
    other = store if backend == "memory" else _reopen(store, request)
    stores = [store, other]
    try:
        for step in range(60):
            op = rnd.random()
            s = rnd.choice(stores)
            a, b = rnd.sample(["x", "y"], 2)
            if op < 0.45:
                s.append([ec.emit(rnd.choice([a, b]), Deposited(amount=rnd.randint(1, 5)))
                          for _ in range(rnd.randint(1, 3))])
            elif op < 0.5:
                s.drop_snapshots()
            else:
                cmd = Seer(account=a, other=b)
                got = _seen(s, cmd, snapshots=ec.SnapshotPolicy(every=rnd.randint(1, 3)),
                            **({} if rnd.random() < 0.5 else {"cache": None}))
                assert got == _truth(rnd.choice(stores), cmd), f"step {step}"
    finally:
        if other is not store:
            other.close()


def test_a_stream_written_through_the_cache_of_another_store_object(store, backend, request):
    """Store A caches x (short) and folds y (long) from a snapshot; store B moves both and writes a newer
    snapshot; A then decides (a refusal: nothing appended, so only the read-back protects it)."""
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store, request)
    try:
        store.append([ec.emit("y", Deposited(amount=1)) for _ in range(30)])
        store.append([ec.emit("x", Deposited(amount=1))])
        cmd = Seer(account="x", other="y")
        assert _seen(store, cmd) == _truth(store, cmd)        # A: caches x, snapshot of (x, y)
        other.append([ec.emit("x", Withdrawn(amount=1)), ec.emit("y", Withdrawn(amount=1))])
        other.append([ec.emit("y", Deposited(amount=7))])
        assert _seen(other, cmd) == _truth(other, cmd)        # B: a newer snapshot
        assert _seen(store, cmd) == _truth(store, cmd)        # A: stale cache of x + B's snapshot
        store.append([ec.emit("x", Deposited(amount=2))])
        assert _seen(other, cmd) == _truth(other, cmd)
    finally:
        other.close()


# -- streams found by discover(), idempotency keys, raw events and upcasters ----------------------------------


class Finder(Seer):
    __snapshot_name__ = "attack.Finder"

    def discover(self, state):
        return ["found"] if state[0] >= 2 else []


def test_a_discovering_command_folds_from_the_start_and_writes_no_snapshot(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    store.append([ec.emit("found", Deposited(amount=10))])
    for _ in range(3):
        got = _seen(store, Finder(account="acct"), cache=None)
        assert got[0] == 13
    assert [s.command for s in store.snapshots()] == []


def test_idempotency_keys_with_snapshots(store):
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=3))])
    key = uuid.uuid4()
    first = ec.execute(store, Spend(account="acct"), idempotency_key=key, cache=None)
    again = ec.execute(store, Spend(account="acct"), idempotency_key=key, cache=None)
    assert again.replayed and [e.event_id for e in again.events] == [e.event_id for e in first.events]
    ec.execute(store, Spend(account="acct"), idempotency_key=str(key) + "-2", cache=None)
    ec.execute(store, Spend(account="acct"), idempotency_key=str(key) + "-3", cache=None)
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Spend(account="acct"), idempotency_key=str(key) + "-4", cache=None)
    assert store.stream_version("acct") == 4


class Credited(ec.Event):
    __event_type__ = "attack.Credited"
    __event_version__ = 2
    cents: int


@ec.upcaster("attack.Credited", from_version=1)
def _credited_v1(data: dict) -> dict:
    return {"cents": data["euros"] * 100}


class Cents(ec.Command):
    __snapshots__ = ec.SnapshotPolicy(every=2)
    __snapshot_name__ = "attack.Cents"
    account: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + event.data.cents

    def handle(self, state):
        SEEN.append(state)
        return []


def test_raw_events_of_an_old_version_after_a_snapshot_are_upcast(store):
    _needs_snapshots(store)
    for i in range(6):
        store.append([ec.emit("acct", ec.RawEvent("attack.Credited", b'{"euros": 1}', version=1)),
                      ec.emit("acct", ec.RawEvent("attack.Credited", b'{"cents": 5}', version=2))])
        assert _seen(store, Cents(account="acct"), cache=None) == _truth(store, Cents(account="acct")) == 105 * (i + 1)


def test_a_very_large_state(store):
    _needs_snapshots(store)

    class Big(Seer):
        __snapshot_name__ = "attack.Big"
        __state_type__ = list[str]

        def initial_state(self):
            return []

        def apply(self, state, event):
            return state + ["x" * 400_000]

    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(12)])   # ~4.8 MB of state
    assert len(_seen(store, Big(account="acct"), cache=None)) == 12
    store.append([ec.emit("acct", Deposited(amount=1))])
    assert len(_seen(store, Big(account="acct"), cache=None)) == 13
    assert all(s.size > 4_000_000 for s in store.snapshots())


# -- the CLI: a listing creates and changes nothing ----------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "eventcore", "snapshots", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli_on_a_missing_sqlite_store_creates_nothing(tmp_path):
    path = tmp_path / "nope" / "events.db"
    path2 = tmp_path / "events.db"
    for args in (["--json"], ["--drop"], ["--drop", "x", "--older-than", "5"]):
        for p in (path, path2):
            done = _cli("--dsn", f"sqlite:///{p}", *args)
            assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_on_an_older_sqlite_schema_changes_nothing(tmp_path):
    import sqlite3

    path = tmp_path / "events.db"
    ec.connect(f"sqlite:///{path}").close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE command_snapshots")
    raw.execute("PRAGMA user_version = 5")
    raw.commit()
    raw.close()
    before = path.read_bytes()
    for args in (["--json"], ["--drop"]):
        done = _cli("--dsn", f"sqlite:///{path}", *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert "schema" in done.stderr.lower()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db"]


def test_cli_bad_arguments(tmp_path):
    path = tmp_path / "events.db"
    ec.connect(f"sqlite:///{path}").close()
    for args in (["--older-than", "5"], ["--drop", "--older-than", "nan"], ["--drop", "--older-than", "-1"],
                 ["--drop", "--older-than", "inf"]):
        done = _cli("--dsn", f"sqlite:///{path}", *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, (args, done.stderr)


def test_cli_on_missing_and_older_postgres_schemas_creates_nothing(pg_dsn, pg_schema):
    import psycopg

    url = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={pg_schema}"

    def schemas():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}

    before = schemas()
    for args in (["--json"], ["--drop"]):
        done = _cli("--dsn", url, *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert schemas() == before
    # a schema one migration behind: no command_snapshots
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{pg_schema}".command_snapshots')
        conn.execute(f'DELETE FROM "{pg_schema}".schema_migrations WHERE version = 9')
    for args in (["--json"], ["--drop"]):
        done = _cli("--dsn", url, *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert "schema" in done.stderr.lower() or "migrat" in done.stderr.lower(), done.stderr
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (pg_schema,))}
        version = conn.execute(f'SELECT max(version) FROM "{pg_schema}".schema_migrations').fetchone()[0]
    assert "command_snapshots" not in tables and version == 8


# -- hand-edited snapshot rows ----------------------------------------------------------------------------------


def _snapshot_then_edit_sqlite(store, sql, params=()):
    import sqlite3

    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(4)])
    truth = _truth(store, Seer(account="acct"))
    _seen(store, Seer(account="acct"), cache=None)
    assert len(store.snapshots()) == 1
    raw = sqlite3.connect(store.path)
    raw.execute(sql, params)
    raw.commit()
    raw.close()
    return truth


@pytest.mark.parametrize("covers", [
    5, 1.5,  # TEXT affinity: stored as '5', '1.5'
    "", "null", "[]", '{"acct": [3]}', '{"acct": ["3", "x"]}', '{"acct": [9223372036854775807, "x"]}',
    '{"acct": [-4, "x"]}', '{"acct": [1e300, "x"]}', '{"acct": [true, "x"]}', '{"acct": [18446744073709551616, ""]}',
    b"\xff\xfe", '{"acct": [2, "x"], "acct ": [0, ""]}',
])
def test_sqlite_garbage_covers_is_passed_over(sqlite_store, covers):
    store = sqlite_store
    truth = _snapshot_then_edit_sqlite(store, "UPDATE command_snapshots SET covers = ?", (covers,))
    assert _seen(store, Seer(account="acct"), cache=None) == truth


@pytest.mark.parametrize("column,value", [
    ("state", b"\xc1"), ("state", "text, not a blob"), ("state", 7), ("state_version", "1"), ("state_version", 1.0),
])
def test_sqlite_garbage_state_is_passed_over(sqlite_store, column, value):
    store = sqlite_store
    truth = _snapshot_then_edit_sqlite(store, f"UPDATE command_snapshots SET {column} = ?", (value,))
    assert _seen(store, Seer(account="acct"), cache=None) == truth


def test_sqlite_listing_survives_a_garbage_row(sqlite_store):
    store = sqlite_store
    _snapshot_then_edit_sqlite(store, "UPDATE command_snapshots SET written_at = 'yesterday'")
    done = _cli("--dsn", store.url)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert len(store.snapshots()) == 1


def _pg_edit(store, sql):
    import psycopg

    with psycopg.connect(store._dsn, autocommit=True) as conn:
        conn.execute(sql.replace("{s}", f'"{store.schema}"'))


@pytest.mark.parametrize("edit", [
    "UPDATE {s}.command_snapshots SET versions = '{1}'",                       # arrays disagree with covers
    "UPDATE {s}.command_snapshots SET versions = '{-7}'",
    "UPDATE {s}.command_snapshots SET versions = '{9223372036854775807}'",
    "UPDATE {s}.command_snapshots SET versions = '{NULL}'",
    "UPDATE {s}.command_snapshots SET streams = '{NULL}'",
    "UPDATE {s}.command_snapshots SET streams = '{other}'",
    "UPDATE {s}.command_snapshots SET streams = '{acct,acct}', versions = '{2,3}'",
    "UPDATE {s}.command_snapshots SET covers = '{\"acct\": [3, \"00\"]}'",
    "UPDATE {s}.command_snapshots SET covers = 'not json'",
    "UPDATE {s}.command_snapshots SET state = '\\xc1'",
])
def test_postgres_hand_edited_rows_are_passed_over(pg_store, edit):
    store = pg_store
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(4)])
    truth = _truth(store, Seer(account="acct"))
    _seen(store, Seer(account="acct"), cache=None)
    _pg_edit(store, edit)
    assert _seen(store, Seer(account="acct"), cache=None) == truth
    store.snapshots()


@pytest.mark.parametrize("edit", [
    "UPDATE {s}.command_snapshots SET versions = '{}'",
    "UPDATE {s}.command_snapshots SET versions = '{{4,4}}'",
    "UPDATE {s}.command_snapshots SET streams = '{acct,other}'",
])
def test_postgres_refuses_snapshot_rows_its_reads_could_not_use(pg_store, edit):
    """Arrays of another shape than one version per stream are refused by the table itself."""
    import psycopg

    store = pg_store
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(4)])
    _seen(store, Seer(account="acct"), cache=None)
    with pytest.raises(psycopg.errors.CheckViolation):
        _pg_edit(store, edit)


# -- PostgreSQL: positions are transaction ids, and commits do not come in their order -----------------------


def test_a_late_commit_of_a_lower_position_is_folded_in_position_order(pg_dsn, pg_schema):
    import psycopg

    fast = ec.connect(pg_dsn, schema=pg_schema, group_commit=False)
    slow = ec.connect(pg_dsn, schema=pg_schema, group_commit=False)
    lock = psycopg.connect(pg_dsn, autocommit=True)
    try:
        fast.append([ec.emit("fast", Deposited(amount=1)), ec.emit("slow", Deposited(amount=1))])
        lock.execute(f"""CREATE FUNCTION "{pg_schema}".hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); RETURN NULL; END $$""")
        lock.execute(f"""CREATE TRIGGER hold AFTER INSERT ON "{pg_schema}".events FOR EACH ROW
            WHEN (NEW.stream_id = 'slow') EXECUTE FUNCTION "{pg_schema}".hold()""")
        lock.execute("SELECT pg_advisory_lock(4242)")
        t = threading.Thread(target=lambda: slow.append([ec.emit("slow", Deposited(amount=2))]))
        t.start()
        import time

        time.sleep(0.3)                                                  # its xid (position) is taken
        fast.append([ec.emit("fast", Deposited(amount=3))])             # a higher position, committed first
        cmd = Seer(account="fast", other="slow")
        _seen(fast, cmd, cache=None)                                     # snapshot: fast@2, slow@1
        lock.execute("SELECT pg_advisory_unlock(4242)")
        t.join()
        got = _seen(fast, cmd, cache=None)
        truth = _truth(fast, cmd)
        assert [x[:2] for x in got[1]] == [x[:2] for x in truth[1]]
    finally:
        lock.close()
        fast.close()
        slow.close()


# -- a store restored or rebuilt, with the old snapshot rows copied back ----------------------------------------


def test_postgres_schema_rebuilt_with_other_events_and_the_old_snapshots(pg_dsn, pg_schema):
    import psycopg

    other_schema = pg_schema + "_b"
    with ec.connect(pg_dsn, schema=pg_schema) as old:
        old.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
        _seen(old, Seer(account="acct"), cache=None)
    try:
        with ec.connect(pg_dsn, schema=other_schema) as new:
            new.append([ec.emit("acct", Deposited(amount=100)) for _ in range(7)])
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute(f'INSERT INTO "{other_schema}".command_snapshots SELECT * FROM "{pg_schema}".command_snapshots')
            assert len(new.snapshots()) == 1
            mismatched = SNAPSHOT_STATS["history_mismatch"]
            assert _seen(new, Seer(account="acct"), cache=None) == _truth(new, Seer(account="acct"))
            assert _seen(new, Seer(account="acct"), cache=None)[0] == 700
            assert SNAPSHOT_STATS["history_mismatch"] == mismatched + 1
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')


def test_sqlite_file_replaced_with_the_old_snapshots_copied_in(tmp_path):
    import sqlite3

    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with ec.connect(f"sqlite:///{a}") as old:
        old.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
        old.append([ec.emit("other", Deposited(amount=1))])
        _seen(old, Seer(account="acct", other="other"), cache=None)
    with ec.connect(f"sqlite:///{b}") as new:
        new.append([ec.emit("other", Deposited(amount=50))])
        new.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
        raw = sqlite3.connect(b)
        raw.execute(f"ATTACH '{a}' AS old")
        raw.execute("INSERT INTO command_snapshots SELECT * FROM old.command_snapshots")
        raw.commit()
        raw.close()
        cmd = Seer(account="acct", other="other")
        assert _seen(new, cmd, cache=None) == _truth(new, cmd)


def test_a_store_copied_with_its_event_ids_keeps_using_its_snapshots(tmp_path):
    """read_all -> append of the same events (same ids) is the same history: the snapshot stays usable."""
    import sqlite3

    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with ec.connect(f"sqlite:///{a}") as old, ec.connect(f"sqlite:///{b}") as new:
        old.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
        _seen(old, Seer(account="acct"), cache=None)
        raw = sqlite3.connect(b)
        raw.execute(f"ATTACH '{a}' AS old")
        raw.execute("INSERT INTO events SELECT * FROM old.events")
        raw.execute("INSERT INTO command_snapshots SELECT * FROM old.command_snapshots")
        raw.commit()
        raw.close()
        used = SNAPSHOT_STATS["used"]
        assert _seen(new, Seer(account="acct"), cache=None) == _truth(new, Seer(account="acct"))
        assert SNAPSHOT_STATS["used"] == used + 1


# -- asyncio and sync stores on one PostgreSQL database --------------------------------------------------------


def test_sync_threads_and_asyncio_tasks_spend_through_snapshots(pg_dsn, pg_schema):
    import asyncio

    import eventcore.aio as eca

    with ec.connect(pg_dsn, schema=pg_schema) as sync:
        sync.append([ec.emit("in", Deposited(amount=1)) for _ in range(30)])
        errors: list = []

        def spender():
            for _ in range(12):
                try:
                    ec.execute(sync, Spend(account="out", other="in"), retry=ec.RetryPolicy(max_retries=100, max_delay=0.005))
                except ec.BusinessRuleViolation:
                    pass
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

        async def tasks():
            async with await eca.connect(pg_dsn, schema=pg_schema) as astore:
                async def one():
                    for _ in range(12):
                        try:
                            await eca.execute(astore, Spend(account="out", other="in"),
                                              retry=ec.RetryPolicy(max_retries=100, max_delay=0.005))
                        except ec.BusinessRuleViolation:
                            pass
                await asyncio.gather(one(), one(), one(), astore.drop_snapshots())

        threads = [threading.Thread(target=spender) for _ in range(2)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
        assert errors == []
        assert store_balance(sync) == 0
        balance = 0
        for e in sorted(sync.read_stream("in") + sync.read_stream("out"), key=lambda e: e.position):
            if isinstance(e.data, Withdrawn):
                assert e.data.balance == balance - 1
            balance += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount


def store_balance(store):
    return _balances_never_negative(store, ["in", "out"])


@pytest.mark.parametrize("kw", [{"older_than": 1e300}, {"older_than": 1e13}, {"command": "a\x00b"},
                                {"command": "\ud800"}, {"command": ""}],
                         ids=["older_than_1e300", "older_than_1e13", "nul_name", "surrogate_name", "empty_name"])
def test_drop_snapshots_with_extreme_but_valid_arguments(store3, request, kw):
    """A retention of 1e13 s (nothing is that old) drops nothing; a name no snapshot has drops nothing (or is
    a ValidationError): never an OverflowError, a 'timestamp out of range' StoreUnavailableError, etc."""
    store = store3
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1))])
    _seen(store, Seer(account="acct"), cache=None)
    try:
        assert store.drop_snapshots(**kw) == 0
    except ec.ValidationError:
        pass
    assert len(store.snapshots()) == 1


# -- asyncio: a deadline that expires while the snapshot is written, after the append committed ---------------


class Deposit1(ec.Command):
    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Deposit1"
    account: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return [ec.emit(self.account, Deposited(amount=1))]


def test_asyncio_timeout_during_the_snapshot_write_never_says_nothing_was_written(pg_dsn, pg_schema):
    import asyncio
    import psycopg

    import eventcore.aio as eca

    with ec.connect(pg_dsn, schema=pg_schema) as sync:
        sync.append([ec.emit("acct", Deposited(amount=1))])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"""CREATE FUNCTION "{pg_schema}".slow() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.6); RETURN NEW; END $$""")
        conn.execute(f"""CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON "{pg_schema}".command_snapshots
            FOR EACH ROW EXECUTE FUNCTION "{pg_schema}".slow()""")

    async def run():
        async with await eca.connect(pg_dsn, schema=pg_schema) as astore:
            try:
                await eca.execute(astore, Deposit1(account="acct"), cache=None, timeout=0.3)
            except ec.CommandTimeoutError as exc:
                return exc
            return None

    outcome = asyncio.run(run())
    with ec.connect(pg_dsn, schema=pg_schema) as sync:
        written = sync.stream_version("acct") == 2
    assert written
    assert outcome is None or outcome.maybe_committed, f"committed, yet: {outcome}"


class Tally(ec.Command):
    """Counts per type in a defaultdict inside the state: after msgpack it is a plain dict (equal), and a
    lookup of a type never seen raises KeyError instead of giving 0."""

    __snapshots__ = EVERY1
    __snapshot_name__ = "attack.Tally"
    account: ec.StreamId

    def initial_state(self):
        import collections

        return {"by_type": collections.defaultdict(int)}

    def apply(self, state, event):
        state["by_type"][event.type] += 1
        return state

    def handle(self, state):
        SEEN.append(state["by_type"]["test.Withdrawn"])   # 0 on a full fold
        return []


def test_a_nested_defaultdict_stays_a_defaultdict(store3):
    store = store3
    _needs_snapshots(store)
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
    assert _truth(store, Tally(account="acct")) == 0
    for _ in range(2):
        assert _seen(store, Tally(account="acct"), cache=None) == 0


@pytest.mark.parametrize("pair", [("NULL", "null"), ("a,b", "{x}"), ('q"uote', "back\\slash"), (" sp ", "ü-é"),
                                  ("a", "a,b")])
def test_awkward_stream_ids_use_their_snapshots(store3, pair):
    store = store3
    _needs_snapshots(store)
    a, b = pair
    store.append([ec.emit(a, Deposited(amount=1)), ec.emit(b, Deposited(amount=2))])
    store.append([ec.emit(b, Deposited(amount=3))])
    cmd = Seer(account=a, other=b)
    _seen(store, cmd, cache=None)
    store.append([ec.emit(a, Deposited(amount=4))])
    used = SNAPSHOT_STATS["used"]
    assert _seen(store, cmd, cache=None) == _truth(store, cmd)
    assert SNAPSHOT_STATS["used"] == used + 1


def test_a_busy_sqlite_write_lock_does_not_stall_a_read_only_command(tmp_path):
    import sqlite3
    import time

    path = tmp_path / "events.db"
    with ec.connect(f"sqlite:///{path}?timeout=1.5") as store:
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")                    # another writer holds the lock
        try:
            t0 = time.monotonic()
            _seen(store, Seer(account="acct"), cache=None, snapshots=None)
            without = time.monotonic() - t0
            t0 = time.monotonic()
            _seen(store, Seer(account="acct"), cache=None, timeout=0.5)
            with_snapshots = time.monotonic() - t0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert without < 0.5
        assert with_snapshots < 0.5, f"{with_snapshots:.2f} s for a command that reads"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_older_snapshot_never_replaces_a_newer_one(backend, request):
    import asyncio

    import eventcore.aio as eca
    from conftest import BACKENDS

    store = BACKENDS[backend](request)
    gate, release = threading.Event(), threading.Event()

    class Slow(Seer):
        __snapshot_name__ = Seer.__snapshot_name__  # the same fold: it shares Seer's snapshots on purpose

        def handle(self, state):
            gate.set()
            release.wait(5)
            return []

    errors: list = []

    def slow() -> None:
        try:
            ec.execute(store, Slow(account="acct"), cache=None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
        t = threading.Thread(target=slow)
        t.start()
        assert gate.wait(5), errors                                  # it read 3 events
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])

        async def newer():                                           # another process, in effect
            url = store.url if backend == "sqlite" else store._dsn
            async with await eca.connect(url, **({} if backend == "sqlite" else {"schema": store.schema})) as a:
                SEEN.clear()
                await eca.execute(a, Seer(account="acct"), cache=None)
        asyncio.run(newer())
        assert [s.events for s in store.snapshots()] == [8]
        release.set()
        t.join()
        assert errors == []
        assert [s.events for s in store.snapshots()] == [8]
    finally:
        release.set()
        store.close()
