"""The event model: `Event` (what happened), `Metadata` (who and why), `RecordedEvent` (as stored).

Event classes register themselves under a stable type name — `__event_type__`
when the class sets it, else the class name, never a module path — so stored
events stay readable after code moves. The registry maps names back to classes
on read; an unknown name is a typed error, never a silently dropped event.
"""
from __future__ import annotations

import datetime as _dt
import threading
import uuid
from typing import Any, ClassVar

import msgspec

from .errors import ValidationError
from .payloads import MAX_PAYLOAD_BYTES, has_nul_escape
from .streams import StreamId, forbidden_character, stream_id as _stream_id
from .utf8 import NESTED_TOO_DEEPLY, invalid_utf8, is_utf8_error

_registry: dict[str, type["Event"]] = {}
_registry_lock = threading.Lock()


class Event(msgspec.Struct):
    """Base class of domain events (a msgspec Struct).

    The stored type name is the class name, or `__event_type__` when set::

        class Deposited(ec.Event):
            __event_type__ = "bank.Deposited"   # optional: pin the stored name
            amount: int
    """

    __event_type__: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Read from the class's own dict: a subclass must not inherit its parent's name.
        name = cls.__dict__.get("__event_type__") or cls.__name__
        if not isinstance(name, str) or not name or len(name) > 255:
            raise TypeError(f"{cls.__qualname__}.__event_type__ must be a non-empty str of at most 255 characters")
        bad = forbidden_character(name)
        if bad is not None:
            raise TypeError(f"{cls.__qualname__}.__event_type__ {name!r} contains {bad} (no control characters, "
                            "NUL or lone surrogates)")
        cls.__event_type__ = name
        register_event_type(cls)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_event_type(cls: type[Event]) -> None:
    """Register `cls` under its type name (done automatically for every `Event` subclass).

    Two different classes claiming one name is an error; redefining the same
    class (same module and qualified name, e.g. on reload) replaces it.
    """
    name = cls.__event_type__
    with _registry_lock:
        existing = _registry.get(name)
        if existing is not None and existing is not cls and _qualified(existing) != _qualified(cls):
            raise TypeError(
                f"event type name {name!r} is already used by {_qualified(existing)}; "
                f"set __event_type__ on {_qualified(cls)} to a unique, stable name"
            )
        _registry[name] = cls


def event_class(type_name: str) -> type[Event] | None:
    """The registered `Event` class for a stored type name, or None."""
    return _registry.get(type_name)


