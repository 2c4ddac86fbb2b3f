"""Command throughput on PostgreSQL, on 1 and on 8 threads, against the floor and a peer, in one session.

* cmd_*_eventcore        ec.execute of the workloads' commands (read every stream, fold, decide,
                         one version-checked append), with and without the opt-in StateCache;
* cmd_*_raw              the same workload written by hand against psycopg: read the stream(s) in
                         one SELECT, fold in Python, insert the next version(s) in one INSERT whose
                         UNIQUE (stream_id, version) is the version check — the floor any library pays;
* cmd_*_eventsourcing    the `eventsourcing` library (bench/test_peer_commands_eventsourcing.py).

OPS = EVENTCORE_BENCH_OPS (default 1,000) operations over 100 accounts (opening balance 10**9),
medians of 3 rounds, each round in a fresh schema.
* deposit: op i deposits 1 into account i % 100.
* transfer: op i moves 1 between the i-th (source, target) pair of a plan drawn once, in setup,
  from random.Random(7) (conftest.transfer_pairs: the same plan for every contender and concurrency).

Concurrency c (1 or 8; names with no suffix are c = 1, `_c8` is c = 8): the OPS operations of a
round are shared by c threads, each taking the next op index from one itertools.count(), so every
op is done once (conftest.run_split). c = 1 runs in the benchmark's thread; for c = 8 starting and
joining the threads is part of the timed round.

* eventcore: one store per round, `ec.connect(dsn, pool_size=max(2, c))` with the store's defaults
  otherwise (group commit on: concurrent appends share a transaction; the pool opens connections
  as they are needed); by default each command goes through the store's exact cache (as
  `ec.execute` does unless told otherwise), the "uncached" variant passes cache=None (every command
  reads its streams), the "cache" variant shares one `ec.StateCache()` (it reuses folded states)
  among the round's threads;
  every execute has `retry=ec.RetryPolicy(max_retries=50, base_delay=0.001, max_delay=0.05)`.
* raw: one autocommit connection per thread (prepare_threshold=0), opened in setup; a unique
  violation (another thread wrote the stream first) re-reads and tries again, without limit.

Untimed: setup (schema, store or connections, the 100 AccountOpened events) and, after each round,
the check: every account's versions are 1..n with no gap, n is 1 + its round-robin share of the
deposits or 1 + the number of plan transfers it is in, and the balances sum to the opening total
(+ OPS for deposit). Conflicts retried (attempts beyond the first) and, for the cache variant,
stale cache hits are in the JSON's extra_info.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import psycopg
import pytest
from psycopg import sql

import eventcore as ec
from eventcore.executor import STORE_CACHE
from eventcore.bench.workloads import AccountOpened, DepositMoney, MoneyWithdrawn, TransferMoney

from conftest import CONCURRENCY, FIGURES, MEDIANS, RATIOS, record, run_split, transfer_pairs

OPS = int(os.environ.get("EVENTCORE_BENCH_OPS", "1000"))
ACCOUNTS = 100
OPENING_BALANCE = 10**9
RETRY = ec.RetryPolicy(max_retries=50, base_delay=0.001, max_delay=0.05)


def _accounts(prefix):
    return [ec.StreamId(f"{prefix}-{k}") for k in range(ACCOUNTS)]


def _suffix(concurrency: int) -> str:
    """Median names: no suffix for 1 thread (the names the ratio lines always used), `_c8` for 8."""
    return "" if concurrency == 1 else f"_c{concurrency}"


def _label(concurrency: int) -> str:
    return "" if concurrency == 1 else f", {concurrency} threads"


def _expected(workload: str, pairs) -> tuple[list[int], int]:
    """Events each account must hold after a round, and the balances' total."""
    if workload == "deposit":
        counts = [1 + OPS // ACCOUNTS + (1 if k < OPS % ACCOUNTS else 0) for k in range(ACCOUNTS)]
        return counts, ACCOUNTS * OPENING_BALANCE + OPS
    touched = Counter()
    for a, b in pairs:
        touched[a] += 1
        touched[b] += 1
    return [1 + touched[k] for k in range(ACCOUNTS)], ACCOUNTS * OPENING_BALANCE


def _check(workload, pairs, accounts, versions: dict, total: int) -> None:
    counts, expected_total = _expected(workload, pairs)
    assert set(versions) == set(accounts), sorted(set(versions) ^ set(accounts))[:5]
    for k, account in enumerate(accounts):
        assert sorted(versions[account]) == list(range(1, counts[k] + 1)), (account, len(versions[account]), counts[k])
    assert total == expected_total, (total, expected_total)


def _check_eventcore(store, accounts, workload, pairs) -> None:
    versions, total = defaultdict(list), 0
    for e in store.read_all():
        versions[e.stream_id].append(e.version)
        data = e.data
        if type(data) is AccountOpened:
            total += data.initial_balance
        elif type(data) is MoneyWithdrawn:
            total -= data.amount
        else:
            total += data.amount
    _check(workload, pairs, [str(a) for a in accounts], versions, total)


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("variant", ["default", "uncached", "cache"])
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_eventcore(benchmark, pg_dsn, fresh_schema, workload, variant, concurrency):
    pairs = transfer_pairs(OPS, ACCOUNTS)
    pending = []  # the round last set up: checked and closed before the next one, or at the end
    retried = []  # attempts beyond the first, one entry per retried command
    stale = []  # per round, StateCache hits that proved stale (re-run outside the retry policy)

    def finish():
        while pending:
            store, accounts, cache = pending.pop()
            if cache is not None:
                stale.append((store.command_cache if cache is STORE_CACHE else cache).stale)
            try:
                _check_eventcore(store, accounts, workload, pairs)
            finally:
                store.close()

    def setup():
        finish()
        # The pool opened whole in setup, as the raw contender opens its connections there.
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=max(2, concurrency),
                           pool_min_size=max(2, concurrency))
        accounts = _accounts("acct")
        cache = {"default": STORE_CACHE, "uncached": None, "cache": ec.StateCache()}[variant]
        pending.append((store, accounts, cache))
        store.append([ec.emit(a, AccountOpened(OPENING_BALANCE)) for a in accounts],
                     {a: ec.NO_STREAM for a in accounts})
        return (store, accounts, cache), {}

    def run(store, accounts, cache):
        if workload == "deposit":
            def op(_worker, i):
                result = ec.execute(store, DepositMoney(accounts[i % ACCOUNTS], 1), cache=cache, retry=RETRY)
                if result.attempts > 1:
                    retried.append(result.attempts - 1)
        else:
            def op(_worker, i):
                a, b = pairs[i]
                result = ec.execute(store, TransferMoney(accounts[a], accounts[b], 1), cache=cache, retry=RETRY)
                if result.attempts > 1:
                    retried.append(result.attempts - 1)
        run_split(concurrency, OPS, op)

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        finish()
    finally:
        for store, _, _ in pending:
            store.close()
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, concurrency=concurrency,
                                retries_all_rounds=sum(retried), cache_stale_per_round=stale)
    name = f"cmd_{workload}_eventcore" + _VARIANTS[variant][0] + _suffix(concurrency)
    record(name, benchmark)
    FIGURES[f"{workload}, {_VARIANTS[variant][1]} ({ec.__impl__}){_label(concurrency)}: ops/s"] = (
        OPS / MEDIANS[name], "ops/s")


