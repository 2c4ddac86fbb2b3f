"""Persistent snapshots (eventcore.snapshots): a command folded from its snapshot and the events after it
decides as one folded from the first event, on every backend, and a snapshot that cannot be trusted is
passed over, never an error."""
from __future__ import annotations

import asyncio

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eventcore as ec
import eventcore.aio as eca
from eventcore.snapshots import SNAPSHOT_STATS
from domain import Deposited, Withdrawn

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Ledger(ec.Command):
    """Keeps the whole history as a tuple (order matters), and the balance: a fold that any lost,
    repeated or reordered event changes."""

    __snapshots__ = ec.SnapshotPolicy(every=3)
    __snapshot_name__ = "test.Ledger"
    __state_type__ = tuple[int, tuple[tuple[str, int], ...]]

    account: ec.StreamId
    other: str | None = None
    amount: int = 1

    def streams(self):
        return [self.other] if self.other else []

    def initial_state(self):
        return (0, ())

    def apply(self, state, event):
        balance, seen = state
        sign = 1 if isinstance(event.data, Deposited) else -1
        return (balance + sign * event.data.amount, seen + ((event.stream_id, event.version),))

    def handle(self, state):
        balance, _ = state
        ec.require(balance >= self.amount, f"insufficient funds: {balance} < {self.amount}")
        return [ec.emit(self.account, Withdrawn(amount=self.amount))]


class LedgerWithoutSnapshots(Ledger):
    __snapshots__ = None


class Seen(Ledger):
    """Emits nothing: what it saw is its result (state captured by handle)."""

    __snapshot_name__ = "test.Seen"

    def handle(self, state):
        SEEN.append(state)
        return []


SEEN: list = []


def _state_seen(store, account, other=None, cls=Seen):
    SEEN.clear()
    ec.execute(store, cls(account=account, other=other), cache=None)
    return SEEN[-1]


def _full_fold(store, streams):
    events = sorted((e for sid in streams for e in store.read_stream(sid)), key=lambda e: e.position)
    state = Ledger(account=streams[0]).initial_state()
    for e in events:
        state = Ledger(account=streams[0]).apply(state, e)
    return state


@SETTINGS
@given(history=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 5)), min_size=1, max_size=40),
       points=st.lists(st.integers(0, 40), max_size=5))
def test_snapshot_and_tail_fold_to_the_full_fold(store, history, points):
    """For random histories of two streams and snapshots taken at random points, the state a command
    folds from its snapshot equals the fold of every event."""
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")
    store.drop_snapshots()
    prefix = f"h{abs(hash((tuple(history), tuple(points))))}-"
    a, b = prefix + "a", prefix + "b"
    for i, (which, amount) in enumerate(history):
        store.append([ec.emit(a if which == "a" else b, Deposited(amount=amount))])
        if i in points:
            assert _state_seen(store, a, b) == _full_fold(store, [a, b])
    assert _state_seen(store, a, b) == _full_fold(store, [a, b])
    assert _state_seen(store, a, b) == _full_fold(store, [a, b])


def test_a_long_stream_is_folded_from_its_snapshot(store):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(50)])
    before = dict(SNAPSHOT_STATS)
    ec.execute(store, Ledger(account="acct"), cache=None)  # full fold, writes a snapshot
    assert SNAPSHOT_STATS["written"] == before["written"] + 1
    [info] = store.snapshots()
    assert (info.command, info.state_version, info.events) == ("test.Ledger", 1, 50)
    result = ec.execute(store, Ledger(account="acct"), cache=None)
    assert SNAPSHOT_STATS["used"] == before["used"] + 1
    assert result.stream_versions == {"acct": 52}
    assert _state_seen(store, "acct") == _full_fold(store, ["acct"])
    assert store.drop_snapshots("test.Ledger") == 1
    assert [s.command for s in store.snapshots()] == ["test.Seen"]
    assert store.drop_snapshots() == 1
    assert store.snapshots() == []


def test_snapshots_survive_a_new_store_object(store, backend, request):
    if backend == "memory":
        pytest.skip("a memory store cannot be opened twice")
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(10)])
    ec.execute(store, Ledger(account="acct"), cache=None)
    again = _reopen(store, request)
    try:
        used = SNAPSHOT_STATS["used"]
        ec.execute(again, Ledger(account="acct"), cache=None)
        assert SNAPSHOT_STATS["used"] == used + 1
    finally:
        again.close()


