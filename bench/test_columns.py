"""Columnar bulk I/O on PostgreSQL: `store.ingest_columns` and `store.read_columns` against their baselines.

In one session, on the same server and a freshly migrated schema per round:

* ingest_columns         store.ingest_columns of N events of 4 fields (str, float, int, datetime) from
                         numpy arrays: the same validation, versions and batches as store.ingest;
* ingest_columns_raw     raw psycopg `COPY ... (FORMAT BINARY)` of the very same rows, pre-encoded in
                         memory outside the timing (the physical limit);
* read_columns           store.read_columns of the N events, 4 fields typed from the class;
* read_all               list(store.read_all(...)) of the same events, as objects (today's way);
* ingest_columns_eventsourcing
                         the same N events (the same four fields, the same 1,000 streams) saved by the
                         `eventsourcing` library in its fastest bulk mode (EventStore.put with its DB
                         functions, psycopg binary; see bench/test_peer_eventsourcing.py for why that
                         mode), 100,000 events per put() as ingest_columns' batches; building its
                         event objects is done outside the timing (it is the caller's input there).

Also the peak Python memory of one ingest_columns run (tracemalloc, numpy's arrays included), and the
implementation (EVENTCORE_IMPL) in the summary. EVENTCORE_BENCH_EVENTS sets N (default 1,000,000).
"""
from __future__ import annotations

import datetime as dt
import os
import time
import tracemalloc

import psycopg
import pytest
from psycopg import sql

import eventcore as ec
from eventcore import _impl
from eventcore.formats import COPY_HEADER, COPY_TRAILER

from conftest import FIGURES, MEDIANS, RATIOS, record

np = pytest.importorskip("numpy")

N = int(os.environ.get("EVENTCORE_BENCH_EVENTS", "1000000"))
STREAMS = 1000
BATCH = 100_000
CHUNK = 256 * 1024


class Sampled(ec.Event):
    """The columns benchmark's event: four fields, one of each common column kind."""

    __event_type__ = "bench.columns.Sampled"
    sensor: str
    value: float
    seq: int
    at: dt.datetime


@pytest.fixture(scope="module")
def columns():
    seq = np.arange(N, dtype=np.int64)
    sensors = np.array([f"s{i}" for i in range(STREAMS)], dtype=object)
    return {
        "stream_ids": np.array([f"sensor-{i}" for i in range(STREAMS)], dtype=object)[seq % STREAMS],
        "data": {
            "sensor": sensors[seq % STREAMS],
            "value": seq * 0.5,
            "seq": seq,
            "at": np.datetime64("2024-01-01T00:00:00", "us") + seq * np.timedelta64(1, "ms"),
        },
    }


@pytest.fixture(scope="module")
def preencoded(columns):
    """The same rows as ingest_columns writes, COPY-encoded once, outside any timing."""
    data = columns["data"]
    sids = columns["stream_ids"].tolist()
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    us = dt.timedelta(microseconds=1)
    payloads = [_impl.encode_event(Sampled(s, v, q, epoch + a * us))[1] for s, v, q, a in zip(
        data["sensor"].tolist(), data["value"].tolist(), data["seq"].tolist(),
        data["at"].view(np.int64).tolist())]
    buf = bytearray(COPY_HEADER)
    _impl.encode_copy_rows(buf, 1, sids, _impl.assign_versions(sids, {}), _impl.new_event_ids(N),
                           [Sampled.__event_type__] * N, [1] * N, payloads, [None] * N, time.time_ns() // 1000)
    buf += COPY_TRAILER
    return [bytes(buf[i:i + CHUNK]) for i in range(0, len(buf), CHUNK)]


def _copy(dsn, schema, chunks) -> None:
    copy_sql = sql.SQL(
        "COPY {}.events (position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version) "
        "FROM STDIN (FORMAT BINARY)").format(sql.Identifier(schema))
    with psycopg.connect(dsn) as conn:
        with conn.cursor().copy(copy_sql) as copy:
            for chunk in chunks:
                copy.write(chunk)
        conn.commit()


def _count(dsn, schema) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}.events").format(sql.Identifier(schema))).fetchone()[0]


