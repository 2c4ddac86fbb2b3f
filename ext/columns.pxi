# Twin of src/eventcore/_pure/columns.py: encode_column_payloads, each row's payload written from the
# columns, without an event object per row.
#
# The bytes are msgspec's for the same event, by construction: keys, numbers, booleans and datetimes
# are encoded by msgspec itself, a column at a time (`encode(list)` then split on its commas: none of
# these values holds one), strings are escaped here as msgspec escapes them, and the class's other
# fields are its defaults as msgspec encodes them. Anything this path does not write the way msgspec
# would, or that the row path refuses (a NaN, a NUL, a lone surrogate, a required field without a
# value, an object column, an oversized payload, a class with omit_defaults, a tag or array_like),
# sends the whole call to the pure twin, which writes the same bytes or raises the same
# ColumnRowError. fill_columns (below) writes a page of events into the result's arrays through typed
# memoryviews: the same values and masks as the pure twin.

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF, Py_XDECREF

from eventcore._pure import columns as _pure_columns
from eventcore.formats import (COLUMN_NAT as _COLUMN_NAT, KIND_BOOL as _KIND_BOOL, KIND_DATETIME as _KIND_DATETIME,
                               KIND_FLOAT as _KIND_FLOAT, KIND_INT as _KIND_INT, KIND_STR as _KIND_STR)

_inspect = _msgspec.inspect
_EPOCH_NAIVE = _dt.datetime(1970, 1, 1)
_US = _dt.timedelta(microseconds=1)
#: Default factories whose value encodes the same every time.
_PLAIN_FACTORIES = (list, dict, set, frozenset, tuple)
#: What encoding a column's values may raise: msgspec's errors, and a datetime64 no datetime can hold.
_ColumnEncodeErrors = (OverflowError,) + _EncodeErrors
#: cls -> (field names in order, their encoded keys with the separator before them, each field's
#: encoded default or None when it has none this path can write), or None: not a class this path writes.
cdef dict _class_layouts = {}
cdef object _NOT_WRITTEN = object()


cdef object _layout(object cls):
    found = _class_layouts.get(cls, _NOT_WRITTEN)
    if found is not _NOT_WRITTEN:
        return found
    layout = None
    try:
        info = _inspect.type_info(cls)
        config = cls.__struct_config__
        if info.tag is None and not info.array_like and not config.omit_defaults:
            names, keys, defaults = [], [], []
            for i, f in enumerate(info.fields):
                names.append(f.name)
                keys.append((b"{" if i == 0 else b",") + _encode(f.encode_name) + b":")
                default = None
                if f.default is not _msgspec.NODEFAULT:
                    default = _encode(f.default)
                    if f.default is not None and (b"null" in default or b"\\u0000" in default):
                        default = None  # a non-finite float or a NUL: the row path refuses it
                elif f.default_factory is not _msgspec.NODEFAULT and f.default_factory in _PLAIN_FACTORIES:
                    default = _encode(f.default_factory())
                defaults.append(default)
            layout = (tuple(names), tuple(keys), tuple(defaults))
    except _EncodeErrors:
        layout = None
    _class_layouts[cls] = layout
    return layout


cdef const char* _HEX = b"0123456789abcdef"


# -- a growable C buffer for one row's payload (reused for every row of a call) ---------------------------

