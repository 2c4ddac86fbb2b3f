"""Reading by binary COPY: `decode_copy` in both twins (same events, same errors, never out of
bounds, whatever the bytes), and PostgreSQL reads that return exactly what the row path did:
filters, paging, limits, the fence, typed errors."""
from __future__ import annotations

import datetime as dt
import os
import random
import struct
import threading
import uuid

import pytest

import eventcore as ec
from eventcore import _impl, _pure
from eventcore.formats import (
    COPY_HEADER,
    COPY_SIGNATURE,
    COPY_TRAILER,
    PG_EPOCH_OFFSET_US,
    RECORDED_AT_MAX_US,
    RECORDED_AT_MIN_US,
)

try:
    from eventcore import _speedups as C
except ImportError:  # the compiled extension is part of every CI build
    if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
        raise
    C = None

TWINS = {"python": _pure.decode_copy, **({"c": C.decode_copy} if C is not None else {})}
NOW_US = 1_700_000_000_123_456


class Noted(ec.Event):
    __event_type__ = "copyread.Noted"
    text: str


class Counted(ec.Event):
    __event_type__ = "copyread.Counted"
    n: int
    ratio: float = 0.5
    tags: list[str] = []


class Blob(ec.Event):
    __event_type__ = "copyread.Blob"
    value: object = None


def _rows(events: list[tuple[str, ec.Event, ec.Metadata | None]], first: int = 1, at_us: int = NOW_US,
          versions: list[int] | None = None):
    """The same events as COPY bytes and as stored rows (formats.ROW_COLUMNS), for decode_rows."""
    sids = [s for s, _, _ in events]
    versions = versions or _pure.assign_versions(sids, {})
    ids = _pure.new_event_ids(len(events))
    encoded = [_pure.encode_event(e) for _, e, _ in events]
    mds = [_pure.encode_metadata(m) for _, _, m in events]
    buf = bytearray(COPY_HEADER)
    tvs = [type(e).__event_version__ for _, e, _ in events]
    _pure.encode_copy_rows(buf, first, sids, versions, ids, [t for t, _ in encoded], tvs, [d for _, d in encoded],
                           mds, at_us)
    buf += COPY_TRAILER
    rows = [(first + i, sids[i], versions[i], ids[i], encoded[i][0], encoded[i][1].decode(),
             None if mds[i] is None else mds[i].decode(), at_us, tvs[i]) for i in range(len(events))]
    return bytes(buf), rows


def _outcome(decode, buf):
    try:
        return "ok", decode(buf)
    except ec.SerializationError as exc:
        return type(exc).__name__, str(exc)


def _same_in_both(buf):
    outcomes = {name: _outcome(decode, buf) for name, decode in TWINS.items()}
    first = next(iter(outcomes.values()))
    assert all(o == first for o in outcomes.values()), outcomes
    return first


# -- decode_copy: the twins ------------------------------------------------------------------------

