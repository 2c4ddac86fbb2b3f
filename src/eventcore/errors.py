"""The one error hierarchy of eventcore.

Every error the library raises on purpose derives from `EventCoreError`, and
each says what went wrong in terms a caller can act on: which stream, which
version was expected and which was found, which input field was bad.
"""
from __future__ import annotations

from typing import Any


#: How an error names the special expected versions (their values are defined in eventcore.expected,
#: which imports this module: the table is here so that errors import nothing of the model).
_EXPECTED_WORDS = {-1: "any version", 0: "no stream (version 0)", -2: "an existing stream"}


def describe_expected(expected: int) -> str:
    """An expected version in words, as errors name it."""
    words = _EXPECTED_WORDS.get(expected)
    return words if words is not None else f"version {expected}"


class EventCoreError(Exception):
    """Base class of every error raised by eventcore."""


class ValidationError(EventCoreError, ValueError):
    """Bad input (a stream id, an option, an event): rejected before anything is written."""


class MissingDependencyError(EventCoreError, ImportError):
    """A feature needs an optional package that is not installed; the message says which extra to install
    (e.g. `pip install 'pyeventcore[numpy]'` for columnar I/O)."""


class ColumnRowError(EventCoreError):
    """Internal to store.ingest_columns: row `row` of the columns cannot be an event, `cause` (a
    ValidationError or SerializationError, as the row path raises for the same event) says why. The
    ingest reports it as an IngestError naming the row, with `cause` as its __cause__."""

    def __init__(self, row: int, cause: EventCoreError):
        self.row = row
        self.cause = cause
        super().__init__(f"row {row}: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.row, self.cause))


class BusinessRuleViolation(EventCoreError):
    """A command's `handle` refused the command through `require(...)`. Never retried."""


class ConcurrencyError(EventCoreError):
    """A stream's version was not the one the writer expected; nothing was written.

    `expected` is the expected version as given (an int; see `ExpectedVersion`),
    `actual` the stream's version when the append was checked (0: no events).
    """

    def __init__(self, stream_id: str, expected: int, actual: int, message: str | None = None):
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        if message is None:
            message = (
                f"version conflict on stream {stream_id!r}: expected "
                f"{describe_expected(expected)}, actual version {actual}"
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream_id, self.expected, self.actual, str(self)))


class UndeclaredStreamError(EventCoreError):
    """A command emitted to a stream it did not declare (and so did not read)."""

    def __init__(self, stream_id: str, command: str, declared: list[str] | tuple[str, ...]):
        self.stream_id = stream_id
        self.command = command
        self.declared: tuple[str, ...] = tuple(declared)
        super().__init__(
            f"{command} emitted an event to stream {stream_id!r}, which it did not declare; "
            f"declared streams: {list(self.declared)}. Declare it as a StreamId field, return it "
            f"from streams(), or discover it with discover(state). Nothing was written."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream_id, self.command, self.declared))


class SerializationError(EventCoreError):
    """An event or metadata could not be encoded, or a stored event could not be decoded."""


class UnknownEventTypeError(SerializationError):
    """A stored event's type name has no registered `Event` class in this process."""

    def __init__(self, type_name: str, position: int | None = None, stream_id: str | None = None):
        self.type_name = type_name
        self.position = position
        self.stream_id = stream_id
        where = ""
        if position is not None:
            where = f" at position {position}"
        if stream_id is not None:
            where += f" (stream {stream_id!r})"
        super().__init__(
            f"unknown event type {type_name!r}{where}: define an ec.Event subclass with "
            f"__event_type__ = {type_name!r} (or that class name) and import it before reading"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.position, self.stream_id))


def _where(position: int | None, stream_id: str | None) -> str:
    where = "" if position is None else f" at position {position}"
    if stream_id is not None:
        where += f" (stream {stream_id!r})"
    return where


class EventDefinitionError(EventCoreError, TypeError):
    """An event class or upcaster contradicts what is registered: a stored type name or alias claimed
    by two classes, two upcasters for one step of a chain, an upcaster from a version the class has
    reached, a bad `__event_version__` or `__event_aliases__`. Raised when the class or upcaster is
    defined (a TypeError too, as Python raises for a bad class definition)."""


