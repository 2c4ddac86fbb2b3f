"""Bad input gets a typed error that names the problem, and nothing is written.

Payloads JSON cannot hold (NaN, infinity, lone surrogates), PostgreSQL cannot hold (NUL) or
no event should be (over 16 MiB, nested past the recursion limit); RawEvent data and JSON
lines that are not valid UTF-8 JSON objects; bad type names and stream ids; batches over the
limits; corrupted stored rows (SQLite and PostgreSQL, written behind the store's back); bad
URLs and options on the command line. Every test that feeds a store bad input checks that the
head position and the stream versions did not move.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import sqlite3
import subprocess
import sys
from typing import Any

import msgspec
import pytest

import eventcore as ec
from domain import Noted, Opaque
from eventcore.payloads import MAX_PAYLOAD_BYTES
from eventcore.jsonl import BadLine, JsonLinesReader, parse_line
from eventcore.stores.prepare import MAX_EVENTS_PER_APPEND, MAX_EVENTS_PER_BATCH

emit = ec.emit
NESTING = 10_000  # far past Python's recursion limit (1,000 by default)


class Reading(ec.Event):
    """An event with a float and a free-form field: where NaN and infinity can hide."""

    __event_type__ = "test.bad.Reading"
    value: float
    extra: Any = None


class Emit(ec.Command):
    """Emits whatever event it is given to its one stream (a command that produces bad input)."""

    stream: ec.StreamId
    event: Any

    def initial_state(self):
        return None

    def apply(self, state, event):
        return state

    def handle(self, state):
        return [emit(self.stream, self.event)]


def _state(store, streams=("ok", "s", "other")):
    """Head position, the feed and the versions of the streams the tests write to."""
    feed = [(e.position, e.stream_id, e.version, e.event_id) for e in store.read_all()]
    return store.head_position(), feed, store.stream_versions(list(streams))


def _nested_list(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _nested_dict(depth):
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _refused_everywhere(store, event, error=ec.SerializationError, metadata=None, fragments=()):
    """`event` (to stream "s") is refused by append, append_batch, ingest and execute with `error`
    whose message holds every fragment; returns nothing written."""
    before = _state(store)
    messages = []
    with pytest.raises(error) as info:
        store.append([emit("ok", Noted("fine")), emit("s", event, metadata)])
    messages.append(str(info.value))
    with pytest.raises(error) as info:
        store.append_batch([emit("ok", Noted("fine")), emit("s", event, metadata)])
    messages.append(str(info.value))
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("ok", Noted("fine")), ("s", event, metadata)], batch_size=10)
    assert isinstance(info.value.__cause__, error) and info.value.committed == 0
    messages.append(str(info.value.__cause__))
    if metadata is None:
        with pytest.raises(error) as info:
            ec.execute(store, Emit(stream=ec.StreamId("s"), event=event))
        messages.append(str(info.value))
    for message in messages:
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    assert _state(store) == before
    return messages


# -- payloads: NaN and infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_infinity_in_payloads_are_refused(store, value):
    """msgspec writes them as null; they would come back as None, or not decode at all."""
    store.append([emit("ok", Noted("first"))])
    _refused_everywhere(store, Reading(value), fragments=("test.bad.Reading", "at value", "NaN or infinity"))
    _refused_everywhere(store, Reading(1.0, {"points": [1.5, {"y": value}]}),
                        fragments=("test.bad.Reading", "extra['points'][1]['y']"))
    _refused_everywhere(store, Opaque(value=(1, value)), fragments=("test.Opaque", "value[1]"))


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_and_infinity_in_metadata_are_refused(store, value):
    store.append([emit("ok", Noted("first"))])
    bad = ec.Metadata(user_id="u", custom={"score": [value]})
    _refused_everywhere(store, Noted("x"), metadata=bad, fragments=("metadata", "custom['score'][0]"))
    before = _state(store)
    with pytest.raises(ec.SerializationError, match="NaN or infinity"):
        store.append([emit("s", Noted("x"))], metadata=bad)  # the call's default metadata
    with pytest.raises(ec.SerializationError, match="NaN or infinity"):
        ec.execute(store, Emit(stream=ec.StreamId("s"), event=Noted("x")), metadata=bad)
    assert _state(store) == before


def test_null_and_finite_floats_still_round_trip(store):
    """The NaN check confirms a `null` on the object: a real None (or a float) is never refused."""
    events = [Reading(1e308, None), Reading(-0.0, [None, 2.5, {"k": None}]), Opaque(value=None),
              Noted("null"), Noted("back\\u0000slash")]  # a backslash before u0000 is no NUL
    out = store.append([emit("s", e) for e in events], metadata=ec.Metadata(custom={"n": None, "f": 0.5}))
    assert [e.data for e in store.read_stream("s")] == events
    assert store.read_stream("s")[0].metadata.custom == {"n": None, "f": 0.5}
    assert len(out) == len(events)


# -- payloads: NUL, lone surrogates, size, nesting --------------------------------------------------------


@pytest.mark.parametrize("event, fragments", [
    pytest.param(Noted("a\x00b"), ("test.Noted", "NUL", "at text"), id="nul-in-field"),
    pytest.param(Opaque(value={"k": ["x", "\x00"]}), ("test.Opaque", "NUL", "value['k'][1]"), id="nul-nested"),
    pytest.param(Opaque(value={"k\x00": 1}), ("test.Opaque", "NUL", "(a key)"), id="nul-in-key"),
    pytest.param(Noted("\ud800"), ("test.Noted", "surrogates not allowed"), id="lone-surrogate"),
    pytest.param(Opaque(value=["ok", "x\udfff"]), ("test.Opaque", "surrogates not allowed"), id="lone-surrogate-nested"),
])
def test_text_postgres_or_utf8_cannot_hold_is_refused(store, event, fragments):
    store.append([emit("ok", Noted("first"))])
    _refused_everywhere(store, event, fragments=fragments)


@pytest.mark.parametrize("metadata", [
    pytest.param(ec.Metadata(user_id="a\x00"), id="nul-user-id"),
    pytest.param(ec.Metadata(custom={"x": "\x00"}), id="nul-custom"),
    pytest.param(ec.Metadata(correlation_id="\udc80"), id="lone-surrogate"),
])
def test_metadata_text_that_cannot_be_stored_is_refused(store, metadata):
    store.append([emit("ok", Noted("first"))])
    _refused_everywhere(store, Noted("x"), metadata=metadata, fragments=("metadata",))


def test_payload_over_the_limit_is_refused(store):
    store.append([emit("ok", Noted("first"))])
    big = Noted("x" * MAX_PAYLOAD_BYTES)
    _refused_everywhere(store, big, fragments=("test.Noted", "16 MiB"))
    _refused_everywhere(store, Noted("x"), metadata=ec.Metadata(custom={"blob": "y" * MAX_PAYLOAD_BYTES}),
                        fragments=("metadata", "16 MiB"))
    raw = ec.RawEvent("test.Noted", b'{"text": "' + b"z" * MAX_PAYLOAD_BYTES + b'"}')
    _refused_everywhere(store, raw, error=ec.ValidationError, fragments=("16 MiB",))
    # a large event under the limit is fine
    store.append([emit("s", Noted("y" * (1 << 20)))])
    assert len(store.read_stream("s")[0].data.text) == 1 << 20


@pytest.mark.parametrize("nested", [_nested_list, _nested_dict], ids=["lists", "dicts"])
def test_deeply_nested_payload_is_a_typed_error(store, nested):
    """Never a RecursionError, never a crash: 10,000 levels are refused on every write path."""
    store.append([emit("ok", Noted("first"))])
    deep = nested(NESTING)
    _refused_everywhere(store, Opaque(value=deep), fragments=("test.Opaque", "nested too deeply"))
    _refused_everywhere(store, Noted("x"), metadata=ec.Metadata(custom={"deep": deep}), fragments=("nested too deeply",))
    raw = ec.RawEvent("test.Opaque", b'{"value": ' + b"[" * NESTING + b"]" * NESTING + b"}")
    _refused_everywhere(store, raw, error=ec.ValidationError, fragments=("nested too deeply",))
    store.append([emit("s", Opaque(value=nested(200)))])
    assert store.read_stream("s")[0].data == Opaque(value=nested(200))


# -- RawEvent data and type names ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, fragment", [
    pytest.param(b'{"text": NaN}', "not valid JSON", id="nan-literal"),
    pytest.param(b'{"text": Infinity}', "not valid JSON", id="infinity-literal"),
    pytest.param(b'{"text": -Infinity}', "not valid JSON", id="minus-infinity-literal"),
    pytest.param(b'{"text": "\xff\xfe"}', "not valid UTF-8", id="invalid-utf8"),
    pytest.param(b'{"text": "\xed\xa0\x80"}', "not valid UTF-8", id="utf8-encoded-surrogate"),
    pytest.param(b'{"text": "a\\u0000"}', "NUL", id="nul-escape"),
    pytest.param(b'{"text": "a\x00"}', "not valid JSON", id="raw-nul-byte"),
    pytest.param(b'{"text": "a\\ud800"}', "not valid JSON", id="lone-surrogate-escape"),
    pytest.param(b'{"text": ', "not valid JSON", id="truncated"),
    pytest.param(b'\xef\xbb\xbf{"text": "a"}', "not valid JSON", id="bom"),
    pytest.param(b"[1, 2]", "must be a JSON object", id="array"),
    pytest.param(b'"text"', "must be a JSON object", id="string"),
    pytest.param(b"", "not valid JSON", id="empty"),
])
def test_bad_raw_event_data_is_refused(store, data, fragment):
    store.append([emit("ok", Noted("first"))])
    _refused_everywhere(store, ec.RawEvent("test.Noted", data), error=ec.ValidationError,
                        fragments=(fragment, "test.Noted"))


@pytest.mark.parametrize("name", ["", "x" * 256, "a\x00b", "tab\t", "new\nline", "\x7f", "\x85", "\ud800", 5, None],
                         ids=repr)
def test_bad_event_type_names_are_refused(store, name):
    store.append([emit("ok", Noted("first"))])
    _refused_everywhere(store, ec.RawEvent(name, b"{}"), error=ec.ValidationError, fragments=("RawEvent.type",))
    if name not in ("", None):  # an empty or None __event_type__ falls back to the class name
        with pytest.raises(TypeError, match="__event_type__"):
            type("BadName", (ec.Event,), {"__event_type__": name, "__annotations__": {}})


@pytest.mark.parametrize("sid", ["", "x" * 256, "a\x00b", "a\nb", "\x1b[0m", "c1\x9f", "\ud800", 7, None], ids=repr)
def test_bad_stream_ids_are_refused_on_every_write_path(store, sid):
    """append/expected/read are in test_conformance; here append_batch, ingest and a command's field."""
    store.append([emit("ok", Noted("first"))])
    before = _state(store)
    with pytest.raises(ec.ValidationError):
        store.append_batch([emit("ok", Noted()), ec.EventToWrite(sid, Noted())])
    with pytest.raises(ec.ValidationError):
        store.append_batch([emit("ok", Noted())], {sid: ec.ANY})
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("ok", Noted()), (sid, Noted())])
    assert isinstance(info.value.__cause__, ec.ValidationError)
    with pytest.raises(ec.ValidationError):
        store.ingest([], expected={sid: ec.ANY})
    with pytest.raises(ec.ValidationError):
        ec.execute(store, Emit(stream=sid, event=Noted()))
    assert _state(store) == before


