"""A hostile review of the "warm snapshot" entries of the command cache (executor._warm_snapshot,
_keep_snapshot, _snapshot_appended): a snapshotted command on a stream longer than the cache keeps is
folded from the snapshot's blob and the events after it, kept in memory.

The promises attacked: what handle() is given is always the fold of every event from the start (in
position order across streams); a decision on stale state never commits (stale append: retried; refusal /
nothing to do: confirmed first); bounds hold; closing a store drops its entries; nothing apply()/handle()
mutates leaks into later commands; eventcore.aio behaves the same.

Most tests use `StateCache(max_stream_events=0, reuse_state=False)` (every stream is "long", the exact
cache) so short histories take the new path; some use the store's own cache on streams over 1,000 events.
"""
from __future__ import annotations

import asyncio
import copy
import threading

import msgspec
import pytest

import eventcore as ec
from eventcore.snapshots import SNAPSHOT_STATS

SEEN: list = []


# -- events ---------------------------------------------------------------------------------------


class Pts(ec.Event):
    """Not frozen, immutable field types: the exact cache keeps a *copy* of it (not a row)."""

    __event_type__ = "attack.Pts"
    points: int


class Reset(ec.Event):
    """A mutable field: the exact cache keeps it as a row."""

    __event_type__ = "attack.Reset"
    items: list[str]


class Added(ec.Event):
    __event_type__ = "attack.Added"
    item: str


class Poison(ec.Event):
    __event_type__ = "attack.Poison"
    why: str = ""


class Moved(ec.Event):
    __event_type__ = "attack.Moved"
    amount: int


class Big(ec.Event):
    __event_type__ = "attack.Big"
    text: str


# -- commands: handle() records a deep copy of its state; probe=True decides nothing (for the truth) ----


def _record(state):
    SEEN.append(copy.deepcopy(state))


class Score(ec.Command):
    """apply() changes the events it is given in place (legal on a Struct that is not frozen; the exact
    cache promises a later command never sees it: tests/test_cache.py's Score)."""

    __snapshots__ = ec.SnapshotPolicy(every=3)
    __snapshot_name__ = "attack.Score"
    __state_type__ = int

    stream: ec.StreamId
    points: int = 1
    probe: bool = False

    def initial_state(self):
        return 0

    def apply(self, state, event):
        total = state + event.data.points
        event.data.points = -1000  # a later command must never see this
        return total

    def handle(self, state):
        _record(state)
        if self.probe:
            return []
        return [ec.emit(self.stream, Pts(self.points))]


class Items(ec.Command):
    """Its state *is* the list of the last Reset event; Added appends to it (so, through the state, to the
    event's list). handle() also appends to its state (to the decoded blob or an event's list)."""

    __snapshots__ = ec.SnapshotPolicy(every=3)
    __snapshot_name__ = "attack.Items"
    __state_type__ = list[str]

    stream: ec.StreamId
    item: str = "x"
    probe: bool = False
    mutate: bool = False

    def initial_state(self):
        return []

    def apply(self, state, event):
        if isinstance(event.data, Reset):
            return event.data.items
        if isinstance(event.data, Added):
            state.append(event.data.item)
        return state

    def handle(self, state):
        _record(state)
        if self.mutate:
            state.append("HANDLE-MUTATION")
            state.sort()
        if self.probe:
            return []
        return [ec.emit(self.stream, Added(self.item))]


class Weighed(ec.Command):
    """apply() reads and then clears a custom metadata value in place."""

    __snapshots__ = ec.SnapshotPolicy(every=3)
    __snapshot_name__ = "attack.Weighed"
    __state_type__ = int

    stream: ec.StreamId
    probe: bool = False

    def initial_state(self):
        return 0

    def apply(self, state, event):
        custom = event.metadata.custom
        weight = custom.get("w", 0)
        if "w" in custom:
            custom["w"] = 0  # in place: a later command must never see this
        return state + weight

    def handle(self, state):
        _record(state)
        if self.probe:
            return []
        return [ec.emit(self.stream, Pts(1))]


class Rich(ec.Command):
    """Two streams; the state records everything a read gives of each event, in fold order; it moves
    `amount` from `src` to `dst` if the source holds enough (a multi-stream emitter)."""

    __snapshots__ = ec.SnapshotPolicy(every=4)
    __snapshot_name__ = "attack.Rich"
    __state_type__ = tuple[dict[str, int], tuple[tuple[str, int, int, str, str, int, str, str], ...]]

    src: ec.StreamId
    dst: ec.StreamId
    amount: int = 1
    both: bool = True
    probe: bool = False

    def initial_state(self):
        return ({}, ())

    def apply(self, state, event):
        bal, seen = state
        bal = dict(bal)
        d = event.data
        if isinstance(d, Moved):
            bal[event.stream_id] = bal.get(event.stream_id, 0) + d.amount
        row = (str(event.stream_id), event.version, event.position, event.event_id.hex, event.type,
               event.type_version, event.recorded_at.isoformat(),
               msgspec.json.encode(event.metadata).decode())
        return (bal, seen + (row,))

    def handle(self, state):
        _record(state)
        if self.probe:
            return []
        bal = state[0]
        ec.require(bal.get(self.src, 0) >= self.amount, f"insufficient: {bal.get(self.src, 0)}")
        out = [ec.emit(self.src, Moved(-self.amount))]
        if self.both:
            out.append(ec.emit(self.dst, Moved(self.amount)))
        return out


