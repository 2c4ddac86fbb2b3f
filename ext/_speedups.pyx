# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled hot path of eventcore: the twin of eventcore._pure (same names, same behaviour).

encode_event / encode_metadata   msgspec JSON payloads
decode_rows                      stored rows -> RecordedEvent
new_event_ids                    UUIDv7, 16 bytes each
check_expected_versions          expected-version checks under the write lock
assign_versions                  per-stream version assignment for a batch
encode_copy_rows                 COPY BINARY framing of pre-encoded rows
encode_copy_events               ids + versions + msgspec payloads + framing, fused, for ingestion

Buffers are sized once per call and written through a raw pointer; every
length is checked before it is written, so bad input raises a typed error
(SerializationError, ConcurrencyError) and never writes out of bounds.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

import datetime as _dt
import os as _os
import threading as _threading
import time as _time
import uuid as _uuid

import msgspec as _msgspec

from eventcore.errors import ConcurrencyError, SerializationError, UnknownEventTypeError
from eventcore.events import EMPTY_METADATA, Metadata, RecordedEvent, check_metadata, event_class
from eventcore._pure.payloads import MAX_PAYLOAD_BYTES as _MAX_PAYLOAD_BYTES, _float_capable, check_encoded, float_capable
from eventcore._pure.utf8 import NESTED_TOO_DEEPLY as _NESTED_TOO_DEEPLY, row_decode_error_text as _row_decode_error_text

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    int PyByteArray_Resize(object, Py_ssize_t) except -1


# ----------------------------------------------------------------------------- constants

cdef int64_t PG_EPOCH_OFFSET_US = 946684800000000  # Unix epoch -> 2000-01-01 UTC, microseconds
cdef int64_t ANY = -1
cdef int64_t STREAM_EXISTS = -2
cdef Py_ssize_t MAX_FIELD = 0x7FFFFFFF  # a COPY field length is an int32
# Fixed bytes of one COPY row: field count (2) + position (4+8) + stream len (4) + version (4+8)
# + event id (4+16) + type len (4) + data len (4) + jsonb version (1) + metadata len (4) + recorded_at (4+8)
cdef Py_ssize_t ROW_FIXED = 2 + 12 + 4 + 12 + 20 + 4 + 4 + 1 + 4 + 12


def _enc_hook(obj):
    # str subclasses (StreamId in an event field) are not native to msgspec.
    if isinstance(obj, str):
        return str(obj)
    raise TypeError(f"objects of type {type(obj).__name__} are not JSON-serializable")


_encoder = _msgspec.json.Encoder(enc_hook=_enc_hook)
_encode = _encoder.encode
_encode_into = _encoder.encode_into
_metadata_decoder = _msgspec.json.Decoder(Metadata)
_decoders = {}
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_timedelta = _dt.timedelta
_UUID = _uuid.UUID
_uuid_new = _uuid.UUID.__new__
_set = object.__setattr__
_SAFE_UNKNOWN = _uuid.SafeUUID.unknown
_from_bytes = int.from_bytes
# ValueError: a str with a lone surrogate; RecursionError: nested past the recursion limit.
_EncodeErrors = (_msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError)
# UnicodeError: bytes that are not UTF-8 as some msgspec versions report them (others raise a
# DecodeError: see eventcore._pure.utf8), or text with lone surrogates.
_DecodeErrors = (_msgspec.DecodeError, _msgspec.ValidationError, UnicodeError, RecursionError)
cdef Py_ssize_t MAX_PAYLOAD = _MAX_PAYLOAD_BYTES


def _describe(exc):
    return _NESTED_TOO_DEEPLY if isinstance(exc, RecursionError) else str(exc)


# ----------------------------------------------------------------------------- byte helpers

cdef inline void _put_i16(char* p, int v) noexcept nogil:
    p[0] = <char>((v >> 8) & 0xFF)
    p[1] = <char>(v & 0xFF)


cdef inline void _put_i32(char* p, int32_t v) noexcept nogil:
    cdef uint32_t u = <uint32_t>v
    p[0] = <char>(u >> 24)
    p[1] = <char>(u >> 16)
    p[2] = <char>(u >> 8)
    p[3] = <char>u


cdef inline void _put_i64(char* p, int64_t v) noexcept nogil:
    cdef uint64_t u = <uint64_t>v
    cdef int k
    for k in range(8):
        p[k] = <char>(u >> (56 - 8 * k))


