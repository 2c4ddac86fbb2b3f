"""The one error hierarchy of eventcore.

Every error the library raises on purpose derives from `EventCoreError`, and
each says what went wrong in terms a caller can act on: which stream, which
version was expected and which was found, which input field was bad.
"""
from __future__ import annotations


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

    def __reduce__(self):
        return (type(self), (self.stream_id, self.expected, self.actual, str(self)))


class UndeclaredStreamError(EventCoreError):
    """A command emitted to a stream it did not declare (and so did not read)."""

    def __init__(self, stream_id: str, command: str, declared: list[str] | tuple[str, ...]):
        self.stream_id = stream_id
        self.command = command
        self.declared = tuple(declared)
        super().__init__(
            f"{command} emitted an event to stream {stream_id!r}, which it did not declare; "
            f"declared streams: {list(self.declared)}. Declare it as a StreamId field, return it "
            f"from streams(), or discover it with discover(state). Nothing was written."
        )

    def __reduce__(self):
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

    def __reduce__(self):
        return (type(self), (self.type_name, self.position, self.stream_id))


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

    def __reduce__(self):
        return (type(self), (str(self), self.found, self.expected))


class DuplicateCommandError(EventCoreError):
    """An append carried an idempotency key that an earlier append already committed with.

    Nothing new was written. `events` are the events the first append recorded
    under `key` (same event ids, versions, positions); `execute` turns this into
    that first append's result (`ExecutionResult.replayed`).
    """

    def __init__(self, key: str, events: list | None = None, message: str | None = None):
        self.key = key
        self.events = events
        super().__init__(message or (
            f"idempotency key {key!r} was already used by a committed append; nothing new was written"))

    def __reduce__(self):
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

    def __reduce__(self):
        return (_rebuild_timeout, (type(self), str(self), self.maybe_committed))


def _rebuild_timeout(cls, message, maybe_committed):
    return cls(message, maybe_committed=maybe_committed)
