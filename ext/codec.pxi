# Twin of src/eventcore/_pure/codec.py: msgspec JSON payloads in, RecordedEvent envelopes out.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check

import datetime as _dt
import uuid as _uuid

import msgspec as _msgspec

from eventcore.errors import SerializationError, UpcastError as _UpcastError
from eventcore.events import EMPTY_METADATA, Metadata, RecordedEvent, check_metadata
from eventcore.evolution import decoding as _decoding, upcasting as _upcasting
from eventcore.payloads import enc_hook as _enc_hook
from eventcore.utf8 import row_decode_error_text as _row_decode_error_text

_encoder = _msgspec.json.Encoder(enc_hook=_enc_hook)
_encode = _encoder.encode
_encode_into = _encoder.encode_into
_metadata_decoder = _msgspec.json.Decoder(Metadata)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_timedelta = _dt.timedelta
_UUID = _uuid.UUID
_uuid_new = _uuid.UUID.__new__
_set = object.__setattr__
_SAFE_UNKNOWN = _uuid.SafeUUID.unknown
_from_bytes = int.from_bytes


def encode_event(event):
    """(type name, JSON payload bytes) for an event (checked as in eventcore.payloads)."""
    cls = type(event)
    try:
        name = cls.__event_type__
    except AttributeError:
        raise SerializationError(f"not an ec.Event: {cls.__name__}") from None
    cdef bytes data
    try:
        data = _encode(event)
    except _EncodeErrors as exc:
        raise SerializationError(f"cannot encode event {name!r} ({cls.__name__}): {_describe(exc)}") from exc
    cdef bint floats = _floats(cls)
    if _needs_check(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), floats):
        check_encoded(event, data, f"event {name!r} ({cls.__name__})", floats)
    return name, data


def encode_metadata(metadata):
    """JSON bytes for metadata, or None when there is nothing to store (same checks as encode_event)."""
    if metadata is None or metadata == EMPTY_METADATA:
        return None
    check_metadata(metadata)
    cdef bytes data
    try:
        data = _encode(metadata)
    except _EncodeErrors as exc:
        raise SerializationError(f"cannot encode metadata: {_describe(exc)}") from exc
    if _needs_check(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), True):
        check_encoded(metadata, data, "metadata", True)
    return data


def decode_rows(rows, bint raw=False):
    """Decode stored rows (position, stream_id, version, event_id, type, data, metadata,
    recorded_at_us, type_version) into RecordedEvents, in the given order (see
    eventcore._pure.codec.decode_rows)."""
    cdef list out = []
    cdef dict cache = {}
    cdef PyObject* found
    cdef tuple entry
    for row in rows:
        if len(row) != ROW_WIDTH:
            raise SerializationError(f"a stored row has {len(row)} columns, expected {ROW_WIDTH}")
        position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
        if type(type_name) is not str:
            raise SerializationError(f"corrupt type name at position {position!r} (stream {sid!r}): {type_name!r:.60}")
        if type(position) is not int or type(version) is not int or not PyUnicode_Check(sid) \
                or type(type_version) is not int:
            raise SerializationError(
                f"corrupt envelope at position {position!r} (stream {sid!r}, version {version!r}): "
                "position, version and type version must be ints, the stream id a str"
            )
        found = PyDict_GetItem(cache, type_name)
        if found is NULL:
            entry = _decoding(type_name, raw, position, sid)
            cache[type_name] = entry
        else:
            entry = <tuple>found
        decode = entry[0]
        reads = entry[2]
        if type_version == reads or reads < 0:
            delivered_version = type_version
        else:  # stored at another version than its class's: the upcaster chain (the slow path)
            key = (type_name, type_version)
            found = PyDict_GetItem(cache, key)
            if found is NULL:
                decode = _upcasting(type_name, type_version, position, sid)
                cache[key] = decode
            else:
                decode = <object>found
            delivered_version = reads
        try:
            payload = decode(data)
            md = EMPTY_METADATA if metadata is None else _metadata_decoder.decode(metadata)
        except _DecodeErrors as exc:
            raise SerializationError(
                f"cannot decode event of type {type_name!r} at position {position} "
                f"(stream {sid!r}, version {version}): {_row_decode_error_text(exc, decode.__self__, data, metadata)}"
            ) from exc
        except _UpcastError as exc:
            raise exc.located(position, sid) from exc.__cause__
        except TypeError as exc:
            raise SerializationError(f"corrupt payload at position {position} (stream {sid!r}, version {version}): {exc}") from exc
        if not isinstance(event_id, (bytes, bytearray, memoryview)) or len(event_id) != 16:
            raise SerializationError(f"corrupt event id at position {position} (stream {sid!r}, version {version}): {event_id!r:.60}")
        u = _uuid_new(_UUID)
        _set(u, "int", _from_bytes(event_id, "big"))
        _set(u, "is_safe", _SAFE_UNKNOWN)
        try:
            at = _EPOCH + _timedelta(microseconds=recorded_us)
        except (OverflowError, TypeError, ValueError):
            raise SerializationError(f"corrupt recorded_at at position {position} (stream {sid!r}, version {version}): {recorded_us!r}") from None
        out.append(RecordedEvent(sid, version, position, u, entry[1], payload, md, at, delivered_version))
    return out
