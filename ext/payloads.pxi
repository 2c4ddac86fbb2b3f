# The C side of eventcore.payloads (shared by both twins, not a twin itself): the quick scan of an
# encoded payload that decides whether payloads.check_encoded must look at the object, and the
# lookup of payloads.float_capable's cache without a Python call.

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.string cimport memchr, memcmp

from eventcore.payloads import (
    DECODE_ERRORS as _DecodeErrors,
    ENCODE_ERRORS as _EncodeErrors,
    MAX_PAYLOAD_BYTES as _MAX_PAYLOAD_BYTES,
    check_encoded,
    encode_error_text as _describe,
    float_capable,
    float_capable_cache as _float_capable,
)

cdef Py_ssize_t MAX_PAYLOAD = _MAX_PAYLOAD_BYTES


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
    # The hot path's whole cost of the payload checks: a length test and one or two substring
    # searches; a hit is confirmed on the object by check_encoded.
    return n > MAX_PAYLOAD or _contains(p, n, b"\\u0000", 6) or (floats and _contains(p, n, b"null", 4))


cdef inline bint _floats(object cls) except -1:
    cdef PyObject* found = PyDict_GetItem(_float_capable, cls)
    if found is NULL:
        return float_capable(cls)
    return (<object>found) is True
