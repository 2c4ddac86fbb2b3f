"""Reading from PostgreSQL: eventcore's reads (binary COPY decoded straight into events) against
a raw psycopg row fetch of the same rows, the raw COPY bytes, and the row path eventcore used
before (row fetch + decode_rows).

In one session, on one table (a fresh schema holding N events over 1,000 streams, plus
LONG_STREAMS streams of LONG_EVENTS events each; N = EVENTCORE_BENCH_EVENTS, default 1,000,000):

* read_all_eventcore          store.read_all() into RecordedEvents, default settings, with each
                              twin of decode_copy (C, Python);
* read_all_row_path           what read_all did before: the row statement page by page, psycopg
                              row fetch, decode_rows (each twin);
* read_all_raw_rows           raw psycopg fetchall of the same rows, page by page, same statement:
                              tuples of ints, str and bytes, no events (the floor of the target);
* read_all_raw_copy_bytes     one COPY ... TO STDOUT (FORMAT BINARY) of the whole feed, bytes only;
* projection_catch_up         run_projection(until_caught_up=True) of a no-op batch handler, by
                              COPY and by the row path a projector's session used before;
* read_stream / read_streams  one LONG_EVENTS-event stream; all LONG_STREAMS of them in one call,
                              by COPY and by the row path.
"""
from __future__ import annotations

import os
import uuid

import psycopg
import pytest

import eventcore as ec
from eventcore.projections import DEFAULT_BATCH_SIZE
from eventcore import _impl, _pure
from eventcore.stores.postgres import sql as pg_sql
from eventcore.stores.postgres.projections import PostgresProjectionSession
from eventcore.stores.projection_storage import ProjectionSession

from conftest import FIGURES, MEDIANS, RATIOS, Measured, record

N = int(os.environ.get("EVENTCORE_BENCH_EVENTS", "1000000"))
STREAMS = 1000
#: Long streams: what a command folding a busy aggregate or a per-stream rebuild reads.
LONG_STREAMS = 4
LONG_EVENTS = 10_000
TOTAL = N + LONG_STREAMS * LONG_EVENTS
PAGE = 1000  # read_all's default page (stores.base.DEFAULT_PAGE_SIZE), for the raw paged fetch too


@pytest.fixture(scope="module")
def feed(pg_dsn):
    schema = f"bench_reads_{uuid.uuid4().hex[:10]}"
    store = ec.connect(pg_dsn, schema=schema)
    store.ingest(((f"sensor-{i % STREAMS}", Measured(f"s{i % STREAMS}", i * 0.5, i)) for i in range(N)),
                 batch_size=10_000)
    store.ingest(((f"long-{i % LONG_STREAMS}", Measured("long", i * 0.25, i))
                  for i in range(LONG_STREAMS * LONG_EVENTS)), batch_size=10_000)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(pg_sql.q("VACUUM ANALYZE {s}.events", schema))
    yield store
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(pg_sql.q("DROP SCHEMA {s} CASCADE", schema))


def _rate(name: str, label: str, events: int) -> None:
    FIGURES[f"{label}: events/s"] = (events / MEDIANS[name], "events/s")


def _row_sql(store, name_or_text: str) -> str:
    return pg_sql.q(pg_sql.QUERIES.get(name_or_text, name_or_text), store.schema).as_string(None)


def _row_path_read_all(store, decode: bool) -> int:
    """The feed page by page through the row statement (prepared, as the store prepared it)."""
    query = _row_sql(store, "read_all")
    after, count = 0, 0
    with psycopg.connect(store._dsn, autocommit=True, prepare_threshold=0) as conn:
        while True:
            rows = conn.execute(query, (after, PAGE)).fetchall()
            count += len(_impl.decode_rows(rows)) if decode else len(rows)
            if len(rows) < PAGE:
                return count
            after = rows[-1][0]


