"""What projections need from a store: the contract each backend implements in a module beside its store.

A store gives it through one method, `store._projection_storage()`, a `ProjectionStorage`. Per
projector name it keeps a checkpoint (the position of the last event handled, the projector's state
and who runs it), dead letters (events the projector skipped, each with its error) and a leader lock
(one active instance per name), and it wakes a live projector when events are appended, where the
backend can. The runner (eventcore.projections) drives one projector through a `ProjectionSession`:
its own connection, which holds the lock, reads the feed and runs each batch's transaction, so a
handler's read-model writes and the checkpoint commit together. Listings (checkpoints, dead letters,
events pending after a position) and raw reads of the feed go through the storage itself.

Nothing above this module asks which backend it talks to: memory (`memory_projections`), SQLite
(`sqlite_projections`) and PostgreSQL (`postgres.projections`) each implement all of it.
"""
from __future__ import annotations

import datetime as _dt
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import msgspec

from .. import _impl
from ..errors import EventCoreError, SerializationError, StoreUnavailableError, UnknownEventTypeError
from ..events import RecordedEvent

#: Events after a checkpoint are counted up to this many (a bounded cost); the value means "at least".
PENDING_CAP = 10_000

#: The layout of a dead-letter row (`ProjectionStorage.dead_letters`): the event as stored (the feed's
#: row layout, formats.ROW_COLUMNS), then the error, the attempts made and when it was given up.
DEAD_LETTER_COLUMNS = ("position", "stream_id", "version", "event_id", "type", "data", "metadata",
                       "recorded_at_us", "type_version", "error", "attempts", "failed_at")


class LostLeadership(Exception):
    """The checkpoint moved under us: another instance leads. Roll back and wait for the lock again."""


class StoreFailed(StoreUnavailableError):
    """The projection's own connection is lost, or one of its own statements (read, checkpoint,
    lock) failed: reconnect (with backoff) and resume from the stored checkpoint. Raised by the
    backends only. An error a handler raises, whatever its class (a psycopg.OperationalError such
    as a statement timeout or a deadlock, a StoreUnavailableError of another store), goes to the
    projector's error strategy, unless the projection's connection is found lost."""


class Refused(EventCoreError):
    """The store refused one of the projection's own statements (a missing table, a missing grant):
    not the event's fault, and retrying cannot mend it: the run stops with this error."""


class CheckpointRecord(msgspec.Struct, frozen=True):
    """A projector as its store records it: the stored checkpoint `position`, the feed's `head` read
    with it, `pending` events after the checkpoint (counted up to a cap), the effective `state`
    (see `effective_state`), the last `error`, the `owner` that recorded it, when, and how many
    dead letters it has."""

    name: str
    position: int
    head: int
    pending: int
    state: str
    error: str | None
    owner: str | None
    updated_at: _dt.datetime | None
    dead_letters: int


def effective_state(stored: str, held: bool) -> str:
    """A projector's state from the one stored and whether an instance holds its lock now: running
    while held; a stored "running" without the lock means its process died without saying so."""
    if held:
        return "running"
    if stored == "running":
        return "dead"
    return stored


