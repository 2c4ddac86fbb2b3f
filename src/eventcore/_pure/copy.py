"""COPY BINARY encoding and decoding of event rows: the batch writer's and the readers' hot path
(pure-Python twin of ext/copy.pxi).

Rows follow the column list of pg_sql.COPY_EVENTS: position int8,
stream_id text, version int8, event_id uuid, type text, data jsonb, metadata
jsonb (NULL when empty), recorded_at timestamptz, type_version int2 (the writers always send it;
the readers also take NULL for 1, which is how the store's reads send version 1). jsonb's binary form is a
version byte (1) followed by the JSON text, which is exactly what msgspec
produces, so payloads are framed, never re-encoded. The stream's header and
trailer, and every limit, are in `eventcore.formats`.

`decode_copy` reads the same layout back (what PostgreSQL sends for `COPY (SELECT ...) TO STDOUT
(FORMAT BINARY)`) straight into `RecordedEvent`s: no row tuples, no text conversions on the server.
`copy_from_result` lays a binary-format query result out the same way, for decode_copy.
"""
from __future__ import annotations

import datetime as _dt
import struct
import uuid
from typing import Any

from ..errors import SerializationError, UpcastError
from ..events import EMPTY_METADATA, MAX_EVENT_VERSION, Event, Metadata, RecordedEvent, check_metadata
from ..evolution import decoding, upcasting
from ..formats import (
    COPY_CRITICAL_FLAGS,
    COPY_FIELDS,
    COPY_HEADER,
    COPY_SIGNATURE,
    INT64_MAX,
    INT64_MIN,
    JSONB_VERSION,
    MAX_FIELD_BYTES,
    NULL_LENGTH,
    PG_EPOCH_OFFSET_US,
    TYPE_VERSION_BYTES,
    copy_header_problem,
    copy_row_problem,
)
from ..payloads import DECODE_ERRORS, ENCODE_ERRORS, MAX_PAYLOAD_BYTES, check_encoded, encode_error_text, float_capable
from ..utf8 import row_decode_error_text
from . import ids as _ids
from .codec import _EPOCH, _UUID, _encoder, _metadata_decoder, _new_uuid, _set

_ROW_START = struct.Struct(">hiq")  # field count; position: length 8, int8
_INT8 = struct.Struct(">iq")
_LEN = struct.Struct(">i")
_UUID_FIELD = _LEN.pack(16)
_INT2 = struct.Struct(">ih")  # length 2, int2: the type version
_NULL = _LEN.pack(NULL_LENGTH)
_JSONB_VERSION = bytes((JSONB_VERSION,))
_COPY_TRAILER = _LEN.pack(NULL_LENGTH)[:2]  # int16 -1


def _utf8(value, what: str, i: int) -> bytes:
    if not isinstance(value, str):
        raise SerializationError(f"{what} {i} must be a str, got {type(value).__name__}")
    try:
        return value.encode()
    except UnicodeError as exc:
        raise SerializationError(f"{what} {i} is not valid UTF-8 text: {exc}") from None


def _int64(value, what: str, i: int) -> int:
    if not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        raise SerializationError(f"{what} {i} must be an int within int64, got {value!r}")
    return value