class Acct(ec.Command):
    """Withdraws if the balance allows; refuses with the balance in the message; Poison events make
    apply() raise."""

    __snapshots__ = ec.SnapshotPolicy(every=4)
    __snapshot_name__ = "attack.Acct"
    __state_type__ = tuple[int, int]

    account: ec.StreamId
    other: str | None = None
    amount: int = 1
    probe: bool = False
    emit_poison: bool = False

    def streams(self):
        return [self.other] if self.other else []

    def initial_state(self):
        return (0, 0)

    def apply(self, state, event):
        if isinstance(event.data, Poison):
            raise RuntimeError(f"poison at {event.stream_id}:{event.version}")
        if isinstance(event.data, Moved):
            return (state[0] + event.data.amount, state[1] + 1)
        return (state[0], state[1] + 1)

    def handle(self, state):
        _record(state)
        if self.probe:
            return []
        if self.emit_poison:
            return [ec.emit(self.account, Poison("by handle"))]
        ec.require(state[0] >= self.amount, f"insufficient funds: {state[0]} < {self.amount}")
        if self.amount == 0:
            return []
        return [ec.emit(self.account, Moved(-self.amount))]


class AcctV2(Acct):
    """The same snapshot name, a higher state version, another fold (counts every deposit double)."""

    __snapshot_name__ = "attack.Acct"
    __state_version__ = 2

    def apply(self, state, event):
        if isinstance(event.data, Moved) and event.data.amount > 0:
            return (state[0] + 2 * event.data.amount, state[1] + 1)
        return super().apply(state, event)


class Blob(ec.Command):
    """A state far bigger than its events (a large blob)."""

    __snapshots__ = ec.SnapshotPolicy(every=3)
    __snapshot_name__ = "attack.Blob"
    __state_type__ = list[str]

    stream: ec.StreamId
    probe: bool = False

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [event.data.text]

    def handle(self, state):
        SEEN.append((len(state), "".join(state)[-50:], sum(map(len, state))))
        if self.probe:
            return []
        return [ec.emit(self.stream, Big("y" * 10))]


@pytest.fixture(autouse=True)
def _warm_path_counter(request):
    before = SNAPSHOT_STATS["cached"]
    yield
    if request.config.getoption("verbose") > 1:
        print(f"\nWARM {request.node.name}: {SNAPSHOT_STATS['cached'] - before}")


# -- helpers ----------------------------------------------------------------------------------------


def _long() -> ec.StateCache:
    return ec.StateCache(max_stream_events=0, reuse_state=False)


def _truth(store, cmd):
    """What handle() is given on a full fold: no cache, no snapshot."""
    SEEN.clear()
    try:
        ec.execute(store, msgspec.structs.replace(cmd, probe=True), cache=None, snapshots=None)
    except ec.BusinessRuleViolation:
        pass
    return SEEN[-1]


def _run(store, cmd, cache, **kw):
    SEEN.clear()
    try:
        outcome = ec.execute(store, cmd, cache=cache, **kw)
    except ec.BusinessRuleViolation as exc:
        outcome = exc
    return (SEEN[-1] if SEEN else None), outcome


def _needs_snapshots(store):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")


def _reopen(store):
    if store.scheme == "sqlite":
        return ec.connect(f"sqlite:///{store.path}")
    return ec.connect(store._dsn, schema=store.schema)


def _check_accounting(cache: ec.StateCache):
    """The counters the bounds are enforced on are the sums of what is held, and within the bounds."""
    events = sum(len(e[1]) for e in cache._streams.values() if e[1] is not None)
    events += sum(w.count for w in cache._snapshots.values())
    assert cache._events == events
    if not cache.reuse_state:
        assert cache._bytes == sum(cache._sizes.values()) + sum(w.size for w in cache._snapshots.values())
    assert len(cache._streams) <= cache.max_entries and len(cache._snapshots) <= cache.max_entries
    assert cache._events <= cache.max_events
    if cache.max_bytes is not None:
        assert cache._bytes <= cache.max_bytes


# -- 1. nothing apply() changes reaches a later command --------------------------------------------


