"""A snapshotted command served by the command cache: its snapshot's state and the events after it kept in
memory, so a command on a long stream is one round trip (the version-checked append), as on a short one.

The cache here keeps no stream's events (`max_stream_events=0`), so every stream is "long" and every
snapshotted command goes through its snapshot, cached or read: short histories exercise the path that
streams over 1,000 events take with the store's own cache. Whatever the cache holds, what a command
decides on is the full fold, and a stale decision never commits."""
from __future__ import annotations

import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eventcore as ec
from eventcore.snapshots import SNAPSHOT_STATS
from domain import Deposited, Withdrawn

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SEEN: list = []


class Ledger(ec.Command):
    """Withdraws `amount` if the balance allows. The state keeps every event folded, in order, so a lost,
    repeated or reordered event changes it; handle() records what it was given."""

    __snapshots__ = ec.SnapshotPolicy(every=4)
    __snapshot_name__ = "cached.Ledger"
    __state_type__ = tuple[int, tuple[tuple[str, int, str], ...]]

    account: ec.StreamId
    other: str | None = None
    amount: int = 1

    def streams(self):
        return [self.other] if self.other else []

    def initial_state(self):
        return (0, ())

    def apply(self, state, event):
        balance, seen = state
        d = event.data
        change = d.amount if isinstance(d, Deposited) else -d.amount if isinstance(d, Withdrawn) else 0
        return (balance + change, seen + ((event.stream_id, event.version, event.event_id.hex),))

    def handle(self, state):
        SEEN.append(state)
        ec.require(state[0] >= self.amount, f"insufficient funds: {state[0]} < {self.amount}")
        if self.amount == 0:
            return []
        return [ec.emit(self.account, Withdrawn(amount=self.amount, balance=state[0] - self.amount))]


def _long_streams_cache(reuse_state: bool = False) -> ec.StateCache:
    """A cache that keeps no stream's events: every stream goes through the command's snapshot."""
    return ec.StateCache(max_stream_events=0, reuse_state=reuse_state)


def _truth(store, cmd):
    """The state `cmd` is given when folded from the first event of every stream: no cache, no snapshot."""
    SEEN.clear()
    try:
        ec.execute(store, Ledger(account=cmd.account, other=cmd.other, amount=0), cache=None, snapshots=None)
    except ec.BusinessRuleViolation:
        pass
    return SEEN[-1]


def _run(store, cmd, cache, **kw):
    """Execute; returns (what handle() was last given, the result or the refusal)."""
    SEEN.clear()
    try:
        outcome = ec.execute(store, cmd, cache=cache, **kw)
    except ec.BusinessRuleViolation as exc:
        outcome = exc
    return SEEN[-1], outcome


def _needs_snapshots(store):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")


def _reopen(store):
    if store.scheme == "sqlite":
        return ec.connect(f"sqlite:///{store.path}")
    return ec.connect(store._dsn, schema=store.schema)


def test_a_long_stream_is_served_from_the_cache_between_snapshots(store):
    """After the first command reads the snapshot, the next ones fold it from the cache with the events
    after it, without a read, until `every` events followed it; then a read makes a newer snapshot."""
    _needs_snapshots(store)
    cache = _long_streams_cache()
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(50)])
    before = dict(SNAPSHOT_STATS)
    for i in range(12):
        truth = _truth(store, Ledger(account="acct"))
        seen, result = _run(store, Ledger(account="acct"), cache)
        assert isinstance(result, ec.ExecutionResult) and result.attempts == 1
        assert seen == truth, f"command {i}"
    cached = SNAPSHOT_STATS["cached"] - before["cached"]
    read = SNAPSHOT_STATS["used"] + SNAPSHOT_STATS["none"] - before["used"] - before["none"]
    # every=4: a read, then 3 commands from the cache (the 4th event after the snapshot makes the next read)
    assert (read, cached) == (3, 9), (read, cached)
    assert store.stream_version("acct") == 62