def _run(benchmark, fn, rounds=3):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def _twin(name: str, function: str):
    if name == "python":
        return getattr(_pure, function)
    return getattr(pytest.importorskip("eventcore._speedups"), function)


@pytest.mark.benchmark(group="read_all")
@pytest.mark.parametrize("twin", ["c", "python"])
def test_read_all_eventcore(benchmark, feed, monkeypatch, twin):
    monkeypatch.setattr(_impl, "decode_copy", _twin(twin, "decode_copy"))
    assert _run(benchmark, lambda: sum(1 for _ in feed.read_all())) == TOTAL
    record(f"read_all_eventcore_{twin}", benchmark)
    _rate(f"read_all_eventcore_{twin}", f"read_all, eventcore ({twin}), {TOTAL:,} events", TOTAL)


@pytest.mark.benchmark(group="read_all")
@pytest.mark.parametrize("twin", ["c", "python"])
def test_read_all_row_path(benchmark, feed, monkeypatch, twin):
    monkeypatch.setattr(_impl, "decode_rows", _twin(twin, "decode_rows"))
    assert _run(benchmark, lambda: _row_path_read_all(feed, True)) == TOTAL
    record(f"read_all_row_path_{twin}", benchmark)
    _rate(f"read_all_row_path_{twin}", f"read_all by the row path (row fetch + decode_rows, {twin})", TOTAL)


@pytest.mark.benchmark(group="read_all")
def test_read_all_raw_rows(benchmark, feed):
    assert _run(benchmark, lambda: _row_path_read_all(feed, False)) == TOTAL
    record("read_all_raw_rows", benchmark)
    _rate("read_all_raw_rows", "raw psycopg row fetch, same rows, pages of 1,000 (tuples, no events)", TOTAL)


def _typed_rows_read_all(store) -> int:
    """The feed page by page as a psycopg user reads it: the table's own columns, psycopg's default
    loaders (jsonb parsed into dicts, uuid into UUID, timestamptz into datetime), same paging."""
    query = pg_sql.q("SELECT position, stream_id, version, event_id, type, data, metadata, recorded_at "
                     "FROM {s}.events WHERE position > %s ORDER BY position LIMIT %s", store.schema).as_string(None)
    after, count = 0, 0
    with psycopg.connect(store._dsn, autocommit=True, prepare_threshold=0) as conn:
        while True:
            rows = conn.execute(query, (after, PAGE)).fetchall()
            count += len(rows)
            if len(rows) < PAGE:
                return count
            after = rows[-1][0]


@pytest.mark.benchmark(group="read_all")
def test_read_all_raw_typed_rows(benchmark, feed):
    assert _run(benchmark, lambda: _typed_rows_read_all(feed)) == TOTAL
    record("read_all_raw_typed_rows", benchmark)
    _rate("read_all_raw_typed_rows", "raw psycopg row fetch with its default types (jsonb -> dict, uuid, "
          "datetime), same rows and pages", TOTAL)


@pytest.mark.benchmark(group="read_all")
def test_read_all_raw_copy_bytes(benchmark, feed):
    query = _row_sql(feed, "COPY (SELECT {copy_columns} FROM {s}.events ORDER BY position) TO STDOUT (FORMAT BINARY)"
                     .replace("{copy_columns}", pg_sql.QUERIES["copy_columns"]))

    def run():
        rows = -1  # the header arrives with the first row, the trailer alone
        with psycopg.connect(feed._dsn, autocommit=True) as conn:
            with conn.cursor().copy(query) as copy:
                while copy.read():
                    rows += 1
        return rows

    assert _run(benchmark, run) == TOTAL
    record("read_all_raw_copy", benchmark)
    _rate("read_all_raw_copy", "raw psycopg COPY TO STDOUT (FORMAT BINARY), bytes only, one statement", TOTAL)


