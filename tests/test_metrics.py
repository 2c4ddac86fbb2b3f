"""MetricsCollector: exact counters and histograms for a scripted sequence, hooks, health, on every backend."""
from __future__ import annotations

import logging

import pytest

import eventcore as ec
from domain import Deposit, Deposited, Noted
from eventcore.metrics import BUCKET_BOUNDS, Histogram

#: account -> attempts on which another writer appends to the stream between the read and the append.
_INTERFERE: dict = {}


class Racing(ec.Command):
    """Appends one Noted event; for the first `_INTERFERE[account][1]` attempts another writer gets in first."""

    account: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        store, remaining = _INTERFERE[self.account]
        if remaining:
            _INTERFERE[self.account] = (store, remaining - 1)
            store.append([ec.emit(self.account, Noted(text="behind your back"))])
        return [ec.emit(self.account, Noted(text=f"after {state}"))]


def _script(store, collector=None):
    """Five commands: succeeded, rejected, conflict then success, conflicts exhausted, timeout."""
    kw = {} if collector is None else {"metrics": collector}
    ec.execute(store, Deposit(ec.StreamId("m-a"), 10), **kw)
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Deposit(ec.StreamId("m-a"), -1), **kw)
    _INTERFERE["m-b"] = (store, 1)
    result = ec.execute(store, Racing(ec.StreamId("m-b")), retry=ec.RetryPolicy(max_retries=2, base_delay=0), **kw)
    assert result.attempts == 2
    _INTERFERE["m-c"] = (store, 5)
    with pytest.raises(ec.ConcurrencyError):
        ec.execute(store, Racing(ec.StreamId("m-c")), retry=ec.RetryPolicy(max_retries=1, base_delay=0), **kw)
    _INTERFERE["m-d"] = (store, 1)
    with pytest.raises(ec.CommandTimeoutError):  # the pause after the conflict would pass the deadline
        ec.execute(store, Racing(ec.StreamId("m-d")), timeout=1.0,
                   retry=ec.RetryPolicy(max_retries=3, base_delay=10.0, max_delay=10.0, jitter=False), **kw)


def test_counters_and_histograms_are_exact(store):
    collector = ec.MetricsCollector()
    store.attach(collector)
    store.command_cache = None  # every command reads: the reads' metrics are what is counted here
    done, retried = [], []
    collector.on_command_complete(done.append)
    collector.on_retry(retried.append)
    _script(store)

    assert collector.commands == {
        ("Deposit", "succeeded"): 1, ("Deposit", "rejected"): 1,
        ("Racing", "succeeded"): 1, ("Racing", "conflict_exhausted"): 1, ("Racing", "timeout"): 1,
        ("Racing", "conflict_retried"): 2,
    }
    assert collector.retries == {("Racing", "conflict"): 2}
    assert collector.count("Racing", "conflict_retried") == 2 and collector.retry_count() == 2
    # reads: one per attempt (1 + 1 + 2 + 2 + 1); appends: 6 written (3 behind the commands' backs), 4 conflicts
    assert collector.operations == {("read", "ok"): 7, ("append", "ok"): 6, ("append", "conflict"): 4}
    assert collector.events_written == 6
    assert collector.events_read == 3  # m-a's deposit once, then the interfering event of m-b and of m-c
    assert collector.latency("Deposit").count == 2 and collector.latency("Racing").count == 3
    assert collector.operation("read").count == 7 and collector.operation("append").count == 10
    for h in (collector.latency("Racing"), collector.operation("append")):
        assert sum(h.counts) == h.count and h.min <= h.percentile(50) <= h.percentile(99) <= h.max

    assert [(i.command_type, i.outcome, i.attempts) for i in done] == [
        ("Deposit", "succeeded", 1), ("Deposit", "rejected", 1), ("Racing", "succeeded", 2),
        ("Racing", "conflict_exhausted", 2), ("Racing", "timeout", 1)]
    assert done[0].streams == ["m-a"] and done[0].stream_versions == {"m-a": 1} and done[0].events_written == 1
    assert done[2].stream_versions == {"m-b": 2} and done[3].streams == ["m-c"]
    assert isinstance(done[4].error, ec.CommandTimeoutError) and done[4].duration_s >= 0
    assert [(r.command_type, r.attempt, r.reason) for r in retried] == [("Racing", 1, "conflict"), ("Racing", 1, "conflict")]

    summary = collector.summary(duration_s=1.0)
    assert summary["commands"]["Racing"]["outcomes"] == {
        "succeeded": 1, "rejected": 0, "conflict_exhausted": 1, "timeout": 1, "store_error": 0, "error": 0}
    assert summary["commands"]["Deposit"]["success_rate"] == 50.0 and summary["events_written_per_s"] == 6.0
    text = collector.format_summary(summary=summary)
    assert "| Racing" in text and "| append" in text