@pytest.mark.benchmark(group="columns-ingest")
def test_ingest_columns(benchmark, pg_dsn, fresh_schema, columns):
    stores = []

    def setup():
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=1)
        stores.append(store)
        return (store,), {}

    def run(store):
        return store.ingest_columns(columns["stream_ids"], Sampled, columns["data"], batch_size=BATCH)

    result = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert result.events == N and _count(pg_dsn, stores[-1].schema) == N
    for s in stores:
        s.close()
    record("ingest_columns", benchmark)
    FIGURES[f"ingest_columns ({ec.__impl__}), {N:,} events of 4 fields: events/s"] = (
        N / MEDIANS["ingest_columns"], "events/s")
    RATIOS.append(("ingest_columns vs raw COPY of the same rows pre-encoded", "ingest_columns",
                   "ingest_columns_raw", ">= 1.0x"))


@pytest.mark.benchmark(group="columns-ingest")
def test_ingest_columns_two_lanes(benchmark, pg_dsn, fresh_schema, columns):
    stores = []

    def setup():
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=2)
        stores.append(store)
        return (store,), {}

    def run(store):
        return store.ingest_columns(columns["stream_ids"], Sampled, columns["data"], batch_size=BATCH, parallel=2)

    result = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert result.events == N and _count(pg_dsn, stores[-1].schema) == N
    for s in stores:
        s.close()
    record("ingest_columns_2", benchmark)
    FIGURES[f"ingest_columns ({ec.__impl__}, parallel=2), {N:,} events of 4 fields: events/s"] = (
        N / MEDIANS["ingest_columns_2"], "events/s")
    RATIOS.append(("ingest_columns(parallel=2) vs raw COPY of the same rows pre-encoded", "ingest_columns_2",
                   "ingest_columns_raw", ">= 1.0x"))


def test_ingest_columns_peak_memory(pg_dsn, fresh_schema, columns):
    """One untimed run under tracemalloc: the Python heap's peak above what the columns hold already."""
    with ec.connect(pg_dsn, schema=fresh_schema(), pool_size=1) as store:
        tracemalloc.start()
        try:
            store.ingest_columns(columns["stream_ids"], Sampled, columns["data"], batch_size=BATCH)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    FIGURES[f"ingest_columns peak Python memory above the input, batches of {BATCH:,}"] = (peak / 2 ** 20, "MiB")


@pytest.mark.benchmark(group="columns-ingest")
def test_ingest_columns_raw_copy(benchmark, pg_dsn, fresh_schema, preencoded):
    schemas = []

    def setup():
        schemas.append(fresh_schema())
        return (schemas[-1],), {}

    benchmark.pedantic(lambda s: _copy(pg_dsn, s, preencoded), setup=setup, rounds=3, iterations=1)
    assert _count(pg_dsn, schemas[-1]) == N
    record("ingest_columns_raw", benchmark)
    FIGURES["raw psycopg COPY of the same rows, pre-encoded: events/s"] = (N / MEDIANS["ingest_columns_raw"],
                                                                          "events/s")


@pytest.mark.benchmark(group="columns-ingest")
def test_ingest_columns_eventsourcing(benchmark, pg_dsn, columns):
    es = pytest.importorskip("eventsourcing.application")
    domain = pytest.importorskip("eventsourcing.domain")
    pytest.importorskip("eventsourcing.postgres")
    import uuid

    from conftest import eventsourcing_env

    class Sensor(domain.Aggregate):
        class Sampled(domain.Aggregate.Event):
            sensor: str
            value: float
            seq: int
            at: dt.datetime

    class ColumnsPeer(es.Application):
        """The peer's application: its events table is <schema>.columnspeer_events."""

    ids = [uuid.uuid5(uuid.NAMESPACE_URL, f"sensor-{k}") for k in range(STREAMS)]
    data = columns["data"]
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    apps: list = []

    def setup():
        schema = f"bench_es_cols_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        app = ColumnsPeer(env=eventsourcing_env(pg_dsn, schema, POSTGRES_ENABLE_DB_FUNCTIONS="y",
                                                POSTGRES_POOL_SIZE="1", CREATE_TABLE="y"))
        apps.append((app, schema))
        now = dt.datetime.now(dt.timezone.utc)
        events = [Sensor.Sampled(originator_id=ids[i % STREAMS], originator_version=i // STREAMS + 1, timestamp=now,
                                 sensor=s, value=v, seq=q, at=epoch + dt.timedelta(microseconds=a))
                  for i, (s, v, q, a) in enumerate(zip(data["sensor"].tolist(), data["value"].tolist(),
                                                       data["seq"].tolist(), data["at"].view(np.int64).tolist()))]
        return (app, events), {}

    def run(app, events):
        for start in range(0, len(events), BATCH):
            app.events.put(events[start:start + BATCH])

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}.columnspeer_events").format(
                sql.Identifier(apps[-1][1]))).fetchone()[0]
        assert rows == N
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for app, schema in apps:
                app.close()
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    record("ingest_columns_eventsourcing", benchmark)
    FIGURES["eventsourcing's fastest bulk save of the same events: events/s"] = (
        N / MEDIANS["ingest_columns_eventsourcing"], "events/s")
    RATIOS.append(("ingest_columns vs eventsourcing's fastest bulk save (same events)", "ingest_columns",
                   "ingest_columns_eventsourcing", ">= 5x"))


