"""The asyncio PostgreSQL store on a real server: parity with the sync store (options, errors, reads,
one shared schema), group commit across tasks, cancellation at any point, lost connections,
timeouts and LISTEN/NOTIFY wake-ups."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import eventcore as ec
from optional import require

psycopg = require("psycopg")

from eventcore.aio.postgres import AsyncPostgresStore  # noqa: E402
from eventcore.stores.postgres import PostgresStore  # noqa: E402
from eventcore.stores.prepare import prepare_append  # noqa: E402

pytestmark = pytest.mark.usefixtures("pg_dsn")


class Noted(ec.Event):
    __event_type__ = "aiopg.Noted"
    text: str


class Counted(ec.Event):
    __event_type__ = "aiopg.Counted"
    n: int


def run(coro):
    return asyncio.run(coro)


def _envelopes(events):
    return [(e.stream_id, e.version, e.position, e.event_id, e.type, e.type_version, e.data, e.metadata,
             e.recorded_at) for e in events]


def _raw(dsn):
    return psycopg.connect(dsn, autocommit=True)


def _lock_waiter_pids(dsn, schema):
    with _raw(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = %s",
            (f"eventcore:{schema}",))]


async def _until(predicate, what, timeout=20.0):
    """Liveness guard: wait until predicate() holds (polling), or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def _keeping_cancellation(coro, caught: list):
    """`coro`, its CancelledError kept in `caught`: awaiting a cancelled task raises a new one before
    Python 3.11, without the notes the store added."""
    try:
        return await coro
    except asyncio.CancelledError as exc:
        caught.append(exc)
        raise


def _hold_stream_lock(dsn, stream):
    """A connection holding `stream`'s append lock in an open transaction (rollback() to release it)."""
    conn = psycopg.connect(dsn)
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (stream,))
    return conn


# -- opening, options ------------------------------------------------------------------------


def test_open_close_and_the_pool(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=3) as store:
            assert store.scheme == "postgresql" and store.default_ingest_lanes == 2
            assert await store.head_position() == 0
            assert await store.schema_version() == await store.migrate()
            stats = store.pool_stats()
            assert stats["max"] == 3 and stats["in_use"] == 0 and stats["size"] >= 1
            health = await store.health()
            assert health.ok, health.error
        assert store.closed
        async def feed():
            return [e async for e in store.read_all()]

        for closed in (store.head_position(), store.schema_version(), store.wait_for_events(0, 1),
                       store.read_stream("s"), store.read_streams(["s", "t"]), feed(), store.stream_version("s"),
                       store.append([ec.emit("s", Noted("y"))]), store.append_batch([ec.emit("s", Noted("y"))]),
                       store.ingest([("s", Noted("z"))], resume_key="k")):
            with pytest.raises(ec.StoreUnavailableError):
                await closed
    run(main())


def test_connect_opens_the_native_store_and_hides_the_password(pg_dsn, pg_schema):
    import eventcore.aio as eca

    async def main():
        url = pg_dsn + ("&" if "?" in pg_dsn else "?") + f"schema={pg_schema}&pool_size=2"
        async with await eca.connect(url) as store:
            assert isinstance(store, AsyncPostgresStore)
            assert store.schema == pg_schema and store.pool_size == 2
            assert store.url == PostgresStore.from_url(url, migrate=False).url
    run(main())


def test_no_password_in_what_the_store_shows_or_raises(pg_dsn, pg_schema):
    from pgserver import url_as

    url = url_as(pg_dsn, "postgres", "s3cret-pw")  # the throwaway cluster trusts its socket; CI's checks it

    async def main():
        async with await AsyncPostgresStore.open(url, schema=pg_schema, pool_size=1, pool_timeout=0.2) as store:
            shown = [repr(store), store.url, str(await store.health())]
            async with store._connection():  # the only connection taken: the next call cannot have one
                with pytest.raises(ec.StoreUnavailableError) as info:
                    await store.append([ec.emit("x", Noted("1"))])
                shown.append(str(info.value))
            assert "no connection within 0.2s" in shown[-1]
            assert not [text for text in shown if "s3cret" in text]
    run(main())


