"""ec.StateCache: warm commands skip the read, and a decision made on stale state never commits."""
from __future__ import annotations

import threading

import msgspec

import pytest

import eventcore as ec
from domain import (Deposit, Deposited, LimitedWithdraw, LimitSet, SetLimit, Transfer, Withdraw, Withdrawn,
                    assert_gap_free, balance)


@pytest.fixture(params=["reuse_state", "exact"])
def new_cache(request):
    """StateCache's two modes: reusing folded states (opt-in), and exact (every store's default)."""
    return lambda *args, **kw: ec.StateCache(*args, reuse_state=request.param == "reuse_state", **kw)


def _count_reads(store, monkeypatch):
    calls = []
    real = store.read_streams

    def counting(ids):
        calls.append(list(ids))
        return real(ids)

    monkeypatch.setattr(store, "read_streams", counting)
    return calls


def test_warm_command_skips_the_read(store, monkeypatch, new_cache):
    """Entries are per command type and streams: the first Withdraw reads, the next ones do not."""
    cache = new_cache()
    acct = ec.StreamId("c-1")
    store.append([ec.emit(acct, Deposited(amount=100))])
    reads = _count_reads(store, monkeypatch)
    ec.execute(store, Withdraw(acct, 30), cache=cache)
    assert reads == [["c-1"]] and (cache.hits, cache.misses) == (0, 1)
    result = ec.execute(store, Withdraw(acct, 30), cache=cache)
    assert reads == [["c-1"]] and result.attempts == 1 and result.stream_versions == {"c-1": 3}
    ec.execute(store, Withdraw(acct, 30), cache=cache)
    assert reads == [["c-1"]] and (cache.hits, cache.misses) == (2, 1)
    assert balance(store, "c-1") == 10


def test_stale_cached_state_never_commits_a_decision(store, new_cache):
    """Cache says 100; someone else withdraws 80; a cached Withdraw(50) must not commit."""
    cache = new_cache()
    acct = ec.StreamId("c-2")
    store.append([ec.emit(acct, Deposited(amount=110))])
    ec.execute(store, Withdraw(acct, 10), cache=cache)  # warm: the cache now says 100 at version 2
    store.append([ec.emit(acct, Withdrawn(amount=80))], {acct: 2})  # another writer, behind the cache's back
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds: 20 < 50"):
        ec.execute(store, Withdraw(acct, 50), cache=cache)
    assert cache.stale == 1
    assert [e.data.amount for e in store.read_stream(acct)] == [110, 10, 80]
    assert balance(store, "c-2") == 20


def test_stale_cache_retry_is_free(store, new_cache):
    cache = new_cache()
    acct = ec.StreamId("c-3")
    ec.execute(store, Deposit(acct, 10), cache=cache)
    store.append([ec.emit(acct, Deposited(amount=5))])
    result = ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert result.attempts == 1 and result.stream_versions == {"c-3": 3}
    assert balance(store, "c-3") == 16
    # and the refreshed entry is warm again
    ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert cache.hits == 2 and cache.stale == 1


def test_business_rule_rejection_keeps_the_entry(store, new_cache):
    cache = new_cache()
    acct = ec.StreamId("c-4")
    store.append([ec.emit(acct, Deposited(amount=10))])
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Withdraw(acct, 11), cache=cache)  # a miss that reads, then refuses
    ec.execute(store, Withdraw(acct, 4), cache=cache)
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Withdraw(acct, 7), cache=cache)
    ec.execute(store, Withdraw(acct, 6), cache=cache)
    assert balance(store, "c-4") == 0
    assert cache.hits == 3 and cache.misses == 1


def test_threads_share_a_cache_without_lost_updates(store, new_cache):
    cache = new_cache()
    acct = ec.StreamId("c-5")
    errors = []

    def work():
        try:
            for _ in range(25):
                ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=50))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [e.version for e in store.read_stream(acct)] == list(range(1, 151))
    assert balance(store, "c-5") == 150
    assert_gap_free(store)


def test_cache_is_bounded_and_per_store(store, new_cache):
    cache = new_cache(max_entries=2)
    for k in range(5):
        ec.execute(store, Deposit(ec.StreamId(f"c-b{k}"), 1), cache=cache)
    assert len(cache) == 2
    other = ec.connect("memory://")
    try:
        ec.execute(other, Deposit(ec.StreamId("c-b4"), 7), cache=cache)  # same command and stream, other store
        assert balance(other, "c-b4") == 7 and balance(store, "c-b4") == 1
    finally:
        other.close()
    with pytest.raises(ec.ValidationError):
        ec.StateCache(max_entries=0)
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Deposit(ec.StreamId("x"), 1), cache={})