def encode_copy_rows(
    buf: bytearray,
    first_position: int,
    stream_ids: list[str],
    versions: list[int],
    event_ids: list[bytes],
    types: list[str],
    type_versions: list[int],
    payloads: list[bytes],
    metadatas: list[bytes | None],
    recorded_at_us: int,
) -> None:
    """Append one COPY BINARY row per event to `buf` (no header or trailer).

    `event_ids` are 16-byte UUIDs, `type_versions` each event type's version (1..32767),
    `payloads` and `metadatas` msgspec JSON bytes (metadata may be None), `recorded_at_us`
    microseconds since the Unix epoch. On error `buf` is left as it was.
    """
    n = len(stream_ids)
    if not (len(versions) == len(event_ids) == len(types) == len(type_versions) == len(payloads)
            == len(metadatas) == n):
        raise SerializationError("encode_copy_rows: column lists differ in length")
    if first_position > INT64_MAX - n:
        raise SerializationError("position overflows int64")
    ts = _INT8.pack(8, recorded_at_us - PG_EPOCH_OFFSET_US)
    out = bytearray()
    row_start = _ROW_START.pack
    int8 = _INT8.pack
    length = _LEN.pack
    int2 = _INT2.pack
    for i in range(n):
        sid = _utf8(stream_ids[i], "stream id", i)
        typ = _utf8(types[i], "type", i)
        version = _int64(versions[i], "version", i)
        tv = type_versions[i]
        if type(tv) is not int or not 1 <= tv <= MAX_EVENT_VERSION:
            raise SerializationError(f"type version {i} must be an int in 1..{MAX_EVENT_VERSION}, got {tv!r}")
        eid = event_ids[i]
        if type(eid) is not bytes or len(eid) != 16:
            raise SerializationError(f"event id {i} must be 16 bytes")
        data = payloads[i]
        if type(data) is not bytes:
            raise SerializationError(f"payload {i} must be bytes, got {type(data).__name__}")
        md = metadatas[i]
        if md is not None and type(md) is not bytes:
            raise SerializationError(f"metadata {i} must be bytes or None, got {type(md).__name__}")
        if len(sid) > MAX_FIELD_BYTES or len(typ) > MAX_FIELD_BYTES or len(data) >= MAX_FIELD_BYTES or (
            md is not None and len(md) >= MAX_FIELD_BYTES
        ):
            raise SerializationError(f"row {i} has a field longer than a COPY field allows (2 GiB)")
        out += row_start(COPY_FIELDS, 8, first_position + i)
        out += length(len(sid))
        out += sid
        out += int8(8, version)
        out += _UUID_FIELD
        out += eid
        out += length(len(typ))
        out += typ
        out += length(len(data) + 1)
        out += _JSONB_VERSION
        out += data
        if md is None:
            out += _NULL
        else:
            out += length(len(md) + 1)
            out += _JSONB_VERSION
            out += md
        out += ts
        out += int2(2, tv)
    buf += out


def encode_copy_events(
    buf: bytearray,
    first_position: int,
    stream_ids: list[str],
    events: list[Event],
    metadatas: list[Metadata | None],
    heads: dict[str, int],
    recorded_at_us: int,
) -> list[bytes]:
    """Fused ingestion encoder: for each event make a UUIDv7, take the next version of its
    stream from `heads` (advanced in place), msgspec-encode the payload and metadata
    (ec.Metadata or None) with jsonb framing, and frame the row into `buf`.

    Returns the event ids (16-byte strings). On error `buf` and `heads` are left as they were.
    """
    n = len(stream_ids)
    if len(events) != n or len(metadatas) != n:
        raise SerializationError("encode_copy_events: column lists differ in length")
    if first_position > INT64_MAX - n:
        raise SerializationError("position overflows int64")
    event_ids = _ids.new_event_ids(n)
    new_heads: dict = {}
    types, type_versions, payloads, mds, versions = [], [], [], [], []
    encode = _encoder.encode
    float_classes: dict = {}  # class -> float_capable(class), looked up once per call
    md_checked = None  # the Metadata last checked: an ingest often gives one to every event
    for i in range(n):
        sid = stream_ids[i]
        _utf8(sid, "stream id", i)
        ev = events[i]
        try:
            name = type(ev).__event_type__
        except AttributeError:
            raise SerializationError(f"event {i} is not an ec.Event: {type(ev).__name__}") from None
        head = new_heads.get(sid)
        if head is None:
            head = _int64(heads.get(sid, 0), "stream head", i)
        if head >= INT64_MAX:
            raise SerializationError(f"stream head {i} is at the int64 limit")
        new_heads[sid] = head + 1
        versions.append(head + 1)
        try:
            data = encode(ev)
        except ENCODE_ERRORS as exc:
            raise SerializationError(
                f"cannot encode event {i} {name!r} ({type(ev).__name__}): {encode_error_text(exc)}"
            ) from exc
        floats = float_classes.get(type(ev))
        if floats is None:
            floats = float_classes[type(ev)] = float_capable(type(ev))
        if len(data) > MAX_PAYLOAD_BYTES or data.find(b"\\u0000") >= 0 or (floats and data.find(b"null") >= 0):
            check_encoded(ev, data, f"event {i} {name!r} ({type(ev).__name__})", floats)
        payloads.append(data)
        md = metadatas[i]
        if md is None or md == EMPTY_METADATA:
            mds.append(None)
        elif type(md) is not Metadata:
            raise SerializationError(f"metadata {i} must be an ec.Metadata or None, got {type(md).__name__}")
        else:
            if md is not md_checked:
                check_metadata(md)
                md_checked = md
            try:
                data = encode(md)
            except ENCODE_ERRORS as exc:
                raise SerializationError(f"cannot encode metadata {i}: {encode_error_text(exc)}") from exc
            if len(data) > MAX_PAYLOAD_BYTES or data.find(b"\\u0000") >= 0 or data.find(b"null") >= 0:
                check_encoded(md, data, f"metadata {i}", True)
            mds.append(data)
        types.append(name)
        type_versions.append(type(ev).__event_version__)
    encode_copy_rows(buf, first_position, stream_ids, versions, event_ids, types, type_versions, payloads, mds,
                     recorded_at_us)
    heads.update(new_heads)
    return event_ids