cdef inline bint _contains(const char* p, Py_ssize_t n, const char* needle, Py_ssize_t k) noexcept nogil:
    cdef const char* q
    while n >= k:
        q = <const char*>memchr(p, needle[0], <size_t>(n - k + 1))
        if q == NULL:
            return False
        if memcmp(q, needle, <size_t>k) == 0:
            return True
        n -= (q - p) + 1
        p = q + 1
    return False


cdef inline bint _needs_check(const char* p, Py_ssize_t n, bint floats) noexcept nogil:
    # The hot path's whole cost of the payload checks (eventcore._pure.payloads): a length test
    # and one or two substring searches; a hit is confirmed on the object by check_encoded.
    return n > MAX_PAYLOAD or _contains(p, n, b"\\u0000", 6) or (floats and _contains(p, n, b"null", 4))


cdef inline bint _floats(object cls) except -1:
    cdef PyObject* found = PyDict_GetItem(_float_capable, cls)
    if found is NULL:
        return float_capable(cls)
    return (<object>found) is True


cdef inline const char* _utf8(object s, Py_ssize_t* size, str what, Py_ssize_t i) except NULL:
    if not PyUnicode_Check(s):
        raise SerializationError(f"{what} {i} must be a str, got {type(s).__name__}")
    try:
        return PyUnicode_AsUTF8AndSize(s, size)
    except UnicodeError as exc:
        raise SerializationError(f"{what} {i} is not valid UTF-8 text: {exc}") from None


cdef inline int64_t _as_i64(object v, str what, Py_ssize_t i) except? -1:
    if not isinstance(v, int):
        raise SerializationError(f"{what} {i} must be an int within int64, got {v!r}")
    try:
        return <int64_t>v
    except (OverflowError, TypeError) as exc:
        raise SerializationError(f"{what} {i} must be an int within int64, got {v!r}") from None


# ----------------------------------------------------------------------------- codec

def encode_event(event):
    """(type name, JSON payload bytes) for an event (checked as in eventcore._pure.payloads)."""
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


cdef object _decoder_for(str type_name, object position, object sid):
    cls = event_class(type_name)
    if cls is None:
        raise UnknownEventTypeError(type_name, position, sid)
    dec = _decoders.get(cls)
    if dec is None:
        dec = _msgspec.json.Decoder(cls)
        _decoders[cls] = dec
    return dec


def decode_rows(rows):
    """Decode stored rows (position, stream_id, version, event_id, type, data, metadata,
    recorded_at_us) into RecordedEvents, in the given order."""
    cdef list out = []
    cdef dict cache = {}
    cdef PyObject* found
    for row in rows:
        if len(row) != 8:
            raise SerializationError(f"a stored row has {len(row)} columns, expected 8")
        position, sid, version, event_id, type_name, data, metadata, recorded_us = row
        if type(type_name) is not str:
            raise SerializationError(f"corrupt type name at position {position!r} (stream {sid!r}): {type_name!r:.60}")
        if type(position) is not int or type(version) is not int or not PyUnicode_Check(sid):
            raise SerializationError(
                f"corrupt envelope at position {position!r} (stream {sid!r}, version {version!r}): "
                "position and version must be ints, the stream id a str"
            )
        found = PyDict_GetItem(cache, type_name)
        if found is NULL:
            dec = _decoder_for(type_name, position, sid)
            cache[type_name] = dec
        else:
            dec = <object>found
        try:
            payload = dec.decode(data)
            md = EMPTY_METADATA if metadata is None else _metadata_decoder.decode(metadata)
        except _DecodeErrors as exc:
            raise SerializationError(
                f"cannot decode event of type {type_name!r} at position {position} "
                f"(stream {sid!r}, version {version}): {_row_decode_error_text(exc, dec, data, metadata)}"
            ) from exc
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
        out.append(RecordedEvent(sid, version, position, u, type_name, payload, md, at))
    return out


# ----------------------------------------------------------------------------- event ids

_id_lock = _threading.Lock()
cdef int64_t _last_ms = 0
cdef int64_t _counter = 0


def _reinit_after_fork():
    global _id_lock
    _id_lock = _threading.Lock()  # another thread may have held it at fork()


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_reinit_after_fork)


cdef inline void _write_event_id(char* p, int64_t ms, int64_t counter, const unsigned char* r) noexcept nogil:
    cdef int k
    for k in range(6):
        p[k] = <char>((ms >> (40 - 8 * k)) & 0xFF)
    p[6] = <char>(0x70 | ((counter >> 8) & 0x0F))
    p[7] = <char>(counter & 0xFF)
    p[8] = <char>(0x80 | (r[0] & 0x3F))
    for k in range(1, 8):
        p[8 + k] = <char>r[k]


