"""The asyncio API (eventcore.aio) on its own terms: tasks on one loop, cancellation, timeouts, async
iteration and async inputs, and a sync and an asyncio store sharing one database.

Every test runs its coroutine with asyncio.run (bounded by HANG: a hang fails, it never blocks the
run) against real stores: "aio-memory", "aio-sqlite" and "aio-postgres" (the last once
eventcore.aio.postgres exists; see conftest.AIO_BACKENDS). What the sync suites prove is proved for
the asyncio stores by test_aio_conformance.py and test_aio_stateful.py, through a sync facade; this
module proves what only awaiting can break.
"""
from __future__ import annotations

import asyncio
import importlib.util
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any, NamedTuple

import pytest

import eventcore as ec
import eventcore.aio as eca
from domain import Deposit, Deposited, Noted, SetLimit, Transfer, Withdraw, Withdrawn
from test_executor import CheckPairs, Checked, Paired
from test_projections import Collector, Counted

emit = ec.emit
SID = ec.StreamId
#: Bounds a hang, never a speed: a test's coroutine that runs longer fails.
HANG = 120.0
#: Retries enough that contention never exhausts them (only a real defect fails a command).
PATIENT = ec.RetryPolicy(max_retries=100_000, base_delay=0.0002, max_delay=0.01)


class Credit(Deposit):
    """A deposit whose recorded balance counts withdrawals too (domain.Deposit's fold adds every amount)."""

    def apply(self, state, event):
        return state + (event.data.amount if isinstance(event.data, Deposited) else -event.data.amount)


class Target(NamedTuple):
    """A database to open asyncio (and sync) stores on."""

    backend: str
    url: str
    options: dict

    async def open(self, **extra: Any) -> eca.AsyncEventStore:
        return await eca.connect(self.url, **{**self.options, **extra})

    def open_sync(self) -> ec.EventStore:
        return ec.connect(self.url, **self.options)


def _target(backend: str, request) -> Target:
    if backend == "aio-memory":
        return Target(backend, "memory://", {})
    if backend == "aio-sqlite":
        return Target(backend, f"sqlite:///{request.getfixturevalue('tmp_path') / 'events.db'}", {})
    if importlib.util.find_spec("eventcore.aio.postgres") is None:
        pytest.skip("eventcore.aio.postgres (AsyncPostgresStore) is not in this build yet")
    return Target(backend, request.getfixturevalue("pg_dsn"),
                  {"schema": request.getfixturevalue("pg_schema"), "pool_size": 20})


@pytest.fixture(params=["aio-memory", "aio-sqlite", "aio-postgres"])
def target(request) -> Target:
    return _target(request.param, request)


@pytest.fixture
def memory_target(request) -> Target:
    """For what does not depend on the backend (the loop's threads): the memory store only."""
    return _target("aio-memory", request)


@pytest.fixture(params=["aio-sqlite", "aio-postgres"])
def shared(request) -> Target:
    """A database that several store objects (and processes) can open."""
    return _target(request.param, request)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, HANG))


async def feed(store) -> list:
    return [e async for e in store.read_all(page_size=97)]


async def until(cond, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.005)


def _ids(events) -> list:
    return [e.event_id for e in events]


async def assert_ledger(store, accounts) -> dict:
    """Every account's stream gap-free, every decision made on a state that held every earlier event of
    the stream (the balance each event carries is the fold of those before it): no lost update.
    Returns account -> balance."""
    balances = {}
    for a in accounts:
        events = await store.read_stream(a)
        assert [e.version for e in events] == list(range(1, len(events) + 1)), a
        total = 0
        for e in events:
            total += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
            assert e.data.balance == total, (a, e.version)
        balances[a] = total
    assert await store.stream_versions(accounts) == {a: len(await store.read_stream(a)) for a in accounts}
    return balances


# -- many tasks on one loop -----------------------------------------------------------------------------------


def test_many_tasks_on_one_loop_lose_no_update(target):
    """40 tasks deposit and transfer at once among 8 accounts (half through the store's command cache,
    half reading every time; on a shared database, through two store objects, whose commands really
    conflict): every command's events are written once, versions are gap-free, money is conserved and
    every decision saw every earlier event of its streams."""
    async def main():
        stores = [await target.open()]
        if target.backend != "aio-memory":
            stores.append(await target.open())
        try:
            store = stores[0]
            accounts = [SID(f"acct-{i}") for i in range(8)]
            await store.append([emit(a, Deposited(amount=100, balance=100)) for a in accounts])
            deposits, transfers, refused = [], [], []

            async def worker(k: int) -> None:
                rng = random.Random(k)
                on = stores[k % len(stores)]
                cache = ec.executor.STORE_CACHE if k % 4 < 2 else None
                for _ in range(8):
                    if rng.random() < 0.3:
                        amount = rng.randint(1, 20)
                        r = await eca.execute(on, Credit(rng.choice(accounts), amount), retry=PATIENT, timeout=None,
                                              cache=cache)
                        assert len(r.events) == 1
                        deposits.append(amount)
                    else:
                        src, dst = rng.sample(accounts, 2)
                        try:
                            r = await eca.execute(on, Transfer(src, dst, rng.randint(1, 60)), retry=PATIENT,
                                                  timeout=None, cache=cache)
                        except ec.BusinessRuleViolation as exc:
                            assert "insufficient funds" in str(exc)
                            refused.append(1)
                            continue
                        assert [e.stream_id for e in r.events] == [src, dst]
                        assert r.events[1].position == r.events[0].position + 1  # one append
                        transfers.append(r)

            await asyncio.gather(*(worker(k) for k in range(40)))
            assert transfers and len(deposits) + len(transfers) + len(refused) == 40 * 8
            events = await feed(store)
            positions = [e.position for e in events]
            assert positions == sorted(set(positions)) and await store.head_position() == positions[-1]
            assert len(events) == len(accounts) + len(deposits) + 2 * len(transfers)
            balances = await assert_ledger(store, accounts)
            assert sum(balances.values()) == 100 * len(accounts) + sum(deposits)
            assert all(b >= 0 for b in balances.values()), balances
            written = {e.event_id for e in events}
            assert all(e.event_id in written for r in transfers for e in r.events)
        finally:
            for s in stores:
                await s.aclose()

    run(main())


@pytest.mark.parametrize("backend", ["aio-memory", "aio-sqlite"])
def test_a_memory_or_sqlite_store_serves_one_event_loop_after_another(backend, request):
    """Opened on one loop, used by tasks racing on one stream on a second loop and then a third (as a
    test suite or a sync program calling asyncio.run now and then does)."""
    target = _target(backend, request)
    store = asyncio.run(target.open())
    try:
        for round_ in range(3):
            async def burst():
                acct = SID("loops")
                once = ec.RetryPolicy(max_retries=0)  # queued on the stream's lock: no conflict to retry
                results = await asyncio.gather(*(eca.execute(store, Credit(acct, 1), retry=once) for _ in range(20)))
                versions = sorted(r.stream_versions[acct] for r in results)
                assert versions == list(range(20 * round_ + 1, 20 * round_ + 21))

            run(burst())
        events = asyncio.run(store.read_stream("loops"))
        assert [e.data.balance for e in events] == list(range(1, 61))
    finally:
        asyncio.run(store.aclose())


