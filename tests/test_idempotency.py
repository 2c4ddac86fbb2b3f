"""Idempotency keys (`execute(..., idempotency_key=...)`, `append(..., idempotency_key=...)`) and
resumable ingest (`ingest(..., resume_key=...)`), on every backend.

A key is recorded in the append's own transaction, so it is recorded exactly when the events
are; a second append or command with it writes nothing and gets the first one's events back.
"""
from __future__ import annotations

import threading
import uuid

import pytest

import eventcore as ec
from domain import Deposit, Deposited, Noted, Transfer, Withdrawn, balance
from eventcore.stores.prepare import prepare_append


def _head(store) -> int:
    return store.head_position()


def _ids(events) -> list:
    return [e.event_id for e in events]


# -- execute ----------------------------------------------------------------------------


def test_execute_twice_with_one_key_writes_once_and_returns_the_original(store):
    first = ec.execute(store, Deposit(account="acct-1", amount=10), idempotency_key="deposit-1")
    assert not first.replayed
    head = _head(store)
    again = ec.execute(store, Deposit(account="acct-1", amount=10), idempotency_key="deposit-1")
    assert again.replayed
    assert _ids(again.events) == _ids(first.events)
    assert [(e.stream_id, e.version, e.position) for e in again.events] == [
        (e.stream_id, e.version, e.position) for e in first.events]
    assert again.events[0].data == Deposited(amount=10, balance=10)
    assert again.stream_versions == {"acct-1": 1}
    assert _head(store) == head
    assert balance(store, "acct-1") == 10


def test_a_replay_wins_over_a_refusal_the_command_would_now_make(store):
    ec.execute(store, Deposit(account="a", amount=5))
    first = ec.execute(store, Transfer(source="a", target="b", amount=5), idempotency_key=uuid.UUID(int=7))
    # Run again, "a" has nothing left: handle() would refuse, but this command already ran.
    again = ec.execute(store, Transfer(source="a", target="b", amount=5), idempotency_key=uuid.UUID(int=7))
    assert again.replayed and _ids(again.events) == _ids(first.events)
    assert [type(e.data) for e in again.events] == [Withdrawn, Deposited]
    # Without the key the same command is refused.
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Transfer(source="a", target="b", amount=5))
    assert balance(store, "a") == 0 and balance(store, "b") == 5


def test_a_different_command_reusing_a_key_gets_the_first_commands_result(store):
    first = ec.execute(store, Deposit(account="x", amount=1), idempotency_key="k")
    other = ec.execute(store, Deposit(account="y", amount=2), idempotency_key="k")
    assert other.replayed and _ids(other.events) == _ids(first.events)
    assert store.stream_version("y") == 0


def test_a_key_is_recorded_only_with_events(store):
    class NoOp(ec.Command):
        account: ec.StreamId

        def initial_state(self):
            return None

        def apply(self, state, event):
            return state

        def handle(self, state):
            return []

    assert ec.execute(store, NoOp(account="n"), idempotency_key="later").events == []
    assert store.recorded_command("later") is None
    result = ec.execute(store, Deposit(account="n", amount=3), idempotency_key="later")
    assert not result.replayed and len(result.events) == 1


def test_refused_commands_record_no_key(store):
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Transfer(source="empty", target="t", amount=1), idempotency_key="t-1")
    assert store.recorded_command("t-1") is None