def as_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    """A stored JSON column (bytes, memoryview or str; None) as bytes."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class FeedPage:
    """A page of the feed as the runner takes it: `events` in position order, each decoded or None
    when it cannot be (its SerializationError at the same index of `errors`), and each event's
    stored row (formats.ROW_COLUMNS) on demand: `row(i)`, what a dead letter keeps. A backend that
    decodes a page without making rows (PostgreSQL's binary COPY) passes `load_rows`, which reads
    the page's rows again, only when a dead letter needs one."""

    __slots__ = ("events", "errors", "_rows", "_load_rows")

    def __init__(self, events: list[RecordedEvent | None], errors: list[BaseException | None],
                 rows: list[tuple[Any, ...]] | None = None,
                 load_rows: Callable[[], list[tuple[Any, ...]]] | None = None) -> None:
        self.events: list[RecordedEvent | None] = events
        self.errors: list[BaseException | None] = errors
        self._rows = rows
        self._load_rows = load_rows

    @classmethod
    def of_rows(cls, rows: list[tuple[Any, ...]], decoding: str = "strict") -> FeedPage:
        """Stored rows decoded: all at once, or, when one of them cannot be, each alone. `decoding`:
        "strict" (every event decoded as its class; one that cannot be has its error), "raw" (every
        event as read_all(decode=False) gives it), "known" (strict, but an event of a type this
        process has no class for raw)."""
        raw = decoding == "raw"
        try:
            return cls(_impl.decode_rows(rows, raw), [None] * len(rows), rows)
        except SerializationError:
            pass
        events, errors = [], []
        for row in rows:
            try:
                events.append(_impl.decode_rows([row], raw)[0])
                errors.append(None)
            except UnknownEventTypeError as exc:
                if decoding == "known":
                    events.append(_impl.decode_rows([row], True)[0])
                    errors.append(None)
                else:
                    events.append(None)
                    errors.append(exc)
            except SerializationError as exc:
                events.append(None)
                errors.append(exc)
        return cls(events, errors, rows)

    def __len__(self) -> int:
        return len(self.events)

    def row(self, i: int) -> tuple[Any, ...]:
        """The stored row of event `i`."""
        if self._rows is None:
            self._rows = self._load_rows()
        return self._rows[i]


class ProjectionSession(ABC):
    """One running projector's access to its store: a leader lock, checkpoint transactions, raw
    reads of the feed and wake-ups. `open()` before use, `close()` after (it releases the lock).

    `connection` is what handlers get as `ctx.connection`: the connection the batch's transaction
    runs on (None where there is none)."""

    connection: Any = None
    #: Seconds a running listener's claim lasts unless renewed (PostgreSQL: appends NOTIFY while it lasts).
    listen_lease: float = 30.0

    def __init__(self, storage: ProjectionStorage, name: str) -> None:
        self.storage = storage
        self.store: Any = storage.store
        self.name = name

    def open(self) -> None:
        """Connect (StoreFailed if it cannot)."""

    def close(self) -> None:
        """Release the lock and the connection."""

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the projector's leader lock without waiting; True if this session holds it now."""

    def release(self) -> None:
        """Give the leader lock up (if held)."""

    @abstractmethod
    def load(self) -> int:
        """The stored checkpoint (recording the projector, at 0, if it is new)."""

    def head(self) -> int:
        """The feed's head position, as its readers see it."""
        return self.store.head_position()

    def read_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple[Any, ...]]:
        """A page of the feed after `after` as stored rows (formats.ROW_COLUMNS), undecoded."""
        return self.storage.read_rows(after, types, prefix, limit)

    def read_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None,
                  limit: int) -> tuple[list[tuple[Any, ...]], int | None]:
        """A page for the runner: (rows, bound). bound None: the read looked up to the feed's head;
        else it looked only up to `bound` (a window of the feed, on PostgreSQL for a filtered
        projector), which is below the head, and every event up to it that matches is in rows
        unless rows is a full page."""
        return self.read_rows(after, types, prefix, limit), None

    def read_events(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int,
                    decoding: str = "strict") -> "tuple[FeedPage, int | None]":
        """`read_page`, decoded (see FeedPage.of_rows): (page, bound). A backend may override it with a
        faster way."""
        rows, bound = self.read_page(after, types, prefix, limit)
        return FeedPage.of_rows(rows, decoding), bound

    @abstractmethod
    @contextmanager
    def transaction(self) -> Iterator["ProjectionSession"]:
        """One batch: the handler's writes (through `connection`) and the calls below commit together,
        or none does. An error the handler raises propagates as it is."""

    # Called inside transaction():
    @abstractmethod
    def advance(self, old: int, new: int) -> None:
        """Move the checkpoint from `old` to `new`: a compare-and-set (LostLeadership if it is not at `old`)."""

    @abstractmethod
    def dead_letter(self, row: tuple[Any, ...], error: str, attempts: int) -> None:
        """Record the event of stored `row` as skipped, with its error and the attempts made."""

    @abstractmethod
    def reset(self) -> None:
        """Checkpoint back to 0 and the dead letters gone (a rebuild)."""

    @abstractmethod
    def set_state(self, state: str, error: str | None, owner: str | None) -> None:
        """Record the projector's state (running, stopped, failed), its error and owner (outside any batch)."""

    def clear_wake(self) -> None:
        """Forget wake-ups received so far (called before each read)."""

    def committed_beyond(self, position: int) -> bool:
        """Are events committed after `position` that reads cannot see yet? (PostgreSQL: behind the
        fence of an older transaction still running; elsewhere never.)"""
        return False

    def keep_listening(self) -> None:
        """Renew the listener's lease when it is due (PostgreSQL); called before every read and while waiting."""

    def stop_listening(self) -> None:
        """End the listener's lease at once (best effort, on the way out, whatever ended the run)."""

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Sleep until `timeout` passes or `stop` is set; True if woken by a notification of new events."""
        stop.wait(timeout)
        return False

    def broken(self) -> bool:
        """Is the connection known to be unusable?"""
        return False

    def lost(self) -> bool:
        """After an error: is the projection's own connection unusable? (broken() plus, where it
        is cheap, a liveness check.) Decides between reconnecting and the error strategy."""
        return self.broken()


class Waiter:
    """Waits for new events where the store sends no wake-ups: a plain sleep."""

    def clear_wake(self) -> None:
        pass

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        stop.wait(timeout)
        return False

    def close(self) -> None:
        pass


class ProjectionStorage(ABC):
    """A store's projection checkpoints, dead letters, leader locks and wake-ups (see the module)."""

    #: Seconds between looks at the feed of a live projector that nothing wakes sooner (the runner's
    #: default poll_interval): where appends wake it, this is only the fallback.
    poll_interval: float = 0.1

    def __init__(self, store: Any) -> None:
        #: The EventStore these projections read (Any: the store module imports this one, not the reverse).
        self.store = store

    @abstractmethod
    def session(self, name: str, listen: bool = True) -> ProjectionSession:
        """A session for projector `name`, not yet open. `listen` False: never wait for wake-ups, poll."""

    @abstractmethod
    def checkpoints(self, name: str | None, cap: int) -> list[CheckpointRecord]:
        """Every projector recorded (or only `name`), by name, with `pending` counted up to `cap`."""

    @abstractmethod
    def count_after(self, position: int, cap: int) -> int:
        """Events after `position` (any type), counted up to `cap`."""

    @abstractmethod
    def dead_letters(self, name: str) -> list[tuple[Any, ...]]:
        """The dead letters of projector `name` in position order, as rows (DEAD_LETTER_COLUMNS)."""

    def read_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple[Any, ...]]:
        """A page of the feed as stored rows (formats.ROW_COLUMNS), whether or not this process can decode them."""
        return self.store._read_all_rows(after, types, prefix, limit)

    def waiter(self) -> Waiter:
        """For `eventcore tail --follow`: an object whose `wait(timeout, stop)` returns early (True)
        when events are appended, where the store can say so (`clear_wake()` before each read forgets
        earlier wake-ups); `close()` it after."""
        return Waiter()