def test_streams_are_cached_one_by_one_so_new_pairs_skip_the_read(store, monkeypatch, new_cache):
    """A transfer between two accounts that other commands already touched reads nothing:
    the cache keeps each stream's events, not only whole command states."""
    cache = new_cache()
    a, b, c = (ec.StreamId(f"p-{k}") for k in "abc")
    store.append([ec.emit(s, Deposited(amount=100)) for s in (a, b, c)])
    reads = _count_reads(store, monkeypatch)
    ec.execute(store, Transfer(a, b, 10), cache=cache)
    assert reads == [["p-a", "p-b"]]
    ec.execute(store, Transfer(b, c, 20), cache=cache)  # only c is new
    assert reads == [["p-a", "p-b"], ["p-c"]]
    result = ec.execute(store, Transfer(c, a, 30), cache=cache)  # a new pair of known streams
    assert len(reads) == 2 and result.attempts == 1
    ec.execute(store, Withdraw(a, 1), cache=cache)  # another command type, same cached stream
    assert len(reads) == 2
    assert (cache.hits, cache.misses, cache.stale) == (2, 2, 0)
    assert {s: balance(store, s) for s in ("p-a", "p-b", "p-c")} == {"p-a": 119, "p-b": 90, "p-c": 90}


def test_stale_cached_stream_never_commits_a_decision(store, new_cache):
    """Per-stream entries too: someone else drains the source; the cached transfer must not commit."""
    cache = new_cache()
    a, b = ec.StreamId("s-a"), ec.StreamId("s-b")
    store.append([ec.emit(a, Deposited(amount=100)), ec.emit(b, Deposited(amount=0))])
    ec.execute(store, Withdraw(a, 10), cache=cache)  # caches a (90 at version 2)
    store.append([ec.emit(a, Withdrawn(amount=85))], {a: 2})  # behind the cache's back: a has 5
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds"):
        ec.execute(store, Transfer(a, b, 50), cache=cache)
    assert cache.stale == 1
    assert balance(store, "s-a") == 5 and balance(store, "s-b") == 0
    ec.execute(store, Transfer(a, b, 5), cache=cache)  # re-read, warm again, correct
    assert balance(store, "s-a") == 0 and balance(store, "s-b") == 5


def test_long_streams_keep_only_their_version_and_the_event_budget_holds(store, monkeypatch, new_cache):
    cache = new_cache(max_stream_events=3, max_events=5)
    long, short = ec.StreamId("l-long"), ec.StreamId("l-short")
    store.append([ec.emit(long, Deposited(amount=1)) for _ in range(4)])
    store.append([ec.emit(short, Deposited(amount=1))])
    reads = _count_reads(store, monkeypatch)
    ec.execute(store, Deposit(long, 1), cache=cache)
    ec.execute(store, Deposit(long, 1), cache=cache)  # the folded state still serves it (exact: none kept)
    assert len(reads) == (1 if cache.reuse_state else 2)
    ec.execute(store, Transfer(long, short, 1), cache=cache)  # long's events are not kept: read
    assert len(reads) == (2 if cache.reuse_state else 3)
    assert cache._events <= 5
    for k in range(4):  # more short streams than the event budget: the oldest go
        ec.execute(store, Deposit(ec.StreamId(f"l-{k}"), 1), cache=cache)
    assert cache._events <= 5
    assert balance(store, "l-long") == 5 and balance(store, "l-short") == 2
    with pytest.raises(ec.ValidationError):
        ec.StateCache(max_events=-1)


def test_transfers_from_threads_through_one_cache_conserve_money(store, new_cache):
    cache = new_cache()
    accounts = [ec.StreamId(f"t-{k}") for k in range(5)]
    store.append([ec.emit(a, Deposited(amount=1000)) for a in accounts])
    errors = []

    def work(seed):
        import random

        rng = random.Random(seed)
        try:
            for _ in range(30):
                a, b = rng.sample(accounts, 2)
                try:
                    ec.execute(store, Transfer(a, b, rng.randint(1, 50)), cache=cache,
                               retry=ec.RetryPolicy(max_retries=100, base_delay=0.0005))
                except ec.BusinessRuleViolation:
                    pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(balance(store, a) for a in accounts) == 5000
    assert all(balance(store, a) >= 0 for a in accounts)
    assert_gap_free(store)


