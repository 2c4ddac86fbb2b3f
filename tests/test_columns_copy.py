"""`decode_copy_columns`, both twins: a COPY stream of the events' columns decoded straight into numpy columns
is what `decode_copy` then `fill_columns` make of it, and a corrupt stream fails alike in both, never out of
bounds. (read_columns on PostgreSQL reads through it: tests/test_columns.py.)"""
from __future__ import annotations

import os
import random

import pytest

np = pytest.importorskip("numpy")

from eventcore import _pure  # noqa: E402
from eventcore.columns import read_plan  # noqa: E402
from test_copy_read import SHAPES, Blob, Counted, Noted, _rows  # noqa: E402

try:
    from eventcore import _speedups as C
except ImportError:  # the compiled extension is part of every CI build
    if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
        raise
    C = None

TWINS = {"python": _pure.decode_copy_columns, **({"c": C.decode_copy_columns} if C is not None else {})}
FIELDS = ("text", "n", "ratio", "tags", "value")


def _columns_layout(buf: bytes, with_data: bool = True) -> bytes:
    """A COPY stream of the events' columns (formats.COPY_FIELDS) as read_columns' COPY sends the same rows
    (formats.COLUMNS_COPY_FIELDS; queries.sql column_columns, or envelope_columns: the payload NULL)."""
    import struct

    from eventcore.formats import COLUMNS_COPY_FIELDS, COPY_FIELDS, COPY_HEADER, COPY_TRAILER

    o = len(COPY_HEADER)
    out = bytearray(COPY_HEADER)
    while True:
        (count,) = struct.unpack_from(">h", buf, o)
        o += 2
        if count == -1:
            break
        assert count == COPY_FIELDS
        fields = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", buf, o)
            o += 4
            fields.append(None if size < 0 else buf[o:o + size])
            o += max(size, 0)
        position, sid, version, _, type_name, data, _, recorded, type_version = fields
        out += struct.pack(">h", COLUMNS_COPY_FIELDS)
        for value in (position, sid, version, type_name, data if with_data else None, recorded, type_version):
            out += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    out += COPY_TRAILER
    return bytes(out)


def _arrays(plan, n):
    envelope, outs, masks = plan.allocate(np, n)
    return envelope, outs, masks


def _as_lists(envelope, outs, masks, used):
    """The arrays' first `used` entries as lists (NaN compared by its repr: NaN != NaN)."""
    return [[repr(x) if isinstance(x, float) else x for x in a[:used].tolist()] for a in (*envelope, *outs, *masks)]


def _expected(buf, plan, offset, n):
    events = _pure.decode_copy(buf)
    envelope, outs, masks = _arrays(plan, n)
    _pure.fill_columns(events, offset, plan.fields, plan.kinds, envelope, outs, masks)
    return events, envelope, outs, masks


def _outcome(decode, buf, plan, offset, n):
    envelope, outs, masks = _arrays(plan, n)
    try:
        got = decode(buf, offset, plan.fields, plan.kinds, envelope, outs, masks)
    except Exception as exc:  # noqa: BLE001 - compared between the twins
        return type(exc).__name__, str(exc)
    return got, _as_lists(envelope, outs, masks, offset + got[0])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fields", [FIELDS, ()], ids=["fields", "envelope only"])
def test_both_twins_write_what_decode_copy_and_fill_columns_write(shape, fields):
    full, _ = _rows(SHAPES[shape])
    plan = read_plan([Noted, Counted, Blob], fields)
    offset = 3
    n = offset + len(SHAPES[shape]) + 2
    events, *want = _expected(full, plan, offset, n)
    # What read_columns' COPY sends: the payload always when fields are read; without them, either.
    for buf in ((_columns_layout(full),) if fields else (_columns_layout(full), _columns_layout(full, False))):
        _check_twins(buf, plan, offset, n, events, want)


def _check_twins(buf, plan, offset, n, events, want):
    want_lists = _as_lists(*want, offset + len(events))
    for name, decode in TWINS.items():
        for given in (buf, bytearray(buf), memoryview(buf)):
            got = _outcome(decode, given, plan, offset, n)
            assert got[0] == (len(events), events[-1].position if events else 0), name
            # rows before `offset` are left as they were (np.empty): compare from offset on
            assert [a[offset:] for a in got[1]] == [a[offset:] for a in want_lists], name


def test_no_room_left_is_a_value_error_in_both():
    buf = _columns_layout(_rows(SHAPES["many types, interleaved"])[0])
    plan = read_plan([Noted, Counted, Blob], FIELDS)
    outcomes = {name: _outcome(decode, buf, plan, 25, 30) for name, decode in TWINS.items()}
    assert {o[0] for o in outcomes.values()} == {"ValueError"}
    assert len({o for o in outcomes.values()}) == 1, outcomes