BAD_OPTIONS = [
    {"pool_size": 0}, {"pool_size": "x"}, {"schema": "pg_nope"}, {"schema": "a$b"}, {"statement_timeout": -1},
    {"connect_timeout": 0}, {"pool_timeout": "soon"}, {"migrate": "maybe"}, {"group_commit": 2},
    {"statement_timeout": 10 ** 7}, {"colour": "blue"},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: next(iter(o)))
def test_bad_options_fail_as_the_sync_stores_do(pg_dsn, options):
    with pytest.raises(Exception) as sync_error:
        PostgresStore.from_url(pg_dsn, **options)

    async def main():
        with pytest.raises(Exception) as async_error:
            await AsyncPostgresStore.open(pg_dsn, **options)
        return async_error.value

    error = run(main())
    assert type(error) is type(sync_error.value) and isinstance(error, ec.ValidationError)
    assert str(error) == str(sync_error.value)


def test_bad_urls_and_unreachable_servers_fail_as_the_sync_stores_do(tmp_path):
    for url in ("postgresql://u:secret@/db?nosuchparam=1",
                f"postgresql://nobody:secret@/db?host={tmp_path}&port=1&connect_timeout=1"):
        with pytest.raises(ec.EventCoreError) as sync_error:
            PostgresStore.from_url(url)

        async def main():
            with pytest.raises(ec.EventCoreError) as async_error:
                await AsyncPostgresStore.open(url)
            return async_error.value

        error = run(main())
        assert type(error) is type(sync_error.value)
        assert str(error) == str(sync_error.value) and "secret" not in str(error)


# -- writing and reading, shared with the sync store -----------------------------------------


def test_sync_and_async_stores_share_one_schema(pg_dsn, pg_schema):
    sync = ec.connect(pg_dsn, schema=pg_schema)

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            md = ec.Metadata(correlation_id="c-1", user_id="u", custom={"k": [1, "é"]})
            written = await store.append([ec.emit("a", Noted("one")), ec.emit("b", Counted(1)),
                                          ec.emit("a", Noted("two"))], {"a": ec.NO_STREAM}, metadata=md)
            assert [(e.stream_id, e.version) for e in written] == [("a", 1), ("b", 1), ("a", 2)]
            assert _envelopes(await asyncio.to_thread(sync.read_stream, "a")) == _envelopes(
                [e for e in written if e.stream_id == "a"])
            await asyncio.to_thread(sync.append, [ec.emit("b", Counted(2))], {"b": 1})
            mine = await store.read_streams(["a", "b", "nothing"])
            theirs = await asyncio.to_thread(sync.read_streams, ["a", "b", "nothing"])
            assert {k: _envelopes(v) for k, v in mine.items()} == {k: _envelopes(v) for k, v in theirs.items()}
            assert await store.stream_versions(["a", "b", "c"]) == {"a": 2, "b": 2, "c": 0}
            assert await store.head_position() == await asyncio.to_thread(sync.head_position)
            assert _envelopes(await store.read_stream("a", from_version=2)) == _envelopes(written[2:])
            assert await store.read_stream("a", limit=0) == []
            assert await store.type_counts() == await asyncio.to_thread(sync.type_counts)
    try:
        run(main())
    finally:
        sync.close()


def test_long_and_short_streams_read_as_the_sync_store_reads_them(pg_dsn, pg_schema):
    sync = ec.connect(pg_dsn, schema=pg_schema)
    sync.append_batch([ec.emit("long", Counted(i)) for i in range(700)] + [ec.emit("short", Counted(0))]
                      + [ec.emit(f"mid-{i % 3}", Counted(i)) for i in range(300)])
    reads = [{}, {"from_version": 300}, {"limit": 256}, {"limit": 257}, {"from_version": 2, "limit": 500},
             {"from_version": 701}, {"decode": False}]

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            for _ in range(2):  # the second time, "long" is known to be long: read by COPY at once
                for kwargs in reads:
                    assert _envelopes(await store.read_stream("long", **kwargs)) == _envelopes(
                        sync.read_stream("long", **kwargs)), kwargs
                for ids in (["short", "mid-0"], ["mid-0", "mid-1", "mid-2", "short"], ["long", "short"]):
                    mine, theirs = await store.read_streams(ids), sync.read_streams(ids)
                    assert {k: _envelopes(v) for k, v in mine.items()} == {k: _envelopes(v) for k, v in theirs.items()}
            assert "long" in store._long_streams
    try:
        run(main())
    finally:
        sync.close()


