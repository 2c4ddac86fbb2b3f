"""What type versions cost on read, on PostgreSQL: events at their class's version against events that
go through one upcaster, and (run against an eventcore from before type versions, see below) the
same current events read by the code that had no versions at all.

N = EVENTCORE_BENCH_EVENTS (default 1,000,000) events over 1,000 streams in each of two schemas:

* read_all_current            store.read_all() of N events stored at their class's version (1);
* read_all_upcast             store.read_all() of N events stored at version 1 and read by the class
                              at version 2 through one upcaster (the slow path: JSON to dict, the
                              upcaster, the class's decoder);
* decode_copy_current/_upcast the decoding alone: decode_copy of the whole feed's COPY bytes, fetched
                              once (no server, no paging): the client CPU each path costs.

The current-event tests use only what eventcore had before type versions, so the file runs unchanged
against that code: build it in a worktree of the earlier commit (`python setup.py build_ext
--inplace`) and run `PYTHONPATH=<that worktree>/src pytest bench/test_evolution.py`; the upcast tests
are skipped there. Compare the medians of read_all_current and decode_copy_current of both runs.
"""
from __future__ import annotations

import os
import uuid

import psycopg
import pytest

import eventcore as ec
from eventcore import _impl
from eventcore.stores.postgres import sql as pg_sql

from conftest import FIGURES, MEDIANS, RATIOS, record

N = int(os.environ.get("EVENTCORE_BENCH_EVENTS", "1000000"))
STREAMS = 1000
VERSIONED = hasattr(ec, "upcaster")


class EvoCurrent(ec.Event):
    __event_type__ = "bench.evo.Current"
    account: str
    amount: int
    note: str


def _schema(pg_dsn, events):
    schema = f"bench_evo_{uuid.uuid4().hex[:10]}"
    store = ec.connect(pg_dsn, schema=schema)
    store.ingest(events, batch_size=10_000)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(pg_sql.q("VACUUM ANALYZE {s}.events", schema))
    return store


def _drop(pg_dsn, store):
    schema = store.schema
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(pg_sql.q("DROP SCHEMA {s} CASCADE", schema))


@pytest.fixture(scope="module")
def current(pg_dsn):
    store = _schema(pg_dsn, ((f"acct-{i % STREAMS}", EvoCurrent(f"a{i % STREAMS}", i, "deposit")) for i in range(N)))
    yield store
    _drop(pg_dsn, store)


@pytest.fixture(scope="module")
def old(pg_dsn):
    """N events written by the version-1 class of "bench.evo.Upcast", and the version-2 class with its
    upcaster registered for the reads (each class in a registry scope of its own)."""
    if not VERSIONED:
        pytest.skip("this eventcore has no type versions")
    from eventcore.events import isolated_registry

    with isolated_registry():
        class Upcast(ec.Event):
            __event_type__ = "bench.evo.Upcast"
            account: str
            amount: int
            note: str

        store = _schema(pg_dsn, ((f"acct-{i % STREAMS}", Upcast(f"a{i % STREAMS}", i, "deposit")) for i in range(N)))
    scope = isolated_registry()
    scope.__enter__()

    class UpcastV2(ec.Event):
        __event_type__ = "bench.evo.Upcast"
        __event_version__ = 2
        account: str
        cents: int
        note: str

    @ec.upcaster("bench.evo.Upcast", from_version=1)
    def _v1(data: dict) -> dict:
        data["cents"] = data.pop("amount") * 100
        return data

    yield store
    scope.__exit__(None, None, None)
    _drop(pg_dsn, store)


def _run(benchmark, fn, rounds=3):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def _copy_bytes(store) -> bytes:
    query = pg_sql.q("COPY (SELECT " + pg_sql.QUERIES["copy_columns"] + " FROM {s}.events ORDER BY position) "
                     "TO STDOUT (FORMAT BINARY)", store.schema)
    out = bytearray()
    with psycopg.connect(store._dsn, autocommit=True) as conn:
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                out += chunk
    return bytes(out)


def _label(what: str) -> str:
    return f"{what}, {N:,} events ({ec.__impl__}{'' if VERSIONED else ', before type versions'})"


@pytest.mark.benchmark(group="evolution")
def test_read_all_current(benchmark, current):
    assert _run(benchmark, lambda: sum(1 for _ in current.read_all())) == N
    record("read_all_current", benchmark)
    FIGURES[_label("read_all, events at their class's version") + ": events/s"] = (
        N / MEDIANS["read_all_current"], "events/s")


@pytest.mark.benchmark(group="evolution")
def test_read_all_upcast(benchmark, old):
    events = list(old.read_all(limit=2))
    assert [type(e.data).__name__ for e in events] == ["UpcastV2"] * 2 and events[1].data.cents == 100
    assert _run(benchmark, lambda: sum(1 for _ in old.read_all())) == N
    record("read_all_upcast", benchmark)
    FIGURES[_label("read_all, version-1 events through one upcaster") + ": events/s"] = (
        N / MEDIANS["read_all_upcast"], "events/s")


@pytest.mark.benchmark(group="evolution decode only")
def test_decode_copy_current(benchmark, current):
    buf = _copy_bytes(current)
    assert _run(benchmark, lambda: len(_impl.decode_copy(buf))) == N
    record("decode_copy_current", benchmark)
    FIGURES[_label("decode_copy alone, events at their class's version") + ": events/s"] = (
        N / MEDIANS["decode_copy_current"], "events/s")


@pytest.mark.benchmark(group="evolution decode only")
def test_decode_copy_upcast(benchmark, old):
    buf = _copy_bytes(old)
    assert _run(benchmark, lambda: len(_impl.decode_copy(buf))) == N
    record("decode_copy_upcast", benchmark)
    FIGURES[_label("decode_copy alone, version-1 events through one upcaster") + ": events/s"] = (
        N / MEDIANS["decode_copy_upcast"], "events/s")


RATIOS.append(("read_all: version-1 events through one upcaster vs current events", "read_all_upcast",
               "read_all_current", "the slow path's price"))
RATIOS.append(("decode_copy: version-1 events through one upcaster vs current events", "decode_copy_upcast",
               "decode_copy_current", "the slow path's price"))
