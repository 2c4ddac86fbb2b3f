"""Column codec: event payloads encoded from columns, and events decoded into columns.

The executable spec of the column hot path (`store.ingest_columns`, `store.read_columns`, see
eventcore.columns). Its arrays come already normalised by eventcore.columns, one per field, with a
kind each (formats.KIND_*: how the field's values are held); this module never imports
numpy, it only indexes the arrays it is given and calls their `tolist()`.

`encode_column_payloads` defines a row's payload as exactly the bytes the row path writes for the
same event: `encode_event(cls(**row))`. A compiled twin must produce the same bytes for the same
columns (without making the object), and raise ColumnRowError for the same first bad row.
"""
from __future__ import annotations

import datetime as _dt
import struct
from typing import Any

import msgspec

from ..errors import ColumnRowError, EventCoreError, SerializationError, UpcastError, ValidationError
from ..evolution import decoding, upcasting
from ..payloads import DECODE_ERRORS
from ..utf8 import row_decode_error_text
from ..events import Event
from ..formats import (
    COLUMN_NAT, COLUMNS_COPY_FIELDS, COPY_CRITICAL_FLAGS, COPY_HEADER, COPY_SIGNATURE, JSONB_VERSION, KIND_BOOL, KIND_DATETIME,
    KIND_FLOAT, KIND_INT, KIND_OBJECT, KIND_STR, NULL_LENGTH, PG_EPOCH_OFFSET_US, RECORDED_AT_MAX_US, RECORDED_AT_MIN_US,
    TYPE_VERSION_BYTES, copy_header_problem, copy_row_problem,
)

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_EPOCH_NAIVE = _dt.datetime(1970, 1, 1)
_US = _dt.timedelta(microseconds=1)


def encode_column_payloads(
    cls: type[Event],
    encode_event: Any,
    names: tuple[str, ...],
    kinds: tuple[int, ...],
    nullable: tuple[bool, ...],
    aware: tuple[bool, ...],
    columns: list,
    masks: list,
    rows: Any,
) -> list[bytes]:
    """The JSON payload of each row in `rows` (indexes into the columns, ascending), as an event of
    `cls` whose field `names[j]` is taken from `columns[j]`.

    A row whose `masks[j]` is true (or whose object value is None) has no value for field j: the
    field gets None if `nullable[j]`, else its default (a required field without a value is a bad
    row). Datetime columns are microseconds since the epoch, made aware (UTC) datetimes where
    `aware[j]`, naive UTC ones where the class wants naive ones. ColumnRowError names the first bad
    row, with what `encode_event` (the row path's encoder) or the class refused."""
    width = len(names)
    values = []
    for j in range(width):
        col = columns[j][rows].tolist()
        if kinds[j] == KIND_DATETIME:
            col = _datetimes(col, _EPOCH if aware[j] else _EPOCH_NAIVE)
        mask = masks[j]
        if mask is not None:
            missing = mask[rows].tolist()
            col = [None if m else v for v, m in zip(col, missing)]
        if kinds[j] == KIND_OBJECT:  # any values: each must convert to the field's type (or be None)
            col = [v if v is None else _converted(v, _field_types(cls)[names[j]]) for v in col]
        elif columns[j].dtype.kind == "O":  # a scalar field's values held as objects: each of its type (or None)
            wanted = _OBJECT_TYPES[kinds[j]]
            col = [v if v is None or type(v) in wanted or (str in wanted and isinstance(v, str)) else _WrongType(v)
                   for v in col]
        values.append(col)
    out = []
    row_numbers = rows.tolist() if hasattr(rows, "tolist") else list(rows)
    for i, row in enumerate(row_numbers):
        kwargs = {}
        for j in range(width):
            v = values[j][i]
            if v is None and not nullable[j]:
                continue  # no value: the field's default
            if type(v) is _WrongType:
                raise ColumnRowError(row, ValidationError(
                    f"{cls.__name__} ({cls.__event_type__!r}): field {names[j]!r} is "
                    f"{_OBJECT_TYPES[kinds[j]][0].__name__} in its class, the row holds {v.value!r:.80}"))
            if type(v) is _NotConverted:
                raise ColumnRowError(row, ValidationError(
                    f"{cls.__name__} ({cls.__event_type__!r}): field {names[j]!r}: {v.reason}"))
            if v is _OUT_OF_RANGE:
                raise ColumnRowError(row, ValidationError(
                    f"{cls.__name__} ({cls.__event_type__!r}): field {names[j]!r} holds a datetime64 outside "
                    "the years 1-9999 that a datetime can hold"))
            kwargs[names[j]] = v
        try:
            event = cls(**kwargs)
        except TypeError as exc:  # a required field without a value
            raise ColumnRowError(row, ValidationError(
                f"{cls.__name__} ({cls.__event_type__!r}): {exc}; give the field a value in every row")) from None
        try:
            out.append(encode_event(event)[1])
        except EventCoreError as exc:
            raise ColumnRowError(row, exc) from exc
    return out


