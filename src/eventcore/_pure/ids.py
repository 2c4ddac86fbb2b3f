"""Event ids: UUIDv7 (RFC 9562), time-ordered, generated client-side before the write.

Ids are known before the append is sent, so a retried write can be recognised
(idempotent re-ingest) and ids sort roughly by creation time in indexes.
"""
from __future__ import annotations

import os
import threading
import time

from ..formats import UUID_COUNTER_MAX, UUID_VARIANT, UUID_VERSION

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def _reinit_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)

# The 128 bits, most significant first: unix_ts_ms (48), version (4), counter in rand_a (12),
# variant (2), random (62).
_FIXED_BITS = UUID_VERSION << 76 | UUID_VARIANT << 62
_RANDOM_MASK = (1 << 62) - 1


def new_event_ids(count: int) -> list[bytes]:
    """`count` UUIDv7 values as 16-byte big-endian strings, strictly increasing within the process."""
    global _last_ms, _counter
    if count <= 0:
        return []
    rand = os.urandom(8 * count)  # one syscall for the whole batch
    out = []
    append = out.append
    from_bytes = int.from_bytes
    fixed, mask, counter_max = _FIXED_BITS, _RANDOM_MASK, UUID_COUNTER_MAX
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = 0
        else:
            ms = _last_ms
        counter = _counter
        for i in range(count):
            counter += 1
            if counter > counter_max:
                # Counter exhausted within one millisecond: borrow the next one.
                ms += 1
                counter = 0
            r = from_bytes(rand[8 * i : 8 * i + 8], "big") & mask
            value = (ms << 80) | counter << 64 | fixed | r
            append(value.to_bytes(16, "big"))
        _last_ms = ms
        _counter = counter
    return out