def test_apply_changing_a_tail_event_in_place_never_reaches_the_next_command(store):
    """A process that starts on a snapshotted stream reads the snapshot and the events after it; apply()
    changes those events in place; the next command of that process must fold what the store holds."""
    _needs_snapshots(store)
    s = ec.StreamId("score-1")
    store.append([ec.emit(s, Pts(1)) for _ in range(3)])
    _run(store, Score(s), _long())          # full fold of 3 (>= every): snapshot at v3; writes v4
    cache = _long()                         # a new process (or a restart): reads the snapshot + [v4]
    for i in range(2):
        truth = _truth(store, Score(s))
        seen, result = _run(store, Score(s), cache)
        assert seen == truth, f"command {i}: handle() was given {seen}, the full fold is {truth}"


def test_apply_changing_a_tail_event_never_reaches_the_stores_own_cache_on_a_long_stream(store):
    """The same through the default store cache, on a stream over 1,000 events, the cache cleared as by a
    restart."""
    _needs_snapshots(store)
    s = ec.StreamId("score-big")
    store.append([ec.emit(s, Pts(1)) for _ in range(1_002)])
    ec.execute(store, Score(s))              # snapshot at 1,002, writes 1,003
    store.command_cache.clear()              # a restart
    SEEN.clear()
    ec.execute(store, Score(s))              # reads the snapshot + [1,003]; apply() sets its points to -1000
    truth = _truth(store, Score(s))
    SEEN.clear()
    ec.execute(store, Score(s))
    assert SEEN[-1] == truth


def test_apply_growing_a_list_its_state_took_from_a_tail_event_never_reaches_the_next_command(store):
    """Items' state is a Reset event's list, which Added events then grow (through the state): the events
    the cache keeps must be what a read gives, not what the fold made of them."""
    _needs_snapshots(store)
    s = ec.StreamId("items-1")
    store.append([ec.emit(s, Added("a")) for _ in range(3)])
    _run(store, Items(s, probe=True), _long())     # snapshot at v3 (nothing written)
    store.append([ec.emit(s, Reset(["r"])), ec.emit(s, Added("b"))])
    cache = _long()
    for i in range(3):
        truth = _truth(store, Items(s, probe=i == 0))
        seen, _ = _run(store, Items(s, probe=i == 0), cache)
        assert seen == truth, f"command {i}"


def test_apply_changing_custom_metadata_never_reaches_the_next_command(store):
    _needs_snapshots(store)
    s = ec.StreamId("weigh-1")
    store.append([ec.emit(s, Pts(1)) for _ in range(3)], metadata=ec.Metadata(custom={"w": 5}))
    _run(store, Weighed(s, probe=True), _long())   # snapshot at v3
    store.append([ec.emit(s, Pts(1))], metadata=ec.Metadata(custom={"w": 7}))
    cache = _long()
    for i in range(3):
        truth = _truth(store, Weighed(s))
        seen, _ = _run(store, Weighed(s), cache)
        assert seen == truth, f"command {i}"


def test_handle_changing_its_state_never_reaches_the_next_command(store):
    """handle() appends to and sorts the state it is given (the decoded blob, or a cached event's list)."""
    _needs_snapshots(store)
    s = ec.StreamId("items-2")
    store.append([ec.emit(s, Reset(["m", "a"]))] + [ec.emit(s, Added("z")) for _ in range(4)])
    cache = _long()
    for i in range(7):
        truth = _truth(store, Items(s, item=f"i{i}"))
        seen, _ = _run(store, Items(s, item=f"i{i}", mutate=True), cache)
        assert seen == truth, f"command {i}"
        if i == 3:
            store.append([ec.emit(s, Reset(["q"]))])


# -- 2. stale state: multi-stream, other store objects, idempotency ------------------------------------


def test_a_write_by_another_store_object_to_the_stream_not_written_never_commits_a_stale_decision(store, backend):
    """Rich(src, dst, both=False) reads two streams and writes only src; another store object moves dst.
    The append checks every stream read: the decision is retried on fresh state."""
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store)
    try:
        a, b = ec.StreamId("ms-a"), ec.StreamId("ms-b")
        store.append([ec.emit(a, Moved(5)) for _ in range(6)])
        store.append([ec.emit(b, Moved(1)) for _ in range(6)])
        cache = _long()
        for i in range(8):
            cmd = Rich(a, b, both=False)
            seen, result = _run(store, cmd, cache)
            assert isinstance(result, ec.ExecutionResult)
            # the decision committed was made on the state as of just before it
            hist = _truth(store, cmd)
            full_before = [r for r in hist[1] if r[3] != result.events[0].event_id.hex]
            assert list(seen[1]) == full_before, f"command {i}: decided on a stale state"
            other.append([ec.emit(b, Moved(1))])
    finally:
        other.close()