cdef struct _Row:
    char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _row_put(_Row* r, const char* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t cap
    cdef char* grown
    if r.size + n > r.cap:
        cap = r.cap * 2 if r.cap * 2 > r.size + n else r.size + n + 256
        grown = <char*>PyMem_Realloc(r.data, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        r.data = grown
        r.cap = cap
    memcpy(r.data + r.size, p, <size_t>n)
    r.size += n
    return 0


cdef int _row_int(_Row* r, long long v) except -1:
    """`v` in decimal, as msgspec writes an int."""
    cdef char digits[24]
    cdef int at = 24
    cdef unsigned long long u = <unsigned long long>(-(v + 1)) + 1 if v < 0 else <unsigned long long>v
    while True:
        at -= 1
        digits[at] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        at -= 1
        digits[at] = 45  # -
    return _row_put(r, digits + at, 24 - at)


cdef inline void _two(char* p, long long v) noexcept:
    p[0] = <char>(48 + v // 10)
    p[1] = <char>(48 + v % 10)


cdef int _row_datetime(_Row* r, long long us, bint aware) except -1:
    """Microseconds since the epoch (years 1-9999: checked by the caller) as msgspec writes the datetime:
    "YYYY-MM-DDTHH:MM:SS", then ".ffffff" unless the microseconds are 0, then "Z" if aware, quoted."""
    cdef long long days = us // _US_PER_DAY, rem = us - days * _US_PER_DAY
    if rem < 0:
        days -= 1
        rem += _US_PER_DAY
    # The civil date of a day number (days since 1970-01-01): the inverse of _days_from_civil, by 400-year
    # eras of 146,097 days counted from 0000-03-01.
    cdef long long z = days + 719468
    cdef long long era = (z if z >= 0 else z - 146096) // 146097
    cdef long long doe = z - era * 146097
    cdef long long yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef long long doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef long long mp = (5 * doy + 2) // 153
    cdef long long day = doy - (153 * mp + 2) // 5 + 1
    cdef long long month = mp + 3 if mp < 10 else mp - 9
    cdef long long year = yoe + era * 400 + (1 if month <= 2 else 0)
    cdef long long seconds = rem // 1_000_000, micros = rem % 1_000_000
    cdef char text[32]
    text[0] = 34  # "
    _two(text + 1, year // 100)
    _two(text + 3, year % 100)
    text[5] = 45
    _two(text + 6, month)
    text[8] = 45
    _two(text + 9, day)
    text[11] = 84  # T
    _two(text + 12, seconds // 3600)
    text[14] = 58
    _two(text + 15, (seconds // 60) % 60)
    text[17] = 58
    _two(text + 18, seconds % 60)
    cdef int n = 20
    if micros:
        text[20] = 46  # .
        _two(text + 21, micros // 10000)
        _two(text + 23, (micros // 100) % 100)
        _two(text + 25, micros % 100)
        n = 27
    if aware:
        text[n] = 90  # Z
        n += 1
    text[n] = 34
    return _row_put(r, text, n + 1)


cdef bint _row_str(_Row* r, str s) except -1:
    """Append `s` as a JSON string, escaped as msgspec escapes it; False (nothing appended) for what
    the row path refuses or this path does not write: a NUL, a lone surrogate."""
    cdef Py_ssize_t n, i, start
    cdef const char* p
    try:
        p = PyUnicode_AsUTF8AndSize(s, &n)
    except UnicodeError:
        return False
    cdef unsigned char c
    cdef char esc[6]
    for i in range(n):
        if p[i] == 0:
            return False
    _row_put(r, b'"', 1)
    start = 0
    for i in range(n):
        c = <unsigned char>p[i]
        if c >= 0x20 and c != 34 and c != 92:
            continue
        if i > start:
            _row_put(r, p + start, i - start)
        start = i + 1
        if c == 34:
            _row_put(r, b'\\"', 2)
        elif c == 92:
            _row_put(r, b"\\\\", 2)
        elif c == 10:
            _row_put(r, b"\\n", 2)
        elif c == 13:
            _row_put(r, b"\\r", 2)
        elif c == 9:
            _row_put(r, b"\\t", 2)
        elif c == 8:
            _row_put(r, b"\\b", 2)
        elif c == 12:
            _row_put(r, b"\\f", 2)
        else:
            esc[0] = 92
            esc[1] = 117  # u
            esc[2] = 48
            esc[3] = 48
            esc[4] = _HEX[c >> 4]
            esc[5] = _HEX[c & 15]
            _row_put(r, esc, 6)
    if n > start:
        _row_put(r, p + start, n - start)
    _row_put(r, b'"', 1)
    return True


# How encode_column_payloads writes a field of the class in each row.
cdef enum:
    _FROM_DEFAULT = 0  # the class's default, encoded once
    _FROM_PIECES = 1  # the row's number as msgspec wrote it (a column encoded as one list)
    _FROM_STR = 2  # the row's str, escaped here
    _FROM_INT64 = 3  # the row's int64, in decimal
    _FROM_DATETIME64 = 4  # the row's microseconds since the epoch, as an ISO datetime


cdef bint _plain_values(list values, object kind):
    """Whether an object column's values are all of the kind's own Python type (then msgspec writes each
    without a comma, and as the row path would)."""
    if kind == _KIND_INT:
        return all(type(v) is int for v in values)
    if kind == _KIND_FLOAT:
        return all(type(v) is float or type(v) is int for v in values)
    if kind == _KIND_BOOL:
        return all(type(v) is bool for v in values)
    return False


def encode_column_payloads(cls, encode_event, tuple names, tuple kinds, tuple nullable, tuple aware, list columns,
                           list masks, rows):
    """The JSON payload of each row in `rows`, as the pure twin writes it (see there)."""
    layout = _layout(cls)
    if layout is None:
        return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware, columns,
                                                    masks, rows)
    cdef tuple field_names = layout[0]
    cdef tuple keys = layout[1]
    cdef tuple defaults = layout[2]
    cdef Py_ssize_t n = len(rows), width = len(field_names), i, j, k
    # Per field of the class: the column index (or -1), its values (encoded pieces or str), its mask.
    cdef list sources = []
    cdef object pieces
    cdef list missing
    by_name = {name: k for k, name in enumerate(names)}
    for name, default in zip(field_names, defaults):
        k = by_name.get(name, -1)
        if k < 0:
            if default is None:
                return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                            columns, masks, rows)
            sources.append((-1, None, None))
            continue
        kind = kinds[k]
        mask = masks[k]
        missing = None if mask is None else mask[rows].tolist()
        if missing is not None and not nullable[k] and any(missing):
            return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                        columns, masks, rows)
        column = columns[k]
        if (kind == _KIND_INT or kind == _KIND_DATETIME) and column.dtype.kind == "i" and column.dtype.itemsize == 8 \
                and column.dtype.isnative:
            # Written here from the int64 values (datetimes: microseconds since the epoch), no object per row;
            # a fancy-indexed copy, so contiguous whatever the column's strides.
            direct = column[rows]
            if kind == _KIND_DATETIME and len(direct):
                present = direct if missing is None else direct[[not m for m in missing]]
                if len(present) and (present.min() < RECORDED_AT_MIN_US or present.max() > RECORDED_AT_MAX_US):
                    return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                                columns, masks, rows)
            sources.append((k, direct, missing))
            continue
        values = column[rows].tolist()
        if missing is not None and kind != _KIND_STR:
            values = [0 if m else v for v, m in zip(values, missing)]
        if columns[k].dtype.kind == "O" and kind != _KIND_STR and not _plain_values(values, kind):
            return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware, columns,
                                                        masks, rows)
        if kind == _KIND_STR:
            pieces = values
        elif kind == _KIND_INT or kind == _KIND_FLOAT or kind == _KIND_BOOL or kind == _KIND_DATETIME:
            try:
                if kind == _KIND_DATETIME:
                    epoch = _EPOCH if aware[k] else _EPOCH_NAIVE
                    values = [epoch + v * _US for v in values]
                encoded = _encode(values)
            except _ColumnEncodeErrors:
                return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                            columns, masks, rows)
            pieces = encoded[1:-1].split(b",") if n else []
            if kind == _KIND_FLOAT and b"null" in encoded:  # NaN or infinity: refused by the row path
                return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                            columns, masks, rows)
        else:
            return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware, columns,
                                                        masks, rows)
        sources.append((k, pieces, missing))
    if width == 0:
        return [b"{}"] * n
    cdef list out = []
    cdef _Row r
    r.data = NULL
    r.size = 0
    r.cap = 0
    cdef bytes key, piece
    cdef object v
    # Per field, for the loop over rows: how it is written, and where from.
    cdef list field_pieces = [None] * width  # bytes per row (numbers msgspec wrote), or str per row
    cdef list field_missing = [None] * width  # bool per row, or None: nothing missing
    cdef int* modes = <int*>PyMem_Malloc(sizeof(int) * width)
    cdef const long long** int64s = <const long long**>PyMem_Malloc(sizeof(long long*) * width)
    if modes == NULL or int64s == NULL:
        PyMem_Free(modes)
        PyMem_Free(int64s)
        raise MemoryError()
    try:
        for j in range(width):
            k, pieces, missing = sources[j]
            field_missing[j] = missing
            int64s[j] = NULL
            if k < 0:
                modes[j] = _FROM_DEFAULT
            elif kinds[k] == _KIND_STR:
                modes[j] = _FROM_STR
                field_pieces[j] = pieces
            elif isinstance(pieces, list):
                modes[j] = _FROM_PIECES
                field_pieces[j] = pieces
            else:  # the int64 values, contiguous (a fancy-indexed copy), kept alive by `sources`
                modes[j] = _FROM_DATETIME64 if kinds[k] == _KIND_DATETIME else _FROM_INT64
                field_pieces[j] = aware[k]
                int64s[j] = <const long long*><size_t>pieces.__array_interface__["data"][0]
        for i in range(n):
            r.size = 0
            for j in range(width):
                key = <bytes>keys[j]
                _row_put(&r, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
                if modes[j] == _FROM_DEFAULT:
                    piece = <bytes>defaults[j]
                    _row_put(&r, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))
                    continue
                missing = <list>field_missing[j]
                if missing is not None and missing[i]:
                    _row_put(&r, b"null", 4)
                elif modes[j] == _FROM_INT64:
                    _row_int(&r, int64s[j][i])
                elif modes[j] == _FROM_DATETIME64:
                    _row_datetime(&r, int64s[j][i], field_pieces[j])
                elif modes[j] == _FROM_PIECES:
                    piece = <bytes>(<list>field_pieces[j])[i]
                    _row_put(&r, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))
                else:
                    v = (<list>field_pieces[j])[i]
                    if v is None:
                        if not nullable[sources[j][0]]:
                            return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable,
                                                                        aware, columns, masks, rows)
                        _row_put(&r, b"null", 4)
                    elif type(v) is not str or not _row_str(&r, v):
                        return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable,
                                                                    aware, columns, masks, rows)
            _row_put(&r, b"}", 1)
            if r.size > MAX_PAYLOAD:
                return _pure_columns.encode_column_payloads(cls, encode_event, names, kinds, nullable, aware,
                                                            columns, masks, rows)
            out.append(PyBytes_FromStringAndSize(r.data, r.size))
    finally:
        PyMem_Free(r.data)
        PyMem_Free(modes)
        PyMem_Free(int64s)
    return out