# -- a sync and an asyncio store on one database ----------------------------------------------------------


def test_a_sync_and_an_asyncio_store_read_each_others_writes(shared):
    async def main():
        sync = shared.open_sync()
        try:
            async with await shared.open() as store:
                a = SID("shared-a")
                r1 = await asyncio.to_thread(ec.execute, sync, Deposit(a, 10), idempotency_key="sync-1")
                r2 = await eca.execute(store, Deposit(a, 5), idempotency_key="async-1")
                assert r2.events[0].data.balance == 15 and r2.stream_versions == {a: 2}  # it read the sync write
                assert await store.read_stream(a) == sync.read_stream(a) == r1.events + r2.events
                # Each API replays the other's idempotency key.
                again = await eca.execute(store, Deposit(a, 10), idempotency_key="sync-1")
                assert again.replayed and _ids(again.events) == _ids(r1.events)
                again = await asyncio.to_thread(ec.execute, sync, Deposit(a, 5), idempotency_key="async-1")
                assert again.replayed and _ids(again.events) == _ids(r2.events)
                # Version checks across the APIs: a stale expectation of one is refused by the other's write.
                sync.append([emit("shared-b", Noted(text="sync"))], {"shared-b": ec.NO_STREAM})
                with pytest.raises(ec.ConcurrencyError) as info:
                    await store.append([emit("shared-b", Noted(text="async"))], {"shared-b": ec.NO_STREAM})
                assert (info.value.stream_id, info.value.actual) == ("shared-b", 1)
                await store.append_batch([emit("shared-b", Noted(text=str(i))) for i in range(5)], {"shared-b": 1})
                assert [e.data.text for e in sync.read_stream("shared-b")] == ["sync", "0", "1", "2", "3", "4"]
                # Both feeds are one feed.
                assert await feed(store) == list(sync.read_all())
                assert await store.head_position() == sync.head_position()
                assert await store.type_counts() == sync.type_counts()
                assert await store.recorded_command("async-1") == sync.recorded_command("async-1")
                # A sync store's cached state is checked against what the asyncio one wrote, and back.
                await asyncio.to_thread(ec.execute, sync, Withdraw(a, 1))
                await eca.execute(store, Withdraw(a, 1))
                await asyncio.to_thread(ec.execute, sync, Withdraw(a, 1))
                await eca.execute(store, Withdraw(a, 1))
                await asyncio.to_thread(ec.execute, sync, Credit(a, 2))
                await eca.execute(store, Credit(a, 3))
                assert [e.data.balance for e in await store.read_stream(a)] == [10, 15, 14, 13, 12, 11, 13, 16]
        finally:
            sync.close()

    run(main())


# -- the command cache ---------------------------------------------------------------------------------------


def _count_reads(store) -> list:
    calls = []
    real = store.read_streams

    async def counting(ids, **kwargs):
        calls.append(list(ids))
        return await real(ids, **kwargs)

    store.read_streams = counting
    return calls


def test_the_command_cache_hits_misses_and_goes_stale_as_the_sync_ones(target):
    """The same commands on a sync store and on an asyncio one: the same reads skipped, the same counters."""
    def script(step):
        """(counters after each step) of one run; `step(kind, *args)` does one thing on one API's store."""
        out = []
        acct = SID("warm")
        step("append", [emit(acct, Deposited(amount=100, balance=100))])
        for _ in range(3):
            step("execute", Withdraw(acct, 10), {})
            out.append(step("counters"))
        step("append", [emit(acct, Withdrawn(amount=50, balance=20))])  # behind the cache's back
        with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds: 20 < 30"):
            step("execute", Withdraw(acct, 30), {})
        out.append(step("counters"))
        step("execute", Withdraw(acct, 5), {"cache": None})
        out.append(step("counters"))
        own = ec.StateCache(reuse_state=True)
        for _ in range(2):
            step("execute", SetLimit(acct, 3), {"cache": own})
        out.append((own.hits, own.misses, own.stale))
        return out

    sync = ec.connect("memory://")
    sync_reads = []
    real = sync.read_streams
    sync.read_streams = lambda ids, **kw: sync_reads.append(list(ids)) or real(ids, **kw)

    def sync_step(kind, *args):
        if kind == "append":
            return sync.append(*args)
        if kind == "execute":
            return ec.execute(sync, args[0], **args[1])
        c = sync.command_cache
        return c.hits, c.misses, c.stale, len(sync_reads)

    expected = script(sync_step)
    assert expected[0][:2] == (0, 1) and expected[2][:2] == (2, 1)  # the sync side as documented

    async def main():
        async with await target.open() as store:
            reads = _count_reads(store)
            loop = asyncio.get_running_loop()

            def step(kind, *args):  # the script runs on a thread; each step is awaited on the loop
                if kind == "counters":
                    c = store.command_cache
                    return c.hits, c.misses, c.stale, len(reads)
                call = store.append(*args) if kind == "append" else eca.execute(store, args[0], **args[1])
                return asyncio.run_coroutine_threadsafe(call, loop).result()

            got = await asyncio.to_thread(script, step)
            assert got == expected

    run(main())


def test_one_cache_over_several_asyncio_stores_keeps_them_apart_and_drops_a_closed_ones_entries(target):
    async def main():
        cache = ec.StateCache()
        async with await target.open() as store:
            other = await eca.connect("memory://")
            await eca.execute(store, Deposit(SID("d-1"), 5), cache=cache)
            await eca.execute(other, Deposit(SID("d-1"), 7), cache=cache)  # same command and stream, other store
            assert len(cache) == 2 and cache.misses == 2
            assert (await eca.execute(other, Deposit(SID("d-1"), 1), cache=cache)).events[0].data.balance == 8
            await other.aclose()
            assert len(cache) == 1
            with pytest.raises(ec.StoreUnavailableError):
                await eca.execute(other, Deposit(SID("d-1"), 1), cache=cache)
            assert len(cache) == 1
            result = await eca.execute(store, Deposit(SID("d-1"), 1), cache=cache)
            assert result.stream_versions == {"d-1": 2} and result.events[0].data.balance == 6
            assert cache.hits == 2
        assert len(cache) == 0 and not cache._folded  # closing the store dropped its entries

    run(main())


