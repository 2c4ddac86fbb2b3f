# Twin of src/eventcore/_pure/ids.py: UUIDv7 event ids (RFC 9562). The clock and counter below are
# also advanced by encode_copy_events (copy.pxi), which writes its ids straight into the COPY buffer.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t

import os as _os
import threading as _threading
import time as _time

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
    p[6] = <char>((UUID_VERSION << 4) | ((counter >> 8) & 0x0F))
    p[7] = <char>(counter & 0xFF)
    p[8] = <char>((UUID_VARIANT << 6) | (r[0] & 0x3F))
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
            if counter > UUID_COUNTER_MAX:
                ms += 1
                counter = 0
            one = PyBytes_FromStringAndSize(NULL, 16)
            _write_event_id(PyBytes_AS_STRING(one), ms, counter, r + 8 * i)
            out.append(one)
        _last_ms = ms
        _counter = counter
    return out