def test_conflicts_name_the_stream_and_leave_nothing(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            await store.append([ec.emit("x", Noted("1")), ec.emit("y", Noted("1"))])
            with pytest.raises(ec.ConcurrencyError) as info:
                await store.append([ec.emit("x", Noted("2")), ec.emit("y", Noted("2"))], {"x": 1, "y": 0})
            assert (info.value.stream_id, info.value.expected, info.value.actual) == ("y", 0, 1)
            with pytest.raises(ec.ConcurrencyError):  # a read-only participant is checked too
                await store.append([ec.emit("x", Noted("2"))], {"x": 1, "z": 3})
            assert await store.stream_versions(["x", "y", "z"]) == {"x": 1, "y": 1, "z": 0}
            await store.append([ec.emit("x", Noted("2"))], {"x": 1, "y": 1, "z": ec.NO_STREAM})
            assert [e.data.text for e in await store.read_stream("x")] == ["1", "2"]
    run(main())


@pytest.mark.parametrize("group_commit", [True, False])
def test_concurrent_tasks_append_without_gaps(pg_dsn, pg_schema, group_commit):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=4,
                                                 group_commit=group_commit) as store:
            async def one(i):
                await store.append([ec.emit(f"own-{i}", Counted(i)), ec.emit(f"own-{i}", Counted(i))])
                for _ in range(10):  # a shared stream: conflicts retried by hand, as execute would
                    version = await store.stream_version("shared")
                    try:
                        return await store.append([ec.emit("shared", Counted(i))], {"shared": version})
                    except ec.ConcurrencyError:
                        await asyncio.sleep(random.random() / 100)
                return await store.append([ec.emit("shared", Counted(i))], {"shared": ec.ANY})

            results = await asyncio.gather(*(one(i) for i in range(64)))
            shared = await store.read_stream("shared")
            assert [e.version for e in shared] == list(range(1, 65))
            assert sorted(e.data.n for e in shared) == list(range(64))
            assert sorted(r[0].version for r in results) == list(range(1, 65))
            owns = await store.read_streams([f"own-{i}" for i in range(64)])
            assert all([e.version for e in evs] == [1, 2] for evs in owns.values())
            feed = [e.position async for e in store.read_all()]
            assert feed == sorted(feed) and len(feed) == 64 * 3
            if group_commit:
                assert store._group.groups < store._group.appends  # tasks' appends shared transactions
            assert store.pool_stats()["in_use"] == 0
    run(main())


def test_one_group_members_bad_data_fails_only_that_member(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=2) as store:
            holder = _hold_stream_lock(pg_dsn, "gate")
            try:  # both tokens taken by appends waiting on a lock: the next ones queue, and go as one group
                gates = [asyncio.create_task(store.append([ec.emit("gate", Noted(str(i)))], {"gate": ec.ANY}))
                         for i in range(2)]
                await _until(lambda: len(_lock_waiter_pids(pg_dsn, pg_schema)) >= 1, "a group waits on the lock")
                await asyncio.sleep(0.05)
                prepared = [prepare_append([ec.emit(f"m{i}", Noted("ok"))], None, None) for i in range(6)]
                # Data the server refuses (jsonb holds no \u0000; the client refuses it too, so it is put in
                # after encoding): the group's statement fails, and each member is written alone.
                prepared[3].payloads[0] = b'{"text":"nul \\u0000"}'
                members = [asyncio.create_task(store._append(p)) for p in prepared]
                await asyncio.sleep(0.05)
            finally:
                holder.rollback()
                holder.close()
            outcomes = await asyncio.gather(*gates, *members, return_exceptions=True)
            assert isinstance(outcomes[2 + 3], ec.SerializationError)
            assert [type(o).__name__ for i, o in enumerate(outcomes) if i != 5] == ["list"] * 7
            assert await store.stream_versions([f"m{i}" for i in range(6)]) == {
                f"m{i}": 0 if i == 3 else 1 for i in range(6)}
            assert (store._group.groups, store._group.appends) == (3, 8)  # the six members went as one group
            with pytest.raises(ec.SerializationError):
                await store.append_batch([ec.emit("nul", Noted("a\x00b"))])
            with pytest.raises(ec.IngestError) as info:
                await store.ingest([("nul", Noted("a\x00b"))])
            assert isinstance(info.value.__cause__, ec.SerializationError)
    run(main())