def test_the_cached_state_is_the_full_fold_at_every_step(store):
    _needs_snapshots(store)
    cache = _long_streams_cache()
    store.append([ec.emit("a", Deposited(amount=3)) for _ in range(10)])
    store.append([ec.emit("b", Deposited(amount=1)) for _ in range(5)])
    for i in range(25):
        cmd = Ledger(account="a", other="b")
        truth = _truth(store, cmd)
        seen, result = _run(store, cmd, cache)
        assert seen == truth, f"command {i}"
        if i % 3 == 0:
            store.append([ec.emit("b", Deposited(amount=2))])  # moves b behind the cache's back


def test_a_refusal_on_stale_cached_state_is_checked_and_taken_back(store, backend, request):
    """Another store object deposits behind the cache's back: a refusal decided on the cached balance is
    confirmed against the store, found stale, and the command runs again on fresh state and succeeds."""
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store)
    try:
        cache = _long_streams_cache()
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(3)])
        for _ in range(3):
            _, result = _run(store, Ledger(account="acct"), cache)
            assert isinstance(result, ec.ExecutionResult)
        _, refused = _run(store, Ledger(account="acct"), cache)
        assert isinstance(refused, ec.BusinessRuleViolation)
        other.append([ec.emit("acct", Deposited(amount=5))])
        seen, result = _run(store, Ledger(account="acct", amount=4), cache)
        assert isinstance(result, ec.ExecutionResult), result
        assert seen[0] == 5 and result.events[0].data.balance == 1
    finally:
        other.close()


def test_a_write_behind_the_caches_back_never_commits_a_stale_decision(store, backend, request):
    _needs_snapshots(store)
    if backend == "memory":
        pytest.skip("needs two store objects on one store")
    other = _reopen(store)
    try:
        cache = _long_streams_cache()
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(6)])
        _run(store, Ledger(account="acct"), cache)
        _run(store, Ledger(account="acct"), cache)          # balance 4, cached
        other.append([ec.emit("acct", Withdrawn(amount=4, balance=0))])
        seen, refused = _run(store, Ledger(account="acct"), cache)
        assert isinstance(refused, ec.BusinessRuleViolation) and seen[0] == 0
        assert store.stream_version("acct") == 9
    finally:
        other.close()


@SETTINGS
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=40),
       every=st.integers(1, 5), reuse=st.booleans())
def test_random_walk_of_two_store_objects_decides_on_the_full_fold(store, backend, request, ops, every, reuse):
    """Two store objects, each with a cache of long streams, deposit, withdraw through snapshots (every
    1..5), and drop snapshots, in a random order: every state handle() is given is the full fold at
    that moment, and no account is ever overdrawn."""
    _needs_snapshots(store)
    prefix = f"w{random.getrandbits(40)}-"
    other = store if backend == "memory" else _reopen(store)
    try:
        stores = [(store, _long_streams_cache(reuse)), (other, _long_streams_cache(reuse))]
        policy = ec.SnapshotPolicy(every=every)
        for op, which, amount in ops:
            s, cache = stores[which]
            a, b = prefix + "a", prefix + "b"
            if op < 3:
                s.append([ec.emit(a if op else b, Deposited(amount=amount + 1))])
            elif op == 3:
                s.drop_snapshots()
            else:
                cmd = Ledger(account=a if op % 2 else b, other=(b if op % 2 else a) if op > 6 else None,
                             amount=amount)
                truth = _truth(s, cmd)
                seen, _ = _run(s, cmd, cache, snapshots=policy)
                assert seen == truth
        for sid in (prefix + "a", prefix + "b"):
            for e in store.read_stream(sid):
                if isinstance(e.data, Withdrawn):
                    assert e.data.balance >= 0
    finally:
        if other is not store:
            other.close()