# -- batches over the limits ------------------------------------------------------------------------------


def test_oversized_append_and_batch_are_refused(store):
    store.append([emit("ok", Noted("first"))])
    before = _state(store)
    one = emit("s", Noted("x"))
    with pytest.raises(ec.ValidationError, match=f"at most {MAX_EVENTS_PER_APPEND:,} events"):
        store.append([one] * (MAX_EVENTS_PER_APPEND + 1))
    with pytest.raises(ec.ValidationError, match=f"at most {MAX_EVENTS_PER_BATCH:,} events"):
        store.append_batch([one] * (MAX_EVENTS_PER_BATCH + 1))
    for size in (0, MAX_EVENTS_PER_BATCH + 1, 10.0, "100"):
        with pytest.raises(ec.ValidationError, match="batch_size"):
            store.ingest([("s", Noted())], batch_size=size)
    assert _state(store) == before


# -- corrupted stored rows --------------------------------------------------------------------------------

#: (SET clause, error class, fragment of the message). Position 2 is stream "a", version 2, a test.Noted.
SQLITE_CORRUPTIONS = [
    ("data = x'7b2274657874'", ec.SerializationError, "truncated"),
    ("data = '{\"text\": 5}'", ec.SerializationError, "Expected `str`, got `int`"),
    ("data = '[1, 2]'", ec.SerializationError, "Expected `object`, got `array`"),
    ("data = '{\"text\": NaN}'", ec.SerializationError, "malformed"),
    ("data = '{\"text\": 1e400}'", ec.SerializationError, "out of range"),
    ("data = x'7b2274657874223a2280ff227d'", ec.SerializationError, "payload is not valid UTF-8 (byte 9: b'\\x80')"),
    ("metadata = x'7b22757365725f6964223a2280227d'", ec.SerializationError,
     "metadata is not valid UTF-8 (byte 12: b'\\x80')"),
    ("data = CAST(x'7b2274657874223a2280ff227d' AS TEXT)", ec.SerializationError, "not UTF-8"),
    ("type = 'test.Opaque', data = '{\"value\": " + "[" * NESTING + "]" * NESTING + "}'",
     ec.SerializationError, "nested too deeply"),
    ("data = 5", ec.SerializationError, "corrupt payload"),
    ("metadata = '[1]'", ec.SerializationError, "Expected `object`, got `array`"),
    ("metadata = '{\"user_id\": 5}'", ec.SerializationError, "Expected `str | null`"),
    ("metadata = x'ff'", ec.SerializationError, "malformed"),
    ("type = 'test.bad.NoSuchType'", ec.UnknownEventTypeError, "test.bad.NoSuchType"),
    ("type = CAST(x'ff' AS TEXT)", ec.SerializationError, "not UTF-8"),
    ("type = 5", ec.UnknownEventTypeError, "'5'"),
    ("event_id = x'00'", ec.SerializationError, "corrupt event id"),
    ("event_id = 'not a blob'", ec.SerializationError, "corrupt event id"),
    ("recorded_at = 'yesterday'", ec.SerializationError, "corrupt recorded_at"),
    ("recorded_at = 1e300", ec.SerializationError, "corrupt recorded_at"),
    ("version = 'two'", ec.SerializationError, "corrupt envelope"),
    ("stream_id = CAST(x'61ff' AS TEXT)", ec.SerializationError, "not UTF-8"),
]