def test_concurrent_executions_of_one_key_write_once(store):
    results, errors = [], []

    def run():
        try:
            results.append(ec.execute(store, Deposit(account="hot", amount=1), idempotency_key="once"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(not r.replayed for r in results) == 1
    assert len({tuple(_ids(r.events)) for r in results}) == 1
    assert balance(store, "hot") == 1


def test_keys_from_other_processes_of_the_same_key_write_once(backend, store, tmp_path):
    if backend == "memory":
        pytest.skip("a memory store is not shared between processes")
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        schema = getattr(store, "schema", None)
        outcomes = pool.starmap(_execute_in_child, [(store.url, schema, "shared-key")] * 8)
    assert sorted(o[0] for o in outcomes).count(False) == 1  # one wrote, seven replayed
    assert len({o[1] for o in outcomes}) == 1
    assert balance(store, "proc") == 1


def _execute_in_child(url: str, schema, key: str) -> tuple[bool, tuple]:
    import eventcore as ec2
    from domain import Deposit as D

    with ec2.connect(url, **({} if schema is None else {"schema": schema})) as s:
        r = ec2.execute(s, D(account="proc", amount=1), idempotency_key=key)
        return r.replayed, tuple(str(e.event_id) for e in r.events)


def test_execute_retries_an_ambiguous_store_error_under_a_key(store):
    """The store committed, then failed to say so (maybe_committed): with a key, execute runs the
    command again, which finds the key and returns what was committed; without one it raises."""

    @ec.EventStore.register  # a proxy of a store: execute() takes only stores
    class CommitsThenFails:
        """Delegates to a real store; its first append commits and then reports a lost connection."""

        def __init__(self, inner):
            self.inner = inner
            self.failed = False
            self.committed = None

        def append(self, *args, **kwargs):
            recorded = self.inner.append(*args, **kwargs)
            if not self.failed:
                self.failed = True
                self.committed = recorded
                raise ec.StoreUnavailableError("connection lost after COMMIT was sent", maybe_committed=True)
            return recorded

        def __getattr__(self, name):
            return getattr(self.inner, name)

    flaky = CommitsThenFails(store)
    result = ec.execute(flaky, Deposit(account="amb", amount=4), idempotency_key="amb-1")
    assert result.replayed and _ids(result.events) == _ids(flaky.committed)
    assert balance(store, "amb") == 4

    flaky = CommitsThenFails(store)
    with pytest.raises(ec.StoreUnavailableError) as info:
        ec.execute(flaky, Deposit(account="amb2", amount=4))
    assert info.value.maybe_committed
    assert balance(store, "amb2") == 4  # committed once, never retried


def test_replay_with_a_state_cache(store):
    cache = ec.StateCache()
    ec.execute(store, Deposit(account="c", amount=10), cache=cache)
    first = ec.execute(store, Transfer(source="c", target="d", amount=10), idempotency_key="c-d", cache=cache)
    again = ec.execute(store, Transfer(source="c", target="d", amount=10), idempotency_key="c-d", cache=cache)
    assert again.replayed and _ids(again.events) == _ids(first.events)
    # The cache is still right afterwards.
    ec.execute(store, Deposit(account="c", amount=1), cache=cache)
    assert ec.execute(store, Transfer(source="c", target="d", amount=1), cache=cache).events[0].data.balance == 0


# -- append -------------------------------------------------------------------------------


def test_append_with_a_used_key_raises_duplicate_with_the_original_events(store):
    first = store.append([ec.emit("s", Noted(text="one")), ec.emit("t", Noted(text="two"))], idempotency_key="ak")
    head = _head(store)
    with pytest.raises(ec.DuplicateCommandError) as info:
        store.append([ec.emit("s", Noted(text="again"))], {"s": 1}, idempotency_key="ak")
    assert info.value.key == "ak"
    assert _ids(info.value.events) == _ids(first)
    assert [e.data for e in info.value.events] == [Noted(text="one"), Noted(text="two")]
    assert _head(store) == head and store.stream_version("s") == 1
    assert _ids(store.recorded_command("ak")) == _ids(first)


def test_duplicate_key_is_reported_before_a_version_conflict(store):
    store.append([ec.emit("v", Noted())], idempotency_key="dk")
    with pytest.raises(ec.DuplicateCommandError):
        store.append([ec.emit("v", Noted())], {"v": ec.NO_STREAM}, idempotency_key="dk")


def test_a_failed_append_records_no_key(store):
    store.append([ec.emit("f", Noted())])
    with pytest.raises(ec.ConcurrencyError):
        store.append([ec.emit("f", Noted())], {"f": ec.NO_STREAM}, idempotency_key="fk")
    assert store.recorded_command("fk") is None
    store.append([ec.emit("f", Noted())], {"f": 1}, idempotency_key="fk")
    assert len(store.recorded_command("fk")) == 1


def test_recorded_command_of_an_unknown_key_is_none(store):
    assert store.recorded_command("never-used") is None


@pytest.mark.parametrize("bad", ["", "x" * 256, "a\x00b", "tab\tkey", 17, b"bytes", None.__class__])
def test_bad_keys_are_refused_before_anything_is_written(store, bad):
    with pytest.raises(ec.ValidationError, match="idempotency key"):
        store.append([ec.emit("bk", Noted())], idempotency_key=bad)
    with pytest.raises(ec.ValidationError, match="idempotency key"):
        ec.execute(store, Deposit(account="bk", amount=1), idempotency_key=bad)
    assert _head(store) == 0


def test_hostile_keys_are_stored_as_given(store):
    for key in ["'; DROP TABLE command_keys; --", "%s %(x)s {}", "ключ-🔑", 'quote"s\\']:
        ec.execute(store, Deposit(account="h", amount=1), idempotency_key=key)
        assert ec.execute(store, Deposit(account="h", amount=1), idempotency_key=key).replayed
    assert balance(store, "h") == 4


# -- resumable ingest -------------------------------------------------------------------------


def _items(n: int, streams: int = 7) -> list:
    return [(f"ing-{i % streams}", Noted(text=str(i))) for i in range(n)]


class _StopAt:
    """An input that fails after yielding `stop` items (a crash half-way through the source)."""

    def __init__(self, items, stop):
        self.items, self.stop = items, stop

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.stop:
                raise OSError("input went away")
            yield item


def _stored(store) -> dict:
    """stream -> texts in version order."""
    out: dict = {}
    for e in store.read_all():
        out.setdefault(e.stream_id, []).append(e.data.text)
    return out


def _expected(items) -> dict:
    out: dict = {}
    for sid, ev in items:
        out.setdefault(sid, []).append(ev.text)
    return out


@pytest.mark.parametrize("parallel", [1, 3])
def test_an_interrupted_ingest_run_again_finishes_exactly_once(store, parallel):
    items = _items(1000)
    with pytest.raises(OSError):
        store.ingest(_StopAt(items, 640), batch_size=100, resume_key="load-1", parallel=parallel)
    committed = _head(store) and sum(len(v) for v in _stored(store).values())
    assert committed % 100 == 0 or parallel > 1  # whole batches only (one lane: a multiple of the batch)
    result = store.ingest(items, batch_size=100, resume_key="load-1", parallel=parallel)
    assert result.skipped == committed
    assert result.events == 1000 - committed
    assert _stored(store) == _expected(items)
    again = store.ingest(items, batch_size=100, resume_key="load-1", parallel=parallel)
    assert (again.events, again.skipped) == (0, 1000)
    assert _stored(store) == _expected(items)


def test_an_ingest_stopped_by_a_bad_item_resumes_after_the_fix(store):
    items = _items(500)
    broken = list(items)
    broken[321] = ("", Noted(text="bad stream id"))
    with pytest.raises(ec.IngestError) as info:
        store.ingest(broken, batch_size=50, resume_key="fixme")
    assert "resume_key='fixme'" in str(info.value)
    assert info.value.committed == 300
    result = store.ingest(items, batch_size=50, resume_key="fixme")
    assert (result.skipped, result.events) == (300, 200)
    assert _stored(store) == _expected(items)


def test_a_grown_input_ingests_only_the_new_items(store):
    items = _items(300)
    store.ingest(items[:200], batch_size=64, resume_key="log")
    result = store.ingest(items, batch_size=64, resume_key="log")
    assert (result.skipped, result.events) == (200, 100)
    assert _stored(store) == _expected(items)


def test_resuming_with_another_parallel_is_refused(store):
    with pytest.raises(OSError):
        store.ingest(_StopAt(_items(400), 250), batch_size=50, resume_key="par", parallel=2)
    head = _head(store)
    with pytest.raises(ec.ValidationError, match="parallel=2"):
        store.ingest(_items(400), batch_size=50, resume_key="par", parallel=3)
    assert _head(store) == head


def test_without_a_resume_key_an_ingest_writes_again(store):
    store.ingest(_items(10), resume_key="once")
    store.ingest(_items(10))
    assert sum(len(v) for v in _stored(store).values()) == 20


def test_two_members_of_one_group_commit_with_one_key(request):
    """PostgreSQL's group commit: a second member carrying a key an earlier member of the same
    transaction records is reported as a duplicate and writes nothing; the others are written."""
    from pgserver import postgres_store

    from eventcore.stores.prepare import prepare_append

    store = postgres_store(request)
    try:
        members = []
        for sid, key in (("g1", "same"), ("g2", "same"), ("g3", None)):
            p = prepare_append([ec.emit(sid, Noted(text=sid))], None, None)
            p.key = key
            members.append(p)
        out = store._append_group(members)
        assert isinstance(out[0], list) and isinstance(out[2], list)
        assert isinstance(out[1], ec.DuplicateCommandError) and out[1].key == "same"
        assert store.stream_version("g2") == 0
        assert _ids(store.recorded_command("same")) == _ids(out[0])
    finally:
        store.close()


def test_a_later_failure_does_not_hide_an_ambiguous_attempt(store):
    """Under a key, an attempt whose write may have committed is retried; if the retries fail too,
    the error still says the command may have committed (it did, here)."""

    @ec.EventStore.register  # a proxy of a store: execute() takes only stores
    class CommitsThenGoesAway:
        def __init__(self, inner):
            self.inner = inner
            self.calls = 0

        def append(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                self.inner.append(*args, **kwargs)
                raise ec.StoreUnavailableError("connection lost after COMMIT was sent", maybe_committed=True)
            raise ec.StoreUnavailableError("no connection; nothing was written")

        def recorded_command(self, key):
            raise ec.StoreUnavailableError("no connection")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    flaky = CommitsThenGoesAway(store)
    with pytest.raises(ec.StoreUnavailableError) as info:
        ec.execute(flaky, Deposit(account="gone", amount=2), idempotency_key="gone-1",
                   retry=ec.RetryPolicy(max_retries=2, base_delay=0.001))
    assert info.value.maybe_committed and "same idempotency key" in str(info.value)
    # Settled by running it again once the store answers.
    assert ec.execute(store, Deposit(account="gone", amount=2), idempotency_key="gone-1").replayed
    assert balance(store, "gone") == 2


def test_group_member_with_the_key_of_a_refused_member_is_written(pg_dsn, pg_schema):
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit("s1", Deposited(amount=1, balance=1))])
        refused = prepare_append([ec.emit("s1", Deposited(amount=2, balance=2))], {"s1": ec.NO_STREAM}, None)
        refused.key = "K"
        valid = prepare_append([ec.emit("s2", Deposited(amount=3, balance=3))], None, None)
        valid.key = "K"
        out = store._append_group([refused, valid])
        assert isinstance(out[0], ec.ConcurrencyError)
        assert not isinstance(out[1], BaseException), out[1]
        assert store.recorded_command("K") is not None


def test_two_runs_of_one_key_with_different_lane_counts_never_both_write(pg_dsn, pg_schema):
    """Two runs of one resumable ingest start at once, one with one lane and one with two; both read
    the key's progress before either records any (a third session holds the progress table's write
    lock meanwhile). One of them writes; the other is refused, nothing of its batches written; every
    item is stored once, and the key is resumed afterwards with the winner's lane count."""
    import threading
    import time

    import psycopg

    from eventcore.stores.ingest import IngestError
    from eventcore.stores.postgres import sql as pg_sql

    store = ec.connect(pg_dsn, schema=pg_schema, pool_size=4)
    try:
        items = [(f"acct-{i % 6}", Noted(str(i))) for i in range(400)]
        blocker = psycopg.connect(pg_dsn)
        blocker.execute(pg_sql.q("LOCK TABLE {s}.ingest_progress IN EXCLUSIVE MODE", pg_schema))
        outcomes = {}

        def run(lanes):
            try:
                outcomes[lanes] = store.ingest(items, batch_size=50, parallel=lanes, resume_key="race")
            except IngestError as exc:
                outcomes[lanes] = exc

        threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        # Both have read the (empty) progress and wait at their first batches: one on the table lock
        # (it holds the key's lock), the other on the key's lock.
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND datname = current_database()").fetchone()[0] < 2:
                assert time.monotonic() < deadline, "the two runs never reached their first batches"
                time.sleep(0.01)
        blocker.rollback()
        blocker.close()
        for t in threads:
            t.join(30)
        refused = [n for n, o in outcomes.items() if isinstance(o, IngestError)]
        assert len(refused) == 1, outcomes
        assert "different parallel" in str(outcomes[refused[0]].__cause__ or outcomes[refused[0]])
        texts = sorted(int(e.data.text) for e in store.read_all())
        assert texts == sorted(set(texts)), "an item was written twice"
        winner = 3 - refused[0]
        again = store.ingest(items, batch_size=50, parallel=winner, resume_key="race")
        assert sorted(int(e.data.text) for e in store.read_all()) == list(range(400))
        assert again.events + len(texts) == 400
    finally:
        store.close()
