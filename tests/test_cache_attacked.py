"""Every store's exact command cache, on by default, attacked: with default settings `ec.execute`
answers exactly as it would with `cache=None`. Each test runs a scenario and states what `cache=None`
answers.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

import eventcore as ec


# -- domain ----------------------------------------------------------------------------------------


class RvNamed(ec.Event):
    __event_type__ = "review.cache.Named"
    name: str


class RvLinked(ec.Event):
    """Written to stream B after RvNamed(name=ref) was written to stream A: B refers to A."""
    __event_type__ = "review.cache.Linked"
    ref: str


class RvPointer(ec.Event):
    __event_type__ = "review.cache.Pointer"
    target: str


class RvRich(ec.Event):
    __event_type__ = "review.cache.Rich"
    when: dt.datetime
    ratio: float
    big: int
    text: str
    anything: Any = None


class RvTouch(ec.Command):
    """Reads one stream, writes nothing: leaves the stream in the store's cache."""
    stream: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return []


class RvCheckLinks(ec.Command):
    """Folds A and B in position order; a link to a name A does not hold (yet) is impossible in the
    store (A's event is committed before B's), so apply() treats it as a corrupt history."""
    a: ec.StreamId
    b: ec.StreamId

    def initial_state(self):
        return set()

    def apply(self, state, event):
        if isinstance(event.data, RvNamed):
            state.add(event.data.name)
        elif isinstance(event.data, RvLinked) and event.data.ref not in state:
            raise RuntimeError(f"corrupt history: link to {event.data.ref!r} before it was named")
        return state

    def handle(self, state):
        return [ec.emit(self.a, RvNamed(name=f"checked-{len(state)}"))]


class RvFollow(ec.Command):
    """Declares the pointer stream; discovers the stream it points to and writes there."""
    pointer: ec.StreamId

    def initial_state(self):
        return {"target": None, "n": 0}

    def apply(self, state, event):
        if isinstance(event.data, RvPointer):
            return {"target": event.data.target, "n": 0}
        return {"target": state["target"], "n": state["n"] + 1}

    def discover(self, state):
        return [ec.StreamId(state["target"])] if state["target"] else []

    def handle(self, state):
        if state["target"] is None:
            return []
        return [ec.emit(ec.StreamId(state["target"]), RvNamed(name=f"seen-{state['n']}"))]


class RvWriteRich(ec.Command):
    stream: ec.StreamId
    event: RvRich

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return [ec.emit(self.stream, self.event)]


def _other_writer(store):
    """A write the store's cache does not see: the store's own append (no execute)."""
    return store.append


# -- tests -----------------------------------------------------------------------------------------


def test_an_error_from_apply_on_a_mix_of_stale_cached_and_fresh_streams_is_final_only_on_a_fresh_read(store):
    """An exception raised while folding (apply/discover/initial_state) on cached state is raised only
    if a fold of a fresh read raises it too. The exact cache folds a *stale prefix* of a cached stream merged with a *fresh* read of an uncached
    one: that merge is not a prefix of any real history, so apply() can see an order of events that
    never existed. With cache=None this command succeeds."""
    a, b = ec.StreamId("rv-a"), ec.StreamId("rv-b")
    store.append([ec.emit(a, RvNamed(name="first"))])
    ec.execute(store, RvTouch(a))  # A now cached at version 1
    # Another writer: name "x" on A, then link to it on B (B never cached).
    _other_writer(store)([ec.emit(a, RvNamed(name="x"))])
    _other_writer(store)([ec.emit(b, RvLinked(ref="x"))])
    # What a read-every-time execute answers:
    expected_state_size = 2
    result = ec.execute(store, RvCheckLinks(a, b))  # default: the store's exact cache
    assert result.events[0].data == RvNamed(name=f"checked-{expected_state_size}")


def test_same_scenario_without_the_cache_succeeds(store):
    """Control for the test above: cache=None."""
    a, b = ec.StreamId("rv-a"), ec.StreamId("rv-b")
    store.append([ec.emit(a, RvNamed(name="first"))])
    ec.execute(store, RvTouch(a), cache=None)
    store.append([ec.emit(a, RvNamed(name="x"))])
    store.append([ec.emit(b, RvLinked(ref="x"))])
    result = ec.execute(store, RvCheckLinks(a, b), cache=None)
    assert result.events[0].data == RvNamed(name="checked-2")


def test_two_stale_cached_streams_met_in_turn_cost_no_real_retry(store):
    """After a stale cache hit the command's next attempt reads every stream: a stream discovered only
    on the fresh state, cached and stale too, must not make it conflict again and use up the
    RetryPolicy (with none, cache=None commits at once)."""
    p, c1, c2 = ec.StreamId("rv-p"), ec.StreamId("rv-c1"), ec.StreamId("rv-c2")
    store.append([ec.emit(p, RvPointer(target=str(c1)))])
    store.append([ec.emit(c1, RvNamed(name="c1"))])
    store.append([ec.emit(c2, RvNamed(name="c2"))])
    ec.execute(store, RvFollow(p))  # caches p and c1 (and writes to c1)
    ec.execute(store, RvTouch(c2))  # caches c2
    # Another writer moves p (now pointing at c2) and c2.
    store.append([ec.emit(p, RvPointer(target=str(c2)))])
    store.append([ec.emit(c2, RvNamed(name="moved"))])
    result = ec.execute(store, RvFollow(p), retry=ec.RetryPolicy(max_retries=0))
    assert result.attempts == 1
    assert [e.stream_id for e in result.events] == [str(c2)]
    assert result.events[0].version == 3