@pytest.mark.benchmark(group="read_all")
@pytest.mark.parametrize("path", ["copy", "row_path"])
def test_projection_catch_up(benchmark, feed, monkeypatch, path):
    if path == "row_path":  # what a projector's session did before: rows, then decode_rows
        monkeypatch.setattr(PostgresProjectionSession, "read_events", ProjectionSession.read_events)
    names = iter(range(1000))

    def run():
        runner = ec.run_projection(feed, ec.Projector(f"bench-catch-up-{path}-{next(names)}",
                                                      batch_handler=lambda events, ctx: None),
                                   until_caught_up=True)
        return runner.events_handled

    assert _run(benchmark, run) == TOTAL
    name = "projection_catch_up" if path == "copy" else "projection_catch_up_row_path"
    record(name, benchmark)
    _rate(name, f"projection catch-up, no-op handler, batches of {DEFAULT_BATCH_SIZE:,}, {path.replace('_', ' ')} "
                f"({ec.__impl__})", TOTAL)


@pytest.mark.benchmark(group="long streams")
def test_read_stream_long(benchmark, feed):
    assert _run(benchmark, lambda: len(feed.read_stream("long-0")), rounds=10) == LONG_EVENTS
    record("read_stream_long", benchmark)
    _rate("read_stream_long", f"read_stream, one {LONG_EVENTS:,}-event stream ({ec.__impl__})", LONG_EVENTS)


@pytest.mark.benchmark(group="long streams")
def test_read_streams_long(benchmark, feed):
    ids = [f"long-{k}" for k in range(LONG_STREAMS)]
    events = LONG_STREAMS * LONG_EVENTS
    assert _run(benchmark, lambda: sum(map(len, feed.read_streams(ids).values())), rounds=10) == events
    record("read_streams_long", benchmark)
    _rate("read_streams_long", f"read_streams, {LONG_STREAMS} x {LONG_EVENTS:,}-event streams ({ec.__impl__})",
          LONG_STREAMS * LONG_EVENTS)


@pytest.mark.benchmark(group="long streams")
def test_read_stream_long_row_path(benchmark, feed):
    query = _row_sql(feed, f"SELECT {pg_sql.COLUMNS} FROM {{s}}.events WHERE stream_id = %s ORDER BY version")
    with psycopg.connect(feed._dsn, autocommit=True, prepare_threshold=0) as conn:
        assert _run(benchmark, lambda: len(_impl.decode_rows(conn.execute(query, ("long-0",)).fetchall())),
                    rounds=10) == LONG_EVENTS
    record("read_stream_long_row_path", benchmark)
    _rate("read_stream_long_row_path", f"read_stream by the row path ({ec.__impl__})", LONG_EVENTS)


RATIOS.append(("read_all: eventcore (C) vs psycopg row fetch with its default types (the issue's floor)",
               "read_all_eventcore_c", "read_all_raw_typed_rows", ">= 3x"))
# The text-column fetch builds no events and parses no JSON: near COPY's own rate, a limit rather than a floor.
RATIOS.append(("read_all: eventcore (C) vs raw psycopg row fetch of text columns", "read_all_eventcore_c",
               "read_all_raw_rows", "near 1x"))
RATIOS.append(("read_all: eventcore (C) vs the row path it replaced (C)", "read_all_eventcore_c", "read_all_row_path_c",
               "> 1x"))
RATIOS.append(("read_all: pure-Python twin vs the row path (Python)", "read_all_eventcore_python",
               "read_all_row_path_python", ">= 1x"))
RATIOS.append(("read_all: eventcore (C) vs raw COPY bytes (the limit)", "read_all_eventcore_c", "read_all_raw_copy",
               "the limit"))
RATIOS.append(("projection catch-up vs psycopg row fetch with its default types", "projection_catch_up",
               "read_all_raw_typed_rows", ">= 3x"))
RATIOS.append(("projection catch-up: COPY vs the row path it replaced", "projection_catch_up",
               "projection_catch_up_row_path", "> 1x"))
RATIOS.append(("read_stream (long): COPY vs the row path", "read_stream_long", "read_stream_long_row_path", "> 1x"))