def test_threads_on_two_store_objects_never_overdraw(store, backend, request):
    """Four threads on two store objects (a cache each, shared by its threads) withdraw from one long
    account through snapshots while a fifth deposits: every withdrawal recorded the balance the full
    fold gives just before it."""
    _needs_snapshots(store)
    other = store if backend == "memory" else _reopen(store)
    try:
        store.append([ec.emit("pot", Deposited(amount=1)) for _ in range(30)])
        caches = {id(store): _long_streams_cache(), id(other): _long_streams_cache()}
        errors: list = []

        def spender(s):
            try:
                for _ in range(12):
                    try:
                        ec.execute(s, Ledger(account="pot"), cache=caches[id(s)],
                                   retry=ec.RetryPolicy(max_retries=200, max_delay=0.005))
                    except ec.BusinessRuleViolation:
                        pass
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(exc)

        def depositor():
            for _ in range(10):
                other.append([ec.emit("pot", Deposited(amount=1))])

        threads = [threading.Thread(target=spender, args=(store if i % 2 else other,)) for i in range(4)]
        threads.append(threading.Thread(target=depositor))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        balance = 0
        for e in store.read_stream("pot"):
            if isinstance(e.data, Withdrawn):
                assert e.data.balance == balance - 1
                balance -= 1
            else:
                balance += e.data.amount
        assert balance >= 0
    finally:
        if other is not store:
            other.close()


def test_the_cache_stays_within_its_bounds(store):
    """Snapshot entries count in the cache's bounds: with room for a few events only, entries are
    evicted, and commands still decide on the full fold."""
    _needs_snapshots(store)
    cache = ec.StateCache(max_entries=3, max_stream_events=0, max_events=5, reuse_state=False, max_bytes=4000)
    for n in range(6):
        store.append([ec.emit(f"s{n}", Deposited(amount=2)) for _ in range(8)])
    for round_ in range(3):
        for n in range(6):
            cmd = Ledger(account=f"s{n}")
            truth = _truth(store, cmd)
            seen, _ = _run(store, cmd, cache)
            assert seen == truth
            assert len(cache._snapshots) <= 3 and cache._events <= 5 and cache._bytes <= 4000
    store.close()
    assert len(cache._snapshots) == 0 and cache._events == 0 and cache._bytes == 0


def test_the_stores_own_cache_serves_a_stream_over_a_thousand_events(store):
    """The default: `store.command_cache` keeps streams of up to 1,000 events; a longer one is folded
    from the cached snapshot and the events after it."""
    _needs_snapshots(store)
    store.append([ec.emit("big", Deposited(amount=1)) for _ in range(1_500)])
    before = SNAPSHOT_STATS["cached"]
    for _ in range(5):
        ec.execute(store, Ledger(account="big"))
    assert SNAPSHOT_STATS["cached"] - before == 3  # every=4: read, 3 from the cache, read
    assert _truth(store, Ledger(account="big"))[0] == 1_495


def test_the_asyncio_postgres_store_serves_snapshots_from_its_cache(pg_dsn, pg_schema):
    """The asyncio store runs the same steps: a cached snapshot serves its commands, and a write by the
    sync store behind its cache's back is caught by the append (a retry on fresh state)."""
    import asyncio

    import eventcore.aio as eca

    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(20)])

        async def run():
            cache = _long_streams_cache()
            async with await eca.connect(pg_dsn, schema=pg_schema) as astore:
                before = SNAPSHOT_STATS["cached"]
                for _ in range(3):
                    await eca.execute(astore, Ledger(account="acct"), cache=cache)
                assert SNAPSHOT_STATS["cached"] - before == 2
                store.append([ec.emit("acct", Withdrawn(amount=15, balance=2))])
                truth = _truth(store, Ledger(account="acct"))
                SEEN.clear()
                result = await eca.execute(astore, Ledger(account="acct"), cache=cache)
                assert SEEN[-1] == truth and result.events[0].data.balance == 1
                SEEN.clear()
                with pytest.raises(ec.BusinessRuleViolation):
                    await eca.execute(astore, Ledger(account="acct", amount=2), cache=cache)

        asyncio.run(run())
