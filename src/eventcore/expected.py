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

ANY = -1
NO_STREAM = 0
STREAM_EXISTS = -2


class ExpectedVersion:
    """Namespace for the expected-version constants; `ExpectedVersion.exact(n)` validates n."""

    ANY = ANY
    NO_STREAM = NO_STREAM
    STREAM_EXISTS = STREAM_EXISTS

    @staticmethod
    def exact(version: int) -> int:
        if type(version) is not int or version < 0:
            raise ValidationError(f"an exact expected version is an int >= 0, got {version!r}")
        return version


def validate_expected(stream_id: str, expected: object) -> int:
    if type(expected) is not int or expected < STREAM_EXISTS:
        raise ValidationError(
            f"expected version for stream {stream_id!r} must be an int >= 0, "
            f"ec.NO_STREAM, ec.ANY or ec.STREAM_EXISTS; got {expected!r}"
        )
    return expected


def describe_expected(expected: int) -> str:
    if expected == ANY:
        return "any version"
    if expected == NO_STREAM:
        return "no stream (version 0)"
    if expected == STREAM_EXISTS:
        return "an existing stream"
    return f"version {expected}"