def test_cached_rows_decode_to_exactly_what_a_read_returns(store):
    """Guarantee: what the exact cache hands the next command (rows laid out from the events an
    execute wrote) equals a read: data, metadata (custom values of several JSON types, tuples made
    lists), recorded_at (tz, microseconds), positions, event ids, type versions."""
    s = ec.StreamId("rv-rich")
    md = ec.Metadata(correlation_id="corr", causation_id=str(uuid.uuid4()), user_id="ü",
                     custom={"t": (1, 2), "f": 0.1, "n": None, "nested": {"z": [1, {"y": "é"}]}, "big": 2**62})
    for i in range(3):
        ev = RvRich(when=dt.datetime(2026, 1, 2, 3, 4, 5, 123456 + i, tzinfo=dt.timezone(dt.timedelta(hours=5))),
                    ratio=1 / 3 + i, big=-(2**63) + i, text="x\u2028y\U0001F600", anything=(i, "t", 1.5))
        ec.execute(store, RvWriteRich(s, ev), metadata=md)
    cache = store.command_cache
    cached = cache._events_of(store, [s])[s]
    read = store.read_stream(s)

    def envelope(e):
        return (e.stream_id, e.version, e.position, e.event_id, e.type, e.type_version, e.data, e.metadata,
                e.recorded_at, e.recorded_at.utcoffset())
    assert [envelope(e) for e in cached] == [envelope(e) for e in read]