#: The Python types an object column may hold for a field of each kind (a str subclass is a str too).
_OBJECT_TYPES = {KIND_INT: (int,), KIND_FLOAT: (float, int), KIND_BOOL: (bool,), KIND_STR: (str,)}


class _WrongType:
    """A value of the wrong type in an object column (reported when its row is reached)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _NotConverted:
    """An object column's value that is not one of its field's type (reported when its row is reached)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


#: Event class -> field name -> its annotation (for msgspec.convert of object columns' values).
_types_of: dict = {}


def _field_types(cls: type) -> dict:
    found = _types_of.get(cls)
    if found is None:
        found = _types_of[cls] = {f.name: f.type for f in msgspec.structs.fields(cls)}
    return found


def _converted(value: Any, annotation: Any) -> Any:
    """`value` as its field's type takes it (msgspec.convert, as a decoder would), or _NotConverted."""
    try:
        return msgspec.convert(value, annotation)
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError) as exc:
        if isinstance(annotation, type):  # a type msgspec takes only as itself (a str subclass: ec.StreamId)
            if isinstance(value, annotation):
                return value
            if issubclass(annotation, str) and isinstance(value, str):
                try:
                    return annotation(value)
                except (TypeError, ValueError) as invalid:
                    exc = invalid
        return _NotConverted(f"{value!r:.80} is not a valid value: {exc}")


#: A datetime64 value no datetime can hold (reported when its row is reached: the first bad row is named).
_OUT_OF_RANGE = object()


def _datetimes(microseconds: list, epoch: _dt.datetime) -> list:
    out = []
    for v in microseconds:
        try:
            out.append(epoch + v * _US)
        except OverflowError:
            out.append(_OUT_OF_RANGE)
    return out