def test_read_all_pages_and_filters_match_the_sync_store(pg_dsn, pg_schema):
    sync = ec.connect(pg_dsn, schema=pg_schema)
    sync.append_batch([ec.emit(f"{'ord' if i % 3 else 'acc'}-{i % 7}", Noted(str(i)) if i % 2 else Counted(i))
                       for i in range(700)])
    sync.append([ec.emit("zzz", ec.RawEvent("aiopg.Unknown", b"{\"x\": 1}"))])
    cases = [
        {}, {"page_size": 7}, {"after_position": 0, "limit": 33, "page_size": 10},
        {"types": [Noted]}, {"types": ["aiopg.Counted"], "stream_prefix": "ord-", "page_size": 50},
        {"stream_prefix": "acc-", "limit": 0}, {"stream_prefix": "nothing"},
    ]

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            middle = (await asyncio.to_thread(lambda: list(sync.read_all(limit=350))))[-1].position
            for case in cases + [{"after_position": middle, "page_size": 100}]:
                kwargs = dict(case)
                if "types" not in kwargs and "stream_prefix" not in kwargs:
                    kwargs["decode"] = False  # the unknown type: raw reads only
                mine = [e async for e in store.read_all(**kwargs)]
                theirs = await asyncio.to_thread(lambda: list(sync.read_all(**kwargs)))
                assert _envelopes(mine) == _envelopes(theirs), case
            rows = await store._read_all_rows(0, ("aiopg.Counted",), "acc-", 5)
            assert [r[0] for r in rows] == [e.position for e in sync.read_all(
                types=["aiopg.Counted"], stream_prefix="acc-", limit=5)]
            with pytest.raises(ec.UnknownEventTypeError):
                [e async for e in store.read_all(stream_prefix="zzz")]
            raw = await store.read_stream("zzz", decode=False)
            assert raw[0].data == {"x": 1} and raw[0].type == "aiopg.Unknown"
            assert {k: _envelopes(v) for k, v in (await store.read_streams(["zzz", "acc-0"], decode=False)).items()} \
                == {k: _envelopes(v) for k, v in sync.read_streams(["zzz", "acc-0"], decode=False).items()}
    try:
        run(main())
    finally:
        sync.close()