def test_a_metrics_collector_counts_what_it_counts_on_the_sync_api(target):
    """The same script on a sync memory store and on an asyncio store, each with a MetricsCollector
    attached: the same commands by outcome, retries by reason, operations by outcome, events."""
    def script(step):
        a, b = SID("m-a"), SID("m-b")
        step("execute", Deposit(a, 10), {})
        with pytest.raises(ec.BusinessRuleViolation):
            step("execute", Deposit(a, -1), {})
        step("execute", Transfer(a, b, 4), {"cache": None})
        with pytest.raises(ec.BusinessRuleViolation):
            step("execute", Transfer(a, b, 400), {})
        step("execute", Withdraw(a, 1), {})  # warm
        step("append", [emit(a, Withdrawn(amount=1, balance=4))], {"a": None})  # behind the cache
        step("execute", Withdraw(a, 1), {})  # a stale cache hit: a free retry
        step("execute", Deposit(b, 1), {"idempotency_key": "m-k"})
        step("execute", Deposit(b, 1), {"idempotency_key": "m-k"})  # replayed
        step("read_stream", a)
        step("read_all")

    def counters(collector):
        return (dict(collector.commands), dict(collector.retries), dict(collector.operations),
                collector.events_written, collector.events_read)

    sync, sync_collector = ec.connect("memory://"), ec.MetricsCollector()
    sync.attach(sync_collector)

    def sync_step(kind, *args):
        if kind == "execute":
            return ec.execute(sync, args[0], **args[1])
        if kind == "append":
            return sync.append(args[0])
        if kind == "read_stream":
            return sync.read_stream(args[0])
        return list(sync.read_all())

    script(sync_step)
    expected = counters(sync_collector)
    assert expected[1][("Withdraw", "stale_cache")] == 1  # the script reaches a stale cache hit

    async def main():
        collector = ec.MetricsCollector()
        async with await target.open(metrics=collector) as store:
            assert store.metrics is collector
            loop = asyncio.get_running_loop()

            def step(kind, *args):
                if kind == "execute":
                    call = eca.execute(store, args[0], **args[1])
                elif kind == "append":
                    call = store.append(args[0])
                elif kind == "read_stream":
                    call = store.read_stream(args[0])
                else:
                    call = feed(store)
                return asyncio.run_coroutine_threadsafe(call, loop).result()

            await asyncio.to_thread(script, step)
            got = counters(collector)
        return got

    try:
        got = run(main())
    finally:
        sync.close()
    # read_all pages: feed() reads pages of 97, the sync read_all pages of 1,000: one page each here.
    assert got == expected


# -- proxies of a real store: failures and waits injected around it --------------------------------------------


class _Proxy:
    """An asyncio store that delegates to a real one (`inner`); subclasses change one method."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


eca.AsyncEventStore.register(_Proxy)


class _CommitsThenFails(_Proxy):
    """Its first append commits and then reports a lost connection."""

    committed = None

    async def append(self, *args, **kwargs):
        recorded = await self.inner.append(*args, **kwargs)
        if self.committed is None:
            self.committed = recorded
            raise ec.StoreUnavailableError("connection lost after COMMIT was sent", maybe_committed=True)
        return recorded


def test_execute_settles_an_ambiguous_append_under_a_key(target):
    async def main():
        async with await target.open() as store:
            flaky = _CommitsThenFails(store)
            result = await eca.execute(flaky, Deposit(SID("amb"), 4), idempotency_key="amb-1")
            assert result.replayed and _ids(result.events) == _ids(flaky.committed)
            flaky = _CommitsThenFails(store)
            with pytest.raises(ec.StoreUnavailableError) as info:
                await eca.execute(flaky, Deposit(SID("amb2"), 4))
            assert info.value.maybe_committed
            assert [e.data.amount for e in await store.read_stream("amb")] == [4]
            assert [e.data.amount for e in await store.read_stream("amb2")] == [4]  # once, never retried

    run(main())


class _GatedRead(_Proxy):
    """Its first read waits for `gate`: a command holding its streams' locks, awaiting."""

    def __init__(self, inner):
        super().__init__(inner)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def read_streams(self, *args, **kwargs):
        if not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        return await self.inner.read_streams(*args, **kwargs)


def test_a_command_waiting_for_a_stream_held_on_the_loop_times_out_having_written_nothing(target):
    async def main():
        async with await target.open() as store:
            gated = _GatedRead(store)
            acct = SID("q-2")
            holder = asyncio.create_task(eca.execute(gated, Deposit(acct, 1), cache=None))
            await gated.entered.wait()
            started = asyncio.get_running_loop().time()
            with pytest.raises(ec.CommandTimeoutError) as info:
                await eca.execute(gated, Deposit(acct, 5), timeout=0.2)
            assert not info.value.maybe_committed and "nothing was written" in str(info.value)
            assert asyncio.get_running_loop().time() - started < 5
            assert await store.stream_version(acct) == 0
            gated.gate.set()
            assert (await holder).stream_versions == {acct: 1}
            assert (await eca.execute(gated, Deposit(acct, 5), timeout=5)).stream_versions == {acct: 2}
            assert [e.data.amount for e in await store.read_stream(acct)] == [1, 5]

    run(main())


class _RacingRead(_Proxy):
    """Between its first read and its second, another writer appends a pair."""

    reads = 0

    async def read_streams(self, *args, **kwargs):
        self.reads += 1
        if self.reads == 2:
            await self.inner.append([emit("pair-left", Paired()), emit("pair-right", Paired())])
        return await self.inner.read_streams(*args, **kwargs)


def test_a_refusal_on_state_read_in_several_rounds_is_confirmed_current(target):
    """test_executor's test of the same name, the race injected around an asyncio store: a discovered
    stream is read later than the declared one, a pair written in between makes a state that never
    existed, and a refusal decided on it must not be final."""
    async def main():
        async with await target.open() as store:
            await store.append([emit("pair-left", Paired()), emit("pair-right", Paired())])
            result = await eca.execute(_RacingRead(store), CheckPairs(SID("pair-left")))
            assert result.attempts == 2 and [type(e.data) for e in result.events] == [Checked]
            assert result.stream_versions == {"pair-left": 3, "pair-right": 2}

    run(main())


# -- cancellation and timeouts ------------------------------------------------------------------------------


async def _outcome(task) -> tuple[str, bool, Any]:
    """(outcome, maybe_committed, result or error) of an execute task that may have been cancelled."""
    try:
        return "done", False, await task
    except asyncio.CancelledError as exc:
        return "cancelled", bool(getattr(exc, "maybe_committed", False)), exc
    except ec.CommandTimeoutError as exc:
        return "timeout", bool(exc.maybe_committed), exc


