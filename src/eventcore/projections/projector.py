"""The projector model: a read model's name, handler, filters and error strategy, and what a handler gets.

A `Projector` names a read model and handles events (one at a time, or a batch for speed), optionally
filtered by type and stream prefix; `Retry` (or "fatal", "skip") says what happens when its handler
fails on an event. Nothing here touches a store: the runner (runner.py) feeds it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable

import msgspec

from ..errors import EventCoreError, ValidationError
from ..events import RecordedEvent
from ..options import seconds
from ..stores.prepare import MAX_EVENTS_PER_BATCH, type_names as _type_names
from ..streams import forbidden_character

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from ..stores.base import EventStore

    #: The type of `ProjectionContext.connection`, which depends on the backend (see ProjectionContext).
    ConnectionT = TypeVar("ConnectionT", default=Any)
else:  # the default is for type checkers only (Python 3.10-3.12's TypeVar takes none)
    from typing import TypeVar

    ConnectionT = TypeVar("ConnectionT")

#: Events per batch (one transaction each: the handler's writes and the checkpoint) unless the
#: projector says otherwise. A catch-up pays a commit (a WAL flush) per batch: 2,000 caught up 1.36x
#: faster than 500 (517k against 381k events/s, no-op handler, 400,000 events, PostgreSQL; 4,000:
#: 564k), while a batch stays a short transaction and a failing event is found among few.
DEFAULT_BATCH_SIZE = 2000

#: Error strategies: stop on the failing event, or record it as a dead letter and go on.
FATAL = "fatal"
SKIP = "skip"


class Retry(msgspec.Struct, frozen=True):
    """Error strategy: retry the failing event alone, `attempts` times in all, sleeping
    `backoff` seconds before the second attempt and doubling up to `max_backoff`; then
    `then` ("fatal": stop; "skip": dead-letter it and go on). An event that cannot be
    decoded is not retried (decoding it again cannot succeed): it goes to `then` at once."""

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 10.0
    then: str = FATAL

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ValidationError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        seconds("Retry.backoff", self.backoff, allow_zero=True)
        seconds("Retry.max_backoff", self.max_backoff, allow_zero=True)
        if self.then not in (FATAL, SKIP):
            raise ValidationError(f"Retry.then must be 'fatal' or 'skip', got {self.then!r}")


def _strategy(value) -> "str | Retry":
    if isinstance(value, Retry):
        return value
    if value == "retry":
        return Retry()
    if value in (FATAL, SKIP):
        return value
    raise ValidationError(f"on_error must be 'fatal', 'skip', 'retry' or an ec.Retry(...), got {value!r}")


class ProjectionError(EventCoreError):
    """A projector stopped on an event (error strategy "fatal"). The handler's error is the `__cause__`.

    `projector` is its name, `position` the event's position, `event` the
    `RecordedEvent` (None when the event could not be decoded).
    """

    def __init__(self, message: str, projector: str = "", position: int | None = None,
                 event: RecordedEvent | None = None):
        self.projector = projector
        self.position = position
        self.event: RecordedEvent | None = event
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.projector, self.position, None))


class ProjectionContext(Generic[ConnectionT]):
    """What a handler gets with its events.

    `connection`: on PostgreSQL the psycopg connection, inside the batch's
    transaction (write the read model through it and it commits with the
    checkpoint); on SQLite the `sqlite3` connection of the store's file, inside
    a `BEGIN IMMEDIATE` transaction; on the memory store None. `position`: the
    checkpoint before this batch.

    Which connection it is depends on the store, known only at run time, so `connection` is
    `Any` unless the handler says: annotate `ctx: ec.ProjectionContext[sqlite3.Connection]`
    (or `[psycopg.Connection[Any]]`) and the type checker checks what is done with it.
    """

    __slots__ = ("store", "projector", "connection", "position")

    store: EventStore
    projector: Projector
    connection: ConnectionT
    position: int

    def __init__(self, store: EventStore, projector: Projector, connection: ConnectionT, position: int) -> None:
        self.store = store
        self.projector = projector
        self.connection = connection
        self.position = position


class Projector:
    """A read model: a name, a handler, optional filters and an error strategy.

    Either subclass and override `handle(event, ctx)` (or `handle_batch(events,
    ctx)` for speed), or pass functions::

        balances = ec.Projector("balances", handler=lambda event, ctx: ..., types=[Deposited])

    `setup(ctx)` runs once when an instance becomes the active one (create
    tables there), `reset(ctx)` when the projection is rebuilt (empty the read
    model there); both in the transaction of the batch machinery.

    Events arrive as `read_all` gives them: decoded, older type versions brought to
    their class's by the upcasters. `unknown_types="raw"` hands an event of a type
    this process has no class for to the handler as `read_all(decode=False)` does
    (`data` a dict, `type` the stored name) instead of failing it (the error
    strategy); `decode=False` hands every event so.

    The hooks' parameters are positional-only (the runner passes them by position): an override
    may name them as it likes.
    """

    name: str = ""
    types: Iterable[str | type] | None = None
    stream_prefix: str | None = None
    on_error: "str | Retry" = FATAL
    batch_size: int = DEFAULT_BATCH_SIZE
    decode: bool = True
    unknown_types: str = "fail"

    def __init__(
        self,
        name: str | None = None,
        handler: Callable[[RecordedEvent, ProjectionContext], object] | None = None,
        *,
        batch_handler: Callable[[list[RecordedEvent], ProjectionContext], object] | None = None,
        types: Iterable[str | type] | None = None,
        stream_prefix: str | None = None,
        on_error: "str | Retry | None" = None,
        batch_size: int | None = None,
        setup: Callable[[ProjectionContext], object] | None = None,
        reset: Callable[[ProjectionContext], object] | None = None,
        decode: bool | None = None,
        unknown_types: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        if types is not None:
            self.types = types
        if stream_prefix is not None:
            self.stream_prefix = stream_prefix
        if on_error is not None:
            self.on_error = on_error
        if batch_size is not None:
            self.batch_size = batch_size
        if decode is not None:
            self.decode = decode
        if unknown_types is not None:
            self.unknown_types = unknown_types
        if type(self.decode) is not bool:
            raise ValidationError(f"decode must be True or False, got {self.decode!r}")
        if self.unknown_types not in ("fail", "raw"):
            raise ValidationError(f"unknown_types must be 'fail' or 'raw', got {self.unknown_types!r}")
        #: How the runner decodes the feed for it (see FeedPage): "raw", "known" or "strict".
        self.decoding = "raw" if not self.decode else "known" if self.unknown_types == "raw" else "strict"
        self._handler = handler
        self._batch_handler = batch_handler
        self._setup = setup
        self._reset = reset
        # No control characters, NUL or lone surrogates, as for stream ids and type names (a lone
        # surrogate cannot be encoded: SQLite and PostgreSQL failed on it with a bare UnicodeEncodeError).
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= 255 or forbidden_character(self.name):
            raise ValidationError(f"a projector needs a name of 1..255 characters without control characters, NUL "
                                  f"or lone surrogates, got {self.name!r}")
        # A batch is one read and one transaction, held in memory: bounded like append_batch.
        if type(self.batch_size) is not int or not 1 <= self.batch_size <= MAX_EVENTS_PER_BATCH:
            raise ValidationError(f"batch_size must be an int in 1..{MAX_EVENTS_PER_BATCH:,}, got {self.batch_size!r}")
        if self.stream_prefix is not None and (not isinstance(self.stream_prefix, str) or "\x00" in self.stream_prefix):
            raise ValidationError(f"stream_prefix must be a str without NUL, got {self.stream_prefix!r}")
        self.on_error = _strategy(self.on_error)
        self.type_names: tuple[str, ...] | None = _type_names(self.types)
        overridden = type(self).handle is not Projector.handle or type(self).handle_batch is not Projector.handle_batch
        if handler is None and batch_handler is None and not overridden:
            raise ValidationError(f"projector {self.name!r} has no handler: pass handler= or batch_handler=, "
                                  "or override handle()/handle_batch()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def handle(self, event: RecordedEvent, ctx: ProjectionContext, /) -> None:
        if self._handler is None:
            raise NotImplementedError(f"projector {self.name!r} handles batches only")
        self._handler(event, ctx)

    def handle_batch(self, events: list[RecordedEvent], ctx: ProjectionContext, /) -> None:
        if self._batch_handler is not None:
            self._batch_handler(events, ctx)
            return
        for event in events:
            self.handle(event, ctx)

    def setup(self, ctx: ProjectionContext, /) -> None:
        if self._setup is not None:
            self._setup(ctx)

    def reset(self, ctx: ProjectionContext, /) -> None:
        if self._reset is not None:
            self._reset(ctx)
