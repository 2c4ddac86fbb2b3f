"""store.ingest: streaming, batch-atomic, version-checked bulk writes on every backend;
and `eventcore ingest FILE` for JSON Lines."""
from __future__ import annotations

import gzip
import json

import pytest

import eventcore as ec
from domain import Noted, assert_feed_positions, assert_gap_free, feed_positions


def _items(n, streams=7):
    for i in range(n):
        yield ec.emit(f"ing-{i % streams}", Noted(str(i)))


def test_ingest_writes_everything_in_batches(store):
    seen = []
    result = store.ingest(_items(2500), batch_size=1000, on_batch=seen.append)
    assert (result.events, result.batches) == (2500, 3)
    assert seen == [1000, 2000, 2500]
    feed = list(store.read_all())
    assert [e.data.text for e in feed] == [str(i) for i in range(2500)]
    assert (result.first_position, result.last_position) == (feed[0].position, feed[-1].position)
    assert result.events_per_s > 0 and result.duration_s > 0
    assert_gap_free(store)
    assert_feed_positions(store)


def test_ingest_accepts_tuples_raw_events_and_metadata(store):
    default = ec.Metadata(correlation_id="import-1")
    own = ec.Metadata(user_id="bob")
    items = [
        ("t-a", Noted("1")),
        ("t-a", Noted("2"), own),
        ec.emit("t-b", ec.RawEvent("test.Noted", b'{"text": "raw"}')),
        ec.emit("t-b", Noted("4"), own),
    ]
    result = store.ingest(iter(items), batch_size=3, metadata=default)
    assert (result.events, result.batches) == (4, 2)
    a, b = store.read_stream("t-a"), store.read_stream("t-b")
    assert [(e.data.text, e.metadata) for e in a] == [("1", default), ("2", own)]
    assert [(e.data.text, e.version, e.metadata) for e in b] == [("raw", 1, default), ("4", 2, own)]


def test_ingest_stops_at_a_bad_item_keeping_earlier_batches(store):
    def items():
        yield from _items(1500)
        yield ("", Noted("bad stream id"))
        yield from _items(10)

    with pytest.raises(ec.IngestError) as info:
        store.ingest(items(), batch_size=1000)
    assert (info.value.committed, info.value.item) == (1000, 1500)
    assert isinstance(info.value.__cause__, ec.ValidationError)
    assert len(feed_positions(store)) == 1000


@pytest.mark.parametrize("bad", [
    ("s", "not an event"),
    ("s", Noted("x"), "not metadata"),
    ("s",),
    ec.emit("s", ec.RawEvent("test.Noted", b"[1, 2]")),
    ec.emit("s", ec.RawEvent("test.Noted", b'{"text": ')),
    ec.emit("s", ec.RawEvent("", b"{}")),
    42,
])
def test_ingest_rejects_bad_items_with_nothing_of_the_batch_written(store, bad):
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("s", Noted("ok")), bad], batch_size=10)
    assert info.value.committed == 0 and info.value.item == 1
    assert feed_positions(store) == []


def test_ingest_checks_expected_versions(store):
    result = store.ingest(_items(20), batch_size=10, expected={"ing-3": ec.NO_STREAM, "ing-1": ec.NO_STREAM})
    assert result.events == 20
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("ing-9", Noted("new")), ("ing-3", Noted("more"))], expected={"ing-3": ec.NO_STREAM})
    cause = info.value.__cause__
    assert isinstance(cause, ec.ConcurrencyError) and (cause.stream_id, cause.expected, cause.actual) == ("ing-3", 0, 3)
    assert info.value.committed == 0
    assert store.stream_versions(["ing-3", "ing-9"]) == {"ing-3": 3, "ing-9": 0}


def test_ingest_tracks_expected_streams_across_batches(store):
    """A stream under `expected` is re-checked in every batch at the version the ingest left it."""
    def interfere(done):
        if done == 4:  # between batch 1 and batch 2, someone else writes to a checked stream
            store.append([ec.emit("ing-0", Noted("intruder"))])

    with pytest.raises(ec.IngestError) as info:
        store.ingest(_items(12, streams=2), batch_size=4, expected={"ing-0": ec.NO_STREAM}, on_batch=interfere)
    assert info.value.committed == 4
    cause = info.value.__cause__
    assert isinstance(cause, ec.ConcurrencyError)
    assert (cause.stream_id, cause.expected, cause.actual) == ("ing-0", 2, 3)


def test_ingest_is_lazy_and_bounded(store):
    produced = 0
    committed_at = []

    def items():
        nonlocal produced
        for i in range(3000):
            produced += 1
            # one batch in flight and one being filled, never more
            assert produced - (committed_at[-1] if committed_at else 0) <= 2 * 500
            yield ("lazy", Noted(str(i)))

    result = store.ingest(items(), batch_size=500, on_batch=committed_at.append)
    assert result.events == 3000 and committed_at[-1] == 3000