def test_batches_ingest_and_idempotency_keys(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            result = await store.append_batch([ec.emit(f"s{i % 5}", Counted(i)) for i in range(3000)])
            assert result.count == 3000 and result.stream_versions == {f"s{i}": 600 for i in range(5)}
            with pytest.raises(ec.ConcurrencyError):
                await store.append_batch([ec.emit("s0", Counted(0))], {"s0": 5})
            ingested = await store.ingest(((f"i{i % 3}", Counted(i)) for i in range(2500)), batch_size=1000,
                                          resume_key="aio-ingest")
            assert ingested.events == 2500 and ingested.batches == 3
            again = await store.ingest(((f"i{i % 3}", Counted(i)) for i in range(2500)), batch_size=1000,
                                       resume_key="aio-ingest")
            assert again.events == 0 and again.skipped == 2500
            assert [e.data.n for e in await store.read_stream("i1")] == list(range(1, 2500, 3))
            raw = await store.ingest([("r", ec.RawEvent("aiopg.Unknown", b"{\"y\": 2}"))])
            assert raw.events == 1 and (await store.read_stream("r", decode=False))[0].data == {"y": 2}
            assert await store._resume_keys("aio-") == ["aio-ingest"]
            lanes = await store.ingest(((f"l{i % 7}", Counted(i)) for i in range(5000)), batch_size=500,
                                       parallel=store.default_ingest_lanes, resume_key="aio-lanes")
            assert lanes.events == 5000
            assert {lane: lanes for lane, (lanes, _) in (await store._ingest_progress("aio-lanes")).items()} == {
                0: 2, 1: 2}
            by_stream = await store.read_streams([f"l{i}" for i in range(7)])
            assert all([e.version for e in evs] == list(range(1, len(evs) + 1)) for evs in by_stream.values())
            assert sorted(e.data.n for evs in by_stream.values() for e in evs) == list(range(5000))

            written = await store.append([ec.emit("k", Noted("once"))], idempotency_key="key-1")
            with pytest.raises(ec.DuplicateCommandError) as info:
                await store.append([ec.emit("k", Noted("twice"))], idempotency_key="key-1")
            assert _envelopes(info.value.events) == _envelopes(written)
            assert _envelopes(await store.recorded_command("key-1")) == _envelopes(written)
            assert await store.recorded_command("key-2") is None
            assert len(await store.read_stream("k")) == 1
    run(main())


def test_execute_runs_commands_on_the_native_store(pg_dsn, pg_schema):
    import eventcore.aio as eca
    from domain import Deposit, Deposited

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            results = await asyncio.gather(*(eca.execute(store, Deposit(account=ec.StreamId("acc"), amount=1),
                                                         retry=ec.RetryPolicy(max_retries=50)) for _ in range(20)))
            assert sorted(r.stream_versions["acc"] for r in results) == list(range(1, 21))
            assert [type(e.data) for e in await store.read_stream("acc")] == [Deposited] * 20
    run(main())


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False])
def test_appends_cancelled_at_random_points_write_all_or_nothing(pg_dsn, pg_schema, group_commit):
    rng = random.Random(7)

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=3,
                                                 group_commit=group_commit) as store:
            await store.head_position()  # warm: the delays below then fall inside the appends

            async def append(i):
                return await store.append([ec.emit(f"c{i}", Counted(k)) for k in range(3)]
                                          + [ec.emit(f"d{i}", Counted(9))], idempotency_key=f"cancel-{i}")

            caught = {}

            async def cancellable(i):
                try:
                    return await append(i)
                except asyncio.CancelledError as exc:  # gather would hand back a new one, without the note
                    caught[i] = exc
                    raise

            # Rounds of 60 appends cancelled after random delays, until one was cancelled after it was sent
            # (how long an append takes depends on the machine's load: a round may miss that window).
            outcomes: list = []
            for round_ in range(10):
                first = len(outcomes)
                tasks = [asyncio.create_task(cancellable(i)) for i in range(first, first + 60)]
                for task in tasks:
                    await asyncio.sleep(rng.random() * 0.004 * (round_ + 1))
                    task.cancel()
                done = await asyncio.gather(*tasks, return_exceptions=True)
                outcomes += [caught.get(i, o) for i, o in enumerate(done, first)]
                cancelled = [i for i, o in enumerate(outcomes) if isinstance(o, asyncio.CancelledError)]
                sent = [i for i in cancelled if "may have committed" in " ".join(outcomes[i].__notes__)]
                if cancelled and sent:
                    break
            assert cancelled and sent, "no append was cancelled in flight: the test proves nothing"
            for i, outcome in enumerate(outcomes):
                versions = await store.stream_versions([f"c{i}", f"d{i}"])
                assert versions in ({f"c{i}": 0, f"d{i}": 0}, {f"c{i}": 3, f"d{i}": 1}), (i, versions)
                if isinstance(outcome, asyncio.CancelledError):
                    notes = " ".join(getattr(outcome, "__notes__", []))
                    assert "cancelled" in notes and ("nothing of it was written" in notes or "cancel-" in notes)
                    assert outcome.maybe_committed is ("nothing of it was written" not in notes)
                    if "nothing of it was written" in notes:
                        assert versions[f"c{i}"] == 0
                    # Running it again settles it: written once, whatever happened.
                    try:
                        await append(i)
                    except ec.DuplicateCommandError as dup:
                        assert versions[f"c{i}"] == 3 and len(dup.events) == 4
                    else:
                        assert versions[f"c{i}"] == 0
                    assert await store.stream_versions([f"c{i}"]) == {f"c{i}": 3}
                else:
                    assert not isinstance(outcome, BaseException), outcome
            # The pool is not poisoned: every connection handed back is idle, and 100 appends go through.
            await asyncio.gather(*(store.append([ec.emit(f"after-{i}", Counted(i))]) for i in range(100)))
            assert await store.stream_versions([f"after-{i}" for i in range(100)]) == {
                f"after-{i}": 1 for i in range(100)}
            await _until(lambda: store.pool_stats()["in_use"] == 0, "every connection is back, idle")
            stats = store.pool_stats()
            assert stats["size"] <= 3 and stats["waiting"] == 0
    run(main())