def test_multi_stream_emitter_interleaved_with_outside_writes_folds_in_position_order(store):
    """Rich writes to both of its streams; outside writes (through the same store object, behind the
    cache's back) interleave: handle() is given exactly the full fold (positions, ids, times, metadata)."""
    _needs_snapshots(store)
    a, b = ec.StreamId("mv-a"), ec.StreamId("mv-b")
    store.append([ec.emit(a, Moved(3)) for _ in range(5)])
    cache = _long()
    for i in range(14):
        cmd = Rich(a, b) if i % 2 else Rich(b, a, amount=0, both=False)  # same snapshot key, other order
        truth = _truth(store, cmd)
        seen, result = _run(store, cmd, cache, metadata=ec.Metadata(user_id=f"u{i}", custom={"i": [i]}))
        assert seen == truth, f"command {i}"
        if i % 3 == 0:
            store.append([ec.emit(b if i % 2 else a, Moved(1))])


def test_idempotency_key_on_warm_state_replays_and_writes_nothing_twice(store, backend):
    _needs_snapshots(store)
    s = ec.StreamId("idem-1")
    store.append([ec.emit(s, Moved(1)) for _ in range(10)])
    cache = _long()
    _run(store, Acct(s), cache)
    _run(store, Acct(s), cache)                      # warm from here
    _, first = _run(store, Acct(s), cache, idempotency_key="k-1")
    assert isinstance(first, ec.ExecutionResult) and not first.replayed
    version = store.stream_version(s)
    _, again = _run(store, Acct(s), cache, idempotency_key="k-1")
    assert isinstance(again, ec.ExecutionResult) and again.replayed
    assert store.stream_version(s) == version
    # the key used first by another store object: this one's warm state does not know of it
    other = store if backend == "memory" else _reopen(store)
    try:
        ec.execute(other, Acct(s), idempotency_key="k-2", cache=None)
        version = store.stream_version(s)
        _, third = _run(store, Acct(s), cache, idempotency_key="k-2")
        assert isinstance(third, ec.ExecutionResult) and third.replayed
        assert store.stream_version(s) == version
        # refusal on warm state for a key that already committed: replayed, not refused
        _, fourth = _run(store, Acct(s, amount=1_000), cache, idempotency_key="k-2")
        assert isinstance(fourth, ec.ExecutionResult) and fourth.replayed
    finally:
        if other is not store:
            other.close()


def test_a_refusal_and_a_no_op_on_warm_state_are_confirmed_after_a_raw_append_behind_its_back(store):
    """RawEvent appends by the same store object, outside execute: the cache does not see them."""
    _needs_snapshots(store)
    s = ec.StreamId("raw-1")
    store.append([ec.emit(s, Moved(1)) for _ in range(5)])
    cache = _long()
    for _ in range(2):
        _run(store, Acct(s), cache)                  # balance 3, warm
    store.append([ec.emit(s, ec.RawEvent("attack.Moved", b'{"amount": 10}'))])
    seen, result = _run(store, Acct(s, amount=12), cache)
    assert isinstance(result, ec.ExecutionResult), result
    assert seen == (13, 8)
    store.append([ec.emit(s, ec.RawEvent("attack.Moved", b'{"amount": 2}'))])
    seen, result = _run(store, Acct(s, amount=0), cache)  # nothing to do (on fresh state or confirmed)
    assert seen == _truth(store, Acct(s))
    # handle() emitting a RawEvent through the warm path: the next command folds it as a read gives it
    class RawAcct(Acct):
        __snapshot_name__ = "attack.Acct"

        def handle(self, state):
            _record(state)
            if self.probe:
                return []
            return [ec.emit(self.account, ec.RawEvent("attack.Moved", b'{"amount": -1}'))]

    for _ in range(3):
        truth = _truth(store, Acct(s))
        seen, _ = _run(store, RawAcct(s), cache)
        assert seen == truth
    assert _run(store, Acct(s), cache)[0] == _truth(store, Acct(s))


def test_a_refusal_on_warm_state_is_taken_back_when_another_store_object_deposited(store, backend):
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store)
    try:
        a, b = ec.StreamId("rf-a"), ec.StreamId("rf-b")
        store.append([ec.emit(a, Moved(1)) for _ in range(3)] + [ec.emit(b, Moved(1))])
        cache = _long()
        for _ in range(4):
            _run(store, Acct(a, other=b), cache)
        _, refused = _run(store, Acct(a, other=b), cache)
        assert isinstance(refused, ec.BusinessRuleViolation)
        other.append([ec.emit(b, Moved(0))])  # the *other* stream moves first
        other.append([ec.emit(a, Moved(7))])
        truth = _truth(store, Acct(a, other=b))
        seen, result = _run(store, Acct(a, other=b, amount=7), cache)
        assert isinstance(result, ec.ExecutionResult), result
        assert seen == truth and seen[0] == 7
    finally:
        other.close()


# -- 3. apply() raising --------------------------------------------------------------------------------