def fill_columns(events: list, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...],
                 envelope: tuple, outs: list, masks: list) -> None:
    """Write `events` (RecordedEvents) into preallocated columns from index `offset` on.

    `envelope`: the arrays (position, stream id, version, recorded-at as int64 microseconds since the
    epoch, type). `outs[j]` receives field `fields[j]` of each event's data, as its kind holds it
    (datetimes as int64 microseconds since the epoch, naive ones taken as UTC); `masks[j]` is set where
    the event's data has no such field or holds None there."""
    positions, stream_ids, versions, recorded, types = envelope
    stop = offset + len(events)
    if offset < 0 or any(len(a) < stop for a in (*envelope, *outs, *masks)):
        raise ValueError(f"fill_columns: {len(events)} events from index {offset} do not fit every array")
    positions[offset:stop] = [e.position for e in events]
    stream_ids[offset:stop] = [e.stream_id for e in events]
    versions[offset:stop] = [e.version for e in events]
    recorded[offset:stop] = [(e.recorded_at - _EPOCH) // _US for e in events]
    types[offset:stop] = [e.type for e in events]
    _fill_fields([e.data for e in events], offset, fields, kinds, outs, masks)


def _fill_fields(payloads: list, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...], outs: list,
                 masks: list) -> None:
    """Field `fields[j]` of each payload into `outs[j]` (and `masks[j]`), from index `offset` on."""
    stop = offset + len(payloads)
    for j, name in enumerate(fields):
        kind = kinds[j]
        out, mask = outs[j], masks[j]
        fill = _FILL[kind]
        values = []
        missing = []
        for data in payloads:
            v = getattr(data, name, None)
            if v is None:
                missing.append(True)
                values.append(fill)
                continue
            missing.append(False)
            if kind == KIND_DATETIME:
                if v.tzinfo is None:
                    v = v.replace(tzinfo=_dt.timezone.utc)
                v = (v - _EPOCH) // _US
            values.append(v)
        if kind == KIND_OBJECT:  # a slice assignment would take a list value for a sequence of values
            for i, v in enumerate(values, offset):
                out[i] = v
        else:
            out[offset:stop] = values
        mask[offset:stop] = missing


#: What a column holds under the mask where an event has no value, per kind.
_FILL = {KIND_INT: 0, KIND_FLOAT: float("nan"), KIND_BOOL: False, KIND_STR: None,
         KIND_DATETIME: COLUMN_NAT, KIND_OBJECT: None}