def new_event_ids(Py_ssize_t count):
    """`count` UUIDv7 values as 16-byte big-endian strings, strictly increasing within the process."""
    global _last_ms, _counter
    cdef list out = []
    cdef bytes rand, one
    cdef const unsigned char* r
    cdef int64_t ms, counter
    cdef Py_ssize_t i
    if count <= 0:
        return out
    rand = _os.urandom(8 * count)
    r = <const unsigned char*>PyBytes_AS_STRING(rand)
    with _id_lock:
        ms = _time.time_ns() // 1000000
        if ms > _last_ms:
            _last_ms = ms
            _counter = 0
        else:
            ms = _last_ms
        counter = _counter
        for i in range(count):
            counter += 1
            if counter > 0xFFF:
                ms += 1
                counter = 0
            one = PyBytes_FromStringAndSize(NULL, 16)
            _write_event_id(PyBytes_AS_STRING(one), ms, counter, r + 8 * i)
            out.append(one)
        _last_ms = ms
        _counter = counter
    return out


# ----------------------------------------------------------------------------- versions

cdef int _check_expected_objects(object sid, object want, object have) except -1:
    # Values that are not ints within int64 (the stores validate them before they get here): compared
    # as Python objects, exactly as the pure-Python twin compares every value.
    if want == ANY:
        return 0
    if want == STREAM_EXISTS:
        if have == 0:
            raise ConcurrencyError(sid, want, have)
    elif have != want:
        raise ConcurrencyError(sid, want, have)
    return 0


def check_expected_versions(dict expected, dict current):
    """Raise ConcurrencyError unless every stream's current version satisfies its expectation
    (streams checked in sorted order, as the pure-Python twin)."""
    cdef int64_t want, have
    cdef PyObject* found
    for sid in sorted(expected):
        w = expected[sid]
        found = PyDict_GetItem(current, sid)
        h = 0 if found is NULL else <object>found
        if type(w) is not int or type(h) is not int:
            _check_expected_objects(sid, w, h)
            continue
        try:
            want = w
            have = h
        except OverflowError:
            _check_expected_objects(sid, w, h)
            continue
        if want == ANY:
            continue
        if want == STREAM_EXISTS:
            if have == 0:
                raise ConcurrencyError(sid, want, have)
        elif have != want:
            raise ConcurrencyError(sid, want, have)


