"""Stream identifiers: validated once, at construction, so no store ever sees a bad one."""
from __future__ import annotations

import re

from .errors import ValidationError

#: Longest stream id accepted. 255 characters keeps ids inside one B-tree page
#: entry on every backend and matches the original EventCore's limit.
MAX_STREAM_ID_LENGTH = 255

# C0 and C1 control characters (NUL included) and lone surrogates, which have
# no UTF-8 encoding and so could not be stored or compared consistently.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class StreamId(str):
    """A validated stream identifier: non-empty, at most 255 characters, no control characters.

    A `str` subclass, so it is used (and stored) like a string. On an
    `ec.Command`, every field annotated `StreamId` is a stream the command reads
    and may write.
    """

    __slots__ = ()

    def __new__(cls, value: object) -> "StreamId":
        if type(value) is cls:
            return value
        if not isinstance(value, str):
            raise ValidationError(f"stream id must be a str, got {type(value).__name__}: {value!r}")
        if not value:
            raise ValidationError("stream id must not be empty")
        if len(value) > MAX_STREAM_ID_LENGTH:
            raise ValidationError(
                f"stream id is {len(value)} characters long; the limit is {MAX_STREAM_ID_LENGTH}: "
                f"{value[:40]!r}..."
            )
        bad = _FORBIDDEN.search(value)
        if bad is not None:
            raise ValidationError(
                f"stream id {value!r} contains the forbidden character {bad.group()!r} at index "
                f"{bad.start()} (control characters, NUL and lone surrogates are not allowed)"
            )
        return str.__new__(cls, value)


def forbidden_character(text: str) -> str | None:
    """A description of the first control character, NUL or lone surrogate in `text`, or None.

    Shared with event type names, which are stored beside stream ids in text columns
    (PostgreSQL's text refuses NUL; a lone surrogate has no UTF-8 form)."""
    bad = _FORBIDDEN.search(text)
    if bad is None:
        return None
    return f"the forbidden character {bad.group()!r} at index {bad.start()}"


def stream_id(value: object) -> StreamId:
    """Validate `value` as a stream id (returns it unchanged when it already is one)."""
    if type(value) is StreamId:
        return value
    return StreamId(value)
