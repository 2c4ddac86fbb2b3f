"""ingest_columns hands store.ingest its rows in blocks (events.RowBlock: a chunk of rows as parallel
lists, moved into the batches a slice at a time); store.ingest of the same events one item at a time is
the reference. With the chunk made small (many blocks, batches and blocks not aligned), both write the
same events, stop at the same item with the same count committed, and resume alike: skipped counts,
lanes, `expected` checked again against what an earlier run wrote."""
from __future__ import annotations

import math

import pytest

from optional import require

np = require("numpy")

import eventcore as ec  # noqa: E402
from eventcore import columns as columns_module  # noqa: E402
from eventcore.events import RowBlock  # noqa: E402


class Reading(ec.Event):
    __event_type__ = "test.blocks.Reading"
    x: float
    n: int


N = 61


def _input(bad: int | None = None, streams: int = 4):
    ids = np.array([f"blk-{(i * 7) % streams}" for i in range(N)], dtype=object)
    x = np.arange(N, dtype=float) / 4
    if bad is not None:
        x[bad] = math.nan
    return ids, {"x": x, "n": np.arange(N, dtype=np.int64) * 3}


def _items(ids, data):
    return [(sid, Reading(float(x), int(n))) for sid, x, n in zip(ids.tolist(), data["x"].tolist(),
                                                                   data["n"].tolist())]


def _contents(store):
    return sorted((e.stream_id, e.version, e.type, e.data) for e in store.read_all(decode=False))


def _run(call):
    try:
        r = call()
    except ec.IngestError as exc:
        return ("error", exc.item, exc.committed, type(exc.__cause__).__name__)
    return ("ok", r.events, r.skipped)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(columns_module, "ENCODE_CHUNK_ROWS", 7)


def _both(store, steps):
    """Each step (bad row or None, options) run through ingest_columns on `store` and through ingest of
    the items on a memory store: the same outcomes, the same events."""
    reference = ec.connect("memory://")
    try:
        for bad, options in steps:
            ids, data = _input(bad)
            got = _run(lambda: store.ingest_columns(ids, Reading, data, **options))
            if bad is not None:  # the items path meets the bad row when it is read: the same item
                items = _items(ids, data)
                items[bad] = (ids[bad], ec.events.RawEvent(Reading.__event_type__, b'{"x":NaN}'))
            else:
                items = _items(ids, data)
            want = _run(lambda: reference.ingest(items, **options))
            assert got[:3] == want[:3], (options, got, want)
            assert _contents(store) == _contents(reference)
    finally:
        reference.close()


@pytest.mark.parametrize("parallel", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 5, 13, 1000])
def test_blocks_write_what_items_write(store, parallel, batch_size):
    _both(store, [(None, {"batch_size": batch_size, "parallel": parallel})])


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_bad_row_stops_blocks_where_it_stops_items(store, parallel):
    if parallel > 1:  # no single resume point: what is committed depends on the lanes' timing
        ids, data = _input(bad=40)
        with pytest.raises(ec.IngestError) as info:
            store.ingest_columns(ids, Reading, data, batch_size=5, parallel=parallel)
        assert info.value.item == 40 and len(_contents(store)) == info.value.committed
        return
    _both(store, [(40, {"batch_size": 6})])


@pytest.mark.parametrize("parallel", [1, 2])
def test_blocks_resume_as_items_resume(store, parallel):
    options = {"batch_size": 6, "parallel": parallel, "resume_key": f"blocks-{parallel}",
               "expected": {"blk-0": ec.NO_STREAM}}
    try:
        store.ingest([], resume_key="probe")
    except ec.ValidationError:
        pytest.skip("this store cannot resume an ingest")
    if parallel == 1:
        _both(store, [(33, options), (None, options), (None, options)])
        return
    ids, data = _input(bad=33)
    with pytest.raises(ec.IngestError):
        store.ingest_columns(ids, Reading, data, **options)
    first = len(_contents(store))
    ids, data = _input()
    again = store.ingest_columns(ids, Reading, data, **options)
    assert (again.skipped, again.events) == (first, N - first)
    stored = _contents(store)
    for sid in set(ids.tolist()):
        mine = [e for e in stored if e[0] == sid]
        assert [e[1] for e in mine] == list(range(1, len(mine) + 1))
        assert [e[3]["n"] for e in mine] == sorted(e[3]["n"] for e in mine)
    assert sorted(e[3]["n"] for e in stored) == [3 * i for i in range(N)]
    assert store.ingest_columns(ids, Reading, data, **options).skipped == N


def test_blocks_and_items_do_not_mix(store):
    block = RowBlock([ec.StreamId("mix-1")], [Reading.__event_type__], [1], [b'{"x":1.0,"n":1}'], [None])
    with pytest.raises(ec.IngestError) as info:
        store.ingest([block, ("mix-2", Reading(2.0, 2))], batch_size=1)
    assert info.value.item == 1 and "not both" in str(info.value.__cause__)
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("mix-2", Reading(2.0, 2)), block])
    assert info.value.item == 1 and info.value.committed == 0


@pytest.mark.parametrize("check", [
    lambda s: test_blocks_write_what_items_write(s, 2, 5),
    lambda s: test_blocks_resume_as_items_resume(s, 1),
    lambda s: test_blocks_resume_as_items_resume(s, 2),
    lambda s: test_a_resume_passes_over_committed_rows_without_checking_them(s, "uuid"),
], ids=["parallel", "resume", "resume_parallel", "resume_passes_over"])
def test_the_asyncio_stores_take_blocks_alike(aio_store, check):
    check(aio_store)


@pytest.mark.parametrize("key", ["blocks-pass", "uuid"])
def test_a_resume_passes_over_committed_rows_without_checking_them(store, key):
    """Rows an earlier run committed are not encoded again: one that would be refused now (a NaN) does not
    stop the resumed run, whatever form the resume key takes (a UUID is taken as its text, as ingest does)."""
    import uuid

    resume_key = uuid.UUID(int=7) if key == "uuid" else key
    try:
        store.ingest([], resume_key=resume_key)
    except ec.ValidationError:
        pytest.skip("this store cannot resume an ingest")
    ids, data = _input(bad=40)
    with pytest.raises(ec.IngestError) as info:
        store.ingest_columns(ids, Reading, data, batch_size=10, resume_key=resume_key)
    assert (info.value.item, info.value.committed) == (40, 40)
    ids, data = _input(bad=3)  # row 40 fixed; row 3, committed by the first run, now refused
    again = store.ingest_columns(ids, Reading, data, batch_size=10, resume_key=resume_key)
    assert (again.skipped, again.events) == (40, N - 40)
