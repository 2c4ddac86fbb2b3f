"""Commands: read several streams, fold them into state, decide, emit events to those streams.

A command's streams are its fields annotated `StreamId` (or a list, tuple or
set of `StreamId`), plus what `streams()` returns, plus what `discover(state)`
finds from partly folded state. Every stream it reads takes part in the
optimistic-concurrency check of the append, whether it is written or not.
"""
from __future__ import annotations

import typing
from typing import Any, Iterable

import msgspec

from .errors import BusinessRuleViolation, ValidationError
from .events import EventToWrite, RecordedEvent
from .streams import StreamId, stream_id as _stream_id

_COLLECTIONS = (list, tuple, set, frozenset)


def require(condition: object, message: str) -> None:
    """Refuse the command unless `condition` holds: raises `BusinessRuleViolation(message)`."""
    if not condition:
        raise BusinessRuleViolation(message)


def _stream_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, is_collection) for every field annotated with StreamId, cached per class."""
    cached = cls.__dict__.get("_ec_stream_fields")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    found = []
    for name in cls.__struct_fields__:
        hint = hints.get(name)
        if hint is StreamId:
            found.append((name, False))
        elif typing.get_origin(hint) in _COLLECTIONS and StreamId in typing.get_args(hint):
            found.append((name, True))
    result = tuple(found)
    type.__setattr__(cls, "_ec_stream_fields", result)
    return result


class Command(msgspec.Struct):
    """Base class of commands (a msgspec Struct).

    Override `handle(state)` (required), and `initial_state()` / `apply(state,
    event)` to fold the streams read. `handle` returns the events to append as
    `ec.emit(stream, event)` items; it must be pure: the executor may call it
    again on fresh state after a version conflict.

    The hooks' parameters are positional-only: the executor passes them by position, so an
    override may name them after what they hold (`def handle(self, balances)`) and still
    match this class for type checkers.
    """

    def initial_state(self) -> Any:
        return None

    def apply(self, state: Any, event: RecordedEvent, /) -> Any:
        return state

    def handle(self, state: Any, /) -> Iterable[EventToWrite] | None:
        raise NotImplementedError(f"{type(self).__name__} must implement handle(state)")

    def streams(self) -> Iterable[str]:
        """Extra streams to read, beyond the StreamId fields (e.g. an order's product lines)."""
        return ()

    def discover(self, state: Any, /) -> Iterable[str]:
        """Further streams to read, found from the state folded so far (bounded by the executor)."""
        return ()


def declared_streams(command: Command) -> list[StreamId]:
    """The streams a command declares (fields, then `streams()`), validated, in first-seen order."""
    if not isinstance(command, Command):
        raise ValidationError(f"execute() takes an ec.Command, got {type(command).__name__}")
    seen: dict[StreamId, None] = {}
    for name, is_collection in _stream_fields(type(command)):
        value = getattr(command, name)
        if is_collection:
            if value is None:
                continue
            for item in stream_ids_of(value, f"{type(command).__name__}.{name}"):
                seen[_field_stream(command, name, item)] = None
        elif value is not None:
            seen[_field_stream(command, name, value)] = None
    extra = command.streams()
    if extra:
        for item in stream_ids_of(extra, f"{type(command).__name__}.streams()"):
            seen[_stream_id(item)] = None
    return list(seen)


def stream_ids_of(value: Any, what: str) -> Iterable[Any]:
    """`value` as a collection of stream ids, or ValidationError: a str (or bytes) would be iterated one
    character at a time, each taken for a stream id."""
    if isinstance(value, (str, bytes, bytearray)):
        raise ValidationError(f"{what} must give a collection of stream ids (a list, tuple or set), got a "
                              f"{type(value).__name__}: {value!r:.80}; wrap a single id in a list")
    return value


def _field_stream(command: Command, field: str, value: object) -> StreamId:
    try:
        return _stream_id(value)
    except ValidationError as exc:
        raise ValidationError(f"{type(command).__name__}.{field}: {exc}") from None