def test_a_transfer_cancelled_at_any_point_is_all_or_nothing_and_settled_by_its_key(target):
    """Transfers under idempotency keys, cancelled after a random 0-2 ms or given a tiny timeout (or both).
    Whatever the moment: the store holds all of a transfer's events or none; running it again with its
    key replays it if it committed, else writes it, once; a cancellation or timeout that says nothing
    was written (no maybe_committed) never had its events committed; and the streams' locks are free
    (the run again, on the same streams, completes at once)."""
    iterations = 60 if target.backend == "aio-postgres" else 120

    async def main():
        rng = random.Random(20261207)
        async with await target.open() as store:
            accounts = [SID(f"c-{i}") for i in range(4)]
            await store.append([emit(a, Deposited(amount=10_000, balance=10_000)) for a in accounts])
            seen = Counter()
            for i in range(iterations):
                key = f"cancel-{i}"
                src, dst = rng.sample(accounts, 2)
                cmd = Transfer(src, dst, 1)
                how = rng.choice(["cancel", "timeout", "both"])
                timeout = 30 if how == "cancel" else rng.choice([1e-6, 1e-4, 5e-4, 1e-3, 2e-3])
                before = await store.stream_versions([src, dst])
                task = asyncio.create_task(eca.execute(store, cmd, idempotency_key=key, timeout=timeout))
                cancelled = False
                if how != "timeout":
                    await asyncio.sleep(rng.uniform(0, 0.002))
                    cancelled = task.cancel()
                outcome, maybe, value = await _outcome(task)
                if outcome == "cancelled":
                    assert cancelled, f"#{i}: a CancelledError nobody asked for (timeout={timeout})"
                if outcome == "timeout":
                    assert how != "cancel", f"#{i}: CommandTimeoutError with a 30 s timeout"
                again = await asyncio.wait_for(eca.execute(store, cmd, idempotency_key=key, timeout=10), 10)
                recorded = await store.recorded_command(key)
                assert recorded is not None and [e.stream_id for e in recorded] == [src, dst], i
                assert recorded[1].position == recorded[0].position + 1
                assert _ids(again.events) == _ids(recorded)
                assert await store.stream_versions([src, dst]) == {src: before[src] + 1, dst: before[dst] + 1}, i
                if outcome == "done":
                    assert again.replayed and _ids(value.events) == _ids(recorded), i
                elif again.replayed:
                    assert maybe, (f"#{i}: {outcome} ({value!r}) said nothing was written, but the transfer had "
                                   "committed")
                seen[outcome, maybe, again.replayed] += 1
            assert sum(v for (o, _, _), v in seen.items() if o != "done"), seen  # it did cancel commands
            balances = await assert_ledger(store, accounts)
            assert sum(balances.values()) == 40_000
            withdrawn = [e async for e in store.read_all(types=[Withdrawn])]
            assert len(withdrawn) == iterations  # every key's transfer exactly once
            print(f"\n{target.backend}: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))

    run(main())


class _SlowAnswer(_Proxy):
    """Its appends commit, and then their answer takes a second to come back (a slow network)."""

    async def append(self, *args, **kwargs):
        recorded = await self.inner.append(*args, **kwargs)
        await asyncio.sleep(1)
        return recorded


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_command_stopped_while_its_append_is_in_flight_says_it_may_have_committed(target, how):
    async def main():
        async with await target.open() as store:
            slow = _SlowAnswer(store)
            cmd = Transfer(SID("f-a"), SID("f-b"), 1)
            await store.append([emit("f-a", Deposited(amount=5, balance=5))])
            if how == "cancel":
                task = asyncio.create_task(eca.execute(slow, cmd, idempotency_key="f-1"))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError) as info:
                    await task
                assert getattr(info.value, "maybe_committed", False)
                notes = getattr(info.value, "__notes__", [])
                assert any("may have committed" in n for n in notes), notes
            else:
                with pytest.raises(ec.CommandTimeoutError) as info:
                    await eca.execute(slow, cmd, idempotency_key="f-1", timeout=0.3)
                assert info.value.maybe_committed and "may have committed" in str(info.value)
            assert await store.stream_versions(["f-a", "f-b"]) == {"f-a": 2, "f-b": 1}  # it had committed
            again = await eca.execute(store, cmd, idempotency_key="f-1")
            assert again.replayed and await store.stream_versions(["f-a", "f-b"]) == {"f-a": 2, "f-b": 1}

    run(main())