def test_batches_cancelled_at_random_points_write_all_or_nothing(pg_dsn, pg_schema):
    rng = random.Random(11)

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=2) as store:
            notes = []
            for i in range(12):
                caught: list = []
                streams = [f"b{i}-{k}" for k in range(4)]
                task = asyncio.create_task(_keeping_cancellation(store.append_batch(
                    [ec.emit(streams[k % 4], Counted(k)) for k in range(20_000)]), caught))
                await asyncio.sleep(rng.random() * 0.2)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                versions = set((await store.stream_versions(streams)).values())
                assert versions in ({0}, {5000}), (i, versions)
                if caught:
                    note = " ".join(caught[0].__notes__)
                    notes.append(note)
                    assert caught[0].maybe_committed is ("may have committed" in note)
                    if not caught[0].maybe_committed:
                        assert versions == {0} and "nothing of it was written" in note
            assert notes, "no batch was cancelled: the test proves nothing"
            await _until(lambda: store.pool_stats()["in_use"] == 0, "every connection is back, idle")
            result = await store.append_batch([ec.emit("after", Counted(k)) for k in range(1000)])
            assert result.stream_versions == {"after": 1000}
    run(main())


def test_a_cancelled_append_closes_its_connection(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=2,
                                                 group_commit=False) as store:
            holder = _hold_stream_lock(pg_dsn, "locked")
            try:
                caught: list = []
                task = asyncio.create_task(_keeping_cancellation(store.append([ec.emit("locked", Noted("x"))]), caught))
                await _until(lambda: _lock_waiter_pids(pg_dsn, pg_schema), "the append waits on the lock")
                [pid] = _lock_waiter_pids(pg_dsn, pg_schema)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert "may have committed" in " ".join(caught[0].__notes__) and caught[0].maybe_committed
            finally:
                holder.rollback()
                holder.close()
            with _raw(pg_dsn) as conn:
                await _until(lambda: not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                                      (pid,)).fetchone()[0], "the cancelled append's backend ends")
            assert await store.stream_version("locked") == 0  # cancelled on the server: rolled back
            await store.append([ec.emit("locked", Noted("y"))], {"locked": 0})
            await _until(lambda: store.pool_stats()["in_use"] == 0, "every connection is back, idle")
    run(main())


def test_group_members_cancelled_queued_or_in_flight_never_strand_the_others(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=4) as store:
            holders = [_hold_stream_lock(pg_dsn, s) for s in ("L1", "L2")]
            try:
                # Both tokens taken by groups blocked on locks; three more appends queue behind them.
                caught: dict = {s: [] for s in ("L1", "L2", "Q1", "Q2", "Q3")}
                leaders = [asyncio.create_task(_keeping_cancellation(store.append([ec.emit(s, Noted(s))]), caught[s]))
                           for s in ("L1", "L2")]
                await _until(lambda: len(_lock_waiter_pids(pg_dsn, pg_schema)) == 2, "two groups wait on locks")
                queued = [asyncio.create_task(_keeping_cancellation(store.append([ec.emit(s, Noted(s))]), caught[s]))
                          for s in ("Q1", "Q2", "Q3")]
                await asyncio.sleep(0.05)
                assert len(store._group._queue) == 3
                queued[0].cancel()
                leaders[0].cancel()  # its group goes on: the others are not left waiting
                for task, s, note in ((queued[0], "Q1", "nothing of it was written"),
                                      (leaders[0], "L1", "may have committed")):
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    assert note in " ".join(caught[s][0].__notes__)
                    assert caught[s][0].maybe_committed is (s == "L1")
                assert len(store._group._queue) == 2
            finally:
                for h in holders:
                    h.rollback()
                    h.close()
            done = await asyncio.wait_for(asyncio.gather(leaders[1], *queued[1:]), 30)
            assert [r[0].stream_id for r in done] == ["L2", "Q2", "Q3"]
            assert await store.stream_versions(["L1", "L2", "Q1", "Q2", "Q3"]) == {
                "L1": 1, "L2": 1, "Q1": 0, "Q2": 1, "Q3": 1}
            assert store._group._free == 2 and not store._group._queue
    run(main())