class ReadA(ec.Command):
    """Reads stream "a" (the corrupted one) and appends to "ok"."""

    a: ec.StreamId

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return state + 1

    def handle(self, state):
        return [emit("ok", Noted(str(state)))]

    def streams(self):
        return [ec.StreamId("ok")]


@pytest.mark.parametrize("change, error, fragment", SQLITE_CORRUPTIONS, ids=[c[0][:40] for c in SQLITE_CORRUPTIONS])
def test_corrupt_sqlite_rows_are_typed_errors_on_every_read(tmp_path, change, error, fragment):
    path = tmp_path / "events.db"
    store = ec.connect(f"sqlite:///{path}")
    try:
        store.append([emit("a", Noted("1")), emit("a", Noted("2")), emit("b", Noted("3"))])
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("DROP TRIGGER events_are_immutable_update")  # written behind the store's back
        raw.execute(f"UPDATE events SET {change} WHERE position = 2")
        raw.close()
        reads = {
            "read_stream": lambda: store.read_stream("a"),
            "read_streams": lambda: store.read_streams(["b", "a"]),
            "read_all": lambda: list(store.read_all()),
            "read_all paged": lambda: list(store.read_all(page_size=1)),
            "execute": lambda: ec.execute(store, ReadA(a=ec.StreamId("a"))),
        }
        if change.startswith("stream_id"):  # the row is no longer in stream "a": only the feed sees it
            del reads["read_stream"], reads["read_streams"], reads["execute"]
        before = store.head_position(), store.stream_versions(["a", "b", "ok"])
        for name, read in reads.items():
            with pytest.raises(error) as info:
                read()
            message = str(info.value)
            assert fragment in message, (name, message)
            assert "position 2" in message or "(2, " in message, (name, message)
            assert "'a" in message, (name, message)  # the stream
        assert (store.head_position(), store.stream_versions(["a", "b", "ok"])) == before
        # the events around it stay readable
        assert [e.data.text for e in store.read_stream("b")] == ["3"]
        assert [e.data.text for e in store.read_all(after_position=2)] == ["3"]
    finally:
        store.close()