def test_concurrent_transfers_cancelled_at_random_are_each_whole_and_settled_once(target):
    """16 tasks at a time run keyed transfers among 12 accounts (on PostgreSQL, appends of concurrent
    tasks share group commits); a random half are cancelled after 0-3 ms. Each transfer is then run
    again under its key: every one is stored once, whole; one that came back cancelled without
    maybe_committed had written nothing; one that returned is replayed with the events it returned."""
    rounds = 5 if target.backend == "aio-postgres" else 8

    async def main():
        rng = random.Random(71)
        async with await target.open() as store:
            accounts = [SID(f"g-{i}") for i in range(12)]
            await store.append([emit(a, Deposited(amount=10_000, balance=10_000)) for a in accounts])
            seen = Counter()
            keys = []
            for r in range(rounds):
                commands = {}
                for k in range(16):
                    key = f"g{r}-{k}"
                    src, dst = rng.sample(accounts, 2)
                    commands[key] = Transfer(src, dst, 1)
                tasks = {key: asyncio.create_task(eca.execute(store, cmd, idempotency_key=key, retry=PATIENT))
                         for key, cmd in commands.items()}
                when = rng.choice(["before they start", "after a step", "after a while"])
                if when != "before they start":  # on memory, the tasks then run until a stream's lock stops them
                    await asyncio.sleep(0 if when == "after a step" else rng.uniform(0, 0.003))
                cancelled = {key for key in rng.sample(sorted(tasks), 8) if tasks[key].cancel()}
                outcomes = {key: await _outcome(task) for key, task in tasks.items()}
                for key, cmd in commands.items():
                    outcome, maybe, value = outcomes[key]
                    if outcome == "cancelled":
                        assert key in cancelled, f"{key}: a CancelledError nobody asked for"
                    again = await asyncio.wait_for(eca.execute(store, cmd, idempotency_key=key, timeout=10), 10)
                    recorded = await store.recorded_command(key)
                    assert [e.stream_id for e in recorded] == [cmd.source, cmd.target], key
                    assert recorded[1].position == recorded[0].position + 1
                    assert _ids(again.events) == _ids(recorded)
                    if outcome == "done":
                        assert again.replayed and _ids(value.events) == _ids(recorded), key
                    elif again.replayed:
                        assert maybe, f"{key}: {outcome} said nothing was written, but the transfer had committed"
                    seen[outcome, maybe, again.replayed] += 1
                keys += commands
            balances = await assert_ledger(store, accounts)
            assert sum(balances.values()) == 120_000
            assert len([e async for e in store.read_all(types=[Withdrawn])]) == len(keys)
            assert sum(v for (o, _, _), v in seen.items() if o == "cancelled"), seen
            print(f"\n{target.backend}: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))

    run(main())


@pytest.mark.parametrize("operation", ["append", "append_batch"])
@pytest.mark.parametrize("backend", ["aio-memory", "aio-sqlite", "aio-postgres"])
def test_a_write_cancelled_once_handed_to_the_store_says_whether_it_may_have_committed(backend, operation, request):
    """store.append / append_batch cancelled once the task has handed the write to the store (on SQLite,
    once the store's thread has started it): if it committed, its CancelledError says it may have
    (maybe_committed and a note), as promised by AsyncEventStore.append; if not, nothing was written."""
    target = _target(backend, request)

    async def main():
        async with await target.open() as store:
            streams = ["h-0", "h-1", "h-2"]
            events = [emit(streams[n % 3], Noted(text=str(n))) for n in range(600)]
            expected = {sid: ec.NO_STREAM for sid in streams}
            if operation == "append":
                call = store.append(events, expected, idempotency_key="h-key")
            else:
                call = store.append_batch(events, expected)
            started = threading.Event()
            if target.backend == "aio-sqlite":  # the write, on the store's thread, is slowed down once started
                primitive = "_append" if operation == "append" else "_append_batch"
                real = getattr(store.sync, primitive)

                def slowed(*args):
                    started.set()
                    time.sleep(0.2)
                    return real(*args)

                setattr(store.sync, primitive, slowed)
            task = asyncio.create_task(call)
            await asyncio.sleep(0)  # the task runs until it waits for the store
            if target.backend == "aio-sqlite":
                assert await asyncio.to_thread(started.wait, 10)
            cancelled = task.cancel()
            try:
                await task
            except asyncio.CancelledError as exc:
                error = exc
            else:
                error = None
                assert not cancelled or target.backend == "aio-memory"
            await asyncio.sleep(0.3)  # a commit sent before the cancellation has landed by now
            versions = await store.stream_versions(streams)
            assert set(versions.values()) in ({0}, {200}), versions  # all or nothing
            if error is not None and versions["h-0"] == 200:
                assert getattr(error, "maybe_committed", False), "cancelled with no word that it committed"
                assert any("may have committed" in n for n in getattr(error, "__notes__", [])), error
            if error is not None and versions["h-0"] == 0:
                assert not (await store.recorded_command("h-key") if operation == "append" else None)

    run(main())


def test_a_command_cancelled_while_waiting_for_a_stream_writes_nothing_and_frees_its_place(target):
    async def main():
        async with await target.open() as store:
            gated = _GatedRead(store)
            acct = SID("w-1")
            holder = asyncio.create_task(eca.execute(gated, Deposit(acct, 1), cache=None))
            await gated.entered.wait()
            waiters = [asyncio.create_task(eca.execute(gated, Deposit(acct, 10 + k), idempotency_key=f"w-{k}"))
                       for k in range(5)]
            await asyncio.sleep(0.01)
            for w in waiters[:3]:
                w.cancel()
            gated.gate.set()
            results = await asyncio.gather(*waiters, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results[:3]), results
            assert not any(getattr(r, "maybe_committed", False) for r in results[:3])
            assert [r.events[0].data.amount for r in results[3:]] == [13, 14]
            await holder
            assert [e.data.amount for e in await store.read_stream(acct)] == [1, 13, 14]
            for k in range(3):
                assert await store.recorded_command(f"w-{k}") is None

    run(main())


def test_many_tasks_on_a_small_pool_wait_for_connections_and_cancelled_waiters_leak_none(target):
    """60 tasks at once on a store of 2 connections (PostgreSQL; the others have no pool): each command
    waits its turn and completes; a third of them, cancelled while waiting, leave no connection behind."""
    async def main():
        options = {"pool_size": 2} if target.backend == "aio-postgres" else {}
        async with await target.open(**options) as store:
            tasks = [asyncio.create_task(eca.execute(store, Credit(SID(f"p-{k % 20}"), 1), idempotency_key=f"p-{k}"))
                     for k in range(60)]
            await asyncio.sleep(0.002)
            cancelled = {k for k in range(0, 60, 3) if tasks[k].cancel()}
            outcomes = [await _outcome(t) for t in tasks]
            for k, (outcome, maybe, value) in enumerate(outcomes):
                assert outcome == ("cancelled" if k in cancelled else "done"), (k, value)
                again = await eca.execute(store, Credit(SID(f"p-{k % 20}"), 1), idempotency_key=f"p-{k}",
                                          timeout=10)
                if outcome == "done":
                    assert again.replayed and _ids(again.events) == _ids(value.events), k
                elif not maybe:
                    assert not again.replayed, f"#{k}: cancelled saying nothing was written, but it had committed"
            versions = await store.stream_versions([f"p-{i}" for i in range(20)])
            assert sum(versions.values()) == 60  # every command once, the cancelled ones settled by their key
            await assert_ledger(store, [f"p-{i}" for i in range(20)])
            if store.pool_stats() is not None:
                await until(lambda: store.pool_stats()["in_use"] == 0, "every connection back in the pool")

    run(main())


def test_a_cancelled_read_all_leaves_the_store_usable(target):
    async def main():
        async with await target.open() as store:
            await store.append([emit(f"r-{i % 3}", Noted(text=str(i))) for i in range(50)])
            for _ in range(30):  # left at its first event: never finished, never closed by this code
                async for _ in store.read_all(page_size=3):
                    break

            async def reader():
                n = 0
                async for _ in store.read_all(page_size=4):
                    n += 1
                    await asyncio.sleep(0)
                return n

            for round_ in range(3):
                tasks = [asyncio.create_task(reader()) for _ in range(40)]
                await asyncio.sleep(0.002 * round_)
                for t in tasks:
                    t.cancel()
                done = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(isinstance(d, (asyncio.CancelledError, int)) for d in done), done
                assert all(d == 50 for d in done if isinstance(d, int))
            out = await asyncio.wait_for(store.append([emit("r-0", Noted(text="after"))]), 10)
            events = await asyncio.wait_for(feed(store), 10)
            assert len(events) == 51 and events[-1] == out[0]
            assert (await eca.execute(store, Deposit(SID("r-acct"), 1), timeout=10)).stream_versions == {"r-acct": 1}
            stats = store.pool_stats()
            if stats is not None:  # no connection kept by the readers left behind
                await until(lambda: store.pool_stats()["in_use"] == 0, "the pool's connections back")

    run(main())


# -- ingest --------------------------------------------------------------------------------------------------------


def _items(n: int, streams: int = 7) -> list:
    return [(f"ing-{i % streams}", Noted(text=str(i))) for i in range(n)]


async def _source(items, stop: int | None = None):
    """An async generator of `items` that raises OSError at item `stop`."""
    for i, item in enumerate(items):
        if i == stop:
            raise OSError("input went away")
        if i % 25 == 0:
            await asyncio.sleep(0)
        yield item


async def _stored(store) -> dict:
    out: dict = {}
    for e in await feed(store):
        out.setdefault(e.stream_id, []).append(e.data.text)
    return out


def _by_stream(items) -> dict:
    out: dict = {}
    for sid, ev in items:
        out.setdefault(sid, []).append(ev.text)
    return out


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_ingest_from_an_async_generator_interrupted_and_resumed_writes_every_item_once(target, parallel):
    async def main():
        items = _items(1000)
        async with await target.open() as store:
            loop_thread = threading.get_ident()
            reported = []

            async def on_batch(events):
                assert threading.get_ident() == loop_thread  # awaited on the loop
                await asyncio.sleep(0)
                reported.append(events)

            with pytest.raises(OSError, match="input went away"):
                await store.ingest(_source(items, 640), batch_size=100, resume_key="load-1", parallel=parallel,
                                   on_batch=on_batch)
            committed = sum(map(len, (await _stored(store)).values()))
            assert committed % 100 == 0 or parallel > 1
            assert reported == sorted(reported) and (reported[-1] if reported else 0) <= committed
            if parallel == 1:
                assert reported == list(range(100, committed + 1, 100))
            result = await store.ingest(_source(items), batch_size=100, resume_key="load-1", parallel=parallel,
                                        on_batch=on_batch)
            assert (result.skipped, result.events) == (committed, 1000 - committed)
            assert await _stored(store) == _by_stream(items)
            again = await store.ingest(_source(items), batch_size=100, resume_key="load-1", parallel=parallel)
            assert (again.events, again.skipped) == (0, 1000)
            assert await _stored(store) == _by_stream(items)
            # A plain iterable and a plain on_batch too.
            plain = []
            more = _items(230, streams=3)
            more = [(f"more-{sid}", ev) for sid, ev in more]
            result = await store.ingest(iter(more), batch_size=50, on_batch=plain.append, parallel=parallel)
            assert result.events == 230 and plain[-1] == 230
            assert {k: v for k, v in (await _stored(store)).items() if k.startswith("more-")} == _by_stream(more)

    run(main())


def test_a_cancelled_ingest_stops_with_whole_batches_and_resumes_exactly_once(target):
    async def main():
        items = _items(2000)
        async with await target.open() as store:
            batches = []

            async def slow(items):
                for item in items:
                    await asyncio.sleep(0)
                    yield item

            task = asyncio.create_task(store.ingest(slow(items), batch_size=50, resume_key="c-1",
                                                    on_batch=batches.append))
            await until(lambda: len(batches) >= 3, "three batches")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            committed = sum(map(len, (await _stored(store)).values()))
            assert committed % 50 == 0 and committed >= 150
            await asyncio.sleep(0.05)
            assert sum(map(len, (await _stored(store)).values())) == committed  # settled when it raised
            result = await store.ingest(_source(items), batch_size=50, resume_key="c-1")
            assert (result.skipped, result.events) == (committed, 2000 - committed)
            assert await _stored(store) == _by_stream(items)

    run(main())


def test_a_failed_ingest_reports_what_the_sync_one_reports(target):
    """An ingest stopped by a bad item, by a version conflict and by a resume key reused with another
    parallel: the same IngestError (message, committed, item) or ValidationError as the sync API's, and
    the same events committed before it."""
    def runs(ingest):
        items = _items(500)
        broken = list(items)
        broken[321] = ("", Noted(text="bad stream id"))
        out = [ingest(broken, {"batch_size": 50, "resume_key": "fixme"})]
        out.append(ingest([("taken", Noted(text="x"))] * 3, {"expected": {"taken": ec.NO_STREAM}}))
        out.append(ingest([("taken", Noted(text="y"))] * 120, {"batch_size": 50, "expected": {"taken": 3}}))
        out.append(ingest([("taken", Noted(text="z"))] * 120, {"batch_size": 50, "expected": {"taken": 3}}))
        out.append(ingest(items, {"batch_size": 50, "resume_key": "fixme", "parallel": 2}))
        out.append(ingest(items, {"batch_size": 50, "resume_key": "fixme"}))
        return out

    def outcome(call):
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - compared
            return (type(exc), str(exc), getattr(exc, "committed", None), getattr(exc, "item", None),
                    type(exc.__cause__).__name__)
        return (result.events, result.batches, result.skipped)

    sync = ec.connect("memory://")
    try:
        expected = runs(lambda items, kw: outcome(lambda: sync.ingest(items, **kw)))
        expected_feed = [(e.stream_id, e.version, e.data) for e in sync.read_all()]
    finally:
        sync.close()
    assert expected[0][0] is ec.IngestError and expected[0][2] == 300

    async def main():
        async with await target.open() as store:
            loop = asyncio.get_running_loop()

            def ingest(items, kw):
                return outcome(lambda: asyncio.run_coroutine_threadsafe(store.ingest(items, **kw), loop).result())

            got = await asyncio.to_thread(runs, ingest)
            assert got == expected
            assert [(e.stream_id, e.version, e.data) for e in await feed(store)] == expected_feed

    run(main())


def test_an_ingest_with_an_on_batch_that_cannot_be_called_is_refused_before_anything_is_written(memory_target):
    sync = ec.connect("memory://")
    try:
        with pytest.raises(ec.ValidationError, match="on_batch"):
            sync.ingest([("ob", Noted())], on_batch=5)
        assert sync.head_position() == 0
    finally:
        sync.close()

    async def main():
        async with await memory_target.open() as store:
            with pytest.raises(ec.ValidationError, match="on_batch"):
                await store.ingest([("ob", Noted())], on_batch=5)
            assert await store.head_position() == 0

    run(main())


# -- projections ---------------------------------------------------------------------------------------------


def test_run_projection_catches_up_follows_live_and_stops_on_its_event(target):
    async def main():
        async with await target.open() as store:
            await store.append([emit(f"acct-{i % 4}", Counted(i)) for i in range(30)])
            proj = Collector(batch_size=7)
            stop = asyncio.Event()
            task = asyncio.create_task(eca.run_projection(store, proj, stop=stop, poll_interval=0.02))
            await until(lambda: len(proj.seen) == 30, "catch-up")
            for i in range(30, 40):  # the loop stays free: commands run while the projection follows
                await store.append([emit(f"acct-{i % 4}", Counted(i))])
            await until(lambda: len(proj.seen) == 40, "live events")
            stop.set()
            runner = await asyncio.wait_for(task, 30)
            assert [e.position for e in await feed(store)] == proj.order
            assert runner.position == await store.head_position()
            # A restart resumes after the checkpoint.
            late = await store.append([emit("acct-9", Counted(99))])
            again = Collector(batch_size=7)
            await eca.run_projection(store, again, until_caught_up=True)
            assert again.order == [late[0].position]
            # Cancelled, it stops and raises; its checkpoint stays where its last batch left it.
            third = Collector(name="third", batch_size=5)
            task = asyncio.create_task(eca.run_projection(store, third, poll_interval=0.02))
            await until(lambda: len(third.seen) == 41, "the third projector")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            resumed = Collector(name="third", batch_size=5)
            await eca.run_projection(store, resumed, until_caught_up=True)
            assert resumed.order == []
            with pytest.raises(ec.ValidationError, match="stop=asyncio.Event"):
                await eca.run_projection(store, Collector(), stop_event=threading.Event())
            with pytest.raises(ec.ValidationError, match="stop must be an asyncio.Event"):
                await eca.run_projection(store, Collector(), stop=threading.Event())

    run(main())


# -- arguments and closed stores: the sync API's errors -------------------------------------------------------------


_BAD_CALLS = [
    ("append", ([ec.EventToWrite("", Noted(), None)],), {}),
    ("append", ([emit("a", Noted())], {"a": -7}), {}),
    ("append", ([emit("a", Noted())], {"a": 2**63}), {}),
    ("append", ([("a", Noted())],), {}),
    ("append", ([emit("a", Noted())],), {"metadata": {"user_id": "x"}}),
    ("append", ([emit("a", Noted())],), {"idempotency_key": ""}),
    ("append", ([emit("a", Noted())],), {"idempotency_key": 5}),
    ("append", ([emit("a", Noted())],), {"idempotency_key": "k" * 256}),
    ("append_batch", ([ec.EventToWrite("a\x00", Noted(), None)],), {}),
    ("append_batch", ([emit("a", Noted())], {"a": "x"}), {}),
    ("read_stream", ("",), {}),
    ("read_stream", ("a",), {"from_version": 0}),
    ("read_stream", ("a",), {"limit": -1}),
    ("read_stream", ("a",), {"decode": 1}),
    ("read_streams", (["a", ""],), {}),
    ("read_streams", (["a"],), {"decode": None}),
    ("stream_version", ("a\x00",), {}),
    ("stream_versions", (["abc", None],), {}),
    ("recorded_command", ("",), {}),
    ("recorded_command", (b"key",), {}),
    ("read_all", (), {"after_position": -1}),
    ("read_all", (), {"after_position": 1.5}),
    ("read_all", (), {"page_size": 0}),
    ("read_all", (), {"limit": -2}),
    ("read_all", (), {"stream_prefix": "a\x00"}),
    ("read_all", (), {"stream_prefix": 5}),
    ("read_all", (), {"types": [5]}),
    ("ingest", ([("a", Noted())],), {"batch_size": 0}),
    ("ingest", ([("a", Noted())],), {"parallel": 0}),
    ("ingest", ([("a", Noted())],), {"resume_key": ""}),
    ("ingest", ([("", Noted())],), {}),
    ("attach", (object(),), {}),
]

_BAD_EXECUTE = [
    (Deposited(amount=1), {}), (Deposit, {}),
    (None, {"retry": 3}), (None, {"retry": True}), (None, {"metadata": {"user_id": "x"}}),
    (None, {"timeout": "5"}), (None, {"timeout": 0}), (None, {"timeout": -1}), (None, {"timeout": float("nan")}),
    (None, {"timeout": float("inf")}), (None, {"cache": {}}), (None, {"metrics": object()}),
    (None, {"idempotency_key": b"key"}), (None, {"idempotency_key": "k" * 256}),
    (Deposit(SID("a"), 0), {}),  # a refusal, not a bad argument: the same BusinessRuleViolation
    (Deposit("", 1), {}),
]

_BAD_CONNECT = [
    ("nosuch://x", {}), ("memory://", {"pool_size": 3}), ("memory://", {"migrate": "maybe"}),
    ("sqlite://", {}), ("sqlite:///{tmp}/x.db", {"timeout": -1}),
    ("sqlite:///{tmp}/x.db", {"synchronous": "sometimes"}),
    ("sqlite:///{tmp}/x.db?migrate=maybe", {}), ("sqlite:///{tmp}/missing.db", {"migrate": False}),
    ("sqlite:///{tmp}/x.db", {"metrics": object()}), ("", {}), (5, {}),
]


def _error(call) -> tuple:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc), str(exc)
    return None, "no error"