# -- fill_columns: events into preallocated columns ----------------------------------------------------

from cpython.datetime cimport (datetime_day, datetime_hour, datetime_microsecond, datetime_minute, datetime_month,
                               datetime_second, datetime_tzinfo, datetime_year, import_datetime)

import_datetime()

_UTC = _dt.timezone.utc
cdef long long _US_PER_DAY = 86_400_000_000
cdef long long COLUMN_NAT_C = _COLUMN_NAT
cdef double _NAN = float("nan")


cdef long long _days_from_civil(long long y, long long m, long long d) noexcept:
    # Days since 1970-01-01 of a proleptic Gregorian date (the well-known era/day-of-era arithmetic).
    if m <= 2:
        y -= 1
    cdef long long era = (y if y >= 0 else y - 399) // 400
    cdef long long yoe = y - era * 400
    cdef long long doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    cdef long long doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef long long _microseconds(object v) except? -1:
    """Microseconds since the epoch of a datetime: aware ones at their UTC instant, naive ones taken as UTC
    (as the pure twin's `(v - epoch) // 1 us`)."""
    cdef long long seconds = (<long long>datetime_hour(v) * 60 + datetime_minute(v)) * 60 + datetime_second(v)
    cdef long long us = (_days_from_civil(datetime_year(v), datetime_month(v), datetime_day(v)) * _US_PER_DAY
                         + seconds * 1_000_000 + datetime_microsecond(v))
    tz = datetime_tzinfo(v)
    if tz is not None and tz is not _UTC:
        offset = v.utcoffset()
        if offset is not None:
            us -= offset // _US
    return us