#: (SQL that corrupts position p's row, error class, fragment). Valid JSON of the wrong shape: jsonb
#: refuses invalid JSON, but the table's owner or a superuser (or a migration gone wrong) can write any.
POSTGRES_CORRUPTIONS = [
    ("data = '{\"text\": 5}'", ec.SerializationError, "Expected `str`, got `int`"),
    ("data = '[1, 2]'", ec.SerializationError, "Expected `object`, got `array`"),
    ("data = '\"text\"'", ec.SerializationError, "Expected `object`, got `str`"),
    ("data = '{\"text\": 1e400}'", ec.SerializationError, "position"),
    ("type = 'test.Opaque', data = ('{\"value\": ' || repeat('[', 3000) || repeat(']', 3000) || '}')::jsonb",
     ec.SerializationError, "nested too deeply"),
    ("metadata = '[1]'", ec.SerializationError, "Expected `object`, got `array`"),
    ("metadata = '{\"custom\": 5}'", ec.SerializationError, "Expected `object`, got `int`"),
    ("type = 'test.bad.NoSuchType'", ec.UnknownEventTypeError, "test.bad.NoSuchType"),
]


@pytest.mark.parametrize("change, error, fragment", POSTGRES_CORRUPTIONS, ids=[c[0][:30] for c in POSTGRES_CORRUPTIONS])
def test_corrupt_postgres_rows_are_typed_errors_on_every_read(pg_dsn, pg_schema, change, error, fragment):
    import psycopg
    from psycopg import sql

    store = ec.connect(pg_dsn, schema=pg_schema)
    try:
        out = store.append([emit("a", Noted("1")), emit("a", Noted("2")), emit("b", Noted("3"))])
        position = out[1].position
        with psycopg.connect(pg_dsn) as conn:  # the table's owner, behind the store's back, in one transaction
            table = f"{sql.Identifier(pg_schema).as_string(conn)}.events"
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER events_are_immutable".encode())
            conn.execute(f"UPDATE {table} SET {change} WHERE position = %s".encode(), (position,))
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER events_are_immutable".encode())
        before = store.head_position(), store.stream_versions(["a", "b", "ok"])
        for name, read in {
            "read_stream": lambda: store.read_stream("a"),
            "read_streams": lambda: store.read_streams(["b", "a"]),
            "read_all": lambda: list(store.read_all()),
            "execute": lambda: ec.execute(store, ReadA(a=ec.StreamId("a"))),
        }.items():
            with pytest.raises(error) as info:
                read()
            message = str(info.value)
            assert fragment in message and f"position {position}" in message and "'a'" in message, (name, message)
        assert (store.head_position(), store.stream_versions(["a", "b", "ok"])) == before
        assert [e.data.text for e in store.read_stream("b")] == ["3"]
    finally:
        store.close()