async def _async_error(call) -> tuple:
    try:
        await call()
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc), str(exc)
    return None, "no error"


def test_bad_arguments_raise_what_the_sync_api_raises(target, tmp_path):
    sync = ec.connect("memory://")

    def sync_call(name, args, kwargs):
        if name == "read_all":
            return lambda: list(sync.read_all(*args, **kwargs))
        return lambda: getattr(sync, name)(*args, **kwargs)

    expected_calls = [_error(sync_call(*c)) for c in _BAD_CALLS]
    expected_execute = [_error(lambda c=c: ec.execute(sync, c[0] or Deposit(SID("a"), 1), **c[1]))
                        for c in _BAD_EXECUTE]
    urls = [(u.format(tmp=tmp_path) if isinstance(u, str) else u, o) for u, o in _BAD_CONNECT]
    expected_connect = [_error(lambda u=u, o=o: ec.connect(u, **o)) for u, o in urls]
    assert all(t is not None for t, _ in expected_calls + expected_execute + expected_connect)

    async def main():
        async with await target.open() as store:
            def async_call(name, args, kwargs):
                if name == "read_all":
                    async def drain():
                        return [e async for e in store.read_all(*args, **kwargs)]
                    return drain
                method = getattr(store, name)

                async def call():
                    result = method(*args, **kwargs)
                    if asyncio.iscoroutine(result):
                        await result
                return call

            got = [await _async_error(async_call(*c)) for c in _BAD_CALLS]
            for c, want, have in zip(_BAD_CALLS, expected_calls, got):
                assert have == want, c
            got = [await _async_error(lambda c=c: eca.execute(store, c[0] or Deposit(SID("a"), 1), **c[1]))
                   for c in _BAD_EXECUTE]
            for c, want, have in zip(_BAD_EXECUTE, expected_execute, got):
                assert have == want, c
            assert await store.head_position() == 0  # nothing written by any of them
            with pytest.raises(ec.ValidationError, match=r"store must be an eventcore store \(await eventcore.aio"):
                await eca.execute(sync, Deposit(SID("a"), 1))
        got = [await _async_error(lambda u=u, o=o: eca.connect(u, **o)) for u, o in urls]
        for c, want, have in zip(urls, expected_connect, got):
            assert have == want, c

    try:
        run(main())
    finally:
        sync.close()