def _reopen(store, request):
    if store.scheme == "sqlite":
        return ec.connect(f"sqlite:///{store.path}")
    return ec.connect(store._dsn, schema=store.schema)


def _write_snapshot(store, account, state, covers, state_version=1):
    from eventcore.executor import _Snap

    snap = _Snap(Seen(account=account), [account], ec.SnapshotPolicy())
    blob = state if isinstance(state, bytes) else msgspec.msgpack.encode(state)
    store._save_snapshot(snap.key, snap.name, state_version, msgspec.json.encode(covers).decode(), blob, 1)


@pytest.mark.parametrize("how", ["corrupt", "other_state_version", "other_history", "other_streams", "ahead"])
def test_a_snapshot_that_cannot_be_trusted_is_passed_over(store, how):
    """A lie in the snapshot never reaches the decision: the command folds every event instead."""
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")
    store.append([ec.emit("acct", Deposited(amount=2)) for _ in range(5)])
    real = store.read_stream("acct")
    lie = (999, (("acct", 1),))
    covers = {"acct": [3, real[2].event_id.hex]}
    if how == "corrupt":
        _write_snapshot(store, "acct", b"\xc1not msgpack", covers)
    elif how == "other_state_version":
        _write_snapshot(store, "acct", lie, covers, state_version=7)
    elif how == "other_history":
        _write_snapshot(store, "acct", lie, {"acct": [3, real[1].event_id.hex]})
    elif how == "other_streams":
        _write_snapshot(store, "acct", lie, {"acct": [3, real[2].event_id.hex], "zzz": [0, ""]})
    else:
        _write_snapshot(store, "acct", lie, {"acct": [9, real[2].event_id.hex]})
    used = SNAPSHOT_STATS["used"]
    assert _state_seen(store, "acct") == _full_fold(store, ["acct"])
    assert SNAPSHOT_STATS["used"] == used


def test_two_processes_with_snapshots_never_overdraw(store, backend, request):
    """Snapshots change what is read, not what is checked: two store objects withdrawing from one
    account through snapshots never take more than was deposited."""
    if backend == "memory":
        pytest.skip("a memory store cannot be opened twice")
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(30)])
    other = _reopen(store, request)
    try:
        done = 0
        for i in range(40):
            s = store if i % 2 else other
            try:
                ec.execute(s, Ledger(account="acct", amount=1), retry=ec.RetryPolicy(max_retries=10))
                done += 1
            except ec.BusinessRuleViolation:
                pass
        assert done == 30
        assert _full_fold(store, ["acct"])[0] == 0
    finally:
        other.close()


def test_a_state_that_does_not_survive_encoding_is_not_snapshotted(store):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")

    class Box:
        def __init__(self, n):
            self.n = n

    class SetState(Ledger):
        __snapshot_name__ = "test.SetState"
        __state_type__ = None

        def initial_state(self):
            return Box(0)

        def apply(self, state, event):
            return Box(state.n + 1)

        def handle(self, state):
            return []

    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
    skipped = SNAPSHOT_STATS["not_encodable"]
    ec.execute(store, SetState(account="acct"), cache=None)
    assert store.snapshots() == []
    assert SNAPSHOT_STATS["not_encodable"] == skipped + 1


def test_per_call_policy_and_bad_policies(store):
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
    ec.execute(store, LedgerWithoutSnapshots(account="acct"), cache=None, snapshots=ec.SnapshotPolicy(every=1))
    if store.supports_snapshots:  # a subclass's own name: never its parent's snapshots
        assert [s.command for s in store.snapshots()] == ["test_snapshots.LedgerWithoutSnapshots"]
    with pytest.raises(ec.ValidationError, match="SnapshotPolicy"):
        ec.execute(store, Ledger(account="acct"), snapshots=200)
    with pytest.raises(ec.ValidationError, match="every"):
        ec.SnapshotPolicy(every=0)


