"""Expected versions: the optimistic-concurrency condition attached to each stream of an append.

An expected version is an int so the hot path (and its Cython twin) can compare
it without attribute lookups:

* n >= 1  — the stream's current version must be exactly n;
* 0       — the stream must not exist yet (`NO_STREAM`; same as exact version 0);
* -1      — no check (`ANY`);
* -2      — the stream must exist, any version (`STREAM_EXISTS`).
"""
from __future__ import annotations

from .errors import ValidationError
from .formats import INT64_MAX

ANY = -1
NO_STREAM = 0
STREAM_EXISTS = -2

#: Largest exact expected version: versions are int64 in every store (a PostgreSQL bigint, an SQLite
#: INTEGER, a C int64 in the compiled hot path), so no stream can ever be past it.
MAX_VERSION = INT64_MAX


class ExpectedVersion:
    """Namespace for the expected-version constants; `ExpectedVersion.exact(n)` validates n."""

    ANY = ANY
    NO_STREAM = NO_STREAM
    STREAM_EXISTS = STREAM_EXISTS

    @staticmethod
    def exact(version: int) -> int:
        if type(version) is not int or not 0 <= version <= MAX_VERSION:
            raise ValidationError(f"an exact expected version is an int in 0..2**63-1 (int64), got {version!r}")
        return version


def validate_expected(stream_id: str, expected: object) -> int:
    """The expected version of one stream of an append, or ValidationError naming the stream."""
    if type(expected) is not int or not STREAM_EXISTS <= expected <= MAX_VERSION:
        raise ValidationError(
            f"expected version for stream {stream_id!r} must be an int in 0..2**63-1 (int64), "
            f"ec.NO_STREAM, ec.ANY or ec.STREAM_EXISTS; got {expected!r}"
        )
    return expected