def test_apply_raising_on_an_event_behind_the_caches_back_is_raised_never_a_commit(store):
    _needs_snapshots(store)
    s = ec.StreamId("poison-1")
    store.append([ec.emit(s, Moved(1)) for _ in range(9)])
    cache = _long()
    for _ in range(2):
        _run(store, Acct(s), cache)
    store.append([ec.emit(s, Poison("outside"))])
    version = store.stream_version(s)
    with pytest.raises(RuntimeError, match="poison"):
        ec.execute(store, Acct(s), cache=cache)
    assert store.stream_version(s) == version
    with pytest.raises(RuntimeError, match="poison"):  # refusal path too: the read decides
        ec.execute(store, Acct(s, amount=1_000), cache=cache)


def test_apply_raising_on_an_event_the_command_wrote_is_raised_by_the_next_command(store):
    _needs_snapshots(store)
    s = ec.StreamId("poison-2")
    store.append([ec.emit(s, Moved(1)) for _ in range(9)])
    cache = _long()
    _run(store, Acct(s), cache)
    _run(store, Acct(s, emit_poison=True), cache)     # warm entry moves on by a Poison event
    version = store.stream_version(s)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="poison"):
            ec.execute(store, Acct(s), cache=cache)
    assert store.stream_version(s) == version


# -- 4. state versions, class redefinitions, drop_snapshots, every=1 -------------------------------------


def test_two_state_versions_under_one_snapshot_name_each_fold_their_own_way(store):
    _needs_snapshots(store)
    s = ec.StreamId("sv-1")
    store.append([ec.emit(s, Moved(2)) for _ in range(6)])
    cache = _long()
    for i in range(16):
        cls = AcctV2 if i % 3 == 1 else Acct
        truth = _truth(store, cls(s))
        seen, _ = _run(store, cls(s), cache)
        assert seen == truth, f"command {i} ({cls.__name__})"
        if i % 5 == 4:
            store.append([ec.emit(s, Moved(1))])


def test_a_class_defined_again_with_a_higher_state_version_never_gets_the_old_warm_state(store):
    _needs_snapshots(store)
    s = ec.StreamId("sv-2")
    store.append([ec.emit(s, Moved(1)) for _ in range(6)])
    cache = _long()

    def define(version, factor):
        class Again(Acct):
            __snapshot_name__ = "attack.Again"
            __state_version__ = version

            def apply(self, state, event):
                if isinstance(event.data, Moved):
                    return (state[0] + factor * event.data.amount, state[1] + 1)
                return (state[0], state[1] + 1)
        return Again

    old = define(1, 1)
    for _ in range(3):
        _run(store, old(s, amount=0), cache)
    new = define(2, 10)
    for _ in range(3):
        truth = _truth(store, new(s, amount=0))
        seen, _ = _run(store, new(s, amount=0), cache)
        assert seen == truth


def test_an_event_class_defined_again_is_decoded_into_the_new_class_from_warm_tails(store):
    """Classes registered again (a reload) under the same stored type: the warm tail's kept copies were
    made of the old class; the command must be given the class a read gives now."""
    _needs_snapshots(store)
    s = ec.StreamId("reload-1")

    def event_class():
        class Tick(ec.Event):
            __event_type__ = "attack.Tick"
            n: int
        return Tick

    tick = event_class()

    class Ticks(ec.Command):
        __snapshots__ = ec.SnapshotPolicy(every=5)
        __snapshot_name__ = "attack.Ticks"
        __state_type__ = tuple[int, ...]
        stream: ec.StreamId
        probe: bool = False

        def initial_state(self):
            return ()

        def apply(self, state, event):
            current = _current[0]
            assert type(event.data) is current, f"{type(event.data)} is not the class registered now"
            return state + (event.data.n,)

        def handle(self, state):
            _record(state)
            return [] if self.probe else [ec.emit(self.stream, _current[0](len(state)))]

    _current = [tick]
    store.append([ec.emit(s, tick(i)) for i in range(5)])
    cache = _long()
    _run(store, Ticks(s), cache)
    _run(store, Ticks(s), cache)
    _current[0] = event_class()
    for _ in range(2):
        truth = _truth(store, Ticks(s))
        seen, result = _run(store, Ticks(s), cache)
        assert seen == truth and isinstance(result, ec.ExecutionResult)


def test_drop_snapshots_while_warm_changes_no_decision(store):
    _needs_snapshots(store)
    s = ec.StreamId("drop-1")
    store.append([ec.emit(s, Moved(1)) for _ in range(9)])
    cache = _long()
    for i in range(10):
        truth = _truth(store, Acct(s))
        seen, _ = _run(store, Acct(s), cache)
        assert seen == truth, f"command {i}"
        store.drop_snapshots()


@pytest.mark.parametrize("reuse", [False, True])
def test_every_one_with_outside_writes_folds_every_event(store, reuse):
    _needs_snapshots(store)
    s = ec.StreamId("e1")
    store.append([ec.emit(s, Moved(3))])
    cache = ec.StateCache(max_stream_events=0, reuse_state=reuse)
    policy = ec.SnapshotPolicy(every=1)
    for i in range(12):
        amount = 0 if i % 4 == 0 else 1
        truth = _truth(store, Acct(s, amount=amount))
        seen, _ = _run(store, Acct(s, amount=amount), cache, snapshots=policy)
        assert seen == truth, f"command {i}"
        if i % 3 == 2:
            store.append([ec.emit(s, Moved(1))])


