"""Event serialization: msgspec JSON payloads in, `RecordedEvent` envelopes out.

Every backend hands rows to `decode_rows` in one layout (`formats.ROW_COLUMNS`),
so the decoding, and its Cython twin (ext/codec.pxi), is shared by all stores.
What a payload may carry is checked by `eventcore.payloads`, which both twins call.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any, Iterable

import msgspec

from ..errors import SerializationError, UpcastError
from ..events import EMPTY_METADATA, Event, Metadata, RecordedEvent, check_metadata
from ..evolution import decoding, upcasting
from ..formats import ROW_COLUMNS
from ..payloads import (
    DECODE_ERRORS,
    ENCODE_ERRORS,
    MAX_PAYLOAD_BYTES,
    check_encoded,
    enc_hook,
    encode_error_text,
    float_capable,
    float_capable_cache,
)
from ..utf8 import row_decode_error_text

_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_metadata_decoder = msgspec.json.Decoder(Metadata)
_ROW_WIDTH = len(ROW_COLUMNS)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_UUID = uuid.UUID
_new_uuid = uuid.UUID.__new__
_set = object.__setattr__


def encode_event(event: Event) -> tuple[str, bytes]:
    """(type name, JSON payload bytes) for an event.

    SerializationError for what JSON or PostgreSQL cannot hold (see `payloads`): NaN or
    infinity, a NUL, a lone surrogate, an unknown type, nesting past the recursion limit,
    more than MAX_PAYLOAD_BYTES."""
    cls = type(event)
    try:
        name = cls.__event_type__
    except AttributeError:
        raise SerializationError(f"not an ec.Event: {cls.__name__}") from None
    try:
        data = _encoder.encode(event)
    except ENCODE_ERRORS as exc:
        raise SerializationError(f"cannot encode event {name!r} ({cls.__name__}): {encode_error_text(exc)}") from exc
    floats = float_capable_cache.get(cls)
    if floats is None:
        floats = float_capable(cls)
    # The hot path's whole cost: a length test and one or two substring searches (see payloads).
    if len(data) > MAX_PAYLOAD_BYTES or data.find(b"\\u0000") >= 0 or (floats and data.find(b"null") >= 0):
        check_encoded(event, data, f"event {name!r} ({cls.__name__})", floats)
    return name, data


def encode_metadata(metadata: Metadata | None) -> bytes | None:
    """JSON bytes for metadata, or None when there is nothing to store (same checks as `encode_event`)."""
    if metadata is None or metadata == EMPTY_METADATA:
        return None
    check_metadata(metadata)
    try:
        data = _encoder.encode(metadata)
    except ENCODE_ERRORS as exc:
        raise SerializationError(f"cannot encode metadata: {encode_error_text(exc)}") from exc
    if len(data) > MAX_PAYLOAD_BYTES or data.find(b"\\u0000") >= 0 or data.find(b"null") >= 0:
        check_encoded(metadata, data, "metadata", True)
    return data


def _uuid_from_bytes(raw) -> uuid.UUID:
    u = _new_uuid(_UUID)
    _set(u, "int", int.from_bytes(raw, "big"))
    _set(u, "is_safe", uuid.SafeUUID.unknown)
    return u


def decode_rows(rows: Iterable[tuple[Any, ...]], raw: bool = False) -> list[RecordedEvent]:
    """Decode stored rows (layout `formats.ROW_COLUMNS`) into `RecordedEvent`s, in the given order.

    Each payload is decoded as its registered class, through the upcasters when it was stored at an
    older type version (see eventcore.evolution); `raw`: as the stored JSON object (a dict), under
    the stored type name and version, whatever the type. A corrupt row (wrong shape, undecodable
    payload, bad id or timestamp) raises SerializationError naming its position; an unregistered
    type (unless raw) UnknownEventTypeError, a version that cannot be upcast EventVersionError, an
    upcaster that fails UpcastError. Nothing is ever skipped.
    """
    out = []
    append = out.append
    cache: dict = {}
    for row in rows:
        if len(row) != _ROW_WIDTH:
            raise SerializationError(f"a stored row has {len(row)} columns, expected {_ROW_WIDTH}")
        position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
        if type(type_name) is not str:
            raise SerializationError(f"corrupt type name at position {position!r} (stream {sid!r}): {type_name!r:.60}")
        if type(position) is not int or type(version) is not int or not isinstance(sid, str) or (
                type(type_version) is not int):
            raise SerializationError(
                f"corrupt envelope at position {position!r} (stream {sid!r}, version {version!r}): "
                "position, version and type version must be ints, the stream id a str"
            )
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
            md = EMPTY_METADATA if metadata is None else _metadata_decoder.decode(metadata)
        except DECODE_ERRORS as exc:
            raise SerializationError(
                f"cannot decode event of type {type_name!r} at position {position} "
                f"(stream {sid!r}, version {version}): {row_decode_error_text(exc, decode.__self__, data, metadata)}"
            ) from exc
        except UpcastError as exc:
            raise exc.located(position, sid) from exc.__cause__
        except TypeError as exc:
            raise SerializationError(f"corrupt payload at position {position} (stream {sid!r}, version {version}): {exc}") from exc
        if not isinstance(event_id, (bytes, bytearray, memoryview)) or len(event_id) != 16:
            raise SerializationError(f"corrupt event id at position {position} (stream {sid!r}, version {version}): {event_id!r:.60}")
        try:
            at = _EPOCH + _dt.timedelta(microseconds=recorded_us)
        except (OverflowError, TypeError, ValueError):
            raise SerializationError(f"corrupt recorded_at at position {position} (stream {sid!r}, version {version}): {recorded_us!r}") from None
        append(RecordedEvent(sid, version, position, _uuid_from_bytes(event_id), delivered, payload, md, at,
                             delivered_version))
    return out