def assign_versions(list stream_ids, dict heads):
    """Next version for each event, in order; `heads` (stream -> current version) is advanced in place."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(stream_ids)
    cdef list out = [None] * n
    cdef PyObject* found
    cdef object sid, v
    for i in range(n):
        sid = <object>PyList_GET_ITEM(stream_ids, i)
        found = PyDict_GetItem(heads, sid)
        v = 1 if found is NULL else (<object>found) + 1
        PyDict_SetItem(heads, sid, v)
        out[i] = v
    return out


# ----------------------------------------------------------------------------- COPY BINARY

def encode_copy_rows(bytearray buf, int64_t first_position, list stream_ids, list versions, list event_ids,
                     list types, list payloads, list metadatas, int64_t recorded_at_us):
    """Append one COPY BINARY row per event to `buf` (no header or trailer).

    event_ids: 16-byte UUIDs; payloads, metadatas: JSON bytes (metadata may be None).
    On error `buf` is left as it was.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(stream_ids)
    cdef Py_ssize_t i, total = 0, start, sid_len, typ_len, data_len, md_len
    cdef const char* sid_p
    cdef const char* typ_p
    cdef object data, md, eid
    cdef char* p
    cdef int64_t ts = recorded_at_us - PG_EPOCH_OFFSET_US
    if not (PyList_GET_SIZE(versions) == PyList_GET_SIZE(event_ids) == PyList_GET_SIZE(types)
            == PyList_GET_SIZE(payloads) == PyList_GET_SIZE(metadatas) == n):
        raise SerializationError("encode_copy_rows: column lists differ in length")
    # Pass 1: validate everything and size the rows, so a bad row leaves the buffer untouched.
    for i in range(n):
        _utf8(<object>PyList_GET_ITEM(stream_ids, i), &sid_len, "stream id", i)
        _utf8(<object>PyList_GET_ITEM(types, i), &typ_len, "type", i)
        _as_i64(<object>PyList_GET_ITEM(versions, i), "version", i)
        eid = <object>PyList_GET_ITEM(event_ids, i)
        if not PyBytes_Check(eid) or PyBytes_GET_SIZE(eid) != 16:
            raise SerializationError(f"event id {i} must be 16 bytes")
        data = <object>PyList_GET_ITEM(payloads, i)
        if not PyBytes_Check(data):
            raise SerializationError(f"payload {i} must be bytes, got {type(data).__name__}")
        data_len = PyBytes_GET_SIZE(data)
        md = <object>PyList_GET_ITEM(metadatas, i)
        md_len = 0
        if md is not None:
            if not PyBytes_Check(md):
                raise SerializationError(f"metadata {i} must be bytes or None, got {type(md).__name__}")
            md_len = PyBytes_GET_SIZE(md) + 1
        if sid_len > MAX_FIELD or typ_len > MAX_FIELD or data_len >= MAX_FIELD or md_len > MAX_FIELD:
            raise SerializationError(f"row {i} has a field longer than a COPY field allows (2 GiB)")
        total += ROW_FIXED + sid_len + typ_len + data_len + md_len
    if first_position > 0x7FFFFFFFFFFFFFFF - n:
        raise SerializationError("position overflows int64")
    start = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, start + total)
    p = PyByteArray_AS_STRING(buf) + start
    # Pass 2: write.
    for i in range(n):
        sid_p = PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(stream_ids, i), &sid_len)
        typ_p = PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(types, i), &typ_len)
        data = <object>PyList_GET_ITEM(payloads, i)
        md = <object>PyList_GET_ITEM(metadatas, i)
        _put_i16(p, 8); p += 2
        _put_i32(p, 8); _put_i64(p + 4, first_position + i); p += 12
        _put_i32(p, <int32_t>sid_len); memcpy(p + 4, sid_p, sid_len); p += 4 + sid_len
        _put_i32(p, 8); _put_i64(p + 4, <int64_t>(<object>PyList_GET_ITEM(versions, i))); p += 12
        _put_i32(p, 16); memcpy(p + 4, PyBytes_AS_STRING(<object>PyList_GET_ITEM(event_ids, i)), 16); p += 20
        _put_i32(p, <int32_t>typ_len); memcpy(p + 4, typ_p, typ_len); p += 4 + typ_len
        data_len = PyBytes_GET_SIZE(data)
        _put_i32(p, <int32_t>(data_len + 1)); p[4] = 1; memcpy(p + 5, PyBytes_AS_STRING(data), data_len)
        p += 5 + data_len
        if md is None:
            _put_i32(p, -1); p += 4
        else:
            md_len = PyBytes_GET_SIZE(md)
            _put_i32(p, <int32_t>(md_len + 1)); p[4] = 1; memcpy(p + 5, PyBytes_AS_STRING(md), md_len)
            p += 5 + md_len
        _put_i32(p, 8); _put_i64(p + 4, ts); p += 12


