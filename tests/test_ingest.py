"""store.ingest: streaming, batch-atomic, version-checked bulk writes on every backend;
and `eventcore ingest FILE` for JSON Lines."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading

import pytest

import eventcore as ec
from domain import Deposited, Noted, assert_feed_positions, assert_gap_free, feed_positions


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


@pytest.mark.parametrize("parallel", [2, 3])
def test_resumed_lanes_know_a_passed_over_item_was_committed_by_another_lane(store, parallel):
    """Run 1 commits every item (some lanes get none); run 2 passes item 0 over (it is None) and gets a
    new item; run 3 restores item 0. A finished ingest leaves every lane's count at the input's end,
    so item 0 is known committed whichever lane had it: nothing is written twice."""
    sids = ["acct-0", "acct-1", "acct-2", "acct-3"]
    items = [(s, Noted(str(i))) for i, s in enumerate(sids)]
    first = store.ingest(items, parallel=parallel, resume_key="k")
    assert first.events == 4
    second = store.ingest([None] + items[1:] + [("acct-4", Noted("4"))], parallel=parallel, resume_key="k")
    assert (second.events, second.skipped) == (1, 3)
    third = store.ingest(items + [("acct-4", Noted("4"))], parallel=parallel, resume_key="k")
    assert (third.events, third.skipped) == (0, 5)
    assert sorted(e.data.text for e in store.read_all()) == ["0", "1", "2", "3", "4"]
    assert_gap_free(store)


def _stream_in_lane(lane, lanes, taken=()):
    """A stream id that ingest routes to `lane` of `lanes` (crc32 of the id, as ingest does)."""
    import zlib

    return next(sid for sid in (f"lane-{n}" for n in range(1000))
                if zlib.crc32(sid.encode()) % lanes == lane and sid not in taken)


@pytest.mark.parametrize("parallel", [2, 3])
def test_an_item_committed_by_an_interrupted_run_blanked_then_restored_is_written_once(store, parallel):
    """Run 1 commits items 0 and 1 in lane 0 and stops at a bad item, the other lanes' counts still at
    0; run 2 passes item 0 over and the other lanes' counts pass it; run 3 restores it. Lane 0 committed
    it: it is skipped (holes are the passing lane's own), and a new item in another lane is written."""
    a = _stream_in_lane(0, parallel)
    b = _stream_in_lane(1, parallel)
    items = [(a, Noted("0")), (a, Noted("1"))]
    with pytest.raises(ec.IngestError):
        store.ingest(items + [("", Noted("bad"))], batch_size=1, parallel=parallel, resume_key="cut")
    assert sorted(e.data.text for e in store.read_all()) == ["0", "1"]
    second = store.ingest([None, items[1], (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key="cut")
    assert (second.events, second.skipped) == (1, 1)
    third = store.ingest(items + [(b, Noted("2")), (b, Noted("3"))], batch_size=1, parallel=parallel,
                         resume_key="cut")
    assert (third.events, third.skipped) == (1, 3)
    assert sorted(e.data.text for e in store.read_all()) == ["0", "1", "2", "3"]
    assert_gap_free(store)


@pytest.mark.parametrize("parallel", [2, 3])
def test_an_item_passed_over_by_every_run_so_far_is_written_in_its_lane_once_restored(store, parallel):
    """Item 0 is None in runs 1 and 2 (interrupted in lane 0 only): whichever lane it turns out to be of,
    that lane's count passed it while it was passed over, so run 3 writes it, once."""
    a = _stream_in_lane(0, parallel)
    b = _stream_in_lane(1, parallel)
    with pytest.raises(ec.IngestError):
        store.ingest([None, (a, Noted("1")), ("", Noted("bad"))], batch_size=1, parallel=parallel,
                     resume_key="gap")
    store.ingest([None, (a, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key="gap")
    third = store.ingest([(b, Noted("0")), (a, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel,
                         resume_key="gap")
    assert (third.events, third.skipped) == (1, 2)
    assert [e.data.text for e in store.read_stream(b)] == ["2", "0"]
    assert store.ingest([(b, Noted("0")), (a, Noted("1")), (b, Noted("2"))], parallel=parallel,
                        resume_key="gap").events == 0


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
    """With no --parallel the store's default lanes write (two on PostgreSQL, one on SQLite): each
    stream in file order, and on one lane the whole feed."""
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / ("events.jsonl.gz" if compress else "events.jsonl")
    _write_lines(path, [_line(i) for i in range(250)], compress)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "100", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lanes = 2 if store.scheme == "postgresql" else 1
    assert (summary["events"], summary["lanes"], summary["rejected"], summary["error"]) == (250, lanes, 0, None)
    assert summary["batches"] == 3  # two lanes: acct-0..3 (200 lines) in one, acct-4 (50) in the other
    feed = list(store.read_all())
    if lanes == 1:
        assert [e.data.text for e in feed] == [str(i) for i in range(250)]
    for k in range(5):
        assert [e.data.text for e in feed if e.stream_id == f"acct-{k}"] == [str(i) for i in range(k, 250, 5)]
    assert next(e for e in feed if e.data.text == "7").metadata == ec.Metadata(user_id="loader", custom={"line": 8})
    assert_gap_free(store)


def test_cli_ingest_on_two_lanes_keeps_each_streams_order(shared_store, tmp_path, capsys):
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / "events.jsonl"
    _write_lines(path, [_line(i) for i in range(250)], False)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "100", "--parallel", "2", "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["events"], summary["lanes"]) == (250, 2)
    feed = list(store.read_all())
    assert sorted(int(e.data.text) for e in feed) == list(range(250))
    for k in range(5):
        assert [e.data.text for e in feed if e.stream_id == f"acct-{k}"] == [str(i) for i in range(k, 250, 5)]
    assert_gap_free(store)


def test_cli_resume_keeps_the_lane_count_the_ingest_was_started_with(shared_store, tmp_path):
    """An ingest started with --parallel 3 is resumed with three lanes when --parallel is not given (the
    default is 1 or 2): each stream's lane depends on the count."""
    store, dsn = shared_store
    path = tmp_path / "events.jsonl"
    _write_lines(path, [_line(i) for i in range(40)], False)
    first = _ingest_cli(path, dsn, "--parallel", "3", "--batch-size", "10")
    assert (first["rc"], first["events"], first["lanes"]) == (0, 40, 3)
    _write_lines(path, [_line(i) for i in range(60)], False)  # the file grew
    again = _ingest_cli(path, dsn, "--batch-size", "10")
    assert (again["rc"], again["events"], again["lanes"], again["error"]) == (0, 20, 3, None)
    assert sorted(int(t) for t in _texts(store)) == list(range(60))


def test_cli_ingest_stops_at_a_malformed_line(shared_store, tmp_path, capsys):
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / "bad.jsonl"
    lines = [_line(i) for i in range(130)]
    lines[117] = '{"stream": "acct-1", "type": "test.Noted", "data": {"text": "x"}, "oops": 1}'
    _write_lines(path, lines)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "50", "--parallel", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "line 118" in err
    # batches 1-50 and 51-100 committed; nothing of the batch holding line 118
    assert [e.data.text for e in store.read_all()] == [str(i) for i in range(100)]


def test_cli_ingest_stops_at_a_malformed_line_on_two_lanes(shared_store, tmp_path, capsys):
    """Whatever the lanes, what is committed of each stream is a gap-free start of its lines in file
    order, nothing from the malformed line on, and the summary counts exactly what is stored."""
    from eventcore.cli import main

    store, dsn = shared_store
    path = tmp_path / "bad.jsonl"
    lines = [_line(i) for i in range(130)]
    lines[117] = '{"stream": "acct-1", "type": "test.Noted", "data": {"text": "x"}, "oops": 1}'
    _write_lines(path, lines)
    assert main(["ingest", str(path), "--dsn", dsn, "--batch-size", "10", "--parallel", "2", "--json",
                 "--no-progress"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert "line 118" in summary["error"]
    feed = list(store.read_all())
    assert summary["events"] == len(feed) >= 100  # each lane's full batches of 10 below line 118
    for k in range(5):
        texts = [int(e.data.text) for e in feed if e.stream_id == f"acct-{k}"]
        assert texts == list(range(k, 130, 5))[:len(texts)] and all(t < 117 for t in texts)
    assert_gap_free(store)


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
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in records] == list(zip(range(2, 7), bad))
    assert all(r["reason"] for r in records)
    assert "not a valid event line" in records[1]["reason"] and "`data` must be a JSON object" in records[2]["reason"]
    assert len(list(store.read_all())) == 2


def test_cli_ingest_errors(tmp_path, capsys):
    from eventcore.cli import main

    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--dsn", "memory://"]) == 2
    assert "cannot open" in capsys.readouterr().err


# -- resuming: every line written exactly once, whatever was skipped, fixed, blanked or appended -----


def _texts(store) -> list:
    return [e.data.text for e in store.read_all()]


def _ingest_cli(path, dsn, *extra) -> dict:
    from eventcore.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["ingest", str(path), "--dsn", dsn, "--json", "--no-progress", *extra])
    summary = json.loads(out.getvalue())
    summary["rc"] = rc
    return summary


def test_cli_resume_after_skipped_line_is_fixed_writes_it_once(shared_store, tmp_path):
    """Six lines, line 3 invalid: 5 written. Fix line 3 and run again: line 3 is written, nothing twice."""
    store, dsn = shared_store
    path = tmp_path / "six.jsonl"
    lines = [_line(i) for i in range(6)]
    broken = list(lines)
    broken[2] = '{"stream": "acct-2", "type": "test.Noted", "data": "not an object"}'
    _write_lines(path, broken)
    first = _ingest_cli(path, dsn, "--batch-size", "2", "--skip-invalid", "--parallel", "1")
    assert (first["rc"], first["events"], first["rejected"]) == (0, 5, 1)
    assert _texts(store) == ["0", "1", "3", "4", "5"]
    _write_lines(path, lines)
    second = _ingest_cli(path, dsn, "--batch-size", "2", "--skip-invalid")  # resumed with the 1 lane it began with
    assert (second["rc"], second["events"], second["skipped"], second["rejected"]) == (0, 1, 5, 0)
    assert _texts(store) == ["0", "1", "3", "4", "5", "2"]
    third = _ingest_cli(path, dsn, "--batch-size", "2", "--skip-invalid")
    assert (third["events"], third["skipped"]) == (0, 6)
    assert_gap_free(store)


def test_cli_resume_after_the_first_line_is_fixed_keeps_the_key(shared_store, tmp_path):
    """The first line invalid, then fixed: the file's default resume key must not change with it."""
    store, dsn = shared_store
    path = tmp_path / "first.jsonl"
    lines = [_line(i) for i in range(5)]
    _write_lines(path, ["{broken"] + lines[1:])
    assert _ingest_cli(path, dsn, "--batch-size", "2", "--skip-invalid")["events"] == 4
    _write_lines(path, lines + [_line(5)])
    again = _ingest_cli(path, dsn, "--batch-size", "2", "--skip-invalid")
    assert (again["events"], again["skipped"]) == (2, 4)
    assert sorted(_texts(store), key=int) == [str(i) for i in range(6)]


def test_cli_another_file_at_the_same_path_is_ingested_whole(shared_store, tmp_path):
    """A rotated log (other lines at the same path) gets a resume key of its own."""
    store, dsn = shared_store
    path = tmp_path / "app.log.jsonl"
    _write_lines(path, [_line(i) for i in range(4)])
    assert _ingest_cli(path, dsn)["events"] == 4
    _write_lines(path, [_line(i) for i in range(100, 103)])
    rotated = _ingest_cli(path, dsn)
    assert (rotated["events"], rotated["skipped"]) == (3, 0)
    assert _ingest_cli(path, dsn)["events"] == 0


@pytest.mark.parametrize("parallel", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_cli_resume_any_mix_of_skipped_fixed_blank_and_grown_lines(shared_store, tmp_path, seed, parallel):
    """Runs over one file that changes between them as files do: invalid lines fixed or broken in
    another way, blank lines filled, lines appended (valid, invalid or blank), committed lines left
    alone. After the last run every line is valid and each was written exactly once."""
    import random

    rng = random.Random(seed * 10 + parallel)
    store, dsn = shared_store
    path = tmp_path / "mix.jsonl"
    state: list = []  # per line: "ok", "bad" or "blank"
    committed: set = set()

    def render():
        out = []
        for i, kind in enumerate(state):
            out.append(json.dumps(_line(i)) if kind == "ok" else
                       ("" if kind == "blank" else '{"stream": "acct-0", "type": "test.Noted", "data": 1}'))
        _write_lines(path, out)

    for run in range(5):
        for i, kind in enumerate(state):
            if i not in committed and rng.random() < 0.5:
                state[i] = rng.choice(["ok", "bad", "blank"])
        state += [rng.choice(["ok", "ok", "bad", "blank"]) for _ in range(rng.randint(1, 12))]
        if run == 0:
            state[0] = rng.choice(["ok", "bad"])
        render()
        summary = _ingest_cli(path, dsn, "--batch-size", str(rng.randint(1, 4)), "--skip-invalid",
                              "--parallel", str(parallel))
        assert summary["rc"] == 0, summary
        committed |= {i for i, kind in enumerate(state) if kind == "ok"}
        assert sorted(_texts(store), key=int) == [str(i) for i in sorted(committed)], (run, state)
    state = ["ok"] * len(state)
    render()
    final = _ingest_cli(path, dsn, "--batch-size", "3", "--skip-invalid", "--parallel", str(parallel))
    assert final["skipped"] == len(committed)
    assert sorted(_texts(store), key=int) == [str(i) for i in range(len(state))]
    assert_gap_free(store)


@pytest.mark.parametrize("seed", range(3))
def test_cli_interrupted_runs_and_committed_lines_blanked_and_restored_write_each_line_once(
        shared_store, tmp_path, seed):
    """Default lanes (two on PostgreSQL). Runs over one file that changes between them: some stop at
    the first invalid line (interrupted: each lane committed what it had flushed), others record it
    as rejected; committed lines are blanked and restored (the two anchor lines excepted), uncommitted
    ones fixed, broken or blanked, lines appended. No line is ever written twice, and once every line
    is valid the last run writes each line not yet written."""
    import random
    from collections import Counter

    rng = random.Random(seed)
    store, dsn = shared_store
    path = tmp_path / "cut.jsonl"
    state: list = ["ok", "ok"]  # per line: "ok", "bad" or "blank"; lines 0 and 1 are the key's anchors

    def render():
        _write_lines(path, [json.dumps(_line(i)) if kind == "ok" else
                            ("" if kind == "blank" else '{"stream": "acct-0", "type": "test.Noted", "data": 1}')
                            for i, kind in enumerate(state)])

    def written() -> set:
        counts = Counter(_texts(store))
        assert all(n == 1 for n in counts.values()), counts
        return {int(t) for t in counts}

    for run in range(6):
        committed = written()
        for i in range(2, len(state)):
            if i in committed:
                if rng.random() < 0.3:
                    state[i] = "blank" if state[i] == "ok" else "ok"
            elif rng.random() < 0.5:
                state[i] = rng.choice(["ok", "bad", "blank"])
        state += [rng.choice(["ok", "ok", "ok", "bad", "blank"]) for _ in range(rng.randint(3, 15))]
        render()
        strict = rng.random() < 0.5
        summary = _ingest_cli(path, dsn, "--batch-size", str(rng.randint(1, 3)),
                              *(() if strict else ("--skip-invalid",)))
        assert summary["rc"] == (1 if strict and "bad" in state else 0), summary
    state = ["ok"] * len(state)
    render()
    final = _ingest_cli(path, dsn, "--batch-size", "2")
    assert final["rc"] == 0 and final["lanes"] == store.default_ingest_lanes, final
    assert written() == set(range(len(state)))
    assert_gap_free(store)


def test_ingest_none_items_keep_their_place_and_are_written_once_fixed(store):
    """The API under the CLI: None stands for an input record passed over; a later run with the same
    resume key writes what is there by then, once."""
    items = [("s", Noted(text=str(i))) for i in range(8)]
    holes = [None if i in (0, 3, 4) else item for i, item in enumerate(items)]
    first = store.ingest(holes, batch_size=2, resume_key="holes")
    assert (first.events, first.skipped) == (5, 0)
    second = store.ingest(items, batch_size=2, resume_key="holes")
    assert (second.events, second.skipped) == (3, 5)
    assert [e.data.text for e in store.read_stream("s")] == ["1", "2", "5", "6", "7", "0", "3", "4"]
    assert store.ingest(items, batch_size=2, resume_key="holes").events == 0
    assert store.ingest(holes + [("s", Noted(text="8"))], resume_key="holes").events == 1


def test_two_runs_fixing_one_line_write_it_once(store):
    """Two overlapping runs that both find a recorded hole fixed: one writes it, the other is refused."""
    import threading

    items = [("s", Noted(text=str(i))) for i in range(4)]
    store.ingest([items[0], None, items[2], items[3]], batch_size=1, resume_key="race")
    reading = threading.Event()
    go = threading.Event()

    def slow_input():
        reading.set()
        go.wait(30)
        yield from items

    outcome: list = []

    def run():
        try:
            outcome.append(store.ingest(slow_input(), batch_size=1, resume_key="race"))
        except ec.IngestError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert reading.wait(30)  # the slow run read the recorded progress and holes before its input
    outcome.append(store.ingest(items, batch_size=1, resume_key="race"))
    go.set()
    thread.join(30)
    refused = [o for o in outcome if isinstance(o, ec.IngestError)]
    assert len(refused) == 1 and "must not overlap" in str(refused[0]), outcome
    assert sorted(e.data.text for e in store.read_stream("s")) == ["0", "1", "2", "3"]


def test_cli_resumes_under_a_key_recorded_by_an_earlier_eventcore(shared_store, tmp_path):
    """Before line-numbered anchors the default key ended in a hash of the raw first line: a file an
    earlier version ingested half-way is still resumed under that key, not written again."""
    import hashlib
    import os

    from eventcore.jsonl import parse_line

    store, dsn = shared_store
    path = tmp_path / "old.jsonl"
    _write_lines(path, [_line(i) for i in range(6)])
    raw = path.read_bytes().splitlines(keepends=True)
    real = os.path.realpath(path)
    legacy = (f"file:{os.path.basename(real)}:{hashlib.sha256(real.encode()).hexdigest()[:16]}:"
              f"{hashlib.sha256(raw[0]).hexdigest()[:16]}")
    store.ingest([parse_line(n, line.strip()) for n, line in enumerate(raw[:4], 1)], resume_key=legacy)
    summary = _ingest_cli(path, dsn)
    assert (summary["events"], summary["skipped"]) == (2, 4)
    assert _texts(store) == [str(i) for i in range(6)]


def test_cli_finishes_an_ingest_an_earlier_eventcore_started_in_its_own_count(shared_store, tmp_path):
    """An earlier eventcore counted valid lines only (a blank or rejected line took no number). An ingest it
    started, under its default key or a named one, is finished in that count: nothing written twice."""
    import hashlib
    import os

    from eventcore.jsonl import parse_line

    store, dsn = shared_store
    for named in (None, "nightly"):
        path = tmp_path / f"old-{named}.jsonl"
        base = 0 if named is None else 100
        lines = [json.dumps(_line(base)), "", "{broken", json.dumps(_line(base + 1)), "", json.dumps(_line(base + 2)),
                 json.dumps(_line(base + 3))]
        _write_lines(path, lines)
        raw = path.read_bytes().splitlines(keepends=True)
        real = os.path.realpath(path)
        key = named or (f"file:{os.path.basename(real)}:{hashlib.sha256(real.encode()).hexdigest()[:16]}:"
                        f"{hashlib.sha256(raw[0]).hexdigest()[:16]}")
        valid = [parse_line(n, line.strip()) for n, line in enumerate(raw, 1) if line.strip() and line[:2] != b"{b"]
        store.ingest(valid[:2], resume_key=key)  # the earlier run committed the first two valid lines
        extra = ["--resume-key", named] if named else []
        summary = _ingest_cli(path, dsn, "--skip-invalid", *extra)
        assert (summary["events"], summary["skipped"]) == (2, 2), summary
    assert sorted(_texts(store), key=int) == ["0", "1", "2", "3", "100", "101", "102", "103"]


def test_cli_named_resume_key_counts_lines(shared_store, tmp_path):
    """A key named with --resume-key is recorded as lines:KEY and resumes in line numbers."""
    store, dsn = shared_store
    path = tmp_path / "named.jsonl"
    lines = [json.dumps(_line(i)) for i in range(4)]
    _write_lines(path, [lines[0], "{broken", lines[2], lines[3]])
    assert _ingest_cli(path, dsn, "--skip-invalid", "--resume-key", "mine", "--batch-size", "1")["events"] == 3
    assert store._ingest_progress("lines:mine") and not store._ingest_progress("mine")
    _write_lines(path, lines)
    again = _ingest_cli(path, dsn, "--skip-invalid", "--resume-key", "mine")
    assert (again["events"], again["skipped"]) == (1, 3)
    assert sorted(_texts(store), key=int) == ["0", "1", "2", "3"]


def test_cli_rejects_file_lists_only_what_the_last_run_rejected(tmp_path):
    """A rerun after the bad line was fixed rejects nothing: the old rejects file is gone, not left to say
    line 3 is bad. A file at that path that is not a rejects list is never removed."""
    db = tmp_path / "r.db"
    path = tmp_path / "r.jsonl"
    lines = [_line(i) for i in range(4)]
    _write_lines(path, lines[:2] + ["{oops"] + lines[3:])
    rejects = tmp_path / "r.jsonl.rejects.jsonl"
    first = _ingest_cli(path, f"sqlite:///{db}", "--skip-invalid")
    assert first["rejected"] == 1 and [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [3]
    _write_lines(path, lines)
    assert _ingest_cli(path, f"sqlite:///{db}", "--skip-invalid")["events"] == 1
    assert not rejects.exists()


def test_cli_never_writes_rejects_over_a_file_that_is_not_a_rejects_list(tmp_path, capsys):
    """--rejects naming the input, the store's own SQLite file or any other file: refused before anything
    is read or written, every file left byte-identical."""
    from eventcore.cli import main

    db = tmp_path / "s.db"
    with ec.connect(f"sqlite:///{db}") as store:
        store.append([ec.emit("precious", Noted(text="keep me"))])
    path = tmp_path / "in.jsonl"
    _write_lines(path, [_line(0), "{bad", _line(2)])
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\n")
    for target in (db, path, notes, tmp_path):
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        assert main(["ingest", str(path), "--dsn", f"sqlite:///{db}", "--skip-invalid", "--rejects", str(target),
                     "--no-progress"]) == 2
        assert "is not a rejects file" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with ec.connect(f"sqlite:///{db}", migrate=False) as store:
        assert [e.data.text for e in store.read_all()] == ["keep me"]


@pytest.mark.parametrize("argv, message", [
    (["--no-resume", "--resume-key", "k"], "contradict"),
    (["--resume-key", ""], "must not be empty"),
])
def test_cli_ingest_resume_options_that_make_no_sense_are_refused(tmp_path, capsys, argv, message):
    from eventcore.cli import main

    path = tmp_path / "in.jsonl"
    _write_lines(path, [_line(0)])
    assert main(["ingest", str(path), "--dsn", f"sqlite:///{tmp_path / 's.db'}", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_cli_an_anchor_line_blanked_and_restored_keeps_the_key(shared_store, tmp_path):
    """A committed first line blanked (run 2, with a line appended) and restored (run 3): the file keeps
    its key through its second anchor line, so nothing is written twice."""
    store, dsn = shared_store
    path = tmp_path / "anchors.jsonl"
    lines = [json.dumps(_line(i)) for i in range(4)]
    _write_lines(path, lines)
    assert _ingest_cli(path, dsn)["events"] == 4
    _write_lines(path, [""] + lines[1:] + [json.dumps(_line(4))])
    second = _ingest_cli(path, dsn)
    assert (second["events"], second["skipped"]) == (1, 3)
    _write_lines(path, lines + [json.dumps(_line(4))])
    third = _ingest_cli(path, dsn)
    assert (third["events"], third["skipped"]) == (0, 5)
    assert sorted(_texts(store), key=int) == [str(i) for i in range(5)]


def test_cli_default_rejects_file_of_an_earlier_version_is_replaced(tmp_path):
    """FILE.rejects.jsonl is eventcore's own name: a list of raw lines an earlier version wrote there is
    replaced by this run's records."""
    path = tmp_path / "in.jsonl"
    _write_lines(path, [_line(0), "{bad"])
    old = tmp_path / "in.jsonl.rejects.jsonl"
    old.write_text("{bad\n")
    summary = _ingest_cli(path, f"sqlite:///{tmp_path / 's.db'}", "--skip-invalid")
    assert (summary["events"], summary["rejected"]) == (1, 1)
    assert [json.loads(x)["line"] for x in old.read_text().splitlines()] == [2]


# -- resuming through the command line and overlapping runs ---------------------------------------


def _cli_ingest_quietly(db: str, path: str) -> None:
    subprocess.run([sys.executable, "-m", "eventcore", "ingest", "--dsn", f"sqlite:///{db}", path,
                    "--no-progress", "--batch-size", "2"], capture_output=True, text=True, timeout=60)


def _numbered_line(i: int) -> str:
    return '{"stream": "s", "type": "T", "data": {"i": %d}}\n' % i


def test_cli_rerun_on_a_small_file_that_grew_writes_only_the_new_lines(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines(_numbered_line(i) for i in range(3))
    _cli_ingest_quietly(db, path)
    with open(path, "a") as f:
        f.write(_numbered_line(3))
    _cli_ingest_quietly(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 4


def test_cli_rerun_after_fixing_the_bad_line_writes_each_line_once(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines([_numbered_line(0), _numbered_line(1), _numbered_line(2), '{"stream": "s", "type": "T", "data": {"i": 3}\n', _numbered_line(4)])
    _cli_ingest_quietly(db, path)  # stops at line 4: the batch of lines 1-2 is committed
    with open(path) as f:
        text = f.read().replace('"i": 3}\n', '"i": 3}}\n')
    with open(path, "w") as f:
        f.write(text)
    _cli_ingest_quietly(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 5


def test_resumed_ingest_with_expected_finishes():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(5)]

    def killed_after(n):
        for i, item in enumerate(items):
            if i == n:
                raise RuntimeError("killed")
            yield item

    with pytest.raises(RuntimeError):
        store.ingest(killed_after(4), batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    store.ingest(items, batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    assert store.stream_version("a") == 5


def test_two_overlapping_runs_under_one_resume_key_write_each_item_once():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(6)]
    second_done = threading.Event()
    first_reading = threading.Event()  # set once the first run has read the recorded progress

    def first_input():
        first_reading.set()
        for i, item in enumerate(items):
            if i == 2:
                second_done.wait(30)
            yield item

    outcome: list = []

    def run_first():
        try:
            outcome.append(store.ingest(first_input(), batch_size=2, resume_key="r"))
        except ec.IngestError as exc:
            outcome.append(exc)

    first = threading.Thread(target=run_first)
    first.start()
    assert first_reading.wait(30)
    try:
        outcome.append(store.ingest(items, batch_size=2, resume_key="r"))
    except ec.IngestError as exc:
        outcome.append(exc)
    finally:
        second_done.set()
    first.join(30)
    assert not first.is_alive()
    # Whichever run's batch came second on a lane was refused (nothing of it written); the other
    # finished, or a rerun finishes: every item once.
    refused = [o for o in outcome if isinstance(o, ec.IngestError)]
    assert len(refused) == 1 and "must not overlap" in str(refused[0]), outcome
    store.ingest(items, batch_size=2, resume_key="r")
    assert [e.data.amount for e in store.read_stream("a")] == list(range(6))


def _lane_less_holes_resume(store, key):
    """A resume under `key` that an eventcore before per-lane holes started with two lanes: items 0-3,
    item 1 passed over (a hole then, recorded for the whole key); finished now with item 1 restored."""
    a, b = _stream_in_lane(0, 2), _stream_in_lane(1, 2)
    items = [(a, Noted("0")), (b, Noted("1")), (a, Noted("2")), (b, Noted("3"))]
    resumed = store.ingest(items, batch_size=1, parallel=2, resume_key=key)
    assert (resumed.events, resumed.skipped) == (1, 3)  # the hole is item 1's lane's: written, once
    assert sorted(e.data.text for e in store.read_all()) == ["0", "1", "2", "3"]


def test_sqlite_store_of_schema_4_keeps_its_ingest_holes_for_every_lane(tmp_path):
    """Upgrading a SQLite store whose holes have no lane copies each to every lane of its key (what it
    meant then), so an ingest it was resuming finishes writing each item once."""
    import sqlite3

    from eventcore.stores import sqlite as sqlite_store

    path = tmp_path / "holes.db"
    a, b = _stream_in_lane(0, 2), _stream_in_lane(1, 2)
    with ec.connect(f"sqlite:///{path}") as store:
        store.ingest([(a, Noted("0")), None, (a, Noted("2")), (b, Noted("3"))], batch_size=1, parallel=2,
                     resume_key="old")
    conn = sqlite3.connect(path, isolation_level=None)  # the holes table as schema 4 had it
    conn.execute("DROP TABLE ingest_holes")
    conn.execute("CREATE TABLE ingest_holes (key TEXT NOT NULL, item INTEGER NOT NULL, PRIMARY KEY (key, item)) "
                 "WITHOUT ROWID")
    conn.execute("INSERT INTO ingest_holes VALUES ('old', 1)")
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    with ec.connect(f"sqlite:///{path}") as store:
        assert store._ingest_holes("old") == {(0, 1), (1, 1)}
        _lane_less_holes_resume(store, "old")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'ingest_holes_without_lanes'").fetchone() == (0,)
    conn.close()


def test_postgres_schema_of_version_5_keeps_its_ingest_holes_for_every_lane(pg_dsn, pg_schema):
    """The same on PostgreSQL: migration 8 copies each lane-less hole to every lane of its key."""
    import pg_legacy
    import psycopg
    from psycopg import sql

    a, b = _stream_in_lane(0, 2), _stream_in_lane(1, 2)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        pg_legacy.make(admin, pg_schema, 5)
        s = sql.Identifier(pg_schema)
        with admin.transaction():  # the ingest as eventcore 5 left it: items 0, 2 (lane 0) and 3 (lane 1)
            admin.execute(sql.SQL("INSERT INTO {}.streams (stream_id, version) VALUES (%s, 2), (%s, 1)").format(s),
                          (a, b))
            admin.execute(sql.SQL(
                "INSERT INTO {}.events (position, stream_id, version, event_id, type, data) VALUES "
                "(1, %s, 1, gen_random_uuid(), 'test.Noted', '{{\"text\": \"0\"}}'), "
                "(2, %s, 2, gen_random_uuid(), 'test.Noted', '{{\"text\": \"2\"}}'), "
                "(3, %s, 1, gen_random_uuid(), 'test.Noted', '{{\"text\": \"3\"}}')").format(s), (a, a, b))
            admin.execute(sql.SQL("INSERT INTO {}.ingest_progress (key, lane, lanes, items) VALUES "
                                  "('old', 0, 2, 4), ('old', 1, 2, 4)").format(s))
            admin.execute(sql.SQL("INSERT INTO {}.ingest_holes (key, item) VALUES ('old', 1)").format(s))
    with ec.connect(pg_dsn, schema=pg_schema) as store:  # migrations 6 to the current one
        assert store._ingest_holes("old") == {(0, 1), (1, 1)}
        _lane_less_holes_resume(store, "old")
