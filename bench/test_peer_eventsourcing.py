"""Peer comparison for bulk ingestion: the same N events written through the `eventsourcing`
library's PostgreSQL persistence (https://pypi.org/project/eventsourcing/), on the same server.

Data: the shape bench/test_ingest.py gives eventcore. Event i goes to stream i % 1000, and its
payload holds a str, a float and an int (sensor, value, seq=i). Here a stream is an eventsourcing
aggregate: 1,000 originator ids (uuid5 of "sensor-<k>"), and event i gets originator_version
i // 1000 + 1. N = EVENTCORE_BENCH_EVENTS (default 1,000,000).

Timed: `app.events.put(events)`, one call per 10,000 events (eventcore's default ingest batch, so
both libraries commit the same size of transaction). Each call maps the domain events to stored
events with the application's own mapper (JSON transcoder), which does the same job as
eventcore's payload encoding. It then inserts them with the recorder's bulk INSERT ... unnest()
of a composite array in a single statement, and gets back the notification ids (global
positions). Untimed, done in setup: a fresh, empty schema, the Application that creates its
table, type and function there, and the N in-memory event objects. Afterwards, also untimed:
check that the table holds exactly N rows over the 1,000 aggregates, then drop the schema.

Why this mode is the fastest supported one (eventsourcing 9.5.6, psycopg 3.3):

* Caveat for readers of the comparison: this mode skips the default mode's
  LOCK TABLE ... IN EXCLUSIVE MODE, so with several concurrent writers its
  notification ids could commit out of order and a log follower could skip an
  event. It is the fastest mode, not a safe one for concurrent writers; eventcore's
  ingest keeps its never-skip guarantee while being measured.
* POSTGRES_ENABLE_DB_FUNCTIONS=y: the application recorder calls its stored function
  (one statement per batch) instead of the default pipeline of LOCK TABLE + NOTIFY + INSERT.
  The default mode is also unusable for bulk batches: with more than about 2,000-3,000 events
  in one insert_events() call, it deadlocks in psycopg's Pipeline.sync(). The client waits for
  results while the server waits in ClientRead for the rest of the parameter. The function mode
  is what eventsourcing's own speed-run examples use.
* `Application.events.put(...)` (the EventStore that Application.save() writes through) rather
  than `Application.save(*events)`. save() runs the same code after a runtime-Protocol
  isinstance() check per event, which measured about 20 % slower. Both are public API.
* Calling `recorder.insert_events()` with pre-built StoredEvents would be faster still, but it
  leaves out serialising the payloads. That is not the work eventcore's ingest is timed on.
* Batch size hardly matters here (1,000, 5,000 and 20,000 events per call measured the same
  within noise). Most of the time goes to psycopg's pure-Python text dump of the composite
  array and to the JSON transcoder. Originator ids keep the library's default UUID type.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pytest

pytest.importorskip("eventsourcing")
pytest.importorskip("eventsourcing.postgres")  # needs the [postgres] extra (psycopg 3)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from eventsourcing.application import Application  # noqa: E402
from eventsourcing.domain import Aggregate  # noqa: E402

from conftest import FIGURES, RATIOS, eventsourcing_env, record  # noqa: E402

N = int(os.environ.get("EVENTCORE_BENCH_EVENTS", "1000000"))
STREAMS = 1_000
BATCH = 10_000  # events per put() call = eventcore's default ingest batch_size

STREAM_IDS = [uuid.uuid5(uuid.NAMESPACE_URL, f"sensor-{k}") for k in range(STREAMS)]
SENSORS = [f"s{k}" for k in range(STREAMS)]


class Sensor(Aggregate):
    class Measured(Aggregate.Event):
        sensor: str
        value: float
        seq: int


class SensorIngest(Application):
    """The peer's application: its events table is <schema>.sensoringest_events."""


TABLE = "sensoringest_events"


def _env(pg_dsn: str, schema: str) -> dict[str, str]:
    """The fastest bulk mode (see the module docstring), on the benchmark server."""
    return eventsourcing_env(pg_dsn, schema, POSTGRES_ENABLE_DB_FUNCTIONS="y", POSTGRES_POOL_SIZE="1", CREATE_TABLE="y")


def _make_events(n: int) -> list:
    """Event i -> aggregate i % 1000, version i // 1000 + 1; payload (str, float, int)."""
    ts = datetime.now(timezone.utc)
    measured = Sensor.Measured
    return [
        measured(
            originator_id=STREAM_IDS[i % STREAMS],
            originator_version=i // STREAMS + 1,
            timestamp=ts,
            sensor=SENSORS[i % STREAMS],
            value=i * 0.5,
            seq=i,
        )
        for i in range(n)
    ]


def _ingest(app: SensorIngest, events: list) -> None:
    put = app.events.put
    for start in range(0, len(events), BATCH):
        put(events[start:start + BATCH])


@pytest.mark.benchmark(group="ingest")
def test_ingest_eventsourcing(benchmark, pg_dsn):
    schemas: list[str] = []
    current: dict = {}

    def finish_round() -> None:
        """Untimed: check the round wrote exactly N events, free its objects, drop its schema."""
        app = current.pop("app", None)
        if app is None:
            return
        current.pop("events").clear()  # pytest-benchmark still holds the list; free it in place
        schema = current.pop("schema")
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                rows, aggregates = conn.execute(
                    sql.SQL("SELECT count(*), count(DISTINCT originator_id) FROM {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(TABLE))).fetchone()
                assert (rows, aggregates) == (N, min(N, STREAMS)), (rows, aggregates)
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
                schemas.remove(schema)
        finally:
            app.close()

    def setup():
        finish_round()
        schema = f"bench_es_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        schemas.append(schema)
        app = SensorIngest(env=_env(pg_dsn, schema))  # creates table, type, function; opens the pool
        events = _make_events(N)
        current.update(app=app, schema=schema, events=events)
        return (app, events), {}

    try:
        benchmark.pedantic(_ingest, setup=setup, rounds=3, iterations=1)
        finish_round()
    finally:
        if "app" in current:
            current["app"].close()
        if schemas:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                for schema in schemas:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    benchmark.extra_info.update(events=N, streams=STREAMS, batch=BATCH,
                                mode="EventStore.put + POSTGRES_ENABLE_DB_FUNCTIONS=y")
    record("ingest_eventsourcing", benchmark)
    FIGURES["ingest eventsourcing: events/s"] = (N / benchmark.stats.stats.median, "events/s")


RATIOS.append(("ingest: eventcore vs eventsourcing (same events)", "ingest_eventcore", "ingest_eventsourcing", ">= 5x"))
RATIOS.append(("ingest: eventcore, 2 lanes vs eventsourcing", "ingest_eventcore_2_lanes", "ingest_eventsourcing", ">= 5x"))
