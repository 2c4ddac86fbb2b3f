"""Version work for appends: expected-version checks and per-stream version assignment.

Both run while the backend holds its write lock, so they are on the hot path
of every append; the Cython twin (ext/versions.pxi) takes the same arguments.
"""
from __future__ import annotations

from ..errors import ConcurrencyError
from ..expected import ANY, STREAM_EXISTS


def check_expected_versions(expected: dict[str, int], current: dict[str, int]) -> None:
    """Raise ConcurrencyError unless every stream's current version satisfies its expectation.

    `expected` maps stream id -> expected version (see `eventcore.expected`);
    `current` maps stream id -> current version (absent means 0). Streams are
    checked in sorted order, so the error names the same stream whatever the
    order the caller gave.
    """
    for sid in sorted(expected):
        want = expected[sid]
        if want == ANY:
            continue
        have = current.get(sid, 0)
        if want == STREAM_EXISTS:
            if have == 0:
                raise ConcurrencyError(sid, want, have)
        elif have != want:
            raise ConcurrencyError(sid, want, have)


def assign_versions(stream_ids: list[str], heads: dict[str, int]) -> list[int]:
    """Next version for each event, in order; `heads` (stream -> current version) is advanced in place."""
    out = []
    append = out.append
    get = heads.get
    for sid in stream_ids:
        v = get(sid, 0) + 1
        heads[sid] = v
        append(v)
    return out