def decode_copy_columns(buffer: Any, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...], envelope: tuple,
                        outs: list, masks: list) -> tuple[int, int]:
    """Decode a whole binary COPY stream of read_columns' columns (formats.COLUMNS_COPY_FIELDS: position,
    stream id, version, type, payload, recorded_at, type version; queries.sql: column_columns) straight
    into preallocated columns from index `offset` on: (rows written, the last one's position; 0 when
    none). The envelope as fill_columns writes it; each requested field of each event's payload
    (decoded by its class, older versions through the upcasters) as there. Framing is checked as
    decode_copy checks it, with errors of copy_row_problem's. No field asked: the payload may be NULL
    (envelope_columns), and is not decoded."""
    layout = "columns" if fields else "envelope"
    positions, stream_ids, versions, recorded_at, types = envelope
    capacity = len(positions)
    if len(kinds) != len(fields) or len(outs) != len(fields) or len(masks) != len(fields) or len(envelope) != 5:
        raise ValueError("decode_copy_columns: one kind, column and mask per field, and five envelope columns")
    if offset < 0 or any(len(a) != capacity for a in envelope):
        raise ValueError("decode_copy_columns: the envelope's columns must have one length, and offset >= 0")
    for j, name in enumerate(fields):
        if len(outs[j]) != capacity or len(masks[j]) != capacity or \
                outs[j].itemsize != (1 if kinds[j] == KIND_BOOL else 8):
            raise ValueError(f"decode_copy_columns: the column of {name!r} or its mask is not of the envelope's "
                             "length and its kind's item size")
    buf = buffer if type(buffer) is bytes else bytes(buffer)
    end = len(buf)
    if end < len(COPY_HEADER) or buf[:len(COPY_SIGNATURE)] != COPY_SIGNATURE:
        raise SerializationError(copy_header_problem(buf))
    flags, extension = _HEADER_TAIL.unpack_from(buf, len(COPY_SIGNATURE))
    if flags & COPY_CRITICAL_FLAGS or extension < 0 or len(COPY_HEADER) + extension > end:
        raise SerializationError(copy_header_problem(buf))
    o = len(COPY_HEADER) + extension
    cache: dict = {}
    head, mid, length, stamp, int2 = _ROW_HEAD.unpack_from, _ROW_MID.unpack_from, _I32.unpack_from, \
        _I64_FIELD.unpack_from, _INT2.unpack_from
    rows: list = []  # (position, stream id, version, recorded_at µs, type name)
    delivered = None
    payloads: list = []
    while True:
        row = o
        if end - o < 18:
            if end - o == 2 and buf[o] == 0xFF and buf[o + 1] == 0xFF:
                break
            raise SerializationError(copy_row_problem(buf, row, layout))
        try:
            count, size, position, size_sid = head(buf, o)
            if count != COLUMNS_COPY_FIELDS or size != 8 or size_sid < 0 or o + 18 + size_sid > end:
                raise _Bad
            o += 18
            sid = buf[o:o + size_sid].decode()
            o += size_sid
            size, version, size_type = mid(buf, o)  # version (length 8, int8); the type name's length
            o += 16
            if size != 8 or size_type < 0 or o + size_type > end:
                raise _Bad
            size = size_type
            type_name = buf[o:o + size].decode()
            o += size
            size = length(buf, o)[0]
            o += 4
            if size == NULL_LENGTH and not fields:  # the envelope alone: no payload sent (none decoded)
                data = b""
            else:
                if size < 1 or o + size > end or buf[o] != JSONB_VERSION:
                    raise _Bad
                data = buf[o + 1:o + size]
                o += size
            size, recorded = stamp(buf, o)
            o += 12
            if size != 8 or not RECORDED_AT_MIN_US <= recorded + PG_EPOCH_OFFSET_US <= RECORDED_AT_MAX_US:
                raise _Bad
            size = length(buf, o)[0]
            if size == NULL_LENGTH:
                type_version = 1
                o += 4
            else:
                size, type_version = int2(buf, o)
                o += 6
                if size != TYPE_VERSION_BYTES:
                    raise _Bad
        except (_Bad, struct.error, UnicodeDecodeError):
            raise SerializationError(copy_row_problem(buf, row, layout)) from None
        if offset + len(rows) >= capacity:
            raise ValueError(f"decode_copy_columns: more rows than the {capacity - offset} the columns have room for")
        if fields:
            entry = cache.get(type_name)
            if entry is None:
                entry = cache[type_name] = decoding(type_name, False, position, sid)
            decode, delivered, reads = entry
            if not (type_version == reads or reads < 0):
                key = (type_name, type_version)
                decode = cache.get(key)
                if decode is None:
                    decode = cache[key] = upcasting(type_name, type_version, position, sid)
            try:
                payloads.append(decode(data))
            except DECODE_ERRORS as exc:
                raise SerializationError(
                    f"cannot decode event of type {type_name!r} at position {position} "
                    f"(stream {sid!r}, version {version}): {row_decode_error_text(exc, getattr(decode, '__self__', None), data, None)}"
                ) from exc
            except UpcastError as exc:
                raise exc.located(position, sid) from exc.__cause__
        # Decoded: the class's own name (an alias's events too), as read_all gives it; else the stored one.
        rows.append((position, sid, version, recorded + PG_EPOCH_OFFSET_US, delivered if fields else type_name))
    stop = offset + len(rows)
    if rows:
        positions[offset:stop] = [r[0] for r in rows]
        for i, r in enumerate(rows, offset):  # one by one: an object array's slice takes a list as values
            stream_ids[i] = r[1]
            types[i] = r[4]
        versions[offset:stop] = [r[2] for r in rows]
        recorded_at[offset:stop] = [r[3] for r in rows]
        _fill_fields(payloads, offset, fields, kinds, outs, masks)
    return len(rows), (rows[-1][0] if rows else 0)


class _Bad(Exception):
    """A row whose framing fails a check (reported by copy_row_problem)."""


_ROW_HEAD = struct.Struct(">hiqi")  # field count; position (length 8, int8); the stream id's length
_ROW_MID = struct.Struct(">iqi")  # version (length 8, int8); the next field's length
_HEADER_TAIL = struct.Struct(">Ii")  # flags, header extension length
_I32 = struct.Struct(">i")
_I64_FIELD = struct.Struct(">iq")  # length 8, int8
_INT2 = struct.Struct(">ih")  # length 2, int2