class OpenOnce(ec.Command):
    """Writes two events to two streams; refused once the first stream exists (so a replay under its
    key goes through the key lookup, not the append)."""

    a: ec.StreamId
    b: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        ec.require(state == 0, "already open")
        return [ec.emit(self.a, Noted(text="a")), ec.emit(self.b, Noted(text="b"))]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_replayed_command_is_reported_as_writing_nothing(tmp_path, backend):
    store = ec.connect("memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'events.db'}")
    try:
        collector = ec.MetricsCollector()
        store.attach(collector)
        done = []
        collector.on_command_complete(done.append)
        a, b = ec.StreamId("r-a"), ec.StreamId("r-b")
        first = ec.execute(store, OpenOnce(a, b), idempotency_key="open-r")
        # again: its append finds the key (DuplicateCommandError); then refused, so found by the key lookup
        again = ec.execute(store, OpenOnce(a, b), idempotency_key="open-r")
        store.append([ec.emit(a, Noted(text="moves the stream on"))])
        refused_then_found = ec.execute(store, OpenOnce(a, b), idempotency_key="open-r")
        assert (first.replayed, again.replayed, refused_then_found.replayed) == (False, True, True)
        assert len(again.events) == len(refused_then_found.events) == 2
        assert [(i.outcome, i.events_written, i.replayed) for i in done] == [
            ("succeeded", 2, False), ("succeeded", 0, True), ("succeeded", 0, True)]
        assert done[1].stream_versions == done[2].stream_versions == {"r-a": 1, "r-b": 1}
        assert collector.events_written == 2 + 1  # the command's two, and the plain append's one
    finally:
        store.close()


def test_execute_metrics_argument_counts_commands_only(store):
    """metrics= on execute: that command's counters and hooks; store operations need store.attach()."""
    collector = ec.MetricsCollector()
    _script(store, collector)
    assert collector.count("Deposit", "succeeded") == 1 and collector.count("Racing", "timeout") == 1
    assert collector.retry_count(reason="conflict") == 2
    assert collector.operations == {} and collector.events_written == 0


def test_nothing_attached_records_nothing(store):
    collector = ec.MetricsCollector()
    store.attach(collector)
    store.detach()
    assert store.metrics is None
    ec.execute(store, Deposit(ec.StreamId("m-z"), 1))
    assert collector.commands == {} and collector.operations == {}


def test_store_operations_batch_ingest_read_all(store):
    collector = ec.MetricsCollector()
    store.attach(collector)
    store.append_batch([ec.emit(f"b-{k}", Noted(text="x")) for k in range(10)])
    result = store.ingest(((f"i-{k % 3}", Noted(text="y")) for k in range(25)), batch_size=10)
    assert result.batches == 3
    assert len(list(store.read_all(page_size=20))) == 35
    assert store.read_stream("i-0") and store.read_streams(["i-1", "nope"])["nope"] == []
    ops = collector.operations
    assert ops[("append_batch", "ok")] == 1 and ops[("ingest_batch", "ok")] == 3 and ops[("ingest", "ok")] == 1
    assert ops[("read_all", "ok")] == 2 and ops[("read", "ok")] == 2
    assert collector.events_written == 35
    assert collector.events_read == 35 + 9 + 8


def test_hooks_that_raise_never_break_the_command(store, caplog):
    collector = ec.MetricsCollector()
    store.attach(collector)

    @collector.on_command_complete
    def broken(info):
        raise RuntimeError("hook bug")

    collector.on_retry(broken)
    collector.on_store_operation(broken)
    with caplog.at_level(logging.ERROR, logger="eventcore.metrics"):
        assert ec.execute(store, Deposit(ec.StreamId("h-1"), 5)).attempts == 1
        _INTERFERE["h-2"] = (store, 1)
        assert ec.execute(store, Racing(ec.StreamId("h-2")), retry=ec.RetryPolicy(base_delay=0)).attempts == 2
    assert collector.count("Deposit", "succeeded") == 1 and collector.count("Racing", "succeeded") == 1
    assert [e.data.amount for e in store.read_stream("h-1")] == [5]
    messages = [r for r in caplog.records if r.name == "eventcore.metrics"]
    assert messages and all("hook bug" in (r.exc_text or "") or r.exc_info for r in messages)