# -- decisions that write nothing: refusals, no-ops, errors -------------------------------------


def _writer_behind_the_cache(store, request, how: str):
    """A function (stream, event) that writes without the cache: through the same store object, through
    another store object on the same database, or from another process."""
    if how == "same store":
        return lambda sid, event: store.append([ec.emit(sid, event)])
    if store.scheme == "memory":  # a memory store is one object: nothing else can reach it
        return lambda sid, event: store.append([ec.emit(sid, event)])
    if store.scheme == "sqlite":
        url, options = store.url, {}
    else:
        url, options = request.getfixturevalue("pg_dsn"), {"schema": store.schema}
    if how == "another store":
        def write(sid, event):
            with ec.connect(url, **options) as other:
                other.append([ec.emit(sid, event)])
        return write

    def write_from_process(sid, event):
        import subprocess
        import sys
        from pathlib import Path

        code = (
            "import sys, msgspec, eventcore as ec, domain as t\n"
            "url, options, sid, type_name, data = msgspec.json.decode(sys.argv[1])\n"
            "cls = {c.__event_type__: c for c in (t.Deposited, t.Withdrawn, t.LimitSet)}[type_name]\n"
            "with ec.connect(url, **options) as s:\n"
            "    s.append([ec.emit(sid, msgspec.convert(data, cls))])\n"
        )
        arg = msgspec.json.encode([url, options, str(sid), event.__event_type__, event]).decode()
        proc = subprocess.run([sys.executable, "-c", code, arg], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    return write_from_process


BEHIND = ("same store", "another store", "another process")


@pytest.mark.parametrize("how", BEHIND)
def test_refusal_on_cached_state_is_final_only_once_its_versions_are_current(store, request, how, new_cache):
    """Cached Withdraw(50) on an empty account is refused; someone deposits 100 behind the cache;
    the same cached Withdraw(50) now succeeds, as it would without the cache."""
    cache = new_cache()
    acct = ec.StreamId(f"r-{BEHIND.index(how)}")
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Withdraw(acct, 50), cache=cache)
    with pytest.raises(ec.BusinessRuleViolation):  # refused from the cache: the versions are confirmed current
        ec.execute(store, Withdraw(acct, 50), cache=cache)
    _writer_behind_the_cache(store, request, how)(acct, Deposited(amount=100))
    result = ec.execute(store, Withdraw(acct, 50), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert result.attempts == 1 and result.stream_versions == {acct: 2}
    assert balance(store, acct) == 50 and cache.stale == 1
    ec.execute(store, Withdraw(acct, 50), cache=cache)  # warm again, and right
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Withdraw(acct, 1), cache=cache)
    assert balance(store, acct) == 0