# -- 5. bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True])
def test_large_blobs_keep_the_byte_and_event_bounds_and_the_counters_exact(store, reuse):
    _needs_snapshots(store)
    cache = ec.StateCache(max_entries=4, max_stream_events=0, max_events=6, reuse_state=reuse, max_bytes=3_000)
    for n in range(5):
        store.append([ec.emit(f"big{n}", Big(("x" * (200 * (n + 1)))[:-1] + str(n))) for _ in range(4)])
    warm = SNAPSHOT_STATS["cached"]
    for round_ in range(3):
        for n in range(5):
            for _ in range(3):
                cmd = Blob(ec.StreamId(f"big{n}"))
                truth = _truth(store, cmd)
                seen, _ = _run(store, cmd, cache)
                assert seen == truth
                _check_accounting(cache)
    assert SNAPSHOT_STATS["cached"] > warm  # the small blobs were served warm
    store.close()
    assert not cache._snapshots and not cache._streams and cache._events == 0 and cache._bytes == 0


# -- 6. closing ----------------------------------------------------------------------------------------


def test_a_store_closed_during_a_command_leaves_nothing_in_the_cache(store):
    _needs_snapshots(store)
    s = ec.StreamId("close-1")
    store.append([ec.emit(s, Moved(1)) for _ in range(6)])
    cache = _long()
    _run(store, Acct(s), cache)

    class Closer(Acct):
        __snapshot_name__ = "attack.Acct"

        def apply(self, state, event):
            if event.version == 7:
                store.close()
            return super().apply(state, event)

    fresh = _long()  # the read path, where apply() runs before the entry is kept
    with pytest.raises(Exception):
        ec.execute(store, Closer(s), cache=fresh)
    for c in (cache, fresh):
        assert not [k for k in c._snapshots if k[0] == store.instance]
        assert not [k for k in c._streams if k[0] == store.instance]
        assert c._events == 0 and c._bytes == 0


def test_a_store_closed_by_another_thread_while_commands_run_leaves_nothing_in_the_shared_cache(store, backend):
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs a reopenable store")
    cache = _long()
    store.append([ec.emit("cl-a", Moved(1)) for _ in range(400)])
    other = _reopen(store)
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            try:
                ec.execute(other, Acct(ec.StreamId("cl-a"), amount=0), cache=cache)
            except Exception:  # noqa: BLE001 - the store closes under it
                if other.closed:
                    return

    t = threading.Thread(target=worker)
    t.start()
    import time
    time.sleep(0.3)
    other.close()
    stop.set()
    t.join(30)
    assert not [k for k in cache._snapshots if k[0] == other.instance]
    assert not [k for k in cache._streams if k[0] == other.instance]
    assert not [k for k in cache._folded if k[0] == other.instance]


# -- 7. threads: two store objects, one cache ------------------------------------------------------------


def test_threads_on_two_store_objects_sharing_one_cache_never_overdraw(store, backend):
    _needs_snapshots(store)
    other = store if backend == "memory" else _reopen(store)
    try:
        pot = ec.StreamId("pot")
        store.append([ec.emit(pot, Moved(1)) for _ in range(25)])
        cache = ec.StateCache(max_stream_events=0, reuse_state=False, max_entries=3, max_events=8)
        errors: list = []

        def spender(s, n):
            try:
                for k in range(10):
                    try:
                        ec.execute(s, Acct(pot, other=ec.StreamId(f"side{k % 2}")), cache=cache,
                                   retry=ec.RetryPolicy(max_retries=300, max_delay=0.005))
                    except ec.BusinessRuleViolation:
                        pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        def depositor():
            for k in range(10):
                other.append([ec.emit(pot, Moved(1))])
                store.append([ec.emit(f"side{k % 2}", Moved(0))])

        threads = [threading.Thread(target=spender, args=(store if i % 2 else other, i)) for i in range(4)]
        threads.append(threading.Thread(target=depositor))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        balance = 0
        for e in store.read_stream(pot):
            balance += e.data.amount
            assert balance >= 0
        _check_accounting(cache)
    finally:
        if other is not store:
            other.close()


