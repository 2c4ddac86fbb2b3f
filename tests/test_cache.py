"""ec.StateCache: warm commands skip the read, and a decision made on stale state never commits."""
from __future__ import annotations

import threading

import pytest

import eventcore as ec
from domain import Deposit, Deposited, Withdrawn, assert_gap_free, balance


class Withdraw(ec.Command):
    account: ec.StreamId
    amount: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + (event.data.amount if isinstance(event.data, Deposited) else -event.data.amount)

    def handle(self, state):
        ec.require(state >= self.amount, f"insufficient funds: {state} < {self.amount}")
        return [ec.emit(self.account, Withdrawn(amount=self.amount, balance=state - self.amount))]


def _count_reads(store, monkeypatch):
    calls = []
    real = store.read_streams

    def counting(ids):
        calls.append(list(ids))
        return real(ids)

    monkeypatch.setattr(store, "read_streams", counting)
    return calls


def test_warm_command_skips_the_read(store, monkeypatch):
    """Entries are per command type and streams: the first Withdraw reads, the next ones do not."""
    cache = ec.StateCache()
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


def test_stale_cached_state_never_commits_a_decision(store):
    """Cache says 100; someone else withdraws 80; a cached Withdraw(50) must not commit."""
    cache = ec.StateCache()
    acct = ec.StreamId("c-2")
    store.append([ec.emit(acct, Deposited(amount=110))])
    ec.execute(store, Withdraw(acct, 10), cache=cache)  # warm: the cache now says 100 at version 2
    store.append([ec.emit(acct, Withdrawn(amount=80))], {acct: 2})  # another writer, behind the cache's back
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds: 20 < 50"):
        ec.execute(store, Withdraw(acct, 50), cache=cache)
    assert cache.stale == 1
    assert [e.data.amount for e in store.read_stream(acct)] == [110, 10, 80]
    assert balance(store, "c-2") == 20


def test_stale_cache_retry_is_free(store):
    cache = ec.StateCache()
    acct = ec.StreamId("c-3")
    ec.execute(store, Deposit(acct, 10), cache=cache)
    store.append([ec.emit(acct, Deposited(amount=5))])
    result = ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert result.attempts == 1 and result.stream_versions == {"c-3": 3}
    assert balance(store, "c-3") == 16
    # and the refreshed entry is warm again
    ec.execute(store, Deposit(acct, 1), cache=cache, retry=ec.RetryPolicy(max_retries=0))
    assert cache.hits == 2 and cache.stale == 1


def test_business_rule_rejection_keeps_the_entry(store):
    cache = ec.StateCache()
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


def test_threads_share_a_cache_without_lost_updates(store):
    cache = ec.StateCache()
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


def test_cache_is_bounded_and_per_store(store):
    cache = ec.StateCache(max_entries=2)
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
