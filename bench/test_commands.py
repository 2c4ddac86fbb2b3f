"""Command throughput on PostgreSQL, sequential, against the floor and a peer, in one session.

* cmd_*_eventcore        ec.execute of the workloads' commands (read every stream, fold, decide,
                         one version-checked append), with and without the opt-in StateCache;
* cmd_*_raw              the same workload written by hand against psycopg: read the stream(s) in
                         one SELECT, fold in Python, insert the next version(s) in one INSERT whose
                         UNIQUE (stream_id, version) is the version check — the floor any library pays;
* cmd_*_eventsourcing    the `eventsourcing` library (bench/test_peer_commands_eventsourcing.py).

OPS = EVENTCORE_BENCH_OPS (default 1,000) operations over 100 accounts, medians of 3 rounds, each
round in a fresh schema.
"""
from __future__ import annotations

import json
import os
import random

import psycopg
import pytest
from psycopg import sql

import eventcore as ec
from eventcore.workloads import AccountOpened, DepositMoney, TransferMoney

from conftest import FIGURES, MEDIANS, RATIOS, record

OPS = int(os.environ.get("EVENTCORE_BENCH_OPS", "1000"))
ACCOUNTS = 100


def _accounts(prefix):
    return [ec.StreamId(f"{prefix}-{k}") for k in range(ACCOUNTS)]


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("variant", ["plain", "cache"])
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_eventcore(benchmark, pg_dsn, fresh_schema, workload, variant):
    stores = []

    def setup():
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=2)
        accounts = _accounts("acct")
        store.append([ec.emit(a, AccountOpened(10**9)) for a in accounts], {a: ec.NO_STREAM for a in accounts})
        stores.append(store)
        return (store, accounts, ec.StateCache() if variant == "cache" else None), {}

    def run(store, accounts, cache):
        rng = random.Random(7)
        for i in range(OPS):
            if workload == "deposit":
                ec.execute(store, DepositMoney(accounts[i % ACCOUNTS], 1), cache=cache)
            else:
                a, b = rng.sample(accounts, 2)
                ec.execute(store, TransferMoney(a, b, 1), cache=cache)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    per_op = 1 if workload == "deposit" else 2
    assert len(list(stores[-1].read_all())) == ACCOUNTS + per_op * OPS
    for s in stores:
        s.close()
    name = f"cmd_{workload}_eventcore" + ("_cache" if variant == "cache" else "")
    record(name, benchmark)
    FIGURES[f"{workload}, eventcore{' + StateCache' if variant == 'cache' else ''} ({ec.__impl__}): ops/s"] = (
        OPS / MEDIANS[name], "ops/s")


_RAW_TABLE = """
CREATE TABLE {t} (
    position bigserial PRIMARY KEY,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    UNIQUE (stream_id, version)
)"""


@pytest.mark.benchmark(group="commands")
@pytest.mark.parametrize("workload", ["deposit", "transfer"])
def test_commands_raw_psycopg(benchmark, pg_dsn, fresh_schema, workload):
    conns = []

    def setup():
        schema = fresh_schema()
        conn = psycopg.connect(pg_dsn, autocommit=True, prepare_threshold=0)
        table = sql.Identifier(schema, "raw_events")
        conn.execute(sql.SQL(_RAW_TABLE).format(t=table))
        accounts = [f"acct-{k}" for k in range(ACCOUNTS)]
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, 1, 'opened', %s)")
                            .format(table), [(a, json.dumps({"amount": 10**9})) for a in accounts])
        conns.append((conn, table))
        read = sql.SQL("SELECT stream_id, version, type, data::text FROM {} WHERE stream_id = ANY(%s) ORDER BY position").format(table)
        insert1 = sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, %s, %s, %s)").format(table)
        insert2 = sql.SQL("INSERT INTO {} (stream_id, version, type, data) VALUES (%s, %s, %s, %s), (%s, %s, %s, %s)").format(table)
        return (conn, accounts, read, insert1, insert2), {}

    def fold(rows):
        balance, version = {}, {}
        for sid, v, typ, data in rows:
            amount = json.loads(data)["amount"]
            balance[sid] = balance.get(sid, 0) + (-amount if typ == "withdrawn" else amount)
            version[sid] = v
        return balance, version

    def run(conn, accounts, read, insert1, insert2):
        rng = random.Random(7)
        for i in range(OPS):
            while True:  # retry on a version conflict, as a library would
                if workload == "deposit":
                    a = accounts[i % ACCOUNTS]
                    _, version = fold(conn.execute(read, ([a],)).fetchall())
                    try:
                        conn.execute(insert1, (a, version[a] + 1, "deposited", '{"amount": 1}'))
                        break
                    except psycopg.errors.UniqueViolation:
                        continue
                a, b = rng.sample(accounts, 2)
                balance, version = fold(conn.execute(read, ([a, b],)).fetchall())
                assert balance[a] >= 1
                try:
                    conn.execute(insert2, (a, version[a] + 1, "withdrawn", '{"amount": 1}',
                                           b, version[b] + 1, "deposited", '{"amount": 1}'))
                    break
                except psycopg.errors.UniqueViolation:
                    continue

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    conn, table = conns[-1]
    per_op = 1 if workload == "deposit" else 2
    assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0] == ACCOUNTS + per_op * OPS
    for c, _ in conns:
        c.close()
    record(f"cmd_{workload}_raw", benchmark)
    FIGURES[f"{workload}, hand-written psycopg (the floor): ops/s"] = (OPS / MEDIANS[f"cmd_{workload}_raw"], "ops/s")


RATIOS.append(("deposit: eventcore vs hand-written psycopg", "cmd_deposit_eventcore", "cmd_deposit_raw", ">= 0.8x"))
RATIOS.append(("deposit: eventcore + StateCache vs hand-written psycopg", "cmd_deposit_eventcore_cache", "cmd_deposit_raw", ">= 0.8x"))
RATIOS.append(("transfer: eventcore vs hand-written psycopg", "cmd_transfer_eventcore", "cmd_transfer_raw", ">= 0.8x"))
RATIOS.append(("transfer: eventcore + StateCache vs hand-written psycopg", "cmd_transfer_eventcore_cache", "cmd_transfer_raw", ">= 0.8x"))