def test_parallel_lanes_keep_every_stream_in_order(store):
    seen = []
    result = store.ingest(_items(3000, streams=11), batch_size=200, parallel=3, on_batch=seen.append)
    assert result.events == 3000 and result.batches >= 15
    assert seen == sorted(seen) and seen[-1] == 3000
    for k in range(11):
        texts = [int(e.data.text) for e in store.read_stream(f"ing-{k}")]
        assert texts == list(range(k, 3000, 11))  # input order within each stream
    assert_gap_free(store)
    assert_feed_positions(store)
    feed = feed_positions(store)
    assert (result.first_position, result.last_position) == (feed[0], feed[-1])


def test_parallel_ingest_failure_stops_with_committed_batches_intact(store):
    def items():
        yield from _items(1000, streams=5)
        yield ("ing-1", "not an event")
        yield from _items(1000, streams=5)

    with pytest.raises(ec.IngestError) as info:
        store.ingest(items(), batch_size=100, parallel=2)
    assert info.value.item == 1000
    written = feed_positions(store)
    assert info.value.committed == len(written) <= 1000
    assert len(written) % 100 == 0  # whole batches only: a lane's partial batch is never written
    assert_gap_free(store)
    for k in range(5):
        texts = [int(e.data.text) for e in store.read_stream(f"ing-{k}")]
        assert texts == list(range(k, 5 * len(texts), 5))  # a prefix of the stream's input


def test_ingest_validates_options(store):
    for bad in (0, -1, "10", 2_000_000):
        with pytest.raises(ec.ValidationError):
            store.ingest([], batch_size=bad)
    for bad in (0, 33, "2", 1.5):
        with pytest.raises(ec.ValidationError):
            store.ingest([], parallel=bad)
    with pytest.raises(ec.IngestError):
        store.ingest([([1, 2], Noted("unhashable stream id"))])
    assert store.ingest([]).events == 0


# -- eventcore ingest FILE -------------------------------------------------------------------------

def _write_lines(path, lines, compress=False):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _line(i, stream=None):
    return {"stream": stream or f"acct-{i % 5}", "type": "test.Noted", "data": {"text": str(i)},
            "metadata": {"user_id": "loader", "custom": {"line": i + 1}}}


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request):
    """A store the command line can open too (not memory://), and its URL."""
    from conftest import BACKENDS

    store = BACKENDS[request.param](request)
    url = store.url if request.param == "sqlite" else f"{request.getfixturevalue('pg_dsn')}&schema={store.schema}"
    yield store, url
    store.close()


@pytest.mark.parametrize("compress", [False, True])
def test_cli_ingest_file(shared_store, tmp_path, capsys, compress):
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / ("events.jsonl.gz" if compress else "events.jsonl")
    _write_lines(path, [_line(i) for i in range(250)], compress)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "100", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["events"], summary["batches"], summary["rejected"], summary["error"]) == (250, 3, 0, None)
    feed = list(store.read_all())
    assert [e.data.text for e in feed] == [str(i) for i in range(250)]
    assert feed[7].metadata == ec.Metadata(user_id="loader", custom={"line": 8})
    assert_gap_free(store)


def test_cli_ingest_stops_at_a_malformed_line(shared_store, tmp_path, capsys):
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / "bad.jsonl"
    lines = [_line(i) for i in range(130)]
    lines[117] = '{"stream": "acct-1", "type": "test.Noted", "data": {"text": "x"}, "oops": 1}'
    _write_lines(path, lines)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "50", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "line 118" in err
    # batches 1-50 and 51-100 committed; nothing of the batch holding line 118
    assert [e.data.text for e in store.read_all()] == [str(i) for i in range(100)]


def test_cli_ingest_skip_invalid_writes_rejects(shared_store, tmp_path, capsys):
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / "mixed.jsonl"
    bad = ['{"stream": "", "type": "t", "data": {}}', "not json at all", '{"stream": "s", "type": "t", "data": [1]}',
           '{"stream": "s", "type": "", "data": {}}', '{"stream": "s", "type": "t"}']
    lines = [_line(0)] + bad + [_line(1), ""]
    _write_lines(path, lines)
    rejects = tmp_path / "rejects.jsonl"
    assert main(["ingest", str(path), "--dsn", dsn, "--skip-invalid", "--rejects", str(rejects), "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["events"], summary["rejected"]) == (2, 5)
    assert rejects.read_text().splitlines() == bad
    assert len(list(store.read_all())) == 2


def test_cli_ingest_errors(tmp_path, capsys):
    from eventcore.cli import main

    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--dsn", "memory://"]) == 2
    assert "cannot open" in capsys.readouterr().err