def encode_copy_events(bytearray buf, int64_t first_position, list stream_ids, list events, list metadatas,
                       dict heads, int64_t recorded_at_us):
    """Fused ingestion encoder: for each event make a UUIDv7, take the next version of its
    stream from `heads` (advanced in place), msgspec-encode the payload and metadata
    (ec.Metadata or None) straight into `buf` with jsonb framing, and frame the row.

    Returns the event ids (16-byte strings). On error `buf` and `heads` are left as they were.
    """
    global _last_ms, _counter
    cdef Py_ssize_t n = PyList_GET_SIZE(stream_ids)
    cdef Py_ssize_t i, start = PyByteArray_GET_SIZE(buf), row_start, mark, sid_len, typ_len, size
    cdef const char* sid_p
    cdef const char* typ_p
    cdef char* p
    cdef int64_t ts = recorded_at_us - PG_EPOCH_OFFSET_US
    cdef int64_t ms, counter, version
    cdef bytes rand
    cdef const unsigned char* r
    cdef dict type_names = {}
    cdef dict floats_of = {}
    cdef bint floats
    cdef dict new_heads = {}
    cdef list ids = [None] * n
    cdef PyObject* found
    cdef object sid, ev, md, name, cls
    cdef object md_checked = None  # the Metadata last checked: an ingest often gives one to every event
    if PyList_GET_SIZE(events) != n or PyList_GET_SIZE(metadatas) != n:
        raise SerializationError("encode_copy_events: column lists differ in length")
    if first_position > 0x7FFFFFFFFFFFFFFF - n:
        raise SerializationError("position overflows int64")
    rand = _os.urandom(8 * n) if n else b""
    r = <const unsigned char*>PyBytes_AS_STRING(rand)
    with _id_lock:
        ms = _time.time_ns() // 1000000
        if ms > _last_ms:
            counter = 0
        else:
            ms = _last_ms
            counter = _counter
        try:
            for i in range(n):
                sid = <object>PyList_GET_ITEM(stream_ids, i)
                ev = <object>PyList_GET_ITEM(events, i)
                md = <object>PyList_GET_ITEM(metadatas, i)
                sid_p = _utf8(sid, &sid_len, "stream id", i)
                cls = type(ev)
                found = PyDict_GetItem(type_names, cls)
                if found is NULL:
                    try:
                        name = cls.__event_type__
                    except AttributeError:
                        raise SerializationError(f"event {i} is not an ec.Event: {cls.__name__}") from None
                    type_names[cls] = name
                    floats_of[cls] = _floats(cls)
                else:
                    name = <object>found
                floats = <bint>(<object>PyDict_GetItem(floats_of, cls))
                typ_p = _utf8(name, &typ_len, "type", i)
                found = PyDict_GetItem(new_heads, sid)
                if found is NULL:
                    found = PyDict_GetItem(heads, sid)
                version = 0 if found is NULL else _as_i64(<object>found, "stream head", i)
                if version >= 0x7FFFFFFFFFFFFFFF:
                    raise SerializationError(f"stream head {i} is at the int64 limit")
                version += 1
                new_heads[sid] = version
                counter += 1
                if counter > 0xFFF:
                    ms += 1
                    counter = 0
                # Fixed-size head of the row, up to and including the jsonb version byte of data.
                row_start = PyByteArray_GET_SIZE(buf)
                size = 2 + 12 + 4 + sid_len + 12 + 20 + 4 + typ_len + 5
                PyByteArray_Resize(buf, row_start + size)
                p = PyByteArray_AS_STRING(buf) + row_start
                _put_i16(p, 8); p += 2
                _put_i32(p, 8); _put_i64(p + 4, first_position + i); p += 12
                _put_i32(p, <int32_t>sid_len); memcpy(p + 4, sid_p, sid_len); p += 4 + sid_len
                _put_i32(p, 8); _put_i64(p + 4, version); p += 12
                _put_i32(p, 16); _write_event_id(p + 4, ms, counter, r + 8 * i)
                ids[i] = PyBytes_FromStringAndSize(p + 4, 16); p += 20
                _put_i32(p, <int32_t>typ_len); memcpy(p + 4, typ_p, typ_len); p += 4 + typ_len
                p[4] = 1
                mark = row_start + size  # payload starts here; its length goes 5 bytes before
                try:
                    _encode_into(ev, buf, -1)
                except _EncodeErrors as exc:
                    raise SerializationError(
                        f"cannot encode event {i} {name!r} ({cls.__name__}): {_describe(exc)}"
                    ) from exc
                size = PyByteArray_GET_SIZE(buf) - mark
                if _needs_check(PyByteArray_AS_STRING(buf) + mark, size, floats):
                    check_encoded(ev, PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + mark, size),
                                  f"event {i} {name!r} ({cls.__name__})", floats)
                if size >= MAX_FIELD:
                    raise SerializationError(f"event {i} payload is larger than a COPY field allows (2 GiB)")
                _put_i32(PyByteArray_AS_STRING(buf) + mark - 5, <int32_t>(size + 1))
                if md is None or md == EMPTY_METADATA:
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 16)
                    p = PyByteArray_AS_STRING(buf) + row_start
                    _put_i32(p, -1)
                    _put_i32(p + 4, 8); _put_i64(p + 8, ts)
                else:
                    if type(md) is not Metadata:
                        raise SerializationError(f"metadata {i} must be an ec.Metadata or None, got {type(md).__name__}")
                    if md is not md_checked:
                        check_metadata(md)
                        md_checked = md
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 5)
                    PyByteArray_AS_STRING(buf)[row_start + 4] = 1
                    try:
                        _encode_into(md, buf, -1)
                    except _EncodeErrors as exc:
                        raise SerializationError(f"cannot encode metadata {i}: {_describe(exc)}") from exc
                    size = PyByteArray_GET_SIZE(buf) - row_start - 5
                    if _needs_check(PyByteArray_AS_STRING(buf) + row_start + 5, size, True):
                        check_encoded(md, PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + row_start + 5, size),
                                      f"metadata {i}", True)
                    if size >= MAX_FIELD:
                        raise SerializationError(f"metadata {i} is larger than a COPY field allows (2 GiB)")
                    _put_i32(PyByteArray_AS_STRING(buf) + row_start, <int32_t>(size + 1))
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 12)
                    p = PyByteArray_AS_STRING(buf) + row_start
                    _put_i32(p, 8); _put_i64(p + 4, ts)
        except BaseException:
            PyByteArray_Resize(buf, start)
            raise
        _last_ms = ms
        _counter = counter
    heads.update(new_heads)
    return ids