def test_columns_of_another_length_are_refused_in_both():
    buf = _columns_layout(_rows(SHAPES["one event"])[0])
    plan = read_plan([Noted, Counted, Blob], FIELDS)
    for name, decode in TWINS.items():
        envelope, outs, masks = _arrays(plan, 4)
        outs[1] = np.empty(3, np.int64)
        with pytest.raises(ValueError):
            decode(buf, 0, plan.fields, plan.kinds, envelope, outs, masks)


def test_corrupt_streams_fail_alike_in_both_twins():
    """Random truncations and byte flips of real streams: the same rows or the same error, in both."""
    rnd = random.Random(20)
    plan = read_plan([Noted, Counted, Blob], FIELDS)
    bases = [_columns_layout(_rows(SHAPES[s])[0]) for s in ("many types, interleaved", "metadata present and absent",
                                                            "unicode stream ids and text")]
    envelope = read_plan([Noted, Counted, Blob], ())
    for i in range(400):
        if i % 4 == 3:  # the envelope alone: a stream with and one without payloads
            plan_i = envelope
            base = rnd.choice(bases + [_columns_layout(_rows(SHAPES["many types, interleaved"])[0], False)])
        else:
            plan_i, base = plan, rnd.choice(bases)
        buf = bytearray(base)
        if i % 3 == 0:
            buf = buf[:rnd.randrange(len(buf))]
        else:
            for _ in range(rnd.randint(1, 3)):
                buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        outcomes = {name: _outcome(decode, bytes(buf), plan_i, 0, 40) for name, decode in TWINS.items()}
        first = next(iter(outcomes.values()))
        assert all(o == first for o in outcomes.values()), (i, outcomes)


def test_postgres_reads_columns_by_copy_as_the_row_path_fills_them(pg_dsn, pg_schema):
    """On PostgreSQL each page's COPY is decoded straight into the columns: the same arrays as read_all's
    events written into them, for filters, limits and pages that end anywhere."""
    import eventcore as ec
    from eventcore import columns

    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit(f"acct-{i % 7}", Counted(i, i / 7, ["t"] * (i % 3))) for i in range(120)])
        store.append([ec.emit(f"note-{i % 3}", Noted(f"n{i}")) for i in range(30)])
        store.append([ec.emit("acct-1", Blob({"k": i})) for i in range(5)])
        assert store._read_columns_page is not None
        for kw in ({}, {"types": [Counted], "fields": ["n", "ratio", "tags"]},
                   {"types": [Counted, Noted], "fields": ["n", "text"], "page_size": 13},
                   {"types": [Counted], "fields": ["n"], "stream_prefix": "acct-3", "limit": 9, "page_size": 4},
                   {"after_position": store.head_position() - 3, "types": [Blob], "fields": ["value"]},
                   {"limit": 0}):
            direct = store.read_columns(**kw)
            generic = columns.read_columns(store, **kw)  # no `checked`: through read_all's events
            assert list(direct) == list(generic)
            for name in direct:
                assert repr(direct[name].tolist()) == repr(generic[name].tolist()), (kw, name)
                if isinstance(generic[name], np.ma.MaskedArray):
                    assert np.ma.getmaskarray(direct[name]).tolist() == np.ma.getmaskarray(generic[name]).tolist()


def test_an_ingest_that_grows_the_events_table_by_a_tenth_analyzes_it(pg_dsn, pg_schema):
    """Until the table is analyzed, PostgreSQL plans each page of a read as a sort of the whole feed: an
    ingest that grows it by more than a tenth of what its statistics count analyzes it at once; a
    small one leaves it to autovacuum."""
    import psycopg

    import eventcore as ec
    from eventcore.stores.postgres.store import ANALYZE_MIN_EVENTS

    def analyzed(conn):
        return conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = %s AND c.relname = 'events'", (pg_schema,)).fetchone()[0]

    with ec.connect(pg_dsn, schema=pg_schema) as store, psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{pg_schema}".events SET (autovacuum_enabled = false)')
        store.ingest(("small", Noted("x")) for _ in range(ANALYZE_MIN_EVENTS - 1))
        assert analyzed(conn) <= 0  # never analyzed (-1 on PostgreSQL 14 and later)
        store.ingest((f"s-{i % 50}", Counted(i)) for i in range(ANALYZE_MIN_EVENTS))
        assert analyzed(conn) == 2 * ANALYZE_MIN_EVENTS - 1
        store.ingest(("more", Noted("y")) for _ in range(ANALYZE_MIN_EVENTS))  # +50 %: again
        assert analyzed(conn) == 3 * ANALYZE_MIN_EVENTS - 1
        # The columns the reads filter and order on have statistics; the payloads are not sampled.
        columns = {c for (c,) in conn.execute("SELECT attname FROM pg_stats WHERE schemaname = %s AND "
                                              "tablename = 'events'", (pg_schema,))}
        assert {"position", "stream_id", "version", "type"} <= columns and not columns & {"data", "metadata"}


