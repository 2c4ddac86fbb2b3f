# Twin of src/eventcore/_pure/copy.py: COPY BINARY framing of event rows, and the fused ingestion
# encoder that writes ids, versions and msgspec payloads straight into the COPY buffer.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int16_t, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from eventcore.errors import SerializationError
from eventcore.events import EMPTY_METADATA, Metadata, check_metadata

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    const char* _utf8_or_null "PyUnicode_AsUTF8AndSize"(object, Py_ssize_t*)  # NULL with an exception set
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
    void PyErr_Clear()
    int PyByteArray_Resize(object, Py_ssize_t) except -1


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


# _utf8 and _as_i64 are inlined into every row loop, so they are a type check and one C call each;
# the error messages are built out of line (_utf8_error, _as_i64_error). With the messages inline
# the compiler gave up inlining and encode_copy_rows took ~20% longer per row.

cdef inline const char* _utf8(object s, Py_ssize_t* size, str what, Py_ssize_t i) except NULL:
    cdef const char* p = NULL
    if PyUnicode_Check(s):
        p = _utf8_or_null(s, size)
    return p if p != NULL else _utf8_error(s, size, what, i)


cdef const char* _utf8_error(object s, Py_ssize_t* size, str what, Py_ssize_t i) except NULL:
    PyErr_Clear()  # raised again below, where it can be caught
    if not PyUnicode_Check(s):
        raise SerializationError(f"{what} {i} must be a str, got {type(s).__name__}")
    try:
        return PyUnicode_AsUTF8AndSize(s, size)
    except UnicodeError as exc:
        raise SerializationError(f"{what} {i} is not valid UTF-8 text: {exc}") from None


cdef inline int64_t _as_i64(object v, str what, Py_ssize_t i) except? -1:
    cdef int overflow = 0
    cdef long long x
    if PyLong_Check(v):
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow == 0:
            return <int64_t>x
    return _as_i64_error(v, what, i)


cdef int64_t _as_i64_error(object v, str what, Py_ssize_t i) except? -1:
    raise SerializationError(f"{what} {i} must be an int within int64, got {v!r}")