def test_a_cancelled_read_releases_its_connection(pg_dsn, pg_schema):
    sync = ec.connect(pg_dsn, schema=pg_schema)
    sync.append_batch([ec.emit(f"r{i % 50}", Noted("x" * 200)) for i in range(60_000)])
    sync.close()

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=1, pool_timeout=5) as store:
            async def whole_feed():
                return [e async for e in store.read_all(page_size=60_000)]

            for read in (lambda: store.read_streams([f"r{i}" for i in range(50)]), whole_feed):
                # Cancelled mid-COPY: a read that finished before its cancel (how long it takes depends on
                # the machine and the driver's version) is run again with a shorter wait.
                for wait in (0.03, 0.01, 0.003, 0.001, 0.0):
                    task = asyncio.create_task(read())
                    await _until(lambda: store.pool_stats()["in_use"] == 1 or task.done(),
                                 "the read holds the connection")
                    await asyncio.sleep(wait)
                    if task.done():
                        await task
                        continue
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    break
                else:
                    pytest.fail("every read finished before it could be cancelled: the test proves nothing")
                await _until(lambda: store.pool_stats()["in_use"] == 0, "the connection is released")
                assert [e.version for e in await store.read_stream("r7", limit=3)] == [1, 2, 3]
                assert len([e async for e in store.read_all(limit=2500, page_size=1000)]) == 2500
            assert store.pool_stats().get("returns_bad", 0) >= 1  # interrupted mid-COPY: closed, not reused
    run(main())


# -- lost connections, timeouts ---------------------------------------------------------------