@pytest.fixture(scope="module")
def filled(pg_dsn, preencoded):
    """A schema holding the N events (written by raw COPY), for the reads."""
    import uuid

    schema = f"bench_cols_{uuid.uuid4().hex[:10]}"
    ec.connect(pg_dsn, schema=schema, pool_size=1).close()
    _copy(pg_dsn, schema, preencoded)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as store.ingest does after a load this size
        conn.execute(sql.SQL("ANALYZE {}.events").format(sql.Identifier(schema)))
    yield schema
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.benchmark(group="columns-read")
def test_read_columns(benchmark, pg_dsn, filled, columns):
    with ec.connect(pg_dsn, schema=filled, pool_size=1) as store:
        out = benchmark.pedantic(
            lambda: store.read_columns(types=[Sampled], fields=["sensor", "value", "seq", "at"]), rounds=3,
            iterations=1)
    assert len(out["position"]) == N
    assert np.array_equal(out["seq"].filled(-1), columns["data"]["seq"])
    assert np.array_equal(out["at"].filled(np.datetime64("NaT")), columns["data"]["at"])
    record("read_columns", benchmark)
    FIGURES[f"read_columns ({ec.__impl__}), {N:,} events, 4 fields: events/s"] = (
        N / MEDIANS["read_columns"], "events/s")
    RATIOS.append(("read_columns vs read_all into objects", "read_columns", "read_all_objects", ">= 7x"))


@pytest.mark.benchmark(group="columns-read")
def test_read_columns_envelope(benchmark, pg_dsn, filled):
    with ec.connect(pg_dsn, schema=filled, pool_size=1) as store:
        out = benchmark.pedantic(lambda: store.read_columns(), rounds=3, iterations=1)
    assert len(out["position"]) == N
    record("read_columns_envelope", benchmark)
    FIGURES[f"read_columns ({ec.__impl__}), {N:,} events, the envelope alone: events/s"] = (
        N / MEDIANS["read_columns_envelope"], "events/s")


@pytest.mark.benchmark(group="columns-read")
def test_read_columns_raw_copy(benchmark, pg_dsn, filled):
    """The floor of read_columns: the server's COPY of the very columns it reads (queries.sql column_columns),
    in one statement, every message taken from libpq as the store's reader takes them, and dropped."""
    from eventcore.stores.postgres.copy_reader import _COMMAND_OK, _results
    from eventcore.stores.postgres.sql import QUERIES

    query = sql.SQL("COPY (SELECT " + QUERIES["column_columns"] + " FROM {}.events ORDER BY position) "
                    "TO STDOUT (FORMAT BINARY)").format(sql.Identifier(filled))

    def run():
        rows = 0
        with psycopg.connect(pg_dsn) as conn, conn.cursor().copy(query):
            get = conn.pgconn.get_copy_data
            while True:
                size, _ = get(0)  # 0: waits for the next message
                if size < 0:
                    break
                rows += 1
            _results(conn, conn.pgconn, (_COMMAND_OK,))  # the COPY's own result, as the store's reader reads it
        return rows

    rows = benchmark.pedantic(run, rounds=3, iterations=1)
    assert rows == N + 1  # each row one message; the trailer one more
    record("read_columns_raw", benchmark)
    FIGURES["raw COPY of read_columns' columns, read and dropped: events/s"] = (N / MEDIANS["read_columns_raw"],
                                                                              "events/s")
    RATIOS.append(("read_columns vs raw COPY of its columns (read and dropped)", "read_columns",
                   "read_columns_raw", "1.0x is the floor"))


@pytest.mark.benchmark(group="columns-read")
def test_read_all_objects(benchmark, pg_dsn, filled):
    with ec.connect(pg_dsn, schema=filled, pool_size=1) as store:
        events = benchmark.pedantic(lambda: list(store.read_all(types=[Sampled], page_size=10_000)), rounds=3,
                                    iterations=1)
    assert len(events) == N
    record("read_all_objects", benchmark)
    FIGURES[f"read_all into objects ({ec.__impl__}), {N:,} events: events/s"] = (
        N / MEDIANS["read_all_objects"], "events/s")