#: variant -> (benchmark name suffix, what it is)
_VARIANTS = {"default": ("", "eventcore (defaults: the store's exact cache)"),
             "uncached": ("_uncached", "eventcore, cache=None"),
             "cache": ("_cache", "eventcore + StateCache()")}


_RAW_TABLE = """
CREATE TABLE {t} (
    position bigserial PRIMARY KEY,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    UNIQUE (stream_id, version)
)"""

_RAW_CHECK = """
SELECT stream_id, array_agg(version),
       sum(CASE WHEN type = 'withdrawn' THEN -(data->>'amount')::bigint ELSE (data->>'amount')::bigint END)
FROM {t} GROUP BY stream_id"""


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_raw_psycopg(benchmark, pg_dsn, fresh_schema, workload, concurrency):
    pairs = transfer_pairs(OPS, ACCOUNTS)
    accounts = [f"acct-{k}" for k in range(ACCOUNTS)]
    pending = []  # (connections, table) of the round last set up
    retried = []

    def finish():
        while pending:
            conns, table = pending.pop()
            try:
                versions, total = {}, 0
                for sid, vs, balance in conns[0].execute(sql.SQL(_RAW_CHECK).format(t=table)):
                    versions[sid] = vs
                    total += balance
                _check(workload, pairs, accounts, versions, total)
            finally:
                for c in conns:
                    c.close()

    def setup():
        finish()
        schema = fresh_schema()
        table = sql.Identifier(schema, "raw_events")
        conns = []
        pending.append((conns, table))
        for _ in range(concurrency):
            conns.append(psycopg.connect(pg_dsn, autocommit=True, prepare_threshold=0))
        conns[0].execute(sql.SQL(_RAW_TABLE).format(t=table))
        with conns[0].cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, 1, 'opened', %s)")
                            .format(table), [(a, json.dumps({"amount": OPENING_BALANCE})) for a in accounts])
        read = sql.SQL("SELECT stream_id, version, type, data::text FROM {} WHERE stream_id = ANY(%s) ORDER BY position").format(table)
        insert1 = sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, %s, %s, %s)").format(table)
        insert2 = sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, %s, %s, %s), (%s, %s, %s, %s)").format(table)
        return (conns, read, insert1, insert2), {}

    def fold(rows):
        balance, version = {}, {}
        for sid, v, typ, data in rows:
            amount = json.loads(data)["amount"]
            balance[sid] = balance.get(sid, 0) + (-amount if typ == "withdrawn" else amount)
            version[sid] = v
        return balance, version

    def run(conns, read, insert1, insert2):
        def op(worker, i):
            conn = conns[worker]
            while True:  # retry on a version conflict, as a library would
                if workload == "deposit":
                    a = accounts[i % ACCOUNTS]
                    _, version = fold(conn.execute(read, ([a],)).fetchall())
                    try:
                        conn.execute(insert1, (a, version[a] + 1, "deposited", '{"amount": 1}'))
                        return
                    except psycopg.errors.UniqueViolation:
                        retried.append(1)
                        continue
                s, t = pairs[i]
                a, b = accounts[s], accounts[t]
                balance, version = fold(conn.execute(read, ([a, b],)).fetchall())
                assert balance[a] >= 1
                try:
                    conn.execute(insert2, (a, version[a] + 1, "withdrawn", '{"amount": 1}',
                                           b, version[b] + 1, "deposited", '{"amount": 1}'))
                    return
                except psycopg.errors.UniqueViolation:
                    retried.append(1)
                    continue

        run_split(concurrency, OPS, op)

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        finish()
    finally:
        for conns, _ in pending:
            for c in conns:
                c.close()
    benchmark.extra_info.update(ops=OPS, accounts=ACCOUNTS, concurrency=concurrency,
                                retries_all_rounds=len(retried))
    name = f"cmd_{workload}_raw{_suffix(concurrency)}"
    record(name, benchmark)
    FIGURES[f"{workload}, hand-written psycopg (the floor){_label(concurrency)}: ops/s"] = (
        OPS / MEDIANS[name], "ops/s")


for _c in CONCURRENCY:
    for _workload in ("deposit", "transfer"):
        for _variant, _what in _VARIANTS.values():
            RATIOS.append((f"{_workload}{_label(_c)}: {_what} vs hand-written psycopg",
                           f"cmd_{_workload}_eventcore{_variant}{_suffix(_c)}",
                           f"cmd_{_workload}_raw{_suffix(_c)}", ">= 0.8x"))