def test_the_asyncio_api_uses_the_same_snapshots(store, backend, request):
    if backend not in ("memory", "sqlite"):
        pytest.skip("asyncio stores of this backend are tested with it")
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(10)])
    ec.execute(store, Ledger(account="acct"), cache=None)

    async def run():
        if backend == "memory":
            from eventcore.aio.memory import AsyncMemoryStore

            astore = AsyncMemoryStore(store)
        else:
            astore = await eca.connect(f"sqlite:///{store.path}")
        used = SNAPSHOT_STATS["used"]
        result = await eca.execute(astore, Ledger(account="acct"), cache=None)
        assert SNAPSHOT_STATS["used"] == used + 1
        if backend != "memory":
            await astore.aclose()
        return result

    assert asyncio.run(run()).stream_versions == {"acct": 12}


def _withdraw_in_child(url: str, schema, n: int) -> int:
    import eventcore as ec2
    from test_snapshots import Ledger as L

    done = 0
    with ec2.connect(url, **({} if schema is None else {"schema": schema})) as s:
        for _ in range(n):
            try:
                ec2.execute(s, L(account="shared", amount=1), retry=ec2.RetryPolicy(max_retries=200, max_delay=0.01))
                done += 1
            except ec2.BusinessRuleViolation:
                pass
    return done


def test_processes_withdrawing_through_snapshots_never_overdraw(store, backend):
    """Four processes, each with its own snapshots and caches, withdraw from one account: exactly what was
    deposited is taken, and the balance never goes below zero at any position."""
    if backend == "memory":
        pytest.skip("a memory store is not shared between processes")
    import multiprocessing

    store.append([ec.emit("shared", Deposited(amount=1)) for _ in range(60)])
    ec.execute(store, Ledger(account="shared", amount=1), cache=None)  # a snapshot to start from
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        done = pool.starmap(_withdraw_in_child, [(store.url, getattr(store, "schema", None), 25)] * 4)
    assert sum(done) == 59
    balance = 0
    for e in store.read_stream("shared"):
        balance += e.data.amount if isinstance(e.data, Deposited) else -e.data.amount
        assert balance >= 0
    assert balance == 0


def test_retention_and_the_cli(store, backend, tmp_path):
    if not store.supports_snapshots:
        pytest.skip(f"{store.scheme} stores no snapshots")
    store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
    ec.execute(store, Ledger(account="acct"), cache=None)
    assert store.drop_snapshots(older_than=3600) == 0
    assert store.drop_snapshots("another.Command", older_than=0) == 0
    assert store.drop_snapshots(older_than=0) == 1
    with pytest.raises(ec.ValidationError, match="older_than"):
        store.drop_snapshots(older_than=-1)
    if backend != "sqlite":
        return
    import json
    import subprocess
    import sys

    ec.execute(store, Ledger(account="acct"), cache=None)

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "eventcore", "snapshots", "--dsn", store.url, *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    [row] = json.loads(cli("--json"))
    assert row["command"] == "test.Ledger" and row["events"] == 6 and row["bytes"] > 0
    assert "test.Ledger" in cli()
    assert json.loads(cli("--drop", "--older-than", "3600", "--json")) == {"dropped": 0}
    assert json.loads(cli("--drop", "test.Ledger", "--json")) == {"dropped": 1}
    assert cli() == "no snapshots stored\n"


def test_the_asyncio_postgres_store_uses_the_same_snapshots(pg_dsn, pg_schema):
    """A snapshot written through the sync store serves the asyncio one, and the reverse."""
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit("acct", Deposited(amount=1)) for _ in range(10)])
        ec.execute(store, Ledger(account="acct"), cache=None)

    async def run():
        async with await eca.connect(pg_dsn, schema=pg_schema) as astore:
            used = SNAPSHOT_STATS["used"]
            result = await eca.execute(astore, Ledger(account="acct"), cache=None)
            assert SNAPSHOT_STATS["used"] == used + 1
            await astore.append([ec.emit("acct", Deposited(amount=1)) for _ in range(5)])
            await eca.execute(astore, Ledger(account="acct"), cache=None)  # folds 6 + 1 >= 3: writes one
            assert [s.events for s in await astore.snapshots()] == [17]
            assert await astore.drop_snapshots(older_than=3600) == 0
            return result

    assert asyncio.run(run()).stream_versions == {"acct": 12}
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        SEEN.clear()
        ec.execute(store, Seen(account="acct"), cache=None)
        assert SEEN[-1] == _full_fold(store, ["acct"])