def test_a_backend_terminated_mid_append_is_resolved_and_retryable(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            holder = _hold_stream_lock(pg_dsn, "t")
            try:
                task = asyncio.create_task(store.append([ec.emit("t", Noted("1")), ec.emit("u", Noted("1"))]))
                await _until(lambda: _lock_waiter_pids(pg_dsn, pg_schema), "the append waits on the lock")
                with _raw(pg_dsn) as conn:
                    conn.execute("SELECT pg_terminate_backend(%s)", (_lock_waiter_pids(pg_dsn, pg_schema)[0],))
                with pytest.raises(ec.StoreUnavailableError, match="did not commit") as info:
                    await task
                assert info.value.maybe_committed is False
            finally:
                holder.rollback()
                holder.close()
            assert await store.stream_versions(["t", "u"]) == {"t": 0, "u": 0}
            await store.append([ec.emit("t", Noted("2")), ec.emit("u", Noted("2"))], {"t": 0, "u": 0})

            # Committed before the connection was lost: found by its events' ids.
            p = prepare_append([ec.emit("amb", Noted("once")), ec.emit("amb2", Noted("twice"))], None, None)
            written = await store._append(p)
            recovered = await store._resolve_ambiguous(p, RuntimeError("simulated"), None)
            assert [(e.stream_id, e.version, e.position, e.event_id) for e in recovered] == \
                [(e.stream_id, e.version, e.position, e.event_id) for e in written]
            # The lookup itself fails: the outcome is unknown, and said so.
            store._sql = dict(store._sql, event_by_id="SELECT no_such_column FROM pg_class WHERE %s IS NULL")
            with pytest.raises(ec.StoreUnavailableError) as info:
                await store._resolve_ambiguous(p, RuntimeError("simulated"), None)
            assert info.value.maybe_committed is True
    run(main())


def test_statement_timeout_is_a_store_timeout_and_leaves_nothing(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, statement_timeout=0.2) as store:
            await store.append([ec.emit("slow", Noted("1"))])
            holder = _hold_stream_lock(pg_dsn, "slow")
            try:
                with pytest.raises(ec.StoreTimeoutError, match="statement_timeout") as info:
                    await store.append([ec.emit("slow", Noted("2"))], {"slow": 1})
                assert info.value.maybe_committed is False
                with pytest.raises(ec.StoreTimeoutError):
                    await store.append_batch([ec.emit("slow", Noted("3"))])
            finally:
                holder.rollback()
                holder.close()
            assert [e.data.text for e in await store.read_stream("slow")] == ["1"]
            assert store.pool_stats()["in_use"] == 0
    run(main())


# -- LISTEN/NOTIFY ------------------------------------------------------------------------------


def test_wait_for_events_wakes_on_another_stores_append(pg_dsn, pg_schema):
    sync = ec.connect(pg_dsn, schema=pg_schema)
    # A listening projector's lease: appends to the schema NOTIFY while it lasts (see notify_events.sql).
    with _raw(pg_dsn) as conn:
        conn.execute(psycopg.sql.SQL("INSERT INTO {}.projection_checkpoints (name, listening_until) "
                                     "VALUES ('aio-test', now() + interval '5 minutes')").format(
            psycopg.sql.Identifier(pg_schema)))

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            health = await store.health()
            assert health.ok and [p["name"] for p in health.projections] == ["aio-test"]
            assert health.projections == (await asyncio.to_thread(sync.health)).projections
            store.poll_interval = 60  # only a notification can end the wait early
            assert await store.wait_for_events(0, 0.2) is False
            for bad in ((-1, 1), ("0", 1), (0, -1), (0, float("nan")), (0, None)):
                with pytest.raises(ec.ValidationError):
                    await store.wait_for_events(*bad)
            head = await store.head_position()
            timer = threading.Timer(0.3, lambda: sync.append([ec.emit("n", Noted("wake"))]))
            started = time.monotonic()
            timer.start()
            try:
                assert await store.wait_for_events(head, 30) is True
            finally:
                timer.join()
            assert time.monotonic() - started < 20, "woken by the poll, not by the NOTIFY"
            waiters = [asyncio.create_task(store.wait_for_events(await store.head_position(), 30)) for _ in range(3)]
            await asyncio.sleep(0.1)
            await asyncio.to_thread(sync.append, [ec.emit("n", Noted("again"))])
            assert await asyncio.wait_for(asyncio.gather(*waiters), 20) == [True] * 3
    try:
        run(main())
    finally:
        sync.close()


def test_the_client_deadline_bounds_pool_waits_and_statements_on_the_loops_clock(pg_dsn, pg_schema):
    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema, pool_size=1,
                                                 group_commit=False) as store:
            store._client_deadline = 1.5  # a server that never answers: statement_timeout (30 s) never fires
            holder = _hold_stream_lock(pg_dsn, "frozen")
            try:
                blocked = asyncio.create_task(store.append([ec.emit("frozen", Noted("1"))]))
                await _until(lambda: _lock_waiter_pids(pg_dsn, pg_schema), "the append waits on the lock")
                [pid] = _lock_waiter_pids(pg_dsn, pg_schema)
                # The only connection is taken: a second call's wait for it counts inside its deadline.
                store._client_deadline = 0.2
                with pytest.raises(ec.StoreUnavailableError, match="no connection from the pool") as info:
                    await store.append([ec.emit("other", Noted("1"))])
                assert info.value.maybe_committed is False
                with pytest.raises(ec.StoreUnavailableError, match="no connection from the pool"):
                    await store.read_stream("other")
                # The blocked append's deadline passes: its connection is closed, its backend ended, and
                # the lookup finds it did not commit.
                with pytest.raises(ec.StoreUnavailableError, match="did not commit") as info:
                    await blocked
                assert info.value.maybe_committed is False
                with _raw(pg_dsn) as conn:
                    assert not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
            finally:
                holder.rollback()
                holder.close()
            assert await store.stream_versions(["frozen", "other"]) == {"frozen": 0, "other": 0}
            await store.append([ec.emit("frozen", Noted("2"))], {"frozen": 0})
    run(main())


def test_run_projection_follows_the_native_store(pg_dsn, pg_schema):
    import eventcore.aio as eca

    class Seen(ec.Projector):
        def __init__(self):
            super().__init__("aio-seen")
            self.positions = []

        def handle(self, event, ctx):
            self.positions.append(event.position)

    async def main():
        async with await AsyncPostgresStore.open(pg_dsn, schema=pg_schema) as store:
            written = await store.append([ec.emit(f"p{i % 3}", Counted(i)) for i in range(10)])
            projector = Seen()
            await eca.run_projection(store, projector, until_caught_up=True)
            assert projector.positions == [e.position for e in written]
            # The sync store the runner used is closed; ours goes on.
            assert await store.stream_version("p0") == 4
    run(main())