def test_a_closed_store_refuses_every_operation(target):
    async def main():
        store = await target.open()
        await store.append([emit("s", Noted(text="x"))])
        await eca.execute(store, Deposit(SID("acct"), 1))
        await store.aclose()
        assert store.closed
        calls = {
            "read_stream": lambda: store.read_stream("s"),
            "read_streams": lambda: store.read_streams(["s"]),
            "stream_version": lambda: store.stream_version("s"),
            "head_position": lambda: store.head_position(),
            "recorded_command": lambda: store.recorded_command("k"),
            "type_counts": lambda: store.type_counts(),
            "append": lambda: store.append([emit("s", Noted(text="y"))]),
            "append_batch": lambda: store.append_batch([emit("s", Noted(text="y"))]),
            "ingest": lambda: store.ingest([("s", Noted(text="z"))], resume_key="k"),
            "read_all": lambda: feed(store),
            "execute": lambda: eca.execute(store, Deposit(SID("acct"), 1)),
            "execute uncached": lambda: eca.execute(store, Deposit(SID("acct"), 1), cache=None),
        }
        for name, call in calls.items():
            with pytest.raises(ec.StoreUnavailableError):
                await asyncio.wait_for(call(), 10)
        health = await store.health()
        assert not health.ok and not health.connected and health.error
        await store.aclose()  # again: nothing to do

    run(main())


