"""Bulk ingestion into PostgreSQL: eventcore's `store.ingest` against the physical limit.

In one session, on the same server and the same table (a freshly migrated eventcore schema
per round, so every contender starts from an empty table with the same indexes):

* ingest_eventcore      store.ingest of N in-memory (stream, event) items: validation, ids,
                        versions, msgspec encoding, COPY framing, version-checked batches;
* ingest_raw_copy       raw psycopg `COPY ... (FORMAT BINARY)` of the very same rows,
                        pre-encoded in memory: no encoding cost at all (the limit);
* ingest_raw_bytea      the same raw COPY into the same table with bytea payload columns
                        (what jsonb costs the server);
* ingest_raw_parallel   two raw COPY streams at once, each its own transaction and streams;
* CLI                   `eventcore ingest` of an N-line gzip JSON Lines file in a subprocess,
                        with its peak memory.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import sql

import eventcore as ec
from eventcore import _impl
from eventcore._pure import codec
from eventcore.formats import COPY_HEADER, COPY_TRAILER, PG_EPOCH_OFFSET_US
from eventcore.stores.postgres import sql as pg_sql

from conftest import FIGURES, MEDIANS, RATIOS, Measured, record

N = int(os.environ.get("EVENTCORE_BENCH_EVENTS", "1000000"))
STREAMS = 1000
BATCH = 10_000
CHUNK = 256 * 1024



@pytest.fixture(scope="module")
def items():
    return [(f"sensor-{i % STREAMS}", Measured(f"s{i % STREAMS}", i * 0.5, i)) for i in range(N)]


def _chunks(buf: bytes) -> list[bytes]:
    return [buf[i:i + CHUNK] for i in range(0, len(buf), CHUNK)]


@pytest.fixture(scope="module")
def preencoded(items):
    """The same rows as eventcore writes, COPY-encoded once, outside any timing: jsonb and bytea framings."""
    sids = [s for s, _ in items]
    versions = _impl.assign_versions(sids, {})
    ids = _impl.new_event_ids(N)
    types = [e.__event_type__ for _, e in items]
    payloads = [codec.encode_event(e)[1] for _, e in items]
    at = time.time_ns() // 1000
    jsonb = bytearray(COPY_HEADER)
    _impl.encode_copy_rows(jsonb, 1, sids, versions, ids, types, [1] * N, payloads, [None] * N, at)
    jsonb += COPY_TRAILER
    # bytea framing: the same rows without jsonb's version byte.
    import struct

    bytea = bytearray(COPY_HEADER)
    ts = struct.pack(">iq", 8, at - PG_EPOCH_OFFSET_US)
    for i in range(N):
        sid, typ, data = sids[i].encode(), types[i].encode(), payloads[i]
        bytea += struct.pack(">hiqi", 9, 8, i + 1, len(sid)) + sid + struct.pack(">iqi", 8, versions[i], 16) + ids[i]
        bytea += struct.pack(">i", len(typ)) + typ + struct.pack(">i", len(data)) + data + struct.pack(">i", -1) + ts
        bytea += struct.pack(">ih", 2, 1)
    bytea += COPY_TRAILER
    half = N // 2
    halves = []
    for part in (range(0, half), range(half, N)):
        b = bytearray(COPY_HEADER)
        # disjoint streams per COPY stream: even and odd halves of the stream set
        _impl.encode_copy_rows(b, part.start + 1, [f"p{part.start}-{sids[i]}" for i in part],
                               [versions[i] for i in part], [ids[i] for i in part], [types[i] for i in part],
                               [1] * len(part), [payloads[i] for i in part], [None] * len(part), at)
        b += COPY_TRAILER
        halves.append(_chunks(bytes(b)))
    return {"jsonb": _chunks(bytes(jsonb)), "bytea": _chunks(bytes(bytea)), "halves": halves}


def _count(dsn, schema, table="events") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]


def _copy(dsn, schema, chunks, table="events") -> None:
    copy_sql = sql.SQL(
        "COPY {}.{} (position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version) "
        "FROM STDIN (FORMAT BINARY)"
    ).format(sql.Identifier(schema), sql.Identifier(table))
    with psycopg.connect(dsn) as conn:
        with conn.cursor().copy(copy_sql) as copy:
            for chunk in chunks:
                copy.write(chunk)
        conn.commit()


@pytest.mark.benchmark(group="ingest")
@pytest.mark.parametrize("lanes", [1, 2])
def test_ingest_eventcore(benchmark, pg_dsn, fresh_schema, items, lanes):
    stores = []

    def setup():
        store = ec.connect(pg_dsn, schema=fresh_schema(), pool_size=lanes)
        stores.append(store)
        return (store,), {}

    def run(store):
        return store.ingest(items, batch_size=BATCH, parallel=lanes)

    result = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert result.events == N
    assert _count(pg_dsn, stores[-1].schema) == N
    assert stores[-1].stream_version("sensor-7") == N // STREAMS
    for s in stores:
        s.close()
    name = "ingest_eventcore" if lanes == 1 else f"ingest_eventcore_{lanes}_lanes"
    record(name, benchmark)
    FIGURES[f"ingest eventcore ({ec.__impl__}), {lanes} lane(s), {N:,} events: events/s"] = (
        N / MEDIANS[name], "events/s")


@pytest.mark.benchmark(group="ingest")
def test_ingest_raw_copy(benchmark, pg_dsn, fresh_schema, preencoded):
    schemas = []

    def setup():
        schemas.append(fresh_schema())
        return (schemas[-1],), {}

    benchmark.pedantic(lambda s: _copy(pg_dsn, s, preencoded["jsonb"]), setup=setup, rounds=3, iterations=1)
    assert _count(pg_dsn, schemas[-1]) == N
    record("ingest_raw_copy", benchmark)
    FIGURES["raw psycopg COPY, pre-encoded, jsonb: events/s"] = (N / MEDIANS["ingest_raw_copy"], "events/s")


@pytest.mark.benchmark(group="ingest")
def test_ingest_raw_copy_bytea(benchmark, pg_dsn, fresh_schema, preencoded):
    schemas = []

    def setup():
        schema = fresh_schema()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(pg_sql.q(
                "CREATE TABLE {s}.events_bytea (LIKE {s}.events INCLUDING ALL);"
                "ALTER TABLE {s}.events_bytea ALTER data TYPE bytea USING convert_to(data::text, 'UTF8'),"
                " ALTER metadata TYPE bytea USING convert_to(metadata::text, 'UTF8')", schema))
        schemas.append(schema)
        return (schema,), {}

    benchmark.pedantic(lambda s: _copy(pg_dsn, s, preencoded["bytea"], "events_bytea"), setup=setup, rounds=3,
                       iterations=1)
    assert _count(pg_dsn, schemas[-1], "events_bytea") == N
    record("ingest_raw_bytea", benchmark)
    FIGURES["raw psycopg COPY, pre-encoded, bytea: events/s"] = (N / MEDIANS["ingest_raw_bytea"], "events/s")


@pytest.mark.benchmark(group="ingest")
def test_ingest_raw_copy_two_streams_in_parallel(benchmark, pg_dsn, fresh_schema, preencoded):
    schemas = []

    def setup():
        schemas.append(fresh_schema())
        return (schemas[-1],), {}

    def run(schema):
        threads = [threading.Thread(target=_copy, args=(pg_dsn, schema, half)) for half in preencoded["halves"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert _count(pg_dsn, schemas[-1]) == N
    record("ingest_raw_parallel", benchmark)
    FIGURES["raw psycopg COPY, 2 parallel streams, jsonb: events/s"] = (N / MEDIANS["ingest_raw_parallel"], "events/s")


@pytest.mark.parametrize("lanes", [None, 1])
def test_cli_ingest_file_memory_and_rate(pg_dsn, fresh_schema, tmp_path_factory, lanes):
    """`eventcore ingest` of an N-line gzip JSON Lines file, with no flags (the default lanes: two on
    PostgreSQL) and with --parallel 1: events/s and the process's peak memory. One run each (the
    file is written once per parametrisation; its time is the command's own, not the writing)."""
    path = tmp_path_factory.mktemp("ingest") / "events.jsonl.gz"
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(N):
            f.write(json.dumps({"stream": f"sensor-{i % STREAMS}", "type": "bench.Measured",
                                "data": {"sensor": f"s{i % STREAMS}", "value": i * 0.5, "seq": i}}) + "\n")
    schema = fresh_schema()
    out_path = path.with_suffix(".out")
    peak_path = path.with_suffix(".peak")
    # The command's own peak memory: VmHWM of its process image, written as it exits. (The child's
    # ru_maxrss would not do: Linux keeps it across exec, so it starts at this benchmark process's
    # size at fork, a million events in memory.)
    launcher = ("import atexit, re, runpy, sys; peak = sys.argv.pop(1); atexit.register(lambda: open(peak, 'w').write("
                "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))); "
                "sys.argv[0] = 'eventcore'; runpy.run_module('eventcore', run_name='__main__')")
    with open(out_path, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", launcher, str(peak_path), "ingest", str(path), "--dsn",
             f"{pg_dsn}&schema={schema}", "--json", "--no-progress",
             *(() if lanes is None else ("--parallel", str(lanes)))],
            stdout=out, stderr=subprocess.STDOUT,
        )
    output = out_path.read_text()
    assert proc.returncode == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["events"] == N and _count(pg_dsn, schema) == N
    peak_mb = int(peak_path.read_text()) / 1024  # VmHWM is in KiB
    label = (f"eventcore ingest FILE ({N:,}-line .jsonl.gz), "
             + (f"no flags ({summary['lanes']} lanes)" if lanes is None else f"--parallel {lanes}"))
    FIGURES[f"{label}: events/s"] = (summary["events_per_s"], "events/s")
    # As a time per N events, so that RATIOS set it against the raw COPY of the same rows.
    MEDIANS["cli_ingest_default" if lanes is None else f"cli_ingest_{lanes}_lane"] = N / summary["events_per_s"]
    FIGURES[f"{label}: peak memory (VmHWM)"] = (peak_mb, "MB")


RATIOS.append(("ingest: eventcore vs raw COPY of pre-encoded rows", "ingest_eventcore", "ingest_raw_copy", ">= 0.7x"))
RATIOS.append(("ingest: eventcore, 2 lanes vs raw COPY (1 stream)", "ingest_eventcore_2_lanes", "ingest_raw_copy", ">= 0.7x"))
RATIOS.append(("ingest: eventcore, 2 lanes vs raw COPY, 2 streams", "ingest_eventcore_2_lanes", "ingest_raw_parallel", "the limit"))
RATIOS.append(("eventcore ingest FILE, no flags vs raw COPY", "cli_ingest_default", "ingest_raw_copy", ">= 0.8x"))
RATIOS.append(("eventcore ingest FILE, --parallel 1 vs raw COPY", "cli_ingest_1_lane", "ingest_raw_copy", "one lane"))
RATIOS.append(("raw COPY: bytea vs jsonb payload columns", "ingest_raw_bytea", "ingest_raw_copy", "jsonb's cost"))
RATIOS.append(("raw COPY: 2 parallel streams vs 1", "ingest_raw_parallel", "ingest_raw_copy", "pays if > 1x"))
