"""ec.StateCache: warm commands skip the read, and a decision made on stale state never commits."""
from __future__ import annotations

import threading

import pytest

import eventcore as ec
from domain import Deposit, Deposited, Transfer, Withdrawn, assert_gap_free, balance


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


def test_streams_are_cached_one_by_one_so_new_pairs_skip_the_read(store, monkeypatch):
    """A transfer between two accounts that other commands already touched reads nothing:
    the cache keeps each stream's events, not only whole command states."""
    cache = ec.StateCache()
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


def test_stale_cached_stream_never_commits_a_decision(store):
    """Per-stream entries too: someone else drains the source; the cached transfer must not commit."""
    cache = ec.StateCache()
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


def test_long_streams_keep_only_their_version_and_the_event_budget_holds(store, monkeypatch):
    cache = ec.StateCache(max_stream_events=3, max_events=5)
    long, short = ec.StreamId("l-long"), ec.StreamId("l-short")
    store.append([ec.emit(long, Deposited(amount=1)) for _ in range(4)])
    store.append([ec.emit(short, Deposited(amount=1))])
    reads = _count_reads(store, monkeypatch)
    ec.execute(store, Deposit(long, 1), cache=cache)
    ec.execute(store, Deposit(long, 1), cache=cache)  # the folded state still serves it
    assert len(reads) == 1
    ec.execute(store, Transfer(long, short, 1), cache=cache)  # long's events are not kept: read
    assert len(reads) == 2
    assert cache._events <= 5
    for k in range(4):  # more short streams than the event budget: the oldest go
        ec.execute(store, Deposit(ec.StreamId(f"l-{k}"), 1), cache=cache)
    assert cache._events <= 5
    assert balance(store, "l-long") == 5 and balance(store, "l-short") == 2
    with pytest.raises(ec.ValidationError):
        ec.StateCache(max_events=-1)


def test_transfers_from_threads_through_one_cache_conserve_money(store):
    cache = ec.StateCache()
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
