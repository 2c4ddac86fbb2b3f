"""The COPY encoder, C vs its pure-Python twin, on the same 100,000 events: event ids, version
assignment, msgspec payload encoding and row framing together (encode_copy_events)."""
from __future__ import annotations

import pytest

from eventcore._pure import copy as py_copy

from conftest import FIGURES, RATIOS, Measured, record

C = pytest.importorskip("eventcore._speedups")

N = 100_000



@pytest.fixture(scope="module")
def columns():
    sids = [f"sensor-{i % 1000}" for i in range(N)]
    events = [Measured(f"s{i % 1000}", i * 0.5, i) for i in range(N)]
    mds = [None] * N
    return sids, events, mds


def _run(encode, columns):
    sids, events, mds = columns
    buf = bytearray()
    encode(buf, 1, sids, events, mds, {}, 1_700_000_000_000_000)
    return len(buf)


@pytest.mark.benchmark(group="encoder: 100k events")
@pytest.mark.parametrize("impl", ["c", "python"])
def test_encode_copy_events(benchmark, columns, impl):
    encode = C.encode_copy_events if impl == "c" else py_copy.encode_copy_events
    size = benchmark.pedantic(_run, args=(encode, columns), rounds=7, iterations=1, warmup_rounds=1)
    assert size > N * 60
    record(f"encode_{impl}", benchmark)
    FIGURES[f"encoder ({impl}): events/s"] = (N / benchmark.stats.stats.median, "events/s")


RATIOS.append(("encoder: C vs pure Python (same 100k events)", "encode_c", "encode_python", ">= 5x"))