def test_store_error_outcome_and_retry_reason():
    from eventcore.stores.memory import MemoryStore

    class Flaky(MemoryStore):
        failures = 0

        def _read_streams(self, stream_ids):
            if self.failures:
                self.failures -= 1
                raise ec.StoreUnavailableError("server went away (test)")
            return super()._read_streams(stream_ids)

    store = Flaky()
    store.command_cache = None  # every command reads: the reads' metrics are what is counted here
    collector = ec.MetricsCollector()
    store.attach(collector)
    store.failures = 1
    assert ec.execute(store, Deposit(ec.StreamId("f-1"), 1), retry=ec.RetryPolicy(base_delay=0)).attempts == 2
    store.failures = 5
    with pytest.raises(ec.StoreUnavailableError):
        ec.execute(store, Deposit(ec.StreamId("f-1"), 1), retry=ec.RetryPolicy(max_retries=1, base_delay=0))
    assert collector.commands == {("Deposit", "succeeded"): 1, ("Deposit", "store_error"): 1}
    assert collector.retries == {("Deposit", "store_error"): 2}
    assert collector.operations[("read", "error")] == 3


def test_stale_cache_retry_is_reported(store):
    collector = ec.MetricsCollector()
    store.attach(collector)
    cache = ec.StateCache()
    acct = ec.StreamId("s-1")
    ec.execute(store, Deposit(acct, 1), cache=cache)
    store.append([ec.emit(acct, Deposited(amount=5))])
    assert ec.execute(store, Deposit(acct, 1), cache=cache).attempts == 1
    assert collector.retries == {("Deposit", "stale_cache"): 1}
    assert collector.count("Deposit", "conflict_retried") == 0 and collector.count("Deposit", "succeeded") == 2


def test_connect_attaches(tmp_path):
    collector = ec.MetricsCollector()
    with ec.connect(f"sqlite:///{tmp_path / 'm.db'}", metrics=collector) as store:
        assert store.metrics is collector
        ec.execute(store, Deposit(ec.StreamId("c-1"), 1))
    assert collector.count("Deposit", "succeeded") == 1
    with pytest.raises(ec.ValidationError):
        ec.connect("memory://", metrics=object())


def test_histogram_buckets_and_percentiles():
    h = Histogram()
    for ms in (1, 1, 2, 3, 100):
        h.observe(ms / 1000)
    assert h.count == 5 and sum(h.counts) == 5 and h.max == 0.1 and h.min == 0.001
    assert 0.002 <= h.percentile(50) <= 0.002 * 10 ** (1 / 20) + 1e-12  # the median, 2 ms, within one bucket
    assert h.percentile(99) == 0.1  # capped at the exact max
    assert len(BUCKET_BOUNDS) == 161 and BUCKET_BOUNDS[0] == 1e-5
    h.observe(5000.0)  # above the top bound
    assert h.counts[-1] == 1 and h.percentile(100) == 5000.0


def test_health(store, backend):
    ec.execute(store, Deposit(ec.StreamId("hl-1"), 1))
    health = store.health()
    assert health.ok and health.connected and health.error is None and health.head_position >= 1
    assert health.backend == store.scheme and health.latency_ms >= 0
    if backend == "memory":
        assert health.schema_version is None and health.pool is None
    else:
        assert health.schema_version == health.schema_expected and health.schema_version >= 1
    if backend.startswith("postgres"):
        assert health.pool["size"] >= 1 and health.pool["in_use"] >= 0 and health.pool["waiting"] == 0
    assert health.as_dict()["ok"] is True


def test_gauges_report_pool_and_projection_lag(store, backend):
    collector = ec.MetricsCollector()
    store.attach(collector)
    gauges = collector.gauges()[store.url]
    assert (gauges["pool"] is not None) == backend.startswith("postgres")
    assert gauges["projections"] == {}
