# Twin of src/eventcore/_pure/versions.py: expected-version checks and per-stream version assignment.

from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.stdint cimport int64_t

from eventcore.errors import ConcurrencyError


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
