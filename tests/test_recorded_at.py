"""recorded_at within a stream: a later version never carries an earlier time, whichever way the events were
written (commands' appends one at a time and grouped, append_batch, ingest) and however they interleave. Every
writer stamps its events once it holds the stream (PostgreSQL: clock_timestamp() after the stream locks in
append_one, append_group and reserve_append; SQLite and memory: under the write lock). Timing-dependent by
nature: a run whose writers happen not to overlap passes either way, so each round has several writers
racing on few streams."""
from __future__ import annotations

import threading

import eventcore as ec
from domain import Deposited

STREAMS = [f"stamp-{k}" for k in range(3)]


def _race(store, rounds: int = 3, per_writer: int = 40) -> dict:
    errors: list = []
    start = threading.Barrier(4)

    def appends(tag: str) -> None:  # one event at a time, versions unchecked: no writer ever waits to retry
        start.wait()
        for i in range(per_writer):
            store.append([ec.emit(STREAMS[i % 3], Deposited(i))])

    def batches(tag: str) -> None:
        start.wait()
        for i in range(per_writer // 4):
            store.append_batch([ec.emit(STREAMS[(i + k) % 3], Deposited(k)) for k in range(4)])

    def ingests(tag: str) -> None:
        start.wait()
        for i in range(per_writer // 8):
            store.ingest(((STREAMS[k % 3], Deposited(k)) for k in range(8)), batch_size=4)

    def guarded(function, tag):
        try:
            function(tag)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    for round_no in range(rounds):
        threads = [threading.Thread(target=guarded, args=(f, f"{f.__name__}-{round_no}"))
                   for f in (appends, appends, batches, ingests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    return {sid: store.read_stream(sid) for sid in STREAMS}


def test_a_streams_later_versions_never_carry_an_earlier_time(store):
    for sid, events in _race(store).items():
        assert [e.version for e in events] == list(range(1, len(events) + 1))
        stamps = [e.recorded_at for e in events]
        assert stamps == sorted(stamps), f"recorded_at goes back within {sid}"
