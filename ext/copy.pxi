# Twin of src/eventcore/_pure/copy.py: COPY BINARY framing of event rows, and the fused ingestion
# encoder that writes ids, versions and msgspec payloads straight into the COPY buffer.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
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
                else:
                    name = <object>found
                floats = <bint>(<object>PyDict_GetItem(floats_of, cls))
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
                    PyByteArray_Resize(buf, row_start + 16)
                    p = PyByteArray_AS_STRING(buf) + row_start
                    _put_i32(p, NULL_LENGTH)
                    _put_i32(p + 4, 8); _put_i64(p + 8, ts)
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