# -- 8. asyncio --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_asyncio_apply_changing_a_tail_event_never_reaches_the_next_command(tmp_path, kind):
    import eventcore.aio as eca

    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'aio.db'}"

    async def run():
        async with await eca.connect(url) as astore:
            s = ec.StreamId("ascore")
            await astore.append([ec.emit(s, Pts(1)) for _ in range(3)])
            await eca.execute(astore, Score(s), cache=_long())
            for _ in range(100):  # the snapshot is written in a task of its own
                if await astore.snapshots() if asyncio.iscoroutinefunction(astore.snapshots) else astore.snapshots():
                    break
                await asyncio.sleep(0.01)
            cache = _long()
            out = []
            for _ in range(2):
                SEEN.clear()
                await eca.execute(astore, Score(s, probe=True), cache=None, snapshots=None)
                truth = SEEN[-1]
                SEEN.clear()
                await eca.execute(astore, Score(s), cache=cache)
                out.append((SEEN[-1], truth))
            return out

    for seen, truth in asyncio.run(run()):
        assert seen == truth


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_asyncio_a_command_cancelled_after_its_append_committed_leaves_no_stale_decision(tmp_path, kind):
    """The append commits, then the task is cancelled before the executor sees the result: the warm entry
    still says the old version. The next commands must decide on the full fold (or be refused only on
    confirmed state)."""
    import eventcore.aio as eca

    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'aio.db'}"

    async def run():
        async with await eca.connect(url) as astore:
            s = ec.StreamId("acancel")
            await astore.append([ec.emit(s, Moved(1)) for _ in range(6)])
            cache = _long()
            for _ in range(2):
                await eca.execute(astore, Acct(s), cache=cache)   # balance 4, warm
            real = astore.append
            gate = asyncio.Event()

            async def committed_then_stuck(*a, **kw):
                result = await real(*a, **kw)
                gate.set()
                await asyncio.sleep(3600)
                return result

            astore.append = committed_then_stuck
            task = asyncio.ensure_future(eca.execute(astore, Acct(s, amount=4), cache=cache))
            await gate.wait()
            task.cancel()
            with pytest.raises(BaseException):
                await task
            del astore.append
            assert await astore.stream_version(s) == 9  # it did commit: balance 0
            results = []
            for amount in (1, 0):
                SEEN.clear()
                try:
                    r = await eca.execute(astore, Acct(s, amount=amount), cache=cache)
                except ec.BusinessRuleViolation as exc:
                    r = exc
                results.append((SEEN[-1], r))
            return results

    results = asyncio.run(run())
    (seen1, r1), (seen2, r2) = results
    assert isinstance(r1, ec.BusinessRuleViolation) and seen1 == (0, 9), (seen1, r1)
    assert seen2 == (0, 9)


# -- 9. eviction under the event bound -----------------------------------------------------------------


class Plain(ec.Command):
    """No snapshots: a short stream the cache serves with its events."""

    stream: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return []


def test_event_pressure_evicts_the_least_recently_used_snapshot_entry_not_the_streams_it_needs(store):
    """Three long streams whose snapshot entries hold 6 + 6 + 1 events, in a cache of 12: the least
    recently used snapshot entry (A's) should go, and C's next command be served from the cache. (The
    eviction loop drops stream entries first, though a version-only entry frees no event, so it empties
    `_streams`, the entries every snapshot entry is checked against, and then drops A's anyway.)"""
    _needs_snapshots(store)
    cache = ec.StateCache(max_stream_events=0, reuse_state=False, max_events=12)
    policy = ec.SnapshotPolicy(every=10)
    for n in "ABC":
        store.append([ec.emit(f"ev-{n}", Moved(5)) for _ in range(10)])
    for n in "AB":
        for _ in range(6):
            _run(store, Acct(ec.StreamId(f"ev-{n}")), cache, snapshots=policy)
    _run(store, Acct(ec.StreamId("ev-C")), cache, snapshots=policy)   # read; its entry holds 1 event: 13 > 12
    _check_accounting(cache)
    before = SNAPSHOT_STATS["cached"]
    _run(store, Acct(ec.StreamId("ev-C")), cache, snapshots=policy)
    assert SNAPSHOT_STATS["cached"] - before == 1, "C's command read again: its snapshot entry was made useless"


def test_one_snapshot_entry_over_max_events_does_not_empty_the_cache(store):
    """A snapshot entry holding more events than the whole cache may (a tail of 30, max_events=20) can
    never be kept; keeping it should not first evict every other entry (a short stream's kept events:
    its next command reads again). Streams have a guard for this (max_stream_events, max_bytes)."""
    _needs_snapshots(store)
    cache = ec.StateCache(max_stream_events=100, reuse_state=False, max_events=20)
    sh, lg = ec.StreamId("short"), ec.StreamId("long")
    store.append([ec.emit(sh, Moved(1)) for _ in range(5)])
    store.append([ec.emit(lg, Moved(1)) for _ in range(130)])
    ec.execute(store, Acct(lg, amount=0), cache=None, snapshots=ec.SnapshotPolicy(every=100))  # snapshot at 130
    store.append([ec.emit(lg, Moved(1)) for _ in range(30)])
    ec.execute(store, Plain(sh), cache=cache)           # the short stream's 5 events are kept
    misses = cache.misses
    ec.execute(store, Plain(sh), cache=cache)
    assert cache.misses == misses                        # served from the cache
    ec.execute(store, Acct(lg, amount=0), cache=cache, snapshots=ec.SnapshotPolicy(every=1_000))
    _check_accounting(cache)
    ec.execute(store, Plain(sh), cache=cache)
    assert cache.misses == misses, "the short stream's entry was evicted for an entry that could not be kept"


