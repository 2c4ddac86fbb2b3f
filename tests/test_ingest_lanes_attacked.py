"""Ingest holes recorded per lane and `eventcore ingest` on two lanes on PostgreSQL, attacked.

Claim: any sequence of runs of one resumable ingest (interrupted or not; lines fixed, blanked,
restored, appended) writes each input item exactly once, on any lane count.
"""
from __future__ import annotations

import collections
import random
import zlib

import pytest

import eventcore as ec
from domain import Noted


def _stream_in_lane(lane, lanes, prefix="rvl"):
    return next(sid for sid in (f"{prefix}-{n}" for n in range(10_000)) if zlib.crc32(sid.encode()) % lanes == lane)


def _written(store) -> collections.Counter:
    return collections.Counter(e.data.text for e in store.read_all())


@pytest.mark.parametrize("parallel", [2, 3])
def test_a_line_fixed_twice_into_another_lane_is_written_once(store, parallel):
    """Run 1 passes
    line 1 over (rejected); at the end every lane's count passes it, so *every* lane records hole 1.
    Run 2 has the line fixed, in lane 0: written, and only lane 0's hole is deleted. Run 3 has the
    same line fixed again (a corrected stream id), now in lane 1: lane 1 still holds its hole 1, so
    the item would be written a second time: an item written deletes its holes of every lane."""
    a, b = _stream_in_lane(0, parallel), _stream_in_lane(1, parallel)
    store.ingest([(a, Noted("0")), None, (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key="refix")
    assert store._ingest_holes("refix") == {(lane, 1) for lane in range(parallel)}
    second = store.ingest([(a, Noted("0")), (a, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel,
                          resume_key="refix")
    assert (second.events, second.skipped) == (1, 2)
    third = store.ingest([(a, Noted("0")), (b, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel,
                         resume_key="refix")
    assert _written(store) == {"0": 1, "1": 1, "2": 1}, (third, store._ingest_holes("refix"))


@pytest.mark.parametrize("parallel", [2, 3])
def test_a_fixed_line_blanked_and_restored_into_another_lane_is_written_once(store, parallel):
    """The same leftover hole reached by blanking: run 2 writes line 1 in
    lane 0 (its hole there deleted, lane 1's kept), run 3 blanks it, run 4 restores it in lane 1."""
    a, b = _stream_in_lane(0, parallel), _stream_in_lane(1, parallel)
    key = "reblank"
    store.ingest([(a, Noted("0")), None, (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key=key)
    store.ingest([(a, Noted("0")), (a, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key=key)
    store.ingest([(a, Noted("0")), None, (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key=key)
    store.ingest([(a, Noted("0")), (b, Noted("1")), (b, Noted("2"))], batch_size=1, parallel=parallel, resume_key=key)
    assert _written(store) == {"0": 1, "1": 1, "2": 1}


def _run(store, lines, key, parallel, batch_size, cut):
    """One run: `lines` (None: passed over), interrupted at index `cut` by a bad item (or not)."""
    items = list(lines)
    if cut is not None:
        items = items[:cut] + [("", Noted("bad"))] + items[cut + 1:]
    try:
        return store.ingest(items, batch_size=batch_size, parallel=parallel, resume_key=key)
    except ec.IngestError:
        return None


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_random_runs_with_each_line_on_one_stream_write_every_line_once(store, backend, parallel):
    """Guarantee (lines keep their stream): random sequences of runs, each blanking random lines
    (fixed ones, committed ones, already blank ones), interrupted at a random line or not, with lines
    appended; every line is written at most once at every step, and exactly once after a last run
    with every line present."""
    rng = random.Random(f"{backend}-{parallel}")
    scenarios = 6 if backend.startswith("postgres") else 14
    streams = [_stream_in_lane(lane, parallel, prefix=f"rnd{lane}") for lane in range(parallel)]
    for scenario in range(scenarios):
        key = f"rnd-{parallel}-{scenario}"
        n = rng.randint(3, 9)
        line_stream = [rng.choice(streams) for _ in range(n + 4)]

        def line(i):
            return (line_stream[i], Noted(f"{key}:{i}"))
        for _ in range(rng.randint(2, 5)):
            shown = n + rng.randint(0, 2)  # lines appended as runs go
            lines = [None if rng.random() < 0.35 else line(i) for i in range(shown)]
            cut = rng.randrange(shown) if rng.random() < 0.4 else None
            _run(store, lines, key, parallel, rng.choice([1, 2]), cut)
            counts = collections.Counter(t for t in _written(store).elements() if t.startswith(key + ":"))
            assert all(c == 1 for c in counts.values()), (scenario, counts, store._ingest_holes(key))
        full = n + 2
        store.ingest([line(i) for i in range(full)], batch_size=2, parallel=parallel, resume_key=key)
        counts = collections.Counter(t for t in _written(store).elements() if t.startswith(key + ":"))
        assert counts == {f"{key}:{i}": 1 for i in range(full)}, (scenario, counts)


def test_cli_default_lanes_are_the_stores_and_a_resume_keeps_the_recorded_count(pg_dsn, pg_schema):
    """Guarantee: PostgreSQL's default is 2; an ingest recorded with one lane (started before the
    default changed) is resumed with one, not refused as another lane count."""
    from eventcore.cli.ingest import _lanes

    with ec.connect(pg_dsn, schema=pg_schema) as store:
        assert store.default_ingest_lanes == 2
        assert _lanes(store, None, None) == 2
        store.ingest([("one", Noted("0")), None], parallel=1, resume_key="cli-old")
        assert _lanes(store, None, "cli-old") == 1
        again = store.ingest([("one", Noted("0")), ("one", Noted("1"))], parallel=_lanes(store, None, "cli-old"),
                             resume_key="cli-old")
        assert (again.events, again.skipped) == (1, 1)


def test_postgres_migration_8_copies_lane_less_holes_to_every_lane_of_three(pg_dsn, pg_schema):
    """Guarantee: migration 8 on a schema of version 5 with two keys (three lanes, one lane) and
    several holes: each hole in every lane of its key (max(lanes)), the primary key (key, lane, item)
    in force afterwards, the lane column without a default (a writer that names no lane fails)."""
    import pg_legacy
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        pg_legacy.make(admin, pg_schema, 5)
        s = sql.Identifier(pg_schema)
        with admin.transaction():
            admin.execute(sql.SQL("INSERT INTO {}.ingest_progress (key, lane, lanes, items) VALUES "
                                  "('three', 0, 3, 9), ('three', 1, 3, 9), ('three', 2, 3, 4), "
                                  "('one', 0, 1, 5)").format(s))
            admin.execute(sql.SQL("INSERT INTO {}.ingest_holes (key, item) VALUES "
                                  "('three', 1), ('three', 7), ('one', 2)").format(s))
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        assert store._ingest_holes("three") == {(lane, item) for lane in range(3) for item in (1, 7)}
        assert store._ingest_holes("one") == {(0, 2)}
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        with pytest.raises(psycopg.errors.NotNullViolation):
            admin.execute(sql.SQL("INSERT INTO {}.ingest_holes (key, item) VALUES ('one', 3)").format(
                sql.Identifier(pg_schema)))
        with pytest.raises(psycopg.errors.UniqueViolation):
            admin.execute(sql.SQL("INSERT INTO {}.ingest_holes (key, lane, item) VALUES ('one', 0, 2)").format(
                sql.Identifier(pg_schema)))