@pytest.mark.parametrize("how", BEHIND)
def test_no_op_on_cached_state_is_checked_against_the_store(store, request, how, new_cache):
    """SetLimit(5) emits nothing when the cache says the limit is 5; if another writer set it to 7
    meanwhile, the command must see that and set it back to 5."""
    cache = new_cache()
    acct = ec.StreamId(f"n-{BEHIND.index(how)}")
    ec.execute(store, SetLimit(acct, 5), cache=cache)
    quiet = ec.execute(store, SetLimit(acct, 5), cache=cache)  # a no-op, confirmed current
    assert quiet.events == [] and quiet.stream_versions == {acct: 1}
    _writer_behind_the_cache(store, request, how)(acct, LimitSet(limit=7))
    result = ec.execute(store, SetLimit(acct, 5), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert [e.data for e in result.events] == [LimitSet(limit=5)]
    assert result.stream_versions == {acct: 3} and cache.stale == 1
    assert [e.data.limit for e in store.read_stream(acct)] == [5, 7, 5]
    again = ec.execute(store, SetLimit(acct, 5), cache=cache)
    assert again.events == [] and again.stream_versions == {acct: 3}


def test_error_raised_on_cached_state_is_rechecked(store, new_cache):
    """Not only refusals: any exception `handle` raises on cached state is final only once current."""
    cache = new_cache()
    acct = ec.StreamId("e-1")
    with pytest.raises(LookupError):
        ec.execute(store, LimitedWithdraw(acct), cache=cache)
    with pytest.raises(LookupError):
        ec.execute(store, LimitedWithdraw(acct), cache=cache)
    store.append([ec.emit(acct, LimitSet(limit=3))])
    result = ec.execute(store, LimitedWithdraw(acct), cache=cache)
    assert [e.data for e in result.events] == [Withdrawn(amount=3)]


def test_one_cache_many_stores_never_serves_one_store_state_to_another(new_cache):
    """Tenant stores opened and closed through one cache: a new store (which may reuse a freed store's
    id()) is never served a closed store's state, and closing a store drops its entries."""
    import gc

    cache = new_cache()
    acct = ec.StreamId("tenant-account")
    for round_, funds in enumerate((50, 0, 50, 0)):
        stores = [ec.connect("memory://") for _ in range(60)]
        for s in stores:
            s.append([ec.emit(acct, Deposited(amount=funds))])  # version 1 in every tenant, every round
            with pytest.raises(ec.BusinessRuleViolation):
                ec.execute(s, Withdraw(acct, 1000), cache=cache)  # reads and caches this tenant's state
        for s in stores:
            if funds >= 48:
                ec.execute(s, Withdraw(acct, 48), cache=cache)
            else:
                with pytest.raises(ec.BusinessRuleViolation):
                    ec.execute(s, Withdraw(acct, 48), cache=cache)
        assert [balance(s, acct) for s in stores] == [funds - 48 if funds >= 48 else funds] * 60, round_
        for s in stores:
            s.close()
        del stores, s
        gc.collect()
    assert len(cache) == 0 and not cache._folded  # closing a store dropped its entries


def test_closing_a_store_drops_only_its_entries(store, new_cache):
    cache = new_cache()
    other = ec.connect("memory://")
    ec.execute(store, Deposit(ec.StreamId("d-1"), 5), cache=cache)
    ec.execute(other, Deposit(ec.StreamId("d-1"), 7), cache=cache)
    assert len(cache) == 2
    other.close()
    assert len(cache) == 1
    assert ec.execute(store, Deposit(ec.StreamId("d-1"), 1), cache=cache).stream_versions == {"d-1": 2}
    assert cache.hits == 1


def test_a_read_that_fails_through_the_cache_is_a_store_error(store, new_cache):
    """The first read of a cached command fails: StoreUnavailableError, retried like any store error,
    and the cache forgets the command's streams."""
    cache = new_cache()
    acct = ec.StreamId("f-1")
    ec.execute(store, Deposit(acct, 1), cache=cache)
    cache.clear()
    real = store.read_streams
    failures = []

    def failing(ids):
        if len(failures) < 2:
            failures.append(ids)
            raise ec.StoreUnavailableError("the store is away")
        return real(ids)

    store.read_streams = failing
    try:
        with pytest.raises(ec.StoreUnavailableError, match="away"):
            ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
        result = ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=1, base_delay=0))
    finally:
        del store.read_streams
    assert result.attempts == 2 and balance(store, acct) == 2


# -- the store's own cache: exact, on by default ------------------------------------------------


class Tagged(ec.Event):
    __event_type__ = "cache.Tagged"
    tags: list[str]
    labels: dict[str, int] = {}


class Tag(ec.Command):
    """Adds a tag unless present. Its state keeps the events' own list and dict, and `handle` changes
    them (sloppy, but legal code): an exact cache must not let that reach a later command."""

    stream: ec.StreamId
    tag: str

    def initial_state(self):
        return {"tags": [], "labels": {}}

    def apply(self, state, event):
        state["tags"] = event.data.tags  # the event's own list, not a copy
        state["labels"] = event.data.labels
        return state

    def handle(self, state):
        tags = state["tags"]
        if self.tag in tags:
            return []
        tags.append(self.tag)  # changes the list apply() took from the last event
        state["labels"][self.tag] = len(tags)
        return [ec.emit(self.stream, Tagged(list(tags), dict(state["labels"])))]


class CountOf(ec.Command):
    """Its fold depends on one of its own fields (`kind`), not only on the events."""

    stream: ec.StreamId
    kind: str

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + (self.kind in event.data.tags)

    def handle(self, state):
        ec.require(state < 2, f"already two {self.kind}")
        return [ec.emit(self.stream, Tagged([self.kind]))]