# -- 10. more stale-state attacks ------------------------------------------------------------------------


class Strict(Acct):
    """handle() raises a plain error (not a refusal) when the balance is short."""

    __snapshot_name__ = "attack.Acct"

    def handle(self, state):
        _record(state)
        if self.probe:
            return []
        if state[0] < self.amount:
            raise ValueError(f"short: {state[0]}")
        return [ec.emit(self.account, Moved(-self.amount))]


def test_an_error_of_handle_on_stale_warm_state_is_rechecked_and_a_stale_hit_is_no_retry(store, backend):
    """Another store object deposits; handle() raising on the warm (stale) balance is confirmed, found
    stale, and the command runs on fresh state: it succeeds, even with no retries allowed; a stale append
    also succeeds with max_retries=0 (a stale hit is not a retry)."""
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store)
    try:
        s = ec.StreamId("strict-1")
        store.append([ec.emit(s, Moved(1)) for _ in range(5)])
        cache = _long()
        for _ in range(2):
            _run(store, Strict(s), cache)                        # balance 3, warm
        other.append([ec.emit(s, Moved(10))])
        result = ec.execute(store, Strict(s, amount=12), cache=cache, retry=ec.NO_RETRY
                            if hasattr(ec, "NO_RETRY") else ec.RetryPolicy(max_retries=0))
        assert result.attempts == 1 and store.stream_version(s) == 9
        other.append([ec.emit(s, Moved(5))])
        result = ec.execute(store, Strict(s, amount=1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
        assert result.attempts == 1 and result.events[0].version == 11
    finally:
        other.close()


def test_calls_with_and_without_snapshots_alternate_on_one_cache(store):
    _needs_snapshots(store)
    s = ec.StreamId("alt-1")
    store.append([ec.emit(s, Moved(2)) for _ in range(9)])
    cache = _long()
    for i in range(14):
        kw = {"snapshots": None} if i % 3 == 1 else ({"snapshots": ec.SnapshotPolicy(every=2)} if i % 3 == 2 else {})
        truth = _truth(store, Acct(s))
        seen, _ = _run(store, Acct(s), cache, **kw)
        assert seen == truth, f"command {i} {kw}"


def test_postgres_late_commit_of_a_lower_position_after_a_warm_entry_was_kept(pg_dsn, pg_schema):
    """Rich reads fast and slow while an append to slow holds a lower position uncommitted; the warm entry
    keeps fast's later event beyond the fence. Once slow commits, the next commands decide on the full
    fold in position order (the stale warm state is caught by the append or by the confirmation)."""
    import time

    import psycopg

    fast = ec.connect(pg_dsn, schema=pg_schema, group_commit=False)
    slow = ec.connect(pg_dsn, schema=pg_schema, group_commit=False)
    lock = psycopg.connect(pg_dsn, autocommit=True)
    try:
        f, sl = ec.StreamId("fast"), ec.StreamId("slow")
        fast.append([ec.emit(f, Moved(5)) for _ in range(5)] + [ec.emit(sl, Moved(1))])
        lock.execute(f"""CREATE FUNCTION "{pg_schema}".hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_lock(4343); PERFORM pg_advisory_unlock(4343); RETURN NULL; END $$""")
        lock.execute(f"""CREATE TRIGGER hold AFTER INSERT ON "{pg_schema}".events FOR EACH ROW
            WHEN (NEW.stream_id = 'slow') EXECUTE FUNCTION "{pg_schema}".hold()""")
        lock.execute("SELECT pg_advisory_lock(4343)")
        t = threading.Thread(target=lambda: slow.append([ec.emit(sl, Moved(100))]))
        t.start()
        time.sleep(0.3)
        fast.append([ec.emit(f, Moved(1))])
        cache = _long()
        _run(fast, Rich(f, sl, probe=True), cache)                 # read, kept warm (an append would wait)
        _run(fast, Rich(f, sl, probe=True), cache)                 # warm, confirmed
        lock.execute("SELECT pg_advisory_unlock(4343)")
        t.join()
        truth = _truth(fast, Rich(f, sl))
        seen, _ = _run(fast, Rich(f, sl, probe=True), cache)       # nothing to do: confirmed first
        assert seen == truth
        truth = _truth(fast, Rich(f, sl))
        seen, result = _run(fast, Rich(sl, f, amount=100), cache)  # only the fresh state allows it
        assert isinstance(result, ec.ExecutionResult) and seen == truth
    finally:
        lock.close()
        fast.close()
        slow.close()