class EventVersionError(SerializationError):
    """A stored event's type version cannot be brought to its class's version: the stored version is
    newer than the class (this code is older than the data: deploy the newer class), or a step of
    the upcaster chain from the stored version to the class's is missing. Nothing is skipped.

    `type_name` and `version` are as stored, `class_version` the class's `__event_version__`,
    `missing` the first version with no upcaster to the next (None when the stored one is newer)."""

    def __init__(self, type_name: str, version: int, class_version: int, missing: int | None = None,
                 position: int | None = None, stream_id: str | None = None, class_name: str | None = None):
        self.type_name = type_name
        self.version = version
        self.class_version = class_version
        self.missing = missing
        self.position = position
        self.stream_id = stream_id
        self.class_name = class_name
        cls = f" ({class_name})" if class_name else ""
        if missing is None:
            text = (f"event type {type_name!r} version {version}{_where(position, stream_id)} is newer than its "
                    f"class{cls}, which is at version {class_version}: this code is older than the data; deploy "
                    f"the class that writes version {version}")
        else:
            text = (f"event type {type_name!r}{cls} is at version {class_version} but no upcaster takes version "
                    f"{missing} to {missing + 1}, so the stored version {version}{_where(position, stream_id)} "
                    f"cannot be read: define @ec.upcaster({type_name!r}, from_version={missing})")
        super().__init__(text)

    def located(self, position: int, stream_id: str) -> "EventVersionError":
        return EventVersionError(self.type_name, self.version, self.class_version, self.missing, position,
                                 stream_id, self.class_name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.version, self.class_version, self.missing, self.position,
                             self.stream_id, self.class_name))


class UpcastError(SerializationError):
    """An upcaster raised, or returned something its class cannot decode, while a stored event was
    brought from its stored version to its class's. `type_name` and `version` are as stored,
    `step` the version the failing upcaster takes to the next (None: the chain's result did not
    decode as the class), `position` and `stream_id` the event."""

    def __init__(self, type_name: str, version: int, step: int | None, reason: str,
                 position: int | None = None, stream_id: str | None = None):
        self.type_name = type_name
        self.version = version
        self.step = step
        self.reason = reason
        self.position = position
        self.stream_id = stream_id
        if step is None:
            what = "the upcasters' result does not decode as its class"
        else:
            what = f"the upcaster from version {step} to {step + 1} failed"
        super().__init__(f"cannot upcast event type {type_name!r} version {version}{_where(position, stream_id)}: "
                         f"{what}: {reason}")

    def located(self, position: int, stream_id: str) -> "UpcastError":
        return UpcastError(self.type_name, self.version, self.step, self.reason, position, stream_id)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.version, self.step, self.reason, self.position, self.stream_id))


class StoreUnavailableError(EventCoreError):
    """The store could not be reached or failed mid-operation.

    `maybe_committed` is True when the failure happened after a write may have
    reached the store (the outcome is unknown); the executor retries a command
    only when it is False.
    """

    def __init__(self, message: str, *, maybe_committed: bool = False):
        self.maybe_committed = maybe_committed
        super().__init__(message)


class StoreNotFoundError(StoreUnavailableError):
    """No eventcore store exists where the URL points (a missing or empty SQLite file, a PostgreSQL
    schema that does not exist), and the call was not allowed to create one (`migrate=False`, as the
    command line's read-only commands open stores). Nothing was created."""


class NotAnEventStoreError(ValidationError):
    """The URL points at something that is not an eventcore store: another application's SQLite
    file, a file that is not a SQLite database, a PostgreSQL schema holding another application's
    tables. eventcore refuses it and leaves it exactly as it was."""


class SchemaVersionError(StoreUnavailableError):
    """The store's schema is at another version than this eventcore needs: older (run `eventcore
    migrate`, or connect with migrate=True) or newer (upgrade eventcore). `found` and `expected` are
    the two versions."""

    def __init__(self, message: str, found: int, expected: int):
        self.found = found
        self.expected = expected
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.found, self.expected))


class DuplicateCommandError(EventCoreError):
    """An append carried an idempotency key that an earlier append already committed with.

    Nothing new was written. `events` are the events the first append recorded
    under `key` (same event ids, versions, positions); `execute` turns this into
    that first append's result (`ExecutionResult.replayed`).
    """

    def __init__(self, key: str, events: list[Any] | None = None, message: str | None = None):
        self.key = key
        #: The RecordedEvents of the first append (a list of Any: this module imports nothing of the model).
        self.events = events
        super().__init__(message or (
            f"idempotency key {key!r} was already used by a committed append; nothing new was written"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.events, str(self)))


class StoreTimeoutError(StoreUnavailableError, TimeoutError):
    """The store cancelled a statement that ran past its timeout (PostgreSQL's `statement_timeout`,
    SQLite's busy `timeout` waiting for the write lock). The statement's transaction was rolled
    back: nothing was written (`maybe_committed` is False). `execute` does not retry it: a server
    too slow for one attempt is not helped by more load."""


class CommandTimeoutError(EventCoreError, TimeoutError):
    """A command did not complete within its overall timeout.

    `maybe_committed` is True when an earlier attempt's write may have reached the
    store (its connection was lost after the write was sent) and no later attempt
    could settle it: run the command again with the same idempotency key.
    """

    def __init__(self, message: str, *, maybe_committed: bool = False):
        self.maybe_committed = maybe_committed
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeout, (type(self), str(self), self.maybe_committed))


def _rebuild_timeout(cls, message, maybe_committed):
    return cls(message, maybe_committed=maybe_committed)