# -- JSON Lines: the API ------------------------------------------------------------------------------------

GOOD_LINE = b'{"stream": "s", "type": "test.Noted", "data": {"text": "a"}}'

#: (line, fragment of BadLine.reason)
BAD_LINES = [
    (b'{"stream": "s", "type": "test.Noted", "data": {"text": ', "truncated"),
    (b"[1, 2]", "Expected `object`, got `array`"),
    (b"42", "Expected `object`, got `int`"),
    (b'"a line"', "Expected `object`, got `str`"),
    (b'{"type": "test.Noted", "data": {}}', "missing required field `stream`"),
    (b'{"stream": "s", "data": {}}', "missing required field `type`"),
    (b'{"stream": "s", "type": "test.Noted"}', "missing required field `data`"),
    (b'{"stream": "s", "type": "test.Noted", "data": {}, "extra": 1}', "unknown field `extra`"),
    (b'{"stream": 5, "type": "test.Noted", "data": {}}', "Expected `str`, got `int` - at `$.stream`"),
    (b'{"stream": "s", "type": ["x"], "data": {}}', "Expected `str`, got `array` - at `$.type`"),
    (b'{"stream": "s", "type": "test.Noted", "data": {}, "metadata": {"user_id": 1}}', "at `$.metadata.user_id`"),
    (b'{"stream": "s", "type": "test.Noted", "data": {}, "metadata": {"nope": 1}}', "unknown field `nope`"),
    (b'{"stream": "s", "type": "test.Noted", "data": {}, "metadata": {"user_id": "\\u0000"}}', "`metadata` holds a NUL"),
    (b'{"stream": "s", "type": "test.Noted", "data": [1]}', "`data` must be a JSON object"),
    (b'{"stream": "s", "type": "test.Noted", "data": null}', "`data` must be a JSON object"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"text": "\xff"}}', "`data` is not valid UTF-8 (byte 56: b'\\xff')"),
    (b'{"stream": "s\xff", "type": "test.Noted", "data": {}}', "not valid UTF-8 (byte 13: b'\\xff')"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"text": "a\x00"}}', "invalid character"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"text": "a\\u0000"}}', "NUL"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"text": NaN}}', "invalid character"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"x": Infinity}}', "invalid character"),
    (b'{"stream": "", "type": "test.Noted", "data": {}}', "bad `stream`"),
    (b'{"stream": "a\\u0000b", "type": "test.Noted", "data": {}}', "bad `stream`"),
    (b'{"stream": "s", "type": "", "data": {}}', "`type`"),
    (b'{"stream": "s", "type": "a\\nb", "data": {}}', "`type`"),
    (b"\xef\xbb\xbf" + GOOD_LINE, "byte-order mark"),
    (b'{"stream": "s", "type": "test.Noted", "data": {"v": ' + b"[" * NESTING + b"]" * NESTING + b"}}",
     "nested too deeply"),
    (b"not json at all", "malformed"),
    (b'{"stream": "s", "type": "test.Noted", "data": {}, "metadata": {"custom": {"k": "\xe2\x82"}}}',
     "not valid UTF-8 (byte 80: b'\\xe2')"),
]


@pytest.mark.parametrize("line, fragment", BAD_LINES, ids=[f"{i}-{b[1][:30]}" for i, b in enumerate(BAD_LINES)])
def test_malformed_json_line_is_a_bad_line_naming_the_problem(tmp_path, line, fragment):
    with pytest.raises(BadLine) as info:
        parse_line(7, line)
    assert info.value.line == 7 and fragment.lower() in info.value.reason.lower(), info.value.reason
    assert isinstance(info.value, ec.ValidationError)
    # in a file: blank lines are skipped but counted, so the number is the line's own
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD_LINE + b"\n\n   \n" + line + b"\n" + GOOD_LINE + b"\n")
    with JsonLinesReader(str(path)) as reader:
        with pytest.raises(BadLine) as info:
            list(reader)
    assert info.value.line == 4 and str(info.value).startswith("line 4: ")


