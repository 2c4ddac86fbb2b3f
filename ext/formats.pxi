# The constants of eventcore.formats (and the two expected-version sentinels of eventcore.expected)
# as typed C globals, copied from the Python modules when the extension is imported: each value is
# written once, in Python, for both twins.

from libc.stdint cimport int64_t, uint32_t

from eventcore import events as _events, expected as _expected, formats as _formats

cdef int COPY_FIELDS = _formats.COPY_FIELDS
cdef int COLUMNS_COPY_FIELDS = _formats.COLUMNS_COPY_FIELDS
cdef int NULL_LENGTH = _formats.NULL_LENGTH
cdef char JSONB_VERSION = _formats.JSONB_VERSION
cdef Py_ssize_t MAX_FIELD_BYTES = _formats.MAX_FIELD_BYTES
cdef int64_t PG_EPOCH_OFFSET_US = _formats.PG_EPOCH_OFFSET_US
cdef int64_t INT64_MAX = _formats.INT64_MAX
cdef Py_ssize_t ROW_WIDTH = len(_formats.ROW_COLUMNS)
cdef int TYPE_VERSION_BYTES = _formats.TYPE_VERSION_BYTES
cdef int MAX_EVENT_VERSION = _events.MAX_EVENT_VERSION
cdef int UUID_VERSION = _formats.UUID_VERSION
cdef int UUID_VARIANT = _formats.UUID_VARIANT
cdef int64_t UUID_COUNTER_MAX = _formats.UUID_COUNTER_MAX
cdef int64_t ANY = _expected.ANY
cdef int64_t STREAM_EXISTS = _expected.STREAM_EXISTS

# Fixed bytes of one COPY row: field count (2) + position (4+8) + stream len (4) + version (4+8)
# + event id (4+16) + type len (4) + data len (4) + jsonb version (1) + metadata len (4) + recorded_at (4+8)
# + type version (4+2)
cdef Py_ssize_t ROW_FIXED = 2 + 12 + 4 + 12 + 20 + 4 + 4 + 1 + 4 + 12 + 6

cdef int64_t RECORDED_AT_MIN_US = _formats.RECORDED_AT_MIN_US
cdef int64_t RECORDED_AT_MAX_US = _formats.RECORDED_AT_MAX_US
cdef uint32_t COPY_CRITICAL_FLAGS = _formats.COPY_CRITICAL_FLAGS
cdef bytes COPY_SIGNATURE = _formats.COPY_SIGNATURE
cdef Py_ssize_t COPY_HEADER_SIZE = len(_formats.COPY_HEADER)
cdef bytes COPY_HEADER = _formats.COPY_HEADER
