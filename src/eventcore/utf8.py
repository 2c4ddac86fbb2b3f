"""Naming the first byte that is not UTF-8 when msgspec refuses to decode bytes; shared by both implementations.

msgspec reports invalid UTF-8 inside a JSON string in one of two ways, depending on
its version: a `UnicodeDecodeError` whose offset counts from the start of that string
(up to 0.22), or `msgspec.DecodeError("Invalid UTF-8 encoded string")` with no offset
at all (0.23 on). Neither tells a user where the bad byte is in what they gave, so
both become one message, the same whichever msgspec is installed: "not valid UTF-8
(byte N: b'\\xff')", N counted from the start of the whole input. Only error paths
come here.
"""
from __future__ import annotations

from typing import Any

import msgspec

NESTED_TOO_DEEPLY = "nested too deeply (more levels than Python's recursion limit)"


def invalid_utf8(data: object) -> str | None:
    """"not valid UTF-8 (byte N: b'\\xNN')" for bytes that are not UTF-8, N the offset of the
    first invalid byte; None for valid UTF-8 and for anything that is not bytes-like."""
    if isinstance(data, str):
        return None
    try:
        raw = bytes(data)
    except TypeError:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"
    return None


def is_utf8_error(exc: BaseException) -> bool:
    """Whether msgspec refused its input for holding bytes that are not UTF-8 (either way it says so)."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    return isinstance(exc, msgspec.DecodeError) and "UTF-8" in str(exc)


def decode_error_text(exc: BaseException, data: object) -> str:
    """What was wrong with `data` when msgspec raised `exc` decoding it: invalid UTF-8 named by
    the offset of its first bad byte, nesting past the recursion limit, else msgspec's message."""
    if isinstance(exc, RecursionError):
        return NESTED_TOO_DEEPLY
    if is_utf8_error(exc):
        problem = invalid_utf8(data)
        if problem is not None:
            return problem
    return str(exc)


def row_decode_error_text(exc: BaseException, decoder: Any, data: bytes,
                          metadata: bytes | None) -> str:
    """`decode_error_text` for a stored row whose payload or metadata failed to decode, saying
    which of the two is not UTF-8 (the payload is decoded again to know: an error path only)."""
    if not is_utf8_error(exc):
        return decode_error_text(exc, data)
    try:
        decoder.decode(data)
    except Exception:  # noqa: BLE001 - whatever it is, the payload is the part that failed
        part, raw = "payload", data
    else:
        part, raw = "metadata", metadata
    problem = invalid_utf8(raw)
    return str(exc) if problem is None else f"{part} is {problem}"