SHAPES = {
    "empty result": [],
    "one event": [("s-1", Noted("hi"), None)],
    "unicode stream ids and text": [("stream-ü-😀", Noted("naïve ☃"), None), ("x'y\"z\\", Noted(""), None),
                                    ("日本語", Noted("\u2028"), None)],
    "metadata present and absent": [
        ("m", Noted(str(i)), ec.Metadata(correlation_id=f"c{i}", causation_id="k", user_id="u",
                                         custom={"n": i, "nested": {"a": [1, 2]}}) if i % 2 else None)
        for i in range(6)],
    "many types, interleaved": [(f"t-{i % 3}", (Noted(str(i)), Counted(i, i / 3, ["a"] * (i % 4)), Blob([i]))[i % 3],
                                 None) for i in range(30)],
    "big payload": [("big", Blob("x" * 1_000_000), None), ("big", Blob({"k": list(range(10_000))}), None)],
    "many streams": [(f"stream-{i % 17}", Counted(i), None) for i in range(500)],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_both_twins_decode_copy_as_decode_rows_decodes_the_same_rows(shape):
    buf, rows = _rows(SHAPES[shape])
    want = _pure.decode_rows(rows)
    for name, decode in TWINS.items():
        for given in (buf, bytearray(buf), memoryview(buf)):
            assert decode(given) == want, name


def test_recorded_at_is_exact_over_the_whole_datetime_range():
    """C computes the calendar date itself: it must agree with Python's datetime everywhere."""
    rnd = random.Random(15)
    stamps = [RECORDED_AT_MIN_US, RECORDED_AT_MAX_US, 0, -1, 1, NOW_US, 951_782_400_000_000 - 1,  # leap day 2000
              -62_135_596_800_000_000 + 86_400_000_000 * 366, 253_402_214_400_000_000]
    stamps += [rnd.randint(RECORDED_AT_MIN_US, RECORDED_AT_MAX_US) for _ in range(300)]
    stamps += [rnd.randint(-10**15, 10**15) for _ in range(300)]
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    for at in stamps:
        buf, _ = _rows([("s", Noted("t"), None)], at_us=at)
        want = epoch + dt.timedelta(microseconds=at)
        for name, decode in TWINS.items():
            got = decode(buf)[0].recorded_at
            assert got == want and got.tzinfo is dt.timezone.utc, (name, at)


def test_each_row_keeps_its_own_recorded_at_when_they_change_from_row_to_row():
    buf, rows = bytearray(COPY_HEADER), []
    for k, at in enumerate((NOW_US, NOW_US, NOW_US + 1, NOW_US, -5, -5, RECORDED_AT_MAX_US)):
        part, part_rows = _rows([("s", Noted(str(k)), None)], first=k + 1, at_us=at, versions=[k + 1])
        buf += part[len(COPY_HEADER):-len(COPY_TRAILER)]
        rows += part_rows
    buf += COPY_TRAILER
    for name, decode in TWINS.items():
        assert decode(bytes(buf)) == _pure.decode_rows(rows), name


def test_event_ids_are_uuids_like_those_decode_rows_makes():
    buf, rows = _rows([("s", Noted(str(i)), None) for i in range(50)])
    for name, decode in TWINS.items():
        ids = [e.event_id for e in decode(buf)]
        assert ids == [uuid.UUID(bytes=r[3]) for r in rows], name
        assert all(type(u) is uuid.UUID and u.version == 7 and u.is_safe == uuid.SafeUUID.unknown for u in ids)
        assert len({hash(u) for u in ids}) == 50


def test_a_header_extension_and_unknown_compatible_flags_are_skipped():
    buf, rows = _rows([("s", Noted("a"), None)])
    body = buf[len(COPY_HEADER):]
    extended = COPY_SIGNATURE + struct.pack(">Ii", 0x0000_8001, 5) + b"extra" + body
    for name, decode in TWINS.items():
        assert decode(extended) == _pure.decode_rows(rows), name


def _corrupt_cases():
    buf, _ = _rows([("s", Noted("a"), None), ("s", Noted("b"), ec.Metadata(user_id="u"))], first=7)
    h = len(COPY_HEADER)

    def at(offset, value: bytes):
        b = bytearray(buf)
        b[offset:offset + len(value)] = value
        return bytes(b)

    # Offsets within the first row: count(2) position(4+8) sid len(4)+1 version(4+8) id(4+16) type len(4)...
    sid_len_at = h + 2 + 12
    version_len_at = sid_len_at + 4 + 1
    id_len_at = version_len_at + 12
    type_len_at = id_len_at + 20
    data_len_at = type_len_at + 4 + len("copyread.Noted")
    return {
        "empty buffer": (b"", "not a binary COPY stream"),
        "text COPY": (b"1\ts\n", "not a binary COPY stream"),
        "header only, no trailer": (COPY_HEADER, "without its trailer"),
        "OIDs flag": (COPY_SIGNATURE + struct.pack(">Ii", 1 << 16, 0) + COPY_TRAILER, "does not know"),
        "header extension past the end": (COPY_SIGNATURE + struct.pack(">Ii", 0, 99) + COPY_TRAILER, "extension"),
        "bytes after the trailer": (buf + b"\x00", "after the COPY trailer"),
        "wrong field count": (at(h, struct.pack(">h", 8)), "has 8 fields, expected 9"),
        "position of 4 bytes": (at(h + 2, struct.pack(">i", 4)), "corrupt position"),
        "NULL stream id": (at(sid_len_at, struct.pack(">i", -1)), "corrupt stream id"),
        "stream id longer than the data": (at(sid_len_at, struct.pack(">i", 10**6)), "truncated stream id"),
        "stream id not UTF-8": (at(sid_len_at + 4, b"\xff"), "not valid UTF-8"),
        "version of 9 bytes": (at(version_len_at, struct.pack(">i", 9)), "corrupt version at position 7 (stream 's')"),
        "event id of 15 bytes": (at(id_len_at, struct.pack(">i", 15)), "corrupt event id at position 7"),
        "negative type length": (at(type_len_at, struct.pack(">i", -2)), "corrupt type name at position 7"),
        "type not UTF-8": (at(type_len_at + 4, b"\xc3"), "corrupt type name at position 7"),
        "jsonb version 2": (at(data_len_at + 4, b"\x02"), "jsonb with version byte 2, expected 1"),
        "NULL data": (at(data_len_at, struct.pack(">i", -1)), "corrupt data at position 7"),
        "empty jsonb": (at(data_len_at, struct.pack(">i", 0)), "no version byte"),
        "payload not JSON": (at(data_len_at + 5, b"!"), "cannot decode event of type 'copyread.Noted' at position 7"),
        "payload not UTF-8": (at(data_len_at + 5 + len('{"text":"'), b"\xff"), "payload is not valid UTF-8"),
        "truncated inside the second row": (buf[:-12], "truncated"),
        "type version of 4 bytes": (buf[:-8] + struct.pack(">i", 4) + buf[-4:], "corrupt type version at position 8"),
        "type version of -2 bytes": (buf[:-8] + struct.pack(">i", -2) + buf[-4:], "corrupt type version at position 8"),
        "no type version": (buf[:-8] + COPY_TRAILER, "truncated type version at position 8"),
        "trailer missing": (buf[:-2], "without its trailer"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_corrupt_streams_raise_the_same_serialization_error_in_both_twins(case):
    buf, words = _corrupt_cases()[case]
    kind, message = _same_in_both(buf)
    assert kind == "SerializationError" and words in message, message


def test_timestamps_outside_pythons_range_are_corrupt_in_both_twins():
    for pg_us in (2**63 - 1, -(2**63), RECORDED_AT_MAX_US - PG_EPOCH_OFFSET_US + 1,
                  RECORDED_AT_MIN_US - PG_EPOCH_OFFSET_US - 1):
        buf, _ = _rows([("s", Noted("t"), None)])
        b = bytearray(buf)
        b[-16:-8] = struct.pack(">q", pg_us)  # recorded_at comes before the type version (6 bytes) and the trailer
        kind, message = _same_in_both(bytes(b))
        assert kind == "SerializationError" and "corrupt recorded_at at position 1 (stream 's')" in message


def test_an_unregistered_type_is_named_with_its_position_and_stream_in_both_twins():
    buf, _ = _rows([("acct-1", Noted("x"), None)], first=42)
    buf = buf.replace(b"copyread.Noted", b"copyread.Gone!")
    for decode in TWINS.values():
        with pytest.raises(ec.UnknownEventTypeError) as info:
            decode(buf)
        assert info.value.type_name == "copyread.Gone!" and "42" in str(info.value) and "acct-1" in str(info.value)


def test_every_truncation_is_a_typed_error_never_a_crash():
    buf, _ = _rows([("s", Noted("a"), ec.Metadata(correlation_id="c")), ("t", Counted(1), None)])
    for cut in range(len(buf)):
        kind, message = _same_in_both(buf[:cut])
        assert kind == "SerializationError", (cut, message)


def test_random_bit_flips_and_truncations_give_the_same_outcome_in_both_twins():
    """Fuzzing: whatever the damage, both twins agree (same events, or the same error and words)."""
    buf, _ = _rows([(f"s-{i % 3}", (Noted("é" * i), Counted(i, tags=["x"]), Blob({"a": i}))[i % 3],
                     ec.Metadata(custom={"i": i}) if i % 2 else None) for i in range(12)])
    rnd = random.Random(1515)
    for i in range(4000):
        b = bytearray(buf[:rnd.randrange(len(buf) + 1)] if i % 3 == 0 else buf)
        for _ in range(rnd.randrange(1, 5)):
            if b:
                b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        if i % 7 == 0 and b:  # a whole length field overwritten
            k = rnd.randrange(len(b))
            b[k:k + 4] = struct.pack(">i", rnd.choice((-2, -1, 0, 1, 2**31 - 1, len(b))))
        _same_in_both(bytes(b))


# -- PostgreSQL: reads by COPY return what the row path returned -----------------------------------

psycopg = pytest.importorskip("psycopg")
from eventcore.stores.postgres import sql as pg_sql  # noqa: E402


@pytest.fixture
def pg(pg_dsn, pg_schema):
    store = ec.connect(pg_dsn, schema=pg_schema)
    yield store
    store.close()


def _row_read(store, name_or_sql, params):
    """The rows as the store read them before COPY: the row statements, decode_rows."""
    text = pg_sql.q(pg_sql.QUERIES.get(name_or_sql, name_or_sql), store.schema).as_string(None)
    return _impl.decode_rows(store._fetch(text, params))


ROW_READ_STREAM = (f"SELECT {pg_sql.COLUMNS} FROM {{s}}.events WHERE stream_id = %s AND version >= %s "
                   "ORDER BY version LIMIT %s")
ROW_READ_STREAMS = f"SELECT {pg_sql.COLUMNS} FROM {{s}}.events WHERE stream_id = ANY(%s::text[]) ORDER BY position"
ODD_IDS = ["plain", "it's", 'say "hi"', "back\\slash", "per%cent", "{brace,comma}", "NULL", "ünïcødé-😀", " lead"]


def _fill(store):
    rnd = random.Random(7)
    items = []
    for i in range(240):
        sid = ODD_IDS[i % len(ODD_IDS)] + ("" if i % 4 else f"-{i % 5}")
        event = (Noted(f"n{i}'\\\""), Counted(i, i / 7, [sid]), Blob({"i": i, "s": "ü" * (i % 3)}))[rnd.randrange(3)]
        md = ec.Metadata(correlation_id=f"c{i}", custom={"i": i}) if i % 5 == 0 else None
        items.append(ec.emit(sid, event, metadata=md) if md is not None else ec.emit(sid, event))
    for k in range(0, len(items), 40):  # several transactions
        store.append(items[k:k + 40])
    return sorted({it.stream_id for it in items})


def test_postgres_read_all_by_copy_equals_the_row_path(pg):
    _fill(pg)
    for types in (None, ("copyread.Noted",), ("copyread.Counted", "copyread.Blob"), ("copyread.None",)):
        for prefix in (None, "it's", 'say "', "back\\", "per%", "{", "ünï", "nothing"):
            params = pg_sql.read_all_params(0, types, prefix, 10**6)
            want = _row_read(pg, pg_sql.read_all_sql(types is not None, prefix is not None), params)
            assert list(pg.read_all(types=types, stream_prefix=prefix)) == want, (types, prefix)
            for page_size in (1, 7):
                assert list(pg.read_all(types=types, stream_prefix=prefix, page_size=page_size)) == want
            if len(want) > 3:
                after = want[2].position
                assert list(pg.read_all(after_position=after, types=types, stream_prefix=prefix, limit=5)) == [
                    e for e in want if e.position > after][:5]
    assert list(pg.read_all(limit=0)) == []


def test_postgres_read_stream_and_read_streams_by_copy_equal_the_row_path(pg):
    streams = _fill(pg)
    for sid in streams:
        for from_version, limit in ((1, None), (2, 3), (1, 0), (10**6, None)):
            assert pg.read_stream(sid, from_version=from_version, limit=limit) == _row_read(
                pg, ROW_READ_STREAM, (sid, from_version, limit)), (sid, from_version, limit)
    got = pg.read_streams(streams + ["absent", "it''s"])
    rows = _row_read(pg, ROW_READ_STREAMS, (streams,))
    assert got == {s: [e for e in rows if e.stream_id == s] for s in streams} | {"absent": [], "it''s": []}


def test_postgres_copy_reads_keep_the_row_reads_conditions_and_the_fence():
    """The COPY statements are the row statements' SELECTs with the binary columns: the same
    conditions, the fence included, word for word."""
    for t in (False, True):
        for p in (False, True):
            copy, rows = pg_sql.copy_read_all_sql(t, p), pg_sql.read_all_sql(t, p)
            assert copy.startswith("COPY (SELECT ") and copy.endswith(") TO STDOUT (FORMAT BINARY)")
            assert pg_sql.FENCE in copy
            inner = copy[len("COPY ("):-len(") TO STDOUT (FORMAT BINARY)")]
            assert inner.replace(pg_sql.QUERIES["copy_columns"], pg_sql.COLUMNS) == rows


def test_postgres_read_all_by_copy_does_not_pass_a_transaction_still_open(pg, pg_dsn, pg_schema):
    from eventcore.stores.postgres.group_commit import _encode_group
    from eventcore.stores.prepare import prepare_append

    pg.append([ec.emit("before", Noted("0"))])
    seen = [e.position for e in pg.read_all()]
    open_tx = psycopg.connect(pg_dsn)
    try:
        p = prepare_append([ec.emit("late", Noted("A"))], {"late": ec.ANY}, None)
        open_tx.execute(pg_sql.q(pg_sql.QUERIES["append_group"], pg_schema), (_encode_group([p]),)).fetchall()
        pg.append([ec.emit("early", Noted("B"))])
        assert list(pg.read_all(after_position=seen[-1])) == []
        open_tx.commit()
    finally:
        open_tx.close()
    assert [e.data.text for e in pg.read_all(after_position=seen[-1])] == ["A", "B"]


def test_postgres_a_copy_read_past_statement_timeout_is_a_store_timeout(pg_dsn, pg_schema):
    store = ec.connect(pg_dsn, schema=pg_schema, statement_timeout=0.3)
    locker = psycopg.connect(pg_dsn)
    try:
        store.append([ec.emit("s", Noted("x"))])
        locker.execute(psycopg.sql.SQL("LOCK TABLE {}.events IN ACCESS EXCLUSIVE MODE").format(
            psycopg.sql.Identifier(pg_schema)))
        reads = (lambda: store.read_stream("s"), lambda: store.read_streams(["s"]), lambda: list(store.read_all()))
        for read in reads:
            with pytest.raises(ec.StoreTimeoutError, match="statement_timeout"):
                read()
        locker.rollback()
        assert [e.data.text for e in store.read_stream("s")] == ["x"]  # the pool's connections still work
    finally:
        locker.close()
        store.close()


def test_postgres_projection_catches_up_by_copy_and_dead_letters_keep_the_stored_row(pg):
    """A handler failure on an event read by COPY: its dead letter holds the row as stored."""
    pg.append([ec.emit("p", Counted(i, tags=["t"])) for i in range(1, 51)])

    handled = set()  # a failing batch is replayed one event at a time: some are handled twice

    def handle(event, ctx):
        if event.data.n == 13:
            raise RuntimeError("thirteen")
        handled.add(event.data.n)

    runner = ec.run_projection(pg, ec.Projector("copyread-sum", handle, on_error="skip", batch_size=20),
                               until_caught_up=True)
    assert handled == set(range(1, 51)) - {13} and runner.position == pg.head_position()
    [dead] = ec.dead_letters(pg, "copyread-sum")
    stored = next(e for e in pg.read_stream("p") if e.data.n == 13)
    assert (dead.position, dead.stream_id, dead.version, dead.event_id) == (
        stored.position, "p", stored.version, stored.event_id)
    assert "thirteen" in dead.error


def test_postgres_reads_run_concurrently_on_the_pool(pg):
    pg.append([ec.emit(f"c-{i % 4}", Counted(i)) for i in range(400)])
    want = list(pg.read_all())
    errors, results = [], []

    def reader():
        try:
            for _ in range(5):
                results.append(list(pg.read_all(page_size=50)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 20 and all(r == want for r in results)


def test_postgres_projection_page_with_an_undecodable_event_is_read_again_as_rows(pg):
    """decode_copy refuses the page (an unregistered type): the page's rows are decoded one by one,
    the undecodable event is dead-lettered as stored, the others are handled."""
    pg.append([ec.emit("u", Counted(1)), ec.emit("u", ec.RawEvent("copyread.Unknown", b'{"x": 1}')),
               ec.emit("u", Counted(3))])
    handled = []
    ec.run_projection(pg, ec.Projector("copyread-raw", lambda e, ctx: handled.append(e.data.n), on_error="skip"),
                      until_caught_up=True)
    assert handled == [1, 3]
    [dead] = ec.dead_letters(pg, "copyread-raw")
    assert (dead.version, dead.type, dead.data) == (2, "copyread.Unknown", {"x": 1})


def test_postgres_a_copy_the_server_ends_with_an_error_raises_it_and_leaves_the_connection_idle(pg_dsn):
    """Rows already streaming when statement_timeout fires: the QueryCanceled that ends the COPY is
    raised (the store makes it a StoreTimeoutError), and the connection can run the next statement."""
    from eventcore.stores.postgres.copy_reader import read_copy

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            read_copy(conn, "COPY (SELECT g, repeat('x', 9000), pg_sleep(0.01) FROM generate_series(1, 500) AS g) "
                      "TO STDOUT (FORMAT BINARY)", None)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)
        whole = read_copy(conn, "COPY (SELECT g FROM generate_series(1, %s) AS g) TO STDOUT (FORMAT BINARY)", (3,))
        assert whole.startswith(COPY_SIGNATURE) and whole.endswith(COPY_TRAILER)
        assert whole.count(b"\x00\x01\x00\x00\x00\x04") == 3  # three rows of one int4 field


def test_decode_copy_never_touches_the_cyclic_collector_and_takes_any_buffer_alike():
    """No process-wide switch: the collector's state is the caller's, whatever happens (a page, a
    corrupt page, an argument that is no buffer). Recorded events are simply not tracked by it.
    Both twins take bytes, bytearray and any memoryview (a non-contiguous one too) alike."""
    import gc

    buf, _ = _rows([("s", Noted("x"), None)])
    was = gc.isenabled()
    try:
        for decode in TWINS.values():
            for state in (True, False):
                (gc.enable if state else gc.disable)()
                assert not gc.is_tracked(decode(buf)[0])
                assert gc.isenabled() is state
                with pytest.raises(ec.SerializationError):
                    decode(buf[:-1])
                for bad in (None, "text"):
                    with pytest.raises(TypeError):
                        decode(bad)
                assert gc.isenabled() is state
    finally:
        (gc.enable if was else gc.disable)()
    spaced = bytes(b for c in buf for b in (c, 0))  # every other byte is the stream's
    outcomes = {name: _outcome(decode, memoryview(spaced)[::2]) for name, decode in TWINS.items()}
    assert all(o == _outcome(TWINS["python"], buf) for o in outcomes.values()), outcomes


def test_postgres_copy_reads_work_on_a_connection_numbered_past_select_limit(pg_dsn, pg_schema):
    """A process with over 1,024 open files gives its connections descriptors select() refuses: the
    reader waits with poll."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        store = ec.connect(pg_dsn, schema=pg_schema, pool_size=1)
        try:
            with store._pool.connection() as conn:
                assert conn.pgconn.socket > 1024
            store.append([ec.emit("fd-1", Noted(str(i))) for i in range(300)])
            assert [e.data.text for e in store.read_stream("fd-1")] == [str(i) for i in range(300)]
            assert len(list(store.read_all())) == 300
        finally:
            store.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("how", ["environment", "url", "session"])
def test_postgres_text_is_exact_whatever_client_encoding_the_user_asks_for(pg_dsn, pg_schema, monkeypatch, how):
    """Binary COPY carries text in the client's encoding; the store's connections speak UTF-8 whatever
    PGCLIENTENCODING or the URL say, and a reader whose session was switched switches it back."""
    sid = "café-é ü"
    dsn = pg_dsn
    if how == "environment":
        monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    elif how == "url":
        dsn = f"{pg_dsn}&client_encoding=LATIN1"
    store = ec.connect(dsn, schema=pg_schema)
    try:
        store.append([ec.emit(sid, Noted("naïve é ü")), ec.emit("plain", Noted("x"))])
        store.ingest([(sid, Noted("ingested ß"))])
        if how == "session":
            with store._pool.connection() as conn:
                conn.execute("SET client_encoding TO 'LATIN1'")
        for _ in range(3):  # every pooled connection
            assert [e.data.text for e in store.read_stream(sid)] == ["naïve é ü", "ingested ß"]
            assert {e.stream_id for e in store.read_all()} == {sid, "plain"}
    finally:
        store.close()


# -- short reads of streams: a prepared statement's binary rows laid out as COPY -------------------

LAYOUTS = {"python": _pure.copy_from_result, **({"c": C.copy_from_result} if C is not None else {})}


class _Result:
    """What copy_from_result reads of a libpq result (psycopg's pq.PGresult): rows of bytes or None."""

    def __init__(self, rows: list[list], fields: int | None = None) -> None:
        self.rows = rows
        self.ntuples = len(rows)
        self.nfields = fields if fields is not None else (len(rows[0]) if rows else 8)

    def get_value(self, row: int, field: int):
        return self.rows[row][field]


def test_both_twins_lay_a_result_out_as_the_copy_of_its_rows():
    buf, _ = _rows([(f"s-{i % 3}", Noted("é" * i), ec.Metadata(custom={"i": i}) if i % 2 else None)
                    for i in range(9)])
    # The same rows, cut back into values (what a binary result holds), give the same bytes back.
    values, o = [], len(COPY_HEADER)
    while buf[o:o + 2] != COPY_TRAILER:
        count, = struct.unpack_from(">h", buf, o)
        o += 2
        row = []
        for _ in range(count):
            size, = struct.unpack_from(">i", buf, o)
            o += 4
            row.append(None if size == -1 else buf[o:o + size])
            o += max(size, 0)
        values.append(row)
    for name, lay_out in LAYOUTS.items():
        assert lay_out(_Result(values)) == buf, name
        assert lay_out(_Result([])) == COPY_HEADER + COPY_TRAILER, name
        assert lay_out(_Result([[b""], [None]], 1)) == COPY_HEADER + b"\x00\x01\x00\x00\x00\x00" \
            + b"\x00\x01\xff\xff\xff\xff" + COPY_TRAILER, name


def test_both_twins_refuse_what_is_not_a_binary_value_with_the_same_error():
    outcomes = {}
    for name, lay_out in LAYOUTS.items():
        with pytest.raises(ec.SerializationError) as info:
            lay_out(_Result([[b"1", "text"]]))
        outcomes[name] = str(info.value)
        with pytest.raises(ec.SerializationError, match="32767 fields"):
            lay_out(_Result([], 40_000))
    assert len(set(outcomes.values())) == 1 and "value 1 of result row 0 is str" in outcomes["python"]


def test_postgres_a_binary_result_laid_out_is_byte_for_byte_the_copy_of_the_same_select(pg):
    """What makes the short reads right: a prepared SELECT's values in binary are exactly the fields
    a binary COPY of the same SELECT sends."""
    from eventcore.stores.postgres.copy_reader import read_copy, read_prepared

    streams = _fill(pg)
    select = pg_sql.q(f"SELECT {pg_sql.QUERIES['copy_columns']} FROM {{s}}.events ORDER BY position",
                      pg.schema).as_string(None)
    with pg._pool.connection() as conn:
        copied = bytes(read_copy(conn, f"COPY ({select}) TO STDOUT (FORMAT BINARY)", ()))
        result = read_prepared(conn, b"test_whole_table", select, [])
    assert result.ntuples == 240 and len(streams) > 10
    for name, lay_out in LAYOUTS.items():
        assert lay_out(result) == copied, name


@pytest.mark.parametrize("length_past_first_rows", [-1, 0, 1, 5 + pg_sql.FIRST_ROWS])
def test_postgres_reads_of_streams_either_side_of_the_prepared_rows_equal_the_row_path(pg, length_past_first_rows):
    """A stream read in one prepared statement, or in its first rows and the rest by COPY; several
    streams in one prepared statement, or all again by COPY; and again once the store knows which
    streams are long (it reads those by COPY at once): always what the row path reads."""
    first = pg_sql.FIRST_ROWS
    n = first + length_past_first_rows
    long_id, short_ids = 'lo"ng,{x}', ["s-1", "s-2"]
    for k in range(0, n, 100):
        pg.append([ec.emit(long_id, Counted(i)) for i in range(k, min(n, k + 100))])
    for i in range(30):
        pg.append([ec.emit(short_ids[i % 2], Noted(str(i))), ec.emit(long_id, Noted(str(i)))])
    total = n + 30
    cases = [(1, None), (1, first), (1, first - 1), (1, first + 1), (2, None), (2, first), (first, None),
             (first + 1, None), (first + 1, 3), (total, None), (total + 1, None), (1, 0), (1, total + 7)]
    for _ in range(2):
        for from_version, limit in cases:
            assert pg.read_stream(long_id, from_version=from_version, limit=limit) == _row_read(
                pg, ROW_READ_STREAM, (long_id, from_version, limit)), (from_version, limit)
        for ids in ([long_id], [long_id, *short_ids], short_ids, [short_ids[0], "absent"], ["absent", long_id]):
            rows = _row_read(pg, ROW_READ_STREAMS, (ids,))
            assert pg.read_streams(ids) == {s: [e for e in rows if e.stream_id == s] for s in ids}, ids


def test_postgres_a_read_statement_the_server_forgot_is_prepared_again(pg_dsn, pg_schema):
    store = ec.connect(pg_dsn, schema=pg_schema, pool_size=1, pool_min_size=1)
    try:
        store.append([ec.emit("s", Noted("x")), ec.emit("t", Noted("y"))])
        assert [e.data.text for e in store.read_stream("s")] == ["x"]
        with store._pool.connection() as conn:  # the pool's only connection: the one that prepared it
            conn.execute("DEALLOCATE ALL")
        assert [e.data.text for e in store.read_stream("s")] == ["x"]
        assert [len(v) for v in store.read_streams(["s", "t"]).values()] == [1, 1]
    finally:
        store.close()


def test_postgres_the_prepared_read_of_several_streams_never_walks_the_feed(pg):
    """The prepared read of several streams that are a small share of the table finds them through
    the (stream_id, version) index, also when they were appended last (it has no LIMIT: with one,
    `ANY(...) ORDER BY position LIMIT` could walk the primary key, filtering, past every earlier event)."""
    pg.append_batch([ec.emit(f"old-{i % 50}", Noted(str(i))) for i in range(10_000)])
    pg.append([ec.emit("hot", Noted(str(i))) for i in range(300)])  # appended last, 3 % of the table
    with pg._pool.connection() as conn:
        conn.execute(psycopg.sql.SQL("ANALYZE {}.events").format(psycopg.sql.Identifier(pg.schema)))
        text = pg._sql["read_streams_prepared"].replace("$1", "%s")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + text, (["hot", "old-3"],)))
    assert "events_pkey" not in plan and "Seq Scan on events" not in plan, plan
    got = pg.read_streams(["hot", "old-3"])
    assert [len(v) for v in got.values()] == [300, 200]
    assert [e.data.text for e in got["hot"]] == [str(i) for i in range(300)]


def _slow_copy(schema: str) -> str:
    """A COPY of the events' columns whose rows the server produces slowly (a sleep per row), so that
    the client runs out of received rows many times before the end: read_copy_decoded decodes parts."""
    columns = pg_sql.QUERIES["copy_columns"].replace("position", "e.position", 1)
    return (f"COPY (SELECT {columns} FROM \"{schema}\".events e "
            "CROSS JOIN LATERAL (SELECT pg_sleep(0.0005 * (e.position % 2))) AS z ORDER BY e.position) "
            "TO STDOUT (FORMAT BINARY)")


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_postgres_a_copy_decoded_in_parts_as_it_arrives_is_the_copy_decoded_whole(pg, pg_dsn, monkeypatch, twin):
    from eventcore.stores.postgres import copy_reader

    _fill(pg)
    monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", 1)
    calls = []

    def decode(buffer, raw=False):
        calls.append(len(buffer))
        return TWINS[twin](buffer, raw)

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        whole = TWINS[twin](copy_reader.read_copy(conn, _slow_copy(pg.schema), ()))
        for raw in (False, True):
            calls.clear()
            parts = copy_reader.read_copy_decoded(conn, _slow_copy(pg.schema), (), lambda b: decode(b, raw))
            assert len(calls) > 1, calls  # decoded in parts, each a whole COPY stream of its own
            assert parts == (whole if not raw else TWINS[twin](copy_reader.read_copy(conn, _slow_copy(pg.schema), ()),
                                                               True))
    assert [e.position for e in whole] == [e.position for e in pg.read_all()] and len(whole) == 240


@pytest.mark.parametrize("autocommit", [True, False])
def test_postgres_a_part_that_fails_to_decode_is_raised_after_the_copy_and_the_connection_is_usable(
        pg, pg_dsn, monkeypatch, autocommit):
    """The rest of the COPY is read, not decoded; the error raised then; the connection is idle, or
    still in its open transaction, which goes on (nothing was cancelled)."""
    from eventcore.stores.postgres import copy_reader

    _fill(pg)
    monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", 1)
    calls = []

    def decode(buffer):
        calls.append(1)
        if len(calls) == 2:
            raise ec.SerializationError("part 2 refused")
        return _impl.decode_copy(buffer)

    with psycopg.connect(pg_dsn, autocommit=autocommit) as conn:
        with pytest.raises(ec.SerializationError, match="part 2 refused"):
            copy_reader.read_copy_decoded(conn, _slow_copy(pg.schema), (), decode)
        assert len(calls) == 2
        status = psycopg.pq.TransactionStatus
        assert conn.info.transaction_status == (status.IDLE if autocommit else status.INTRANS)
        assert conn.execute("SELECT count(*) FROM " + f'"{pg.schema}".events').fetchone() == (240,)
        assert len(copy_reader.read_copy_decoded(conn, _slow_copy(pg.schema), (), _impl.decode_copy)) == 240