def test_an_asyncio_ingest_that_grows_the_events_table_analyzes_it(pg_dsn, pg_schema):
    """The asyncio PostgreSQL store's ingest analyzes the events table as the sync store's does."""
    import asyncio

    import psycopg

    import eventcore.aio as eca
    from eventcore.stores.postgres.store import ANALYZE_MIN_EVENTS

    async def main():
        async with await eca.connect(pg_dsn, schema=pg_schema) as store:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute(f'ALTER TABLE "{pg_schema}".events SET (autovacuum_enabled = false)')
            await store.ingest(("small", Noted("x")) for _ in range(ANALYZE_MIN_EVENTS - 1))
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                assert analyzed(conn) <= 0
            await store.ingest((f"s-{i % 50}", Counted(i)) for i in range(ANALYZE_MIN_EVENTS))
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                assert analyzed(conn) == 2 * ANALYZE_MIN_EVENTS - 1

    def analyzed(conn):
        return conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = %s AND c.relname = 'events'", (pg_schema,)).fetchone()[0]

    asyncio.run(main())


def test_the_asyncio_postgres_store_reads_columns_by_copy_alike(pg_dsn, pg_schema):
    """The asyncio PostgreSQL store decodes each page's COPY straight into the columns too: the same arrays as
    the sync store's, for filters, limits and pages that end anywhere."""
    import asyncio

    import eventcore as ec
    import eventcore.aio as eca

    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit(f"acct-{i % 5}", Counted(i, i / 5)) for i in range(60)])
        store.append([ec.emit(f"note-{i % 2}", Noted(f"n{i}")) for i in range(9)])
        cases = ({}, {"types": [Counted], "fields": ["n", "ratio"], "page_size": 7},
                 {"types": [Counted, Noted], "fields": ["n", "text"], "limit": 20, "page_size": 6},
                 {"types": [Counted], "fields": ["n"], "stream_prefix": "acct-2"}, {"limit": 0})
        want = [store.read_columns(**kw) for kw in cases]

    async def run():
        async with await eca.connect(pg_dsn, schema=pg_schema) as astore:
            assert astore._read_columns_page is not None
            return [await astore.read_columns(**kw) for kw in cases]

    for kw, w, g in zip(cases, want, asyncio.run(run())):
        assert list(w) == list(g)
        for name in w:
            assert repr(w[name].tolist()) == repr(g[name].tolist()), (kw, name)


def test_a_row_without_its_payload_is_corrupt_when_fields_are_read_in_both_twins():
    """envelope_columns sends no payload; a stream of those rows read for fields fails alike in both twins,
    naming the payload."""
    from eventcore.errors import SerializationError

    buf = _columns_layout(_rows(SHAPES["many types, interleaved"])[0], with_data=False)
    plan = read_plan([Noted, Counted, Blob], FIELDS)
    outcomes = {name: _outcome(decode, buf, plan, 0, 40) for name, decode in TWINS.items()}
    assert {o[0] for o in outcomes.values()} == {SerializationError.__name__}
    assert len(set(outcomes.values())) == 1 and "corrupt data" in next(iter(outcomes.values()))[1], outcomes


def test_read_columns_statements_are_read_alls_with_other_columns():
    """read_columns reads by read_all's own statements (conditions, fence, order, parameters) with its own
    columns, in the layout both decoders read: seven of them, the payload fifth, NULL without fields."""
    from eventcore.formats import COLUMNS_COPY_FIELDS
    from eventcore.stores.postgres.sql import copy_read_all_sql, copy_read_columns_sql

    def select_list(statement):
        text = statement.split("SELECT ", 1)[1].split(" FROM ", 1)[0]
        names, depth, current = [], 0, ""
        for ch in text:  # split on the commas outside parentheses (nullif(type_version, 1))
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                names.append(current.strip())
                current = ""
            else:
                current += ch
        return names + [current.strip()]

    for t in (False, True):
        for p in (False, True):
            events = copy_read_all_sql(t, p)
            for with_data in (True, False):
                statement = copy_read_columns_sql(t, p, with_data)
                assert statement.split(" FROM ", 1)[1] == events.split(" FROM ", 1)[1]
                columns = select_list(statement)
                assert len(columns) == COLUMNS_COPY_FIELDS
                assert columns[:4] == ["position", "stream_id", "version", "type"]
                assert columns[4] == ("data" if with_data else "NULL::jsonb")
                assert "event_id" not in columns and "metadata" not in columns