def fill_columns(list events, Py_ssize_t offset, tuple fields, tuple kinds, tuple envelope, list outs, list masks):
    """Write `events` into preallocated columns from index `offset` on (see the pure twin)."""
    cdef long long[::1] positions = envelope[0]
    cdef object[::1] stream_ids = envelope[1]
    cdef long long[::1] versions = envelope[2]
    cdef long long[::1] recorded = envelope[3]
    cdef object[::1] types = envelope[4]
    cdef Py_ssize_t n = len(events), i, j, at
    # Writes below go unchecked (boundscheck=False): every array must have room for them.
    if offset < 0 or any(len(a) < offset + n for a in (*envelope, *outs, *masks)):
        raise ValueError(f"fill_columns: {n} events from index {offset} do not fit every array")
    for i in range(n):
        e = events[i]
        at = offset + i
        positions[at] = e.position
        stream_ids[at] = e.stream_id
        versions[at] = e.version
        recorded[at] = _microseconds(e.recorded_at)
        types[at] = e.type
    cdef long long[::1] ints
    cdef double[::1] floats
    cdef unsigned char[::1] flags
    cdef object[::1] objects
    cdef unsigned char[::1] missing
    cdef str name
    cdef object kind
    for j in range(len(fields)):
        name = fields[j]
        kind = kinds[j]
        missing = masks[j].view("u1")
        out = outs[j]
        if kind == _KIND_INT or kind == _KIND_DATETIME:
            ints = out
            for i in range(n):
                v = getattr(events[i].data, name, None)
                at = offset + i
                missing[at] = v is None
                if v is None:
                    ints[at] = 0 if kind == _KIND_INT else COLUMN_NAT_C
                elif kind == _KIND_INT:
                    ints[at] = v
                else:
                    ints[at] = _microseconds(v)
        elif kind == _KIND_FLOAT:
            floats = out
            for i in range(n):
                v = getattr(events[i].data, name, None)
                at = offset + i
                missing[at] = v is None
                floats[at] = _NAN if v is None else v
        elif kind == _KIND_BOOL:
            flags = out.view("u1")
            for i in range(n):
                v = getattr(events[i].data, name, None)
                at = offset + i
                missing[at] = v is None
                flags[at] = v is not None and v
        else:
            objects = out
            for i in range(n):
                v = getattr(events[i].data, name, None)
                at = offset + i
                missing[at] = v is None
                objects[at] = v