# Fixed parts of a row between its variable-length fields: field count, position (length, value)
# and the stream id's length; version (length, value) and the event id's length; a length alone;
# a length and an int8 (recorded_at).
_ROW_HEAD = struct.Struct(">hiqi")
_ROW_MID = struct.Struct(">iqi")
_HEADER_TAIL = struct.Struct(">Ii")  # flags, header extension length
_I32 = struct.Struct(">i")
_TIMESTAMP = _INT8
_timedelta = _dt.timedelta
_SAFE_UNKNOWN = uuid.SafeUUID.unknown


def decode_copy(buffer: bytes | bytearray | memoryview, raw: bool = False) -> list[RecordedEvent]:
    """Decode a whole binary COPY stream (header, rows, trailer) of the events table's columns
    (position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version: the
    layout `encode_copy_rows` writes) into `RecordedEvent`s, in order.

    Every length is checked: a truncated or corrupt stream, a field of the wrong size, text that
    is not UTF-8 or a jsonb of another version raises SerializationError naming the row (its
    position and stream once they are read); an undecodable payload raises it as `decode_rows`
    does, an unregistered type UnknownEventTypeError, and old type versions go through the
    upcasters as there (`raw`: every payload as its stored JSON object). Nothing is ever skipped.
    """
    buf = buffer if type(buffer) is bytes else bytes(buffer)
    end = len(buf)
    if end < len(COPY_HEADER) or buf[:len(COPY_SIGNATURE)] != COPY_SIGNATURE:
        raise SerializationError(copy_header_problem(buf))
    flags, extension = _HEADER_TAIL.unpack_from(buf, len(COPY_SIGNATURE))
    if flags & COPY_CRITICAL_FLAGS or extension < 0 or len(COPY_HEADER) + extension > end:
        raise SerializationError(copy_header_problem(buf))
    o = len(COPY_HEADER) + extension
    out = []
    append = out.append
    cache: dict = {}
    head = _ROW_HEAD.unpack_from
    mid = _ROW_MID.unpack_from
    length = _I32.unpack_from
    stamp = _TIMESTAMP.unpack_from
    int2 = _INT2.unpack_from
    decode_md = _metadata_decoder.decode
    new_uuid, set_attr, from_bytes = _new_uuid, _set, int.from_bytes  # as codec._uuid_from_bytes, inlined
    last_recorded = at = None
    while True:
        row = o
        if end - o < 18:  # no room for a row's fixed start: the trailer (-1), and nothing after it
            if end - o == 2 and buf[o] == 0xFF and buf[o + 1] == 0xFF:
                return out
            break
        try:
            count, size, position, size_sid = head(buf, o)
            if count != COPY_FIELDS or size != 8 or size_sid < 0 or o + 18 + size_sid > end:
                break
            o += 18
            sid = buf[o:o + size_sid].decode()
            o += size_sid
            size, version, size_id = mid(buf, o)
            o += 16
            if size != 8 or size_id != 16 or o + 20 > end:
                break
            event_id = buf[o:o + 16]
            size = length(buf, o + 16)[0]
            o += 20
            if size < 0 or o + size > end:
                break
            type_name = buf[o:o + size].decode()
            o += size
            size = length(buf, o)[0]
            o += 4
            if size < 1 or o + size > end or buf[o] != JSONB_VERSION:
                break
            data = buf[o + 1:o + size]
            o += size
            size = length(buf, o)[0]
            o += 4
            if size == NULL_LENGTH:
                metadata = None
            elif size < 1 or o + size > end or buf[o] != JSONB_VERSION:
                break
            else:
                metadata = buf[o + 1:o + size]
                o += size
            size, recorded = stamp(buf, o)
            o += 12
            if size != 8:
                break
            size = length(buf, o)[0]
            if size == NULL_LENGTH:  # the store's reads send version 1 as NULL
                type_version = 1
                o += 4
            else:
                size, type_version = int2(buf, o)
                o += 6
                if size != TYPE_VERSION_BYTES:
                    break
            if recorded != last_recorded:  # one per transaction: the events of a write share it
                at = _EPOCH + _timedelta(microseconds=recorded + PG_EPOCH_OFFSET_US)
                last_recorded = recorded
        except (struct.error, UnicodeDecodeError, OverflowError):
            break
        entry = cache.get(type_name)
        if entry is None:
            entry = cache[type_name] = decoding(type_name, raw, position, sid)
        decode, delivered, reads = entry
        if type_version == reads or reads < 0:
            delivered_version = type_version
        else:  # stored at another version than its class's: the upcaster chain (the slow path)
            key = (type_name, type_version)
            decode = cache.get(key)
            if decode is None:
                decode = cache[key] = upcasting(type_name, type_version, position, sid)
            delivered_version = reads
        try:
            payload = decode(data)
            md = EMPTY_METADATA if metadata is None else decode_md(metadata)
        except DECODE_ERRORS as exc:
            raise SerializationError(
                f"cannot decode event of type {type_name!r} at position {position} "
                f"(stream {sid!r}, version {version}): {row_decode_error_text(exc, decode.__self__, data, metadata)}"
            ) from exc
        except UpcastError as exc:
            raise exc.located(position, sid) from exc.__cause__
        u = new_uuid(_UUID)
        set_attr(u, "int", from_bytes(event_id, "big"))
        set_attr(u, "is_safe", _SAFE_UNKNOWN)
        append(RecordedEvent(sid, version, position, u, delivered, payload, md, at, delivered_version))
    raise SerializationError(copy_row_problem(buf, row))


def copy_from_result(result: Any) -> bytes:
    """The rows of a libpq query result fetched in binary format (psycopg's `pq.PGresult`:
    `ntuples`, `nfields`, `get_value(row, field)` -> bytes or None) as a whole binary COPY stream:
    header, per row its field count and each value's length (-1: NULL) and bytes, trailer. A binary
    result's values are what a binary COPY of the same columns sends, so decode_copy reads it."""
    rows, fields = result.ntuples, result.nfields
    if not 0 <= fields <= 0x7FFF:
        raise SerializationError(f"a COPY row holds at most 32767 fields, the result has {fields}")
    parts = [COPY_HEADER]
    add, value, length = parts.append, result.get_value, _LEN.pack
    count = struct.pack(">h", fields)
    for r in range(rows):
        add(count)
        for f in range(fields):
            v = value(r, f)
            if v is None:
                add(_NULL)
            elif type(v) is bytes:
                add(length(len(v)))
                add(v)
            else:
                raise SerializationError(f"value {f} of result row {r} is {type(v).__name__}, not bytes")
    add(_COPY_TRAILER)
    return b"".join(parts)