def test_every_store_has_an_exact_cache_that_execute_uses_by_default(store, monkeypatch):
    acct = ec.StreamId("d-1")
    cache = store.command_cache
    assert isinstance(cache, ec.StateCache) and cache.reuse_state is False and store.command_cache is cache
    reads = _count_reads(store, monkeypatch)
    ec.execute(store, Deposit(acct, 5))
    ec.execute(store, Deposit(acct, 5))
    assert reads == [["d-1"]] and (cache.hits, cache.misses) == (1, 1)
    ec.execute(store, Deposit(acct, 5), cache=None)  # read every time
    assert len(reads) == 2
    store.command_cache = None  # off for this store
    ec.execute(store, Deposit(acct, 5))
    assert len(reads) == 3 and balance(store, acct) == 20


def test_the_exact_cache_gives_each_command_the_events_a_read_gives(store):
    """Whatever a command's handle() does to its state, and so to the events apply() kept in it, the
    next command folds events equal to a read's, as new objects."""
    s = ec.StreamId("t-1")
    for tag in ("a", "b", "a", "c", "b"):
        ec.execute(store, Tag(s, tag))
    assert [e.data.tags for e in store.read_stream(s)] == [["a"], ["a", "b"], ["a", "b", "c"]]
    cached = store.command_cache._events_of(store, [s])[s]
    assert cached == store.read_stream(s)
    again = store.command_cache._events_of(store, [s])[s]
    assert again == cached and all(x.data is not y.data for x, y in zip(again, cached))


def test_the_exact_cache_folds_with_each_commands_own_fields(store):
    s = ec.StreamId("k-1")
    ec.execute(store, CountOf(s, "x"))
    ec.execute(store, CountOf(s, "y"))
    ec.execute(store, CountOf(s, "x"))
    with pytest.raises(ec.BusinessRuleViolation, match="already two x"):
        ec.execute(store, CountOf(s, "x"))
    ec.execute(store, CountOf(s, "y"))  # one y so far: allowed
    assert [e.data.tags for e in store.read_stream(s)] == [["x"], ["y"], ["x"], ["y"]]


def test_what_one_command_does_to_its_state_never_reaches_another_through_the_exact_cache(store):
    """Tag's handle() changes the list its state took from an event; CountOf then folds the same
    stream. Through the store's cache it counts what the events hold, as after a read. (A cache that
    reuses folded state and event objects, the opt-in StateCache(), counts the changed list: it
    assumes handle() leaves its state alone.)"""
    s = ec.StreamId("t-2")
    ec.execute(store, Tag(s, "a"))
    ec.execute(store, Tag(s, "b"))  # appends "b" to the list its state holds (the first event's, if shared)
    ec.execute(store, CountOf(s, "b"))  # one event holds "b" so far: allowed
    assert [e.data.tags for e in store.read_stream(s)] == [["a"], ["a", "b"], ["b"]]


class Point(msgspec.Struct, frozen=True):
    x: int
    y: float


class Scored(ec.Event):
    __event_type__ = "cache.Scored"
    points: int
    who: str | None = None
    at: tuple[Point, ...] = ()


class Score(ec.Command):
    """Its apply() changes the events it is given in place (legal on a Struct that is not frozen)."""

    stream: ec.StreamId
    points: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        total = state + event.data.points
        event.data.points = -1000  # a later command must never see this
        return total

    def handle(self, state):
        ec.require(state + self.points <= 10, f"over 10: {state} + {self.points}")
        return [ec.emit(self.stream, Scored(self.points, "me", (Point(1, 2.5),)))]


def test_events_of_immutable_values_are_handed_out_as_copies_nothing_can_reach(store, monkeypatch):
    """Scored holds only immutable values: the exact cache keeps a copy of what a read returns and hands
    each command a new one, so an apply() that changes its events changes nothing kept; what it hands
    out equals a read."""
    s = ec.StreamId("sc-1")
    reads = _count_reads(store, monkeypatch)
    for _ in range(3):
        ec.execute(store, Score(s, 3))
    with pytest.raises(ec.BusinessRuleViolation, match="over 10: 9 \\+ 3"):
        ec.execute(store, Score(s, 3))
    assert len(reads) <= 2  # the first command's read (and the refusal's confirmation is not a read)
    cache = store.command_cache
    kept = cache._streams[(store.instance, s)][1]
    assert all(len(item) == 4 for item in kept)  # copies, not rows
    assert cache._events_of(store, [s])[s] == store.read_stream(s)