def _msgspec_utf8_errors(data: bytes, start_in_string: int) -> list:
    """Both ways msgspec reports invalid UTF-8 in a string: a UnicodeDecodeError whose offset counts
    from the start of the string (up to 0.22), a DecodeError without any offset (0.23 on)."""
    return [
        UnicodeDecodeError("utf-8", data, start_in_string, start_in_string + 1, "invalid start byte"),
        msgspec.DecodeError("Invalid UTF-8 encoded string"),
    ]


def test_invalid_utf8_is_named_by_its_offset_in_the_input_however_msgspec_reports_it():
    from eventcore.utf8 import decode_error_text, is_utf8_error, row_decode_error_text

    data = b'{"text": "ok \xff"}'  # the string's 4th byte, the input's 13th
    for exc in _msgspec_utf8_errors(data, 3):
        assert is_utf8_error(exc)
        assert decode_error_text(exc, data) == "not valid UTF-8 (byte 13: b'\\xff')"
        assert decode_error_text(exc, memoryview(data)) == "not valid UTF-8 (byte 13: b'\\xff')"
    assert not is_utf8_error(msgspec.DecodeError("JSON is malformed: invalid character (byte 0)"))
    assert decode_error_text(msgspec.DecodeError("Input data was truncated"), data) == "Input data was truncated"
    assert decode_error_text(RecursionError(), data).startswith("nested too deeply")
    # a UTF-8 error whose input turns out to be UTF-8 after all keeps msgspec's own words
    assert decode_error_text(msgspec.DecodeError("Invalid UTF-8 encoded string"), b"{}") == "Invalid UTF-8 encoded string"
    payload_decoder = msgspec.json.Decoder(Noted)
    good = b'{"text": "a"}'
    for exc in _msgspec_utf8_errors(data, 3):
        assert row_decode_error_text(exc, payload_decoder, data, good) == "payload is not valid UTF-8 (byte 13: b'\\xff')"
        assert row_decode_error_text(exc, payload_decoder, good, data) == "metadata is not valid UTF-8 (byte 13: b'\\xff')"