def test_closing_a_store_while_tasks_use_it(target):
    """test_close's guarantee for tasks: a store closed while 12 tasks run transfers on it ends each of
    them with its result or StoreUnavailableError (nothing else, and no hang); what was acknowledged is
    stored, every transfer whole or absent; no command cache keeps entries for the closed store."""
    async def main():
        cache = ec.StateCache()
        store = await target.open()
        accounts = [SID(f"z-{i}") for i in range(6)]
        await store.append([emit(a, Deposited(amount=10_000, balance=10_000)) for a in accounts])
        acked: list = []

        async def work(k):
            rng = random.Random(k)
            while True:
                src, dst = rng.sample(accounts, 2)
                try:
                    # (The default retry policy: a closed store's error is retried like any store error that
                    # wrote nothing, a few times.)
                    acked.append(await eca.execute(store, Transfer(src, dst, 1),
                                                   cache=cache if k % 2 else ec.executor.STORE_CACHE))
                except ec.StoreUnavailableError as exc:
                    return exc
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(work(k)) for k in range(12)]
        await until(lambda: len(acked) >= 30, "30 transfers")
        await asyncio.wait_for(store.aclose(), 10)
        done, _ = await asyncio.wait(tasks, timeout=10)
        assert len(done) == len(tasks), "a task still running 10 s after the store was closed"
        for t in tasks:
            assert isinstance(t.result(), ec.StoreUnavailableError), t.result()
        assert len(cache) == 0 and not cache._folded
        if target.backend == "aio-memory":
            return
        async with await target.open() as again:
            ids = {e.event_id for e in await feed(again)}
            assert all(e.event_id in ids for r in acked for e in r.events)
            balances = await assert_ledger(again, accounts)
            assert sum(balances.values()) == 60_000
            withdrawn = [e async for e in again.read_all(types=[Withdrawn])]
            deposited = [e async for e in again.read_all(types=[Deposited])][len(accounts):]
            assert len(withdrawn) == len(deposited) >= len(acked)
            assert all(d.position == w.position + 1 for w, d in zip(withdrawn, deposited))

    run(main())


def test_a_store_opened_as_a_context_is_closed_after_it(target):
    async def main():
        async with await target.open() as store:
            await eca.execute(store, Deposit(SID("ctx"), 1))
            assert (await store.health()).ok
        assert store.closed
        with pytest.raises(ec.StoreUnavailableError):
            await store.head_position()
        if target.backend != "aio-memory":  # what it wrote is there for the next store
            async with await target.open() as again:
                assert [e.data.amount for e in await again.read_stream("ctx")] == [1]

    run(main())


def test_an_idempotency_key_given_as_a_uuid_or_as_its_text_is_one_key(target):
    async def main():
        async with await target.open() as store:
            key = uuid.uuid4()
            first = await eca.execute(store, Deposit(SID("u"), 1), idempotency_key=key)
            again = await eca.execute(store, Deposit(SID("u"), 1), idempotency_key=str(key))
            assert again.replayed and _ids(again.events) == _ids(first.events)

    run(main())


# -- an earlier attempt that may have committed, then a timeout or a cancellation ---------------------------------


class _CommitsThenStalls(_Proxy):
    """Its first append commits and reports a lost connection; then every read stalls (a store that went
    away): the command's next attempt waits until it is timed out or cancelled."""

    committed = None

    async def append(self, *args, **kwargs):
        recorded = await self.inner.append(*args, **kwargs)
        if self.committed is None:
            self.committed = recorded
            raise ec.StoreUnavailableError("connection lost after COMMIT was sent", maybe_committed=True)
        return recorded

    async def read_streams(self, *args, **kwargs):
        if self.committed is not None:
            await asyncio.sleep(3600)
        return await self.inner.read_streams(*args, **kwargs)


def test_a_timeout_after_an_attempt_that_may_have_committed_says_so(target):
    """The sync executor's rule (executor._steps): once an attempt's write may have committed, a later
    failure of the command, a timeout included, says that it may have committed. Here the timeout ends
    the retry while it reads."""
    async def main():
        async with await target.open() as store:
            stalled = _CommitsThenStalls(store)
            with pytest.raises(ec.CommandTimeoutError) as info:
                await eca.execute(stalled, Deposit(SID("amb-t"), 4), idempotency_key="amb-t",
                                  retry=ec.RetryPolicy(base_delay=0), timeout=0.3)
            assert [e.data.amount for e in await store.read_stream("amb-t")] == [4]  # it did commit
            assert info.value.maybe_committed, f"the error says nothing may have been written: {info.value}"

    run(main())


def test_a_cancellation_after_an_attempt_that_may_have_committed_says_so(target):
    async def main():
        async with await target.open() as store:
            stalled = _CommitsThenStalls(store)
            task = asyncio.create_task(eca.execute(stalled, Deposit(SID("amb-c"), 4), idempotency_key="amb-c",
                                                   retry=ec.RetryPolicy(base_delay=0)))
            await until(lambda: stalled.committed is not None, "the first attempt")
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            assert [e.data.amount for e in await store.read_stream("amb-c")] == [4]  # it did commit
            assert getattr(info.value, "maybe_committed", False), \
                "the CancelledError does not say it may have committed"

    run(main())


# -- cancelling what waits on a thread ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aio-memory", "aio-sqlite"])
def test_cancelling_an_ingest_whose_async_source_waits_returns_promptly(backend, request):
    """An async source that has nothing more for now (a queue, a socket): cancelling the ingest must not
    wait for the source's next item, which may never come. (aio/ingest.py, the same for every backend.)"""
    target = _target(backend, request)
    async def main():
        items = _items(120)
        release = asyncio.Event()
        async with await target.open() as store:
            async def source():
                for item in items:
                    yield item
                await release.wait()  # nothing more until released

            batches = []
            task = asyncio.create_task(store.ingest(source(), batch_size=50, resume_key="q-1",
                                                    on_batch=batches.append))
            await until(lambda: len(batches) == 2, "two batches")
            await asyncio.sleep(0.05)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1)
            if not done:
                release.set()  # the source goes on, so the ingest can end and this test with it
            with pytest.raises(asyncio.CancelledError):
                await task
            assert done, "the cancelled ingest was still waiting for its source's next item after 1 s"
            assert sum(map(len, (await _stored(store)).values())) == 100

    run(main())


def test_live_projections_leave_the_loops_default_executor_to_others(memory_target):
    """A live projection runs for as long as the application does: however many run, the loop's other
    work on threads (asyncio.to_thread, run_in_executor(None, ...), an ingest) still runs."""
    from concurrent.futures import ThreadPoolExecutor

    workers = ThreadPoolExecutor()._max_workers  # what asyncio's default executor gets on this machine

    async def main():
        async with await memory_target.open() as store:
            await store.append([emit("p-1", Counted(1))])
            stop = asyncio.Event()
            projectors = [Collector(name=f"live-{k}") for k in range(workers)]
            tasks = [asyncio.create_task(eca.run_projection(store, p, stop=stop, poll_interval=0.05))
                     for p in projectors]
            try:
                await until(lambda: all(p.seen for p in projectors), "every projection caught up")
                ran = asyncio.ensure_future(asyncio.to_thread(lambda: "ran"))
                done, _ = await asyncio.wait({ran}, timeout=1)
                ingest = asyncio.ensure_future(store.ingest([("p-2", Counted(2))]))
                done_ingest, _ = await asyncio.wait({ingest}, timeout=1)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert await ran == "ran" and (await ingest).events == 1
            assert done and done_ingest, (f"{workers} live projections held every thread of the loop's default "
                                          "executor: asyncio.to_thread and store.ingest waited for them to stop")

    run(main())