def encode_copy_rows(bytearray buf, int64_t first_position, list stream_ids, list versions, list event_ids,
                     list types, list type_versions, list payloads, list metadatas, int64_t recorded_at_us):
    """Append one COPY BINARY row per event to `buf` (no header or trailer).

    event_ids: 16-byte UUIDs; type_versions: ints in 1..32767; payloads, metadatas: JSON bytes
    (metadata may be None). On error `buf` is left as it was.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(stream_ids)
    cdef Py_ssize_t i, total = 0, start, sid_len, typ_len, data_len, md_len
    cdef const char* sid_p
    cdef const char* typ_p
    cdef object data, md, eid, tv
    cdef char* p
    cdef int64_t ts = recorded_at_us - PG_EPOCH_OFFSET_US
    if not (PyList_GET_SIZE(versions) == PyList_GET_SIZE(event_ids) == PyList_GET_SIZE(types)
            == PyList_GET_SIZE(type_versions) == PyList_GET_SIZE(payloads) == PyList_GET_SIZE(metadatas) == n):
        raise SerializationError("encode_copy_rows: column lists differ in length")
    # Pass 1: validate everything and size the rows, so a bad row leaves the buffer untouched.
    for i in range(n):
        _utf8(<object>PyList_GET_ITEM(stream_ids, i), &sid_len, "stream id", i)
        _utf8(<object>PyList_GET_ITEM(types, i), &typ_len, "type", i)
        _as_i64(<object>PyList_GET_ITEM(versions, i), "version", i)
        tv = <object>PyList_GET_ITEM(type_versions, i)
        if type(tv) is not int or not 1 <= tv <= MAX_EVENT_VERSION:
            raise SerializationError(f"type version {i} must be an int in 1..{MAX_EVENT_VERSION}, got {tv!r}")
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
        if sid_len > MAX_FIELD_BYTES or typ_len > MAX_FIELD_BYTES or data_len >= MAX_FIELD_BYTES or md_len > MAX_FIELD_BYTES:
            raise SerializationError(f"row {i} has a field longer than a COPY field allows (2 GiB)")
        total += ROW_FIXED + sid_len + typ_len + data_len + md_len
    if first_position > INT64_MAX - n:
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
        _put_i16(p, COPY_FIELDS); p += 2
        _put_i32(p, 8); _put_i64(p + 4, first_position + i); p += 12
        _put_i32(p, <int32_t>sid_len); memcpy(p + 4, sid_p, sid_len); p += 4 + sid_len
        _put_i32(p, 8); _put_i64(p + 4, <int64_t>(<object>PyList_GET_ITEM(versions, i))); p += 12
        _put_i32(p, 16); memcpy(p + 4, PyBytes_AS_STRING(<object>PyList_GET_ITEM(event_ids, i)), 16); p += 20
        _put_i32(p, <int32_t>typ_len); memcpy(p + 4, typ_p, typ_len); p += 4 + typ_len
        data_len = PyBytes_GET_SIZE(data)
        _put_i32(p, <int32_t>(data_len + 1)); p[4] = JSONB_VERSION; memcpy(p + 5, PyBytes_AS_STRING(data), data_len)
        p += 5 + data_len
        if md is None:
            _put_i32(p, NULL_LENGTH); p += 4
        else:
            md_len = PyBytes_GET_SIZE(md)
            _put_i32(p, <int32_t>(md_len + 1)); p[4] = JSONB_VERSION; memcpy(p + 5, PyBytes_AS_STRING(md), md_len)
            p += 5 + md_len
        _put_i32(p, 8); _put_i64(p + 4, ts); p += 12
        _put_i32(p, TYPE_VERSION_BYTES); _put_i16(p + 4, <int>(<object>PyList_GET_ITEM(type_versions, i))); p += 6


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
    cdef dict type_versions_of = {}
    cdef int tv
    cdef bint floats
    cdef dict new_heads = {}
    cdef list ids = [None] * n
    cdef PyObject* found
    cdef object sid, ev, md, name, cls
    cdef object md_checked = None  # the Metadata last checked: an ingest often gives one to every event
    if PyList_GET_SIZE(events) != n or PyList_GET_SIZE(metadatas) != n:
        raise SerializationError("encode_copy_events: column lists differ in length")
    if first_position > INT64_MAX - n:
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
                    type_versions_of[cls] = cls.__event_version__
                else:
                    name = <object>found
                floats = <bint>(<object>PyDict_GetItem(floats_of, cls))
                tv = <int>(<object>PyDict_GetItem(type_versions_of, cls))
                typ_p = _utf8(name, &typ_len, "type", i)
                found = PyDict_GetItem(new_heads, sid)
                if found is NULL:
                    found = PyDict_GetItem(heads, sid)
                version = 0 if found is NULL else _as_i64(<object>found, "stream head", i)
                if version >= INT64_MAX:
                    raise SerializationError(f"stream head {i} is at the int64 limit")
                version += 1
                new_heads[sid] = version
                counter += 1
                if counter > UUID_COUNTER_MAX:
                    ms += 1
                    counter = 0
                # Fixed-size head of the row, up to and including the jsonb version byte of data.
                row_start = PyByteArray_GET_SIZE(buf)
                size = 2 + 12 + 4 + sid_len + 12 + 20 + 4 + typ_len + 5
                PyByteArray_Resize(buf, row_start + size)
                p = PyByteArray_AS_STRING(buf) + row_start
                _put_i16(p, COPY_FIELDS); p += 2
                _put_i32(p, 8); _put_i64(p + 4, first_position + i); p += 12
                _put_i32(p, <int32_t>sid_len); memcpy(p + 4, sid_p, sid_len); p += 4 + sid_len
                _put_i32(p, 8); _put_i64(p + 4, version); p += 12
                _put_i32(p, 16); _write_event_id(p + 4, ms, counter, r + 8 * i)
                ids[i] = PyBytes_FromStringAndSize(p + 4, 16); p += 20
                _put_i32(p, <int32_t>typ_len); memcpy(p + 4, typ_p, typ_len); p += 4 + typ_len
                p[4] = JSONB_VERSION
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
                if size >= MAX_FIELD_BYTES:
                    raise SerializationError(f"event {i} payload is larger than a COPY field allows (2 GiB)")
                _put_i32(PyByteArray_AS_STRING(buf) + mark - 5, <int32_t>(size + 1))
                if md is None or md == EMPTY_METADATA:
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 22)
                    p = PyByteArray_AS_STRING(buf) + row_start
                    _put_i32(p, NULL_LENGTH)
                    _put_i32(p + 4, 8); _put_i64(p + 8, ts)
                    _put_i32(p + 16, TYPE_VERSION_BYTES); _put_i16(p + 20, tv)
                else:
                    if type(md) is not Metadata:
                        raise SerializationError(f"metadata {i} must be an ec.Metadata or None, got {type(md).__name__}")
                    if md is not md_checked:
                        check_metadata(md)
                        md_checked = md
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 5)
                    PyByteArray_AS_STRING(buf)[row_start + 4] = JSONB_VERSION
                    try:
                        _encode_into(md, buf, -1)
                    except _EncodeErrors as exc:
                        raise SerializationError(f"cannot encode metadata {i}: {_describe(exc)}") from exc
                    size = PyByteArray_GET_SIZE(buf) - row_start - 5
                    if _needs_check(PyByteArray_AS_STRING(buf) + row_start + 5, size, True):
                        check_encoded(md, PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + row_start + 5, size),
                                      f"metadata {i}", True)
                    if size >= MAX_FIELD_BYTES:
                        raise SerializationError(f"metadata {i} is larger than a COPY field allows (2 GiB)")
                    _put_i32(PyByteArray_AS_STRING(buf) + row_start, <int32_t>(size + 1))
                    row_start = PyByteArray_GET_SIZE(buf)
                    PyByteArray_Resize(buf, row_start + 18)
                    p = PyByteArray_AS_STRING(buf) + row_start
                    _put_i32(p, 8); _put_i64(p + 4, ts)
                    _put_i32(p + 12, TYPE_VERSION_BYTES); _put_i16(p + 16, tv)
        except BaseException:
            PyByteArray_Resize(buf, start)
            raise
        _last_ms = ms
        _counter = counter
    heads.update(new_heads)
    return ids


# -- reading: decode_copy --------------------------------------------------------------------------

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.datetime cimport datetime_new, import_datetime
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp

from eventcore.errors import UpcastError as _UpcastError
from eventcore.events import RecordedEvent
from eventcore.evolution import decoding as _decoding, upcasting as _upcasting
from eventcore.formats import copy_header_problem as _copy_header_problem, copy_row_problem as _copy_row_problem

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object, object, object) except -1
    object PyLong_FromUnsignedLongLong(unsigned long long)

import_datetime()

_UTC = _dt.timezone.utc
_SIXTY_FOUR = 64
_decode_metadata = _metadata_decoder.decode
cdef int64_t _DAY_US = 86_400_000_000


cdef inline int32_t _get_i32(const unsigned char* p) noexcept nogil:
    return <int32_t>((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline uint64_t _get_u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_get_i32(p) << 32) | <uint32_t>_get_i32(p + 4)


cdef object _utc_datetime(int64_t unix_us):
    """A UTC datetime from Unix microseconds already checked to lie within datetime's range
    (the proleptic Gregorian calendar from days since 1970: H. Hinnant's civil_from_days)."""
    cdef int64_t days = unix_us // _DAY_US, rem = unix_us % _DAY_US
    if rem < 0:  # C division truncates toward zero
        rem += _DAY_US
        days -= 1
    cdef int64_t z = days + 719468
    cdef int64_t era = (z if z >= 0 else z - 146096) // 146097
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int day = <int>(doy - (153 * mp + 2) // 5 + 1)
    cdef int month = <int>(mp + 3 if mp < 10 else mp - 9)
    cdef int year = <int>(yoe + era * 400 + (1 if month <= 2 else 0))
    cdef int64_t secs = rem // 1_000_000
    return datetime_new(year, month, day, <int>(secs // 3600), <int>((secs // 60) % 60), <int>(secs % 60),
                        <int>(rem % 1_000_000), _UTC)


cdef object _uuid_of(const unsigned char* p):
    u = _uuid_new(_UUID)
    PyObject_GenericSetAttr(u, "int", (PyLong_FromUnsignedLongLong(_get_u64(p)) << _SIXTY_FOUR)
                            | PyLong_FromUnsignedLongLong(_get_u64(p + 8)))
    PyObject_GenericSetAttr(u, "is_safe", _SAFE_UNKNOWN)
    return u


cdef object _text_or_null(const unsigned char* p, Py_ssize_t n):
    """The UTF-8 text at p, or None when it is not UTF-8."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        return None


def decode_copy(buffer, bint raw=False):
    """Decode a whole binary COPY stream (header, rows, trailer) of the events table's columns
    into RecordedEvents, in order (see eventcore._pure.copy.decode_copy)."""
    cdef Py_buffer view
    if type(buffer) is not bytes and type(buffer) is not bytearray:
        buffer = bytes(buffer)  # as the pure twin: any buffer (a non-contiguous view too) is copied once
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        return _decode_copy(buffer, <const unsigned char*>view.buf, view.len, raw)
    finally:
        PyBuffer_Release(&view)


cdef list _decode_copy(object buffer, const unsigned char* buf, Py_ssize_t end, bint raw):
    cdef Py_ssize_t o, row, size, extension, id_at
    cdef Py_ssize_t sid_at = 0, sid_len = -1, type_at = 0, type_len = -1
    cdef int64_t position, version, recorded, last_recorded = 0
    # The version the current type's decoder reads as is (-1: any, when raw): a row stored at
    # another goes to the upcasters (the slow path, eventcore.evolution).
    cdef int type_version, reads = -1
    cdef list out = []
    cdef dict cache = {}
    cdef PyObject* found
    cdef tuple entry
    cdef object sid = None, type_name = None, delivered = None, decode = None, data, metadata, md, at = None
    cdef object fast = None, key
    if end < COPY_HEADER_SIZE or memcmp(buf, PyBytes_AS_STRING(COPY_SIGNATURE), PyBytes_GET_SIZE(COPY_SIGNATURE)) != 0:
        raise SerializationError(_copy_header_problem(buffer))
    extension = _get_i32(buf + COPY_HEADER_SIZE - 4)
    if (<uint32_t>_get_i32(buf + COPY_HEADER_SIZE - 8)) & COPY_CRITICAL_FLAGS or extension < 0 \
            or extension > end - COPY_HEADER_SIZE:
        raise SerializationError(_copy_header_problem(buffer))
    o = COPY_HEADER_SIZE + extension
    while True:
        row = o
        # Every read below is preceded by a check that it lies within the buffer; lengths are int32,
        # so `o + size` cannot overflow a Py_ssize_t.
        if end - o < 18:  # no room for a row's fixed start: the trailer (-1), and nothing after it
            if end - o == 2 and buf[o] == 0xFF and buf[o + 1] == 0xFF:
                return out
            break
        if ((buf[o] << 8) | buf[o + 1]) != COPY_FIELDS or _get_i32(buf + o + 2) != 8:
            break
        position = <int64_t>_get_u64(buf + o + 6)
        size = _get_i32(buf + o + 14)
        o += 18
        if size < 0 or size > end - o:
            break
        if size != sid_len or memcmp(buf + o, buf + sid_at, size) != 0:
            sid = _text_or_null(buf + o, size)
            if sid is None:
                break
            sid_at = o
            sid_len = size
        o += size
        # version (4 + 8), event id (4 + 16), the type's length (4)
        if end - o < 36 or _get_i32(buf + o) != 8 or _get_i32(buf + o + 12) != 16:
            break
        version = <int64_t>_get_u64(buf + o + 4)
        id_at = o + 16
        size = _get_i32(buf + o + 32)
        o += 36
        if size < 0 or size > end - o:
            break
        if size != type_len or memcmp(buf + o, buf + type_at, size) != 0:
            type_name = _text_or_null(buf + o, size)
            if type_name is None:
                break
            type_at = o
            type_len = size
            fast = None  # looked up once the whole row is known to be well framed
        o += size
        if end - o < 4:
            break
        size = _get_i32(buf + o)
        o += 4
        if size < 1 or size > end - o or buf[o] != JSONB_VERSION:
            break
        data = PyBytes_FromStringAndSize(<const char*>buf + o + 1, size - 1)
        o += size
        if end - o < 4:
            break
        size = _get_i32(buf + o)
        o += 4
        if size == NULL_LENGTH:
            metadata = None
        elif size < 1 or size > end - o or buf[o] != JSONB_VERSION:
            break
        else:
            metadata = PyBytes_FromStringAndSize(<const char*>buf + o + 1, size - 1)
            o += size
        if end - o < 12 or _get_i32(buf + o) != 8:
            break
        recorded = <int64_t>_get_u64(buf + o + 4)
        o += 12
        if recorded < RECORDED_AT_MIN_US - PG_EPOCH_OFFSET_US or recorded > RECORDED_AT_MAX_US - PG_EPOCH_OFFSET_US:
            break
        if end - o < 4:
            break
        size = _get_i32(buf + o)
        if size == NULL_LENGTH:  # the store's reads send version 1 as NULL
            type_version = 1
            o += 4
        elif size != TYPE_VERSION_BYTES or end - o < 6:
            break
        else:
            type_version = <int16_t>((buf[o + 4] << 8) | buf[o + 5])
            o += 6
        if fast is None:
            found = PyDict_GetItem(cache, type_name)
            if found is NULL:
                entry = _decoding(type_name, raw, position, sid)
                cache[type_name] = entry
            else:
                entry = <tuple>found
            fast = entry[0]
            delivered = entry[1]
            reads = entry[2]
        if type_version == reads or reads < 0:
            decode = fast
        else:  # stored at another version than its class's
            key = (type_name, type_version)
            found = PyDict_GetItem(cache, key)
            if found is NULL:
                decode = _upcasting(type_name, type_version, position, sid)
                cache[key] = decode
            else:
                decode = <object>found
        try:
            payload = decode(data)
            md = EMPTY_METADATA if metadata is None else _decode_metadata(metadata)
        except _DecodeErrors as exc:
            raise SerializationError(
                f"cannot decode event of type {type_name!r} at position {position} "
                f"(stream {sid!r}, version {version}): "
                f"{_row_decode_error_text(exc, decode.__self__, data, metadata)}"
            ) from exc
        except _UpcastError as exc:
            raise exc.located(position, sid) from exc.__cause__
        if recorded != last_recorded or at is None:  # one per transaction: the events of a write share it
            at = _utc_datetime(recorded + PG_EPOCH_OFFSET_US)
            last_recorded = recorded
        out.append(RecordedEvent(sid, version, position, _uuid_of(buf + id_at), delivered, payload, md, at,
                                 type_version if decode is fast else reads))
    raise SerializationError(_copy_row_problem(buffer, row))


def copy_from_result(result):
    """Twin of eventcore._pure.copy.copy_from_result: a binary-format libpq result's rows as one
    binary COPY stream (header, rows, trailer), sized once and written through a pointer."""
    cdef Py_ssize_t rows = result.ntuples
    cdef Py_ssize_t fields = result.nfields
    cdef Py_ssize_t r, f, k, size, total
    cdef list cells
    cdef object v
    cdef bytes out
    cdef char* p
    if not 0 <= fields <= 0x7FFF:
        raise SerializationError(f"a COPY row holds at most 32767 fields, the result has {fields}")
    get = result.get_value
    cells = [None] * (rows * fields)
    total = COPY_HEADER_SIZE + 2 + rows * (2 + 4 * fields)
    k = 0
    for r in range(rows):
        for f in range(fields):
            v = get(r, f)
            if v is not None:
                if not PyBytes_Check(v):
                    raise SerializationError(f"value {f} of result row {r} is {type(v).__name__}, not bytes")
                total += PyBytes_GET_SIZE(v)
            cells[k] = v
            k += 1
    out = PyBytes_FromStringAndSize(NULL, total)
    p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(COPY_HEADER), COPY_HEADER_SIZE)
    p += COPY_HEADER_SIZE
    k = 0
    for r in range(rows):
        _put_i16(p, <int>fields)
        p += 2
        for f in range(fields):
            v = <object>PyList_GET_ITEM(cells, k)
            k += 1
            if v is None:
                _put_i32(p, -1)
                p += 4
            else:
                size = PyBytes_GET_SIZE(v)
                _put_i32(p, <int32_t>size)
                memcpy(p + 4, PyBytes_AS_STRING(v), size)
                p += 4 + size
    _put_i16(p, -1)
    return out