def test_ingest_from_the_command_line_names_the_line_and_byte_that_is_not_utf8(tmp_path):
    good = [json.dumps({"stream": "s", "type": "test.Noted", "data": {"text": str(i)}}).encode() for i in range(3)]
    url = f"sqlite:///{tmp_path / 'events.db'}"
    for bad, problem in [
        (b'{"stream": "s\xc3", "type": "test.Noted", "data": {}}', "not valid UTF-8 (byte 13: b'\\xc3')"),
        (b'{"stream": "s", "type": "test.Noted", "data": {"text": "\xff"}}', "`data` is not valid UTF-8 (byte 56: b'\\xff')"),
    ]:
        path = tmp_path / "events.jsonl"
        path.write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
        proc = _cli(["ingest", str(path), "--dsn", url, "--no-progress", "--no-resume"], cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert f"error: line 3: {problem};" in proc.stderr, proc.stderr


def test_corrupt_gzip_is_a_bad_line_not_a_crash(tmp_path):
    body = b"".join(GOOD_LINE + b"\n" for _ in range(5000))
    packed = gzip.compress(body)
    cases = {
        "truncated": packed[: len(packed) // 2],
        "flipped-bytes": packed[:200] + bytes(b ^ 0xFF for b in packed[200:260]) + packed[260:],
        "bad-crc": packed[:-8] + b"\0\0\0\0" + packed[-4:],
        "header-only": packed[:10],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(data)
        with JsonLinesReader(str(path)) as reader:
            with pytest.raises(BadLine) as info:
                for _ in reader:
                    pass
        assert "cannot read" in info.value.reason and info.value.line >= 1, (name, info.value)


# -- the command line ----------------------------------------------------------------------------------------


def _cli(args, cwd, env=None):
    proc = subprocess.run([sys.executable, "-m", "eventcore", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


CLI_ERRORS = [
    (["tail", "--dsn", "oracle://db"], "unknown store scheme 'oracle'"),
    (["status", "--json", "--dsn", "memory://x"], None),  # status reports in its output, exit 1
    (["tail", "--dsn", "sqlite:///x.db?bogus=1"], "unknown sqlite option(s) ['bogus']"),
    (["tail", "--dsn", "sqlite:///x.db?timeout=soon"], "timeout must be a number"),
    (["tail", "--dsn", "sqlite:///x.db?synchronous=maybe"], "synchronous must be one of"),
    (["tail", "--dsn", "sqlite://host/x.db"], "sqlite URLs have no host"),
    (["projections", "--dsn", "postgresql://u:secret@[::1/db"], "malformed postgresql:// URL"),
    (["tail", "--dsn", "postgresql://u:secret@localhost:99999/db"], "Port out of range"),
    (["tail", "--dsn", "postgresql://u:secret@localhost:port/db"], "Port could not be cast"),
    (["tail", "--dsn", "postgresql://u:secret@localhost/db?nonsense=1"], "invalid URI query parameter"),
    (["migrate", "--dsn", "sqlite:///x.db"], "needs a postgresql:// URL"),
    (["tail", "--dsn", "memory://"], None),  # fine: an empty store
    (["tail", "--from", "-1", "--dsn", "memory://"], "--from must be a position in 0..2**63-1"),
    (["tail", "--from", "first", "--dsn", "memory://"], "invalid int value: 'first'"),
    (["tail", "--interval", "0", "--follow", "--dsn", "memory://"], "--interval must be > 0"),
    (["tail", "--interval", "inf", "--follow", "--dsn", "memory://"], "--interval must be > 0"),
    (["tail", "--interval", "nan", "--follow", "--dsn", "memory://"], "--interval must be > 0"),
    (["tail", "--from", str(2**64), "--dsn", "memory://"], "--from must be a position in 0..2**63-1"),
    (["tail", "--type", "a\x01b", "--dsn", "memory://"], "forbidden character"),
    (["tail", "--prefix", "\x1b[", "--dsn", "memory://"], "forbidden character"),
    (["tail", "--dsn", "not a url"], "store URL must look like"),
    (["tail"], "no database"),
    (["ingest", "missing.jsonl", "--dsn", "sqlite:///x.db"], "cannot open 'missing.jsonl'"),
    (["ingest", "missing.jsonl", "--dsn", "sqlite:///x.db", "--batch-size", "0"], "expected a positive integer"),
    (["ingest", "missing.jsonl", "--dsn", "sqlite:///x.db", "--parallel", "lots"], "expected a positive integer"),
    (["bench", "deposit", "--ops", "-5"], "expected a positive integer"),
    (["bench", "deposit", "--backend", "sqlite", "--dsn", "postgresql://h/db"], "--dsn applies to --backend postgres"),
    (["projections", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args, fragment", CLI_ERRORS, ids=[" ".join(a)[:50] for a, _ in CLI_ERRORS])
def test_cli_bad_urls_and_options_are_one_line_errors_creating_nothing(tmp_path, args, fragment):
    proc = _cli(args, cwd=tmp_path, env={"EVENTCORE_DSN": ""})
    if fragment is None:  # not errors of the command line: the command ran and said so itself
        assert proc.returncode in (0, 1), proc.stderr
        return
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("eventcore") and fragment in lines[0], proc.stderr
    assert "secret" not in proc.stderr  # a password in a URL is never echoed
    assert os.listdir(tmp_path) == []  # no stray database file


def test_cli_ingest_of_bad_lines_exits_1_and_writes_nothing_of_the_batch(tmp_path):
    good = [json.dumps({"stream": f"acct-{i % 3}", "type": "test.Noted", "data": {"text": str(i)}}).encode()
            for i in range(25)]
    url = f"sqlite:///{tmp_path / 'events.db'}"
    for n, (line, fragment) in enumerate(BAD_LINES[::3]):
        path = tmp_path / f"bad-{n}.jsonl"
        path.write_bytes(b"\n".join(good[:23] + [line] + good[23:]) + b"\n")
        before = ec.connect(url)
        try:
            head = before.head_position()
        finally:
            before.close()
        proc = _cli(["ingest", str(path), "--dsn", url, "--batch-size", "10", "--no-progress", "--no-resume"],
                    cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "line 24" in lines[0] and fragment.lower() in lines[0].lower(), proc.stderr
        store = ec.connect(url)
        try:  # the two full batches before the bad line's are committed; nothing of its batch
            assert len(list(store.read_all(after_position=head))) == 20
        finally:
            store.close()


@pytest.mark.parametrize("change, fragment", [
    ("data = x'7b2274657874'", "truncated"),
    ("data = 5", "a JSON column holds int"),
    ("metadata = x'ff'", "can't decode"),
    ("recorded_at = 'yesterday'", "timedelta"),
    ("event_id = x'00'", "16-char"),
    ("version = 'two'", "must be ints"),
    ("data = CAST(x'7b2274657874223a2280ff227d' AS TEXT)", "not UTF-8"),
])
def test_cli_tail_prints_up_to_a_corrupt_row_then_names_it(tmp_path, change, fragment):
    """`eventcore tail` prints events as stored, never as broken JSON or a traceback."""
    path = tmp_path / "events.db"
    store = ec.connect(f"sqlite:///{path}")
    store.append([emit("a", Noted("1")), emit("a", Noted("2")), emit("a", Noted("3"))])
    store.close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DROP TRIGGER events_are_immutable_update")
    raw.execute(f"UPDATE events SET {change} WHERE position = 2")
    raw.close()
    proc = _cli(["tail", "--dsn", f"sqlite:///{path}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    printed = [json.loads(line)["data"] for line in proc.stdout.splitlines()]  # every line whole JSON
    # the event before it; SQLite's non-UTF-8 TEXT fails the whole page's query, so there none
    assert printed == ([] if "CAST" in change else [{"text": "1"}])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "position 2" in lines[0] and fragment in lines[0], proc.stderr


BAD_METADATA = [
    dict(user_id=5), dict(causation_id=7), dict(correlation_id=b"x"), dict(custom="x"), dict(custom=[1]),
    dict(custom=None), dict(custom={1: "a"}),
]


@pytest.mark.parametrize("fields", BAD_METADATA, ids=repr)
def test_metadata_of_the_wrong_type_is_refused_before_anything_is_written(store, fields):
    """msgspec does not check a Struct's fields when it is built: metadata of the wrong type would be
    stored and fail to decode on every read of its stream, for good. Every write path refuses it."""
    from domain import Deposit

    md = ec.Metadata(**fields)
    name = next(iter(fields))
    attempts = [
        lambda: store.append([ec.emit("m", Noted(text="x"))], metadata=md),
        lambda: store.append([ec.emit("m", Noted(text="x"), metadata=md)]),
        lambda: store.append_batch([ec.emit("m", Noted(text="x"), metadata=md)]),
        lambda: ec.execute(store, Deposit(ec.StreamId("m"), 1), metadata=md),
    ]
    for attempt in attempts:
        with pytest.raises(ec.ValidationError, match=f"Metadata.{name}"):
            attempt()
    with pytest.raises(ec.IngestError) as info:
        store.ingest([("m", Noted(text="x"), md)])
    assert isinstance(info.value.__cause__, ec.ValidationError) and f"Metadata.{name}" in str(info.value)
    assert store.read_stream("m") == [] and store.head_position() == 0


@pytest.mark.parametrize("number", [b"1e400", b"-1E+999", b"1e309", b"1" + b"0" * 400 + b".0"])
def test_raw_data_with_a_number_readers_take_for_infinity_is_refused(store, tmp_path, number):
    """Stored as given, such a number could never be read back (msgspec and most JSON readers make it
    infinity, which the README refuses): a RawEvent and a JSON line holding one are refused."""
    data = b'{"v": [1, {"w": ' + number + b'}]}'
    with pytest.raises(ec.ValidationError, match="out of the range"):
        store.append([ec.emit("n", ec.RawEvent("test.Opaque", data))])
    with pytest.raises(BadLine, match="out of the range"):
        parse_line(4, b'{"stream": "n", "type": "test.Opaque", "data": ' + data + b"}")
    assert store.head_position() == 0
    store.append([ec.emit("n", ec.RawEvent("test.Opaque", b'{"value": [1e-400, 2.5]}'))])  # in range: fine
    assert store.read_stream("n")[0].data.value == [0.0, 2.5]


def test_the_reader_checks_every_stream_and_type_even_when_it_remembers_valid_ones(tmp_path, monkeypatch):
    """The reader remembers stream ids and type names found valid (bounded): a bad one is still refused
    on any line, before or after good ones, and after the memory starts afresh."""
    import eventcore.jsonl as jsonl

    monkeypatch.setattr(jsonl, "VALID_NAMES_MEMO", 3)
    good = [json.dumps({"stream": f"s-{i % 4}", "type": f"test.T{i % 2}", "data": {"i": i}}) for i in range(20)]
    bad = [json.dumps({"stream": "bad\x01id", "type": "test.T0", "data": {}}),
           json.dumps({"stream": "s-1", "type": "", "data": {}})]
    path = tmp_path / "memo.jsonl"
    path.write_text("\n".join(good[:10] + [bad[0]] + good[10:] + [bad[1]]) + "\n")
    rejected = []
    with JsonLinesReader(str(path), on_bad=rejected.append) as reader:
        items = list(reader)
    assert [r.line for r in rejected] == [11, 22]
    assert [(str(i[0]), i[1].type) for i in items if i is not None] == [
        (f"s-{i % 4}", f"test.T{i % 2}") for i in range(20)]