def test_idempotency_key_replay_through_a_warm_cache(store):
    """Guarantee: the second execute with the same key replays the first one's events (as with
    cache=None), though the cached state says the command can run again."""
    s = ec.StreamId("rv-key")
    first = ec.execute(store, RvWriteRich(s, RvRich(when=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), ratio=0.5,
                                                    big=1, text="a")), idempotency_key="rv-key-1")
    again = ec.execute(store, RvWriteRich(s, RvRich(when=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), ratio=0.5,
                                                    big=1, text="a")), idempotency_key="rv-key-1")
    assert again.replayed and [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert len(store.read_stream(s)) == 1


def test_store_close_and_reopen_does_not_serve_the_closed_stores_rows(backend, request, tmp_path):
    """Guarantee (SQLite, PostgreSQL): a reopened store object starts with its own cache."""
    if backend == "memory":
        pytest.skip("a memory store does not survive close")
    from conftest import BACKENDS
    s = ec.StreamId("rv-reopen")
    first = BACKENDS[backend](request)
    try:
        ec.execute(first, RvTouch(s))
        url_store = first
        if backend == "sqlite":
            path = first.path
        first.append([ec.emit(s, RvNamed(name="one"))])
        ec.execute(first, RvTouch(s))
        old_cache = first.command_cache
    finally:
        first.close()
    assert len(old_cache) == 0  # close dropped this store's entries
    del url_store
    if backend == "sqlite":
        second = ec.connect(f"sqlite:///{path}")
        try:
            second.append([ec.emit(s, RvNamed(name="two"))])
            r = ec.execute(second, RvFollow(s))  # no pointer: writes nothing, state from a read
            assert r.stream_versions == {str(s): 2}
        finally:
            second.close()


class RvBlob(ec.Event):
    __event_type__ = "review.cache.Blob"
    body: str


class RvAppendBlob(ec.Command):
    stream: ec.StreamId
    size: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return [ec.emit(self.stream, RvBlob(body="b" * self.size))]


def test_the_default_cache_is_bounded_in_bytes_as_the_docs_say():
    """Events may be up to MAX_PAYLOAD_BYTES (16 MiB) each: 300 commands writing 100 KB documents must
    not leave ~30 MB in one store's default cache (bounded by executor.STORE_CACHE_BYTES)."""
    store = ec.connect("memory://")
    try:
        for i in range(300):
            ec.execute(store, RvAppendBlob(ec.StreamId(f"rv-blob-{i % 30}"), 100_000))
        cache = store.command_cache
        held = cache._bytes  # the payloads and metadata it keeps, and ~100 bytes of the rest of each event
        assert held <= 20 * 1024 * 1024, f"{held / 1e6:.1f} MB of payloads held by the default cache"
    finally:
        store.close()


def test_two_store_objects_and_threads_never_overdraw_through_their_caches(backend, request):
    """Guarantee: two store objects on one database (each with its own default cache, neither seeing
    the other's writes) and threads on both: every refusal and every withdrawal is decided on current
    state, so the account ends at exactly 0 and never goes below."""
    import threading

    from conftest import BACKENDS
    from domain import Deposited, Withdraw

    if backend == "memory":
        pytest.skip("one memory store cannot be opened twice")
    first = BACKENDS[backend](request)
    if backend == "sqlite":
        second = ec.connect(f"sqlite:///{first.path}")
    else:
        second = ec.connect(request.getfixturevalue("pg_dsn"), schema=request.getfixturevalue("pg_schema"),
                            pool_size=4)
    acct = ec.StreamId("rv-overdraw")
    try:
        first.append([ec.emit(acct, Deposited(amount=30))])
        for s in (first, second):
            ec.execute(s, Withdraw(acct, 0))  # warm both caches
        done, refused, errors = [], [], []

        def worker(s):
            for _ in range(12):
                try:
                    ec.execute(s, Withdraw(acct, 1), retry=ec.RetryPolicy(max_retries=50, base_delay=0.001))
                    done.append(1)
                except ec.BusinessRuleViolation:
                    refused.append(1)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
        threads = [threading.Thread(target=worker, args=(s,)) for s in (first, second, first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert len(done) == 30 and len(refused) == 48 - 30
        events = first.read_stream(acct)
        balance = 0
        for e in events:
            balance += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
            assert balance >= 0
        assert balance == 0
    finally:
        second.close()
        first.close()


# -- events kept as copies (data of immutable values only): attacks on the copy path --------------


class RvScored(ec.Event):
    __event_type__ = "rv.copy.Scored"
    points: int


class RvBump(ec.Command):
    """Its apply() writes into the metadata's `custom` dict of the events it is given."""

    stream: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        event.metadata.custom["seen"] = event.metadata.custom.get("seen", 0) + 1
        return state + 1

    def handle(self, state):
        return [ec.emit(self.stream, RvScored(1))]


def test_a_copy_shares_no_metadata_dict_with_the_cache_or_another_command():
    store = ec.connect("memory://")
    try:
        s = ec.StreamId("rv-md")
        for _ in range(4):
            ec.execute(store, RvBump(s), metadata=ec.Metadata(correlation_id="corr"))
        handed = store.command_cache._events_of(store, [s])[s]
        assert [e.metadata.custom for e in handed] == [{}] * 4 and handed == store.read_stream(s)
    finally:
        store.close()


class RvPriced(ec.Event):
    __event_type__ = "rv.copy.Priced"
    euros: float
    cents: int = 0

    def __post_init__(self):
        self.cents += round(self.euros * 100)


_BUY_STATES: list = []


class RvBuy(ec.Command):
    stream: ec.StreamId

    def initial_state(self):
        return []

    def apply(self, state, event):
        return state + [event.data.cents]

    def handle(self, state):
        _BUY_STATES.append(state)
        return [ec.emit(self.stream, RvPriced(1.5))]


def test_a_copy_runs_post_init_no_more_than_a_read_does():
    """A read decodes an event once, running __post_init__ once (on the stored values); a copy handed
    out must not run it again (msgspec.structs.replace would, once per command)."""
    store = ec.connect("memory://")
    try:
        s = ec.StreamId("rv-post")
        _BUY_STATES.clear()
        for _ in range(4):
            ec.execute(store, RvBuy(s))
        read = [e.data.cents for e in store.read_stream(s)]
        assert _BUY_STATES[-1] == read[:3]
        assert [e.data.cents for e in store.command_cache._events_of(store, [s])[s]] == read
    finally:
        store.close()


def test_copies_made_before_an_event_class_is_defined_again_are_decoded_into_the_new_class():
    """A module reloaded, a notebook cell run again: a read decodes into the class registered now, so the
    cache hands out that class too (an isinstance() dispatch in apply() depends on it)."""
    def define():
        class RvReloaded(ec.Event):
            __event_type__ = "rv.copy.Reloaded"
            points: int
        return RvReloaded

    current = {"cls": define()}
    seen = []

    class RvAdd(ec.Command):
        stream: ec.StreamId

        def initial_state(self):
            return 0

        def apply(self, state, event):
            return state + event.data.points if isinstance(event.data, current["cls"]) else state

        def handle(self, state):
            seen.append(state)
            return [ec.emit(self.stream, current["cls"](1))]

    store = ec.connect("memory://")
    try:
        s = ec.StreamId("rv-reload")
        ec.execute(store, RvAdd(s))
        ec.execute(store, RvAdd(s))
        current["cls"] = define()
        ec.execute(store, RvAdd(s))
        assert seen == [0, 1, 2]
    finally:
        store.close()


def test_the_byte_bound_counts_the_metadata_of_copies_too():
    store = ec.connect("memory://")
    try:
        md = ec.Metadata(correlation_id="c" * 200_000)
        for i in range(200):
            ec.execute(store, RvBump(ec.StreamId(f"rv-big-{i % 20}")), metadata=md)
        cache = store.command_cache
        held = sum(len(item[1].metadata.correlation_id) for _, kept in cache._streams.values() if kept
                   for item in kept if len(item) == 4)
        assert held <= cache.max_bytes and cache._bytes >= held
    finally:
        store.close()