cdef inline int _put_field(object payload, str name, int kind, char* out, unsigned char* missing,
                          Py_ssize_t at) except -1:
    """One row's value of one field into its column at index `at` (as fill_columns: None or absent ->
    masked): `out` points at the column's data (int64, float64, bool or object pointers)."""
    v = getattr(payload, name, None)
    missing[at] = v is None
    cdef PyObject** slot
    if kind == _KIND_INT:
        (<int64_t*>out)[at] = 0 if v is None else <int64_t>v
    elif kind == _KIND_DATETIME:
        (<int64_t*>out)[at] = COLUMN_NAT_C if v is None else _microseconds(v)
    elif kind == _KIND_FLOAT:
        (<double*>out)[at] = _NAN if v is None else <double>v
    elif kind == _KIND_BOOL:
        (<unsigned char*>out)[at] = v is not None and v
    else:
        slot = (<PyObject**>out) + at
        Py_INCREF(v)
        Py_XDECREF(slot[0])
        slot[0] = <PyObject*>v
    return 0


def decode_copy_columns(buffer, Py_ssize_t offset, tuple fields, tuple kinds, tuple envelope, list outs,
                        list masks):
    """Decode a whole binary COPY stream of read_columns' columns (formats.COLUMNS_COPY_FIELDS) straight into
    preallocated columns from index `offset` on (see eventcore._pure.columns.decode_copy_columns)."""
    cdef Py_buffer view
    cdef Py_ssize_t nfields = len(fields), j, acquired = 0
    cdef Py_buffer* views = NULL
    if len(kinds) != nfields or len(outs) != nfields or len(masks) != nfields or len(envelope) != 5:
        raise ValueError("decode_copy_columns: one kind, column and mask per field, and five envelope columns")
    if type(buffer) is not bytes and type(buffer) is not bytearray:
        buffer = bytes(buffer)
    # The fields' columns and masks, by pointer: 2 views per field, held for the call.
    views = <Py_buffer*>PyMem_Malloc(sizeof(Py_buffer) * (2 * nfields + 1))
    if views == NULL:
        raise MemoryError()
    try:
        for j in range(nfields):
            PyObject_GetBuffer(outs[j], &views[2 * j], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
            acquired += 1
            PyObject_GetBuffer(masks[j], &views[2 * j + 1], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
            acquired += 1
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        try:
            return _decode_copy_columns(buffer, <const unsigned char*>view.buf, view.len, offset, fields, kinds,
                                        envelope, views)
        finally:
            PyBuffer_Release(&view)
    finally:
        for j in range(acquired):
            PyBuffer_Release(&views[j])
        PyMem_Free(views)


cdef tuple _decode_copy_columns(object buffer, const unsigned char* buf, Py_ssize_t end, Py_ssize_t offset,
                                tuple fields, tuple kinds, tuple envelope, Py_buffer* views):
    cdef long long[::1] positions = envelope[0]
    cdef object[::1] stream_ids = envelope[1]
    cdef long long[::1] versions = envelope[2]
    cdef long long[::1] recorded_at = envelope[3]
    cdef object[::1] types = envelope[4]
    cdef Py_ssize_t capacity = positions.shape[0], nfields = len(fields), j
    cdef Py_ssize_t o, row, size, extension, at = offset, count = 0
    cdef Py_ssize_t sid_at = 0, sid_len = -1, type_at = 0, type_len = -1
    cdef int64_t position = 0, last_position = 0, version, recorded
    cdef int type_version, reads = -1
    cdef dict cache = {}
    cdef PyObject* found
    cdef tuple entry
    cdef object sid = None, type_name = None, decode = None, data, payload, fast = None, key, delivered = None
    if offset < 0 or stream_ids.shape[0] != capacity or versions.shape[0] != capacity \
            or recorded_at.shape[0] != capacity or types.shape[0] != capacity:
        raise ValueError("decode_copy_columns: the envelope's columns must have one length, and offset >= 0")
    for j in range(nfields):
        if views[2 * j].len != capacity * views[2 * j].itemsize or views[2 * j + 1].len != capacity \
                or views[2 * j].itemsize != (1 if kinds[j] == _KIND_BOOL else 8):
            raise ValueError(f"decode_copy_columns: the column of {fields[j]!r} or its mask is not of the "
                             "envelope's length and its kind's item size")
    if end < COPY_HEADER_SIZE or memcmp(buf, PyBytes_AS_STRING(COPY_SIGNATURE), PyBytes_GET_SIZE(COPY_SIGNATURE)) != 0:
        raise SerializationError(_copy_header_problem(buffer))
    extension = _get_i32(buf + COPY_HEADER_SIZE - 4)
    if (<uint32_t>_get_i32(buf + COPY_HEADER_SIZE - 8)) & COPY_CRITICAL_FLAGS or extension < 0 \
            or extension > end - COPY_HEADER_SIZE:
        raise SerializationError(_copy_header_problem(buffer))
    o = COPY_HEADER_SIZE + extension
    while True:
        row = o
        # Framing as decode_copy checks it, every read preceded by its bound check.
        if end - o < 18:
            if end - o == 2 and buf[o] == 0xFF and buf[o + 1] == 0xFF:
                return count, last_position
            break
        if ((buf[o] << 8) | buf[o + 1]) != COLUMNS_COPY_FIELDS or _get_i32(buf + o + 2) != 8:
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
        if end - o < 16 or _get_i32(buf + o) != 8:
            break
        version = <int64_t>_get_u64(buf + o + 4)
        size = _get_i32(buf + o + 12)
        o += 16
        if size < 0 or size > end - o:
            break
        if size != type_len or memcmp(buf + o, buf + type_at, size) != 0:
            type_name = _text_or_null(buf + o, size)
            if type_name is None:
                break
            type_at = o
            type_len = size
            fast = None
        o += size
        if end - o < 4:
            break
        size = _get_i32(buf + o)
        o += 4
        if size != NULL_LENGTH or nfields:  # NULL: the envelope alone was read (envelope_columns)
            if size < 1 or size > end - o or buf[o] != JSONB_VERSION:
                break
            data = PyBytes_FromStringAndSize(<const char*>buf + o + 1, size - 1) if nfields else None
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
        if size == NULL_LENGTH:
            type_version = 1
            o += 4
        elif size != TYPE_VERSION_BYTES or end - o < 6:
            break
        else:
            type_version = <int16_t>((buf[o + 4] << 8) | buf[o + 5])
            o += 6
        if at >= capacity:
            raise ValueError(f"decode_copy_columns: more rows than the {capacity - offset} the columns have room for")
        if nfields:
            if fast is None:
                found = PyDict_GetItem(cache, type_name)
                if found is NULL:
                    entry = _decoding(type_name, False, position, sid)
                    cache[type_name] = entry
                else:
                    entry = <tuple>found
                fast = entry[0]
                delivered = entry[1]
                reads = entry[2]
            if type_version == reads or reads < 0:
                decode = fast
            else:
                key = (type_name, type_version)
                found = PyDict_GetItem(cache, key)
                if found is NULL:
                    decode = _upcasting(type_name, type_version, position, sid)
                    cache[key] = decode
                else:
                    decode = <object>found
            try:
                payload = decode(data)
            except _DecodeErrors as exc:
                raise SerializationError(
                    f"cannot decode event of type {type_name!r} at position {position} "
                    f"(stream {sid!r}, version {version}): "
                    f"{_row_decode_error_text(exc, decode.__self__, data, None)}"
                ) from exc
            except _UpcastError as exc:
                raise exc.located(position, sid) from exc.__cause__
            for j in range(nfields):
                _put_field(payload, <str>fields[j], <int>kinds[j], <char*>views[2 * j].buf,
                           <unsigned char*>views[2 * j + 1].buf, at)
        positions[at] = position
        stream_ids[at] = sid
        versions[at] = version
        recorded_at[at] = recorded + PG_EPOCH_OFFSET_US
        types[at] = delivered if nfields else type_name  # decoded: the class's own name (an alias's events too)
        at += 1
        count += 1
        last_position = position
    raise SerializationError(_copy_row_problem(buffer, row, "columns" if nfields else "envelope"))