class Metadata(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who and why: stored with every event and returned on read."""

    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None
    custom: dict[str, Any] = {}


EMPTY_METADATA = Metadata()

_ID_FIELDS = ("correlation_id", "causation_id", "user_id")


def check_metadata(md: Metadata) -> None:
    """ValidationError unless every field has the type Metadata declares: the ids a str or None, `custom`
    a dict with str keys. msgspec does not check a Struct's fields when it is built, and metadata of
    another type would be stored and then fail to decode on every read of its stream, for good.
    (Both implementations' encoders call this one function.)"""
    for name in _ID_FIELDS:
        value = getattr(md, name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"Metadata.{name} must be a str or None, got {type(value).__name__}: {value!r:.80}")
    custom = md.custom
    if type(custom) is not dict:
        raise ValidationError(f"Metadata.custom must be a dict, got {type(custom).__name__}: {custom!r:.80}")
    for key in custom:
        if not isinstance(key, str):
            raise ValidationError(
                f"Metadata.custom keys must be str (JSON object keys), got {type(key).__name__}: {key!r:.80}")


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as stored: its envelope and its decoded payload.

    `version` is 1-based and gap-free within the stream; `position` is the
    global position in the store's feed (strictly increasing; a reader never finds a
    new event below a position it has seen); `event_id` is a UUIDv7.

    Not tracked by the cyclic garbage collector (`gc=False`): reads make these by the
    hundred thousand, and the collector scanning them as they were built cost more than
    decoding them (0.78 against 0.66 µs an event for a page of 1,000). A recorded event
    cannot be in a reference cycle unless its payload is changed to refer back to it,
    which would keep both alive (a leak, never a wrong value).
    """

    stream_id: str
    version: int
    position: int
    event_id: uuid.UUID
    type: str
    data: Any
    metadata: Metadata
    recorded_at: _dt.datetime


class RawEvent(msgspec.Struct, frozen=True):
    """An event given as its stored form: a type name and a JSON object (bytes), written as-is.

    For copying events between stores and for bulk ingestion of JSON Lines
    (`eventcore ingest`); reading it back needs an `Event` class of that type name.
    """

    type: str
    data: bytes


_any_json = msgspec.json.Decoder()


class ValidatedItem(tuple):
    """An ingest item (stream id, RawEvent, metadata or None) whose parts were validated by whoever made
    it (the JSON Lines reader, which validates every line it yields): `store.ingest` takes it as it is
    instead of validating the event's JSON a second time."""

    __slots__ = ()


def raw_data_problem(data: bytes, decoded: bool = False) -> str | None:
    """What is wrong with RawEvent data that parses as JSON, or None: too large, not UTF-8
    (msgspec does not check the bytes inside strings it skips), or a NUL (`\\u0000`), which
    PostgreSQL's jsonb refuses (see eventcore.payloads)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        return f"is {len(data):,} bytes; the limit is {MAX_PAYLOAD_BYTES:,} bytes (16 MiB) per event"
    if not data.isascii():
        problem = invalid_utf8(data)
        if problem is not None:
            return f"is {problem}"
    if data.find(b"\\u0000") >= 0 and has_nul_escape(data):
        return "holds a NUL character (\\u0000), which PostgreSQL cannot store in JSON, so no backend accepts it"
    if decoded:  # the caller decoded it in full already
        return None
    # Every number must be one a JSON reader can hold: 1e400 is infinity to msgspec (and to most
    # readers), so stored as given it could never be read back. A full decode finds them, and costs
    # less than a regular-expression scan for exponents (~0.3 vs ~0.85 us for a 110-byte object).
    try:
        _any_json.decode(data)
    except msgspec.ValidationError as exc:
        return _out_of_range(exc)
    except msgspec.DecodeError:
        pass  # malformed JSON is the caller's to report, with its own wording
    except RecursionError:
        return NESTED_TOO_DEEPLY
    return None


def _out_of_range(exc: Exception) -> str:
    return f"holds a number out of the range JSON readers can hold (infinity to them): {exc}"


def validate_type_name(t: object, what: str = "RawEvent.type") -> str:
    """An event type name as stored: a non-empty str of at most 255 characters, no control characters."""
    if type(t) is not str or not t or len(t) > 255:
        raise ValidationError(f"{what} must be a non-empty str of at most 255 characters, got {t!r}")
    bad = forbidden_character(t)
    if bad is not None:
        raise ValidationError(f"{what} {t!r} contains {bad} (no control characters, NUL or lone surrogates)")
    return t


def validate_raw_event(event: RawEvent) -> tuple[str, bytes]:
    """(type, data) of a RawEvent, or ValidationError: type non-empty, data one JSON object
    (UTF-8, no NUL, at most MAX_PAYLOAD_BYTES, nested less deeply than the recursion limit)."""
    t, data = event.type, event.data
    validate_type_name(t)
    if type(data) is not bytes:
        raise ValidationError(f"RawEvent.data must be JSON bytes, got {type(data).__name__}")
    try:
        _any_json.decode(data)  # one full decode: syntax, UTF-8, nesting and numbers out of range
    except msgspec.ValidationError as exc:
        raise ValidationError(f"RawEvent.data of type {t!r} {_out_of_range(exc)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        problem = invalid_utf8(data) if is_utf8_error(exc) else None
        if problem is not None:
            raise ValidationError(f"RawEvent.data of type {t!r} is {problem}") from None
        raise ValidationError(f"RawEvent.data of type {t!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError(f"RawEvent.data of type {t!r} is {NESTED_TOO_DEEPLY}") from None
    if not data.lstrip()[:1] == b"{":
        raise ValidationError(f"RawEvent.data of type {t!r} must be a JSON object")
    problem = raw_data_problem(data, decoded=True)
    if problem is not None:
        raise ValidationError(f"RawEvent.data of type {t!r} {problem}")
    return t, data


class EventToWrite(msgspec.Struct, frozen=True):
    """An event bound to the stream it goes to; made by `emit(...)`."""

    stream_id: StreamId
    event: Event | RawEvent
    metadata: Metadata | None = None


def emit(stream: str, event: Event | RawEvent, metadata: Metadata | None = None) -> EventToWrite:
    """Name the stream an event goes to: `return [ec.emit(self.account, Deposited(amount=1))]`."""
    if not isinstance(event, (Event, RawEvent)):
        raise ValidationError(
            f"emit() takes an ec.Event instance, got {type(event).__name__}: {event!r}"
        )
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    return EventToWrite(_stream_id(stream), event, metadata)
