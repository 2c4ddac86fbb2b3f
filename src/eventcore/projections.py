"""Projections: read models kept up to date from the global feed, checkpointed, never skipping an event.

A `Projector` names a read model and handles events (one at a time, or a batch
for speed), optionally filtered by type and stream prefix. `run_projection`
(or `ProjectionRunner`) catches up from the projector's checkpoint, then
follows the feed live until asked to stop:

* **Cursor.** The checkpoint is the global position of the last event
  processed; the runner reads `position > checkpoint`. Positions are commit
  ordered on every backend (on PostgreSQL, readers see only positions below the
  oldest running transaction, see `pg_sql`), so resuming after a checkpoint never
  skips an event. Never a count of events. Past events a filtered projector's
  filters leave out, an in-memory read cursor moves ahead of the stored
  checkpoint (saved every `idle_checkpoint_interval` and when the run ends); on
  PostgreSQL a filtered page reads a bounded window of the feed at a time.
* **Batches.** Each batch is one transaction: the handler's read-model writes
  (on PostgreSQL and SQLite through `ctx.connection`) and the checkpoint commit
  together, so each event's effect happens exactly once across crashes and
  restarts. The checkpoint is a compare-and-set on the previous position: an
  instance that lost its leadership can never commit a batch twice.
* **One active instance per projector name.** PostgreSQL: a session advisory
  lock held by the connection that runs the batches (a killed process drops it
  at once); SQLite: an exclusive `flock` on a file next to the database; memory:
  a lock in the store. Other instances wait and take over from the checkpoint.
* **Errors.** `on_error="fatal"` (default): stop, record the error, raise
  `ProjectionError`. `"skip"`: write the event and the error to a dead-letter
  record in the same transaction as the checkpoint that passes it. `Retry(...)`:
  retry the event alone with exponential backoff, then `then` ("fatal" or
  "skip"). A failing batch is replayed one event per transaction to find the
  failing event. An event this process cannot decode is an error like any other:
  never dropped silently.
* **Live.** PostgreSQL: LISTEN/NOTIFY wake-ups (migration 3 notifies on every
  append while a listening projector's lease lasts: `listen_lease`, renewed as
  it runs, ended when it stops for any reason) plus a polling
  fallback every `poll_interval` seconds (for poolers that drop LISTEN); SQLite
  and memory: polling.
* **At-least-once elsewhere.** A read model outside the batch's transaction (not
  written through `ctx.connection`) may see a batch again: after a crash, and
  when a failing batch is replayed one event per transaction.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import signal
import socket
import sqlite3
import threading
import time as _time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import msgspec

from . import _impl
from .errors import EventCoreError, SerializationError, StoreUnavailableError, ValidationError
from .events import RecordedEvent
from .options import seconds
from .streams import forbidden_character
from .stores.base import EventStore
from .stores.prepare import MAX_EVENTS_PER_BATCH, type_names as _type_names
from .stores.sqlite import commit_or_roll_back as _commit_or_roll_back

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger("eventcore.projections")

#: Events per batch (one transaction each) unless the projector says otherwise.
DEFAULT_BATCH_SIZE = 500
#: `pending` counts events after a checkpoint up to this many (a bounded cost): this value means "at least".
PENDING_CAP = 10_000
#: Longest pause between looks while committed events wait behind the feed's fence (PostgreSQL).
_FENCE_RETRY_MAX = 0.05
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_json = msgspec.json.Decoder()

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

    def __init__(self, message: str, projector: str = "", position: int | None = None, event=None):
        self.projector = projector
        self.position = position
        self.event = event
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.projector, self.position, None))


class _LostLeadership(Exception):
    """The checkpoint moved under us: another instance leads. Roll back and wait for the lock again."""


class _StoreFailed(StoreUnavailableError):
    """The projection's own connection is lost, or one of its own statements (read, checkpoint,
    lock) failed: reconnect (with backoff) and resume from the stored checkpoint. Raised by the
    backends only. An error a handler raises, whatever its class (a psycopg.OperationalError such
    as a statement timeout or a deadlock, a StoreUnavailableError of another store), goes to the
    projector's error strategy, unless the projection's connection is found lost."""


class _Refused(EventCoreError):
    """The store refused one of the projection's own statements (a missing table, a missing grant):
    not the event's fault, and retrying cannot mend it: the run stops with this error."""


class _Stopped(Exception):
    """A stop was requested while retrying an event."""


class ProjectionContext:
    """What a handler gets with its events.

    `connection`: on PostgreSQL the psycopg connection, inside the batch's
    transaction (write the read model through it and it commits with the
    checkpoint); on SQLite the `sqlite3` connection of the store's file, inside
    a `BEGIN IMMEDIATE` transaction; on the memory store None. `position`: the
    checkpoint before this batch.
    """

    __slots__ = ("store", "projector", "connection", "position")

    def __init__(self, store, projector: "Projector", connection, position: int) -> None:
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
    """

    name: str = ""
    types: Iterable[str | type] | None = None
    stream_prefix: str | None = None
    on_error: "str | Retry" = FATAL
    batch_size: int = DEFAULT_BATCH_SIZE

    def __init__(
        self,
        name: str | None = None,
        handler: Callable | None = None,
        *,
        batch_handler: Callable | None = None,
        types: Iterable[str | type] | None = None,
        stream_prefix: str | None = None,
        on_error: "str | Retry | None" = None,
        batch_size: int | None = None,
        setup: Callable | None = None,
        reset: Callable | None = None,
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
        self.type_names = _type_names(self.types)
        overridden = type(self).handle is not Projector.handle or type(self).handle_batch is not Projector.handle_batch
        if handler is None and batch_handler is None and not overridden:
            raise ValidationError(f"projector {self.name!r} has no handler: pass handler= or batch_handler=, "
                                  "or override handle()/handle_batch()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def handle(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        if self._handler is None:
            raise NotImplementedError(f"projector {self.name!r} handles batches only")
        self._handler(event, ctx)

    def handle_batch(self, events: list[RecordedEvent], ctx: ProjectionContext) -> None:
        if self._batch_handler is not None:
            self._batch_handler(events, ctx)
            return
        for event in events:
            self.handle(event, ctx)

    def setup(self, ctx: ProjectionContext) -> None:
        if self._setup is not None:
            self._setup(ctx)

    def reset(self, ctx: ProjectionContext) -> None:
        if self._reset is not None:
            self._reset(ctx)


class ProjectionStatus(msgspec.Struct, frozen=True):
    """A projector as its store records it. `lag` = head position - stored checkpoint (0: caught
    up); a distance in positions, not a count of events: on PostgreSQL positions are sparse
    (transaction id << 20, plus the event's index in its transaction), so a lag of a few million
    can be a single event. For alerting use `pending`: the events after the checkpoint (any type),
    counted up to PENDING_CAP (10,000; that value means at least that many), so computing it costs
    a bounded index scan. A filtered projector's stored checkpoint moves past events its filters
    leave out only every `idle_checkpoint_interval` (5 s), so both may show those for a few
    seconds. `state`: running (an instance holds the
    lock), stopped, failed (see `error`), idle (never run) or dead (the last instance died
    without stopping)."""

    name: str
    position: int
    head: int
    lag: int
    pending: int
    state: str
    error: str | None
    owner: str | None
    updated_at: _dt.datetime | None
    dead_letters: int


class DeadLetter(msgspec.Struct, frozen=True):
    """An event a projector skipped, as stored, with the error that made it skip.

    `data` and `metadata` are the stored JSON decoded to Python values (dicts, lists, ...), or
    the stored bytes unchanged when they are not JSON (an event nobody can decode)."""

    projector: str
    position: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    type: str
    data: Any
    metadata: Any
    recorded_at: _dt.datetime
    error: str
    attempts: int
    failed_at: _dt.datetime | None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _unprefixed(exc: BaseException, name: str) -> str:
    """An error's message without a leading "projection 'name': " (the log line says it already)."""
    text, prefix = str(exc), f"projection {name!r}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _as_bytes(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _json_value(value):
    """A dead letter's stored JSON as Python values; its stored bytes as they are when they are not
    JSON (not UTF-8, truncated, nested past the recursion limit): often why it is a dead letter."""
    if value is None:
        return None
    raw = _as_bytes(value)
    try:
        return _json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return raw


# -- backends ------------------------------------------------------------------------------


class _Backend:
    """What the runner needs from a store: a leader lock, checkpoint transactions, raw reads, wake-ups."""

    connection = None
    #: Seconds a running listener's claim lasts unless renewed (PostgreSQL: appends NOTIFY while it lasts).
    listen_lease = 30.0

    def __init__(self, store: EventStore, name: str) -> None:
        self.store = store
        self.name = name

    def open(self) -> None: ...

    def close(self) -> None: ...

    def try_acquire(self) -> bool:
        raise NotImplementedError

    def release(self) -> None: ...

    def load(self) -> int:
        raise NotImplementedError

    def head(self) -> int:
        return self.store.head_position()

    def read_rows(self, after: int, types, prefix, limit: int) -> list:
        return self.store._read_all_rows(after, types, prefix, limit)

    def read_page(self, after: int, types, prefix, limit: int) -> "tuple[list, int | None]":
        """A page for the runner: (rows, bound). bound None: the read looked up to the feed's head;
        else it looked only up to `bound` (a window of the feed, on PostgreSQL for a filtered
        projector), which is below the head, and every event up to it that matches is in rows
        unless rows is a full page."""
        return self.read_rows(after, types, prefix, limit), None

    @contextmanager
    def transaction(self) -> Iterator["_Backend"]:
        raise NotImplementedError
        yield self

    # Called inside transaction():
    def advance(self, old: int, new: int) -> None:
        raise NotImplementedError

    def dead_letter(self, row, error: str, attempts: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def set_state(self, state: str, error: str | None, owner: str | None) -> None:
        raise NotImplementedError

    def clear_wake(self) -> None: ...

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
        return False

    def lost(self) -> bool:
        """After an error: is the projection's own connection unusable? (broken() plus, where it
        is cheap, a liveness check.) Decides between reconnecting and the error strategy."""
        return self.broken()


class _MemoryState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.checkpoints: dict[str, dict] = {}
        self.dead_letters: dict[tuple[str, int], dict] = {}
        self.leaders: dict[str, threading.Lock] = {}


_memory_guard = threading.Lock()


def _memory_state(store) -> _MemoryState:
    with _memory_guard:
        state = getattr(store, "_projection_state", None)
        if state is None:
            state = store._projection_state = _MemoryState()
        return state


def _new_checkpoint() -> dict:
    return {"position": 0, "state": "idle", "error": None, "owner": None, "updated_at": None}


class _MemoryBackend(_Backend):
    """The memory store: checkpoints in the store object; handlers' effects are theirs to make atomic."""

    def __init__(self, store, name) -> None:
        super().__init__(store, name)
        self.state = _memory_state(store)
        with self.state.lock:
            self.leader = self.state.leaders.setdefault(name, threading.Lock())
        self.held = False
        self._ops: list | None = None

    def try_acquire(self) -> bool:
        self.held = self.leader.acquire(blocking=False)
        return self.held

    def release(self) -> None:
        if self.held:
            self.held = False
            self.leader.release()

    def load(self) -> int:
        with self.state.lock:
            return self.state.checkpoints.setdefault(self.name, _new_checkpoint())["position"]

    @contextmanager
    def transaction(self):
        self._ops, self._expect = [], None
        try:
            yield self
            with self.state.lock:  # all or nothing: the compare-and-set first, then every write
                cp = self.state.checkpoints[self.name]
                if self._expect is not None and cp["position"] != self._expect:
                    raise _LostLeadership(f"checkpoint of {self.name!r} is at {cp['position']}, "
                                          f"expected {self._expect}")
                for op in self._ops:
                    op()
        finally:
            self._ops = None

    def advance(self, old, new):
        def op():
            cp = self.state.checkpoints[self.name]
            cp["position"] = new
            cp["updated_at"] = _dt.datetime.now(_dt.timezone.utc)
        self._expect = old
        self._ops.append(op)

    def dead_letter(self, row, error, attempts):
        record = _dead_letter_dict(self.name, row, error, attempts)
        self._ops.append(lambda: self.state.dead_letters.__setitem__((self.name, row[0]), record))

    def reset(self):
        def op():
            self.state.checkpoints[self.name]["position"] = 0
            for key in [k for k in self.state.dead_letters if k[0] == self.name]:
                del self.state.dead_letters[key]
        self._ops.append(op)

    def set_state(self, state, error, owner):
        with self.state.lock:
            cp = self.state.checkpoints.setdefault(self.name, _new_checkpoint())
            cp.update(state=state, error=error, owner=owner, updated_at=_dt.datetime.now(_dt.timezone.utc))


def _dead_letter_dict(name, row, error, attempts) -> dict:
    position, sid, version, event_id, type_name, data, metadata, recorded_us = row
    return {
        "projector": name, "position": position, "stream_id": sid, "version": version,
        "event_id": bytes(event_id), "type": type_name, "data": _as_bytes(data),
        "metadata": None if metadata is None else _as_bytes(metadata), "recorded_at_us": recorded_us,
        "error": error, "attempts": attempts, "failed_at": _dt.datetime.now(_dt.timezone.utc),
    }


_NOW = "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"


def _sqlite_connect(store) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(store.path, timeout=store.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous = {store.synchronous}")  # the tables are the store's own (schema 3)
    except sqlite3.Error as exc:
        raise _StoreFailed(f"cannot open the projection tables in {store.path!r}: {exc}") from exc
    return conn


class _SQLiteBackend(_Backend):
    """SQLite: checkpoint tables in the store's file, written on the projection's own connection
    in the same `BEGIN IMMEDIATE` transaction as the handler's writes; the leader lock is an
    exclusive flock on `<database>.projection-<hash of name>.lock`, dropped by the OS when the
    process dies."""

    def open(self) -> None:
        self.connection = _sqlite_connect(self.store)
        self._lock_file = None

    def close(self) -> None:
        self.release()
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _lock_path(self) -> str:
        # The real path: every process (whatever its working directory, through whichever
        # symlink it opened the database) locks the same file.
        path = os.path.realpath(self.store.path)
        return f"{path}.projection-{hashlib.sha256(self.name.encode()).hexdigest()[:16]}.lock"

    def try_acquire(self) -> bool:
        fd = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return False
        self._lock_file = fd
        return True

    def release(self) -> None:
        fd, self._lock_file = getattr(self, "_lock_file", None), None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _run(self, sql, params=()):
        try:
            return self.connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise _StoreFailed(f"SQLite projection statement failed on {self.store.path!r}: {exc}") from exc

    def load(self) -> int:
        self._run("INSERT OR IGNORE INTO projection_checkpoints (name) VALUES (?)", (self.name,))
        return self._run("SELECT position FROM projection_checkpoints WHERE name = ?", (self.name,))[0][0]

    @contextmanager
    def transaction(self):
        self._run("BEGIN IMMEDIATE")  # errors become _StoreFailed
        with _commit_or_roll_back(self.connection):
            yield self

    def advance(self, old, new):
        cur = self.connection.execute(
            f"UPDATE projection_checkpoints SET position = ?, updated_at = {_NOW} WHERE name = ? AND position = ?",
            (new, self.name, old))
        if cur.rowcount != 1:
            raise _LostLeadership(f"checkpoint of {self.name!r} is no longer at {old}")

    def dead_letter(self, row, error, attempts):
        d = _dead_letter_dict(self.name, row, error, attempts)
        self.connection.execute(
            "INSERT OR REPLACE INTO projection_dead_letters (projector, position, stream_id, version, event_id, type, "
            f"data, metadata, recorded_at, error, attempts, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NOW})",
            (self.name, d["position"], d["stream_id"], d["version"], d["event_id"], d["type"], d["data"],
             d["metadata"], d["recorded_at_us"], error, attempts))

    def reset(self):
        self.connection.execute(f"UPDATE projection_checkpoints SET position = 0, updated_at = {_NOW} WHERE name = ?",
                                (self.name,))
        self.connection.execute("DELETE FROM projection_dead_letters WHERE projector = ?", (self.name,))

    def set_state(self, state, error, owner):
        self._run("INSERT OR IGNORE INTO projection_checkpoints (name) VALUES (?)", (self.name,))
        self._run(f"UPDATE projection_checkpoints SET state = ?, error = ?, owner = ?, updated_at = {_NOW} "
                  "WHERE name = ?", (state, error, owner, self.name))

    def lock_held(self) -> bool:
        if not os.path.exists(self._lock_path()):
            return False
        if self.try_acquire():
            self.release()
            return False
        return True


def _backend(store: EventStore, name: str, listen: bool = True) -> _Backend:
    scheme = getattr(store, "scheme", "")
    if scheme == "memory":
        return _MemoryBackend(store, name)
    if scheme == "sqlite":
        return _SQLiteBackend(store, name)
    if scheme == "postgresql":
        from .stores.pg_projections import PostgresBackend

        return PostgresBackend(store, name, listen, listen_at_once=False)
    raise ValidationError(f"projections are not supported on {type(store).__name__}")


# -- the runner ------------------------------------------------------------------------------


def _decode(rows: list) -> tuple[list, list]:
    """Decode a page: (events, errors), parallel to rows; an undecodable row has event None and its error."""
    try:
        return _impl.decode_rows(rows), [None] * len(rows)
    except SerializationError:
        pass
    events, errors = [], []
    for row in rows:
        try:
            events.append(_impl.decode_rows([row])[0])
            errors.append(None)
        except SerializationError as exc:
            events.append(None)
            errors.append(exc)
    return events, errors


class ProjectionRunner:
    """Runs one projector against one store: `run()` in this thread, or `start()` a thread.

    `stop()` (or setting `stop_event`, or SIGTERM/SIGINT with `handle_signals=True`)
    ends it after the batch in hand. `caught_up` is set whenever a read finds no
    more events; `position` is the checkpoint as this instance last saw it.
    """

    def __init__(
        self,
        store: EventStore,
        projector: Projector,
        *,
        stop_event: threading.Event | None = None,
        poll_interval: float | None = None,
        lock_poll_interval: float = 0.5,
        until_caught_up: bool = False,
        rebuild: bool = False,
        handle_signals: bool = False,
        reconnect_backoff: float = 0.5,
        max_reconnect_backoff: float = 30.0,
        listen: bool = True,
        listen_lease: float = 30.0,
        idle_checkpoint_interval: float = 5.0,
    ) -> None:
        if not isinstance(projector, Projector):
            raise ValidationError(f"run_projection takes an ec.Projector, got {type(projector).__name__}")
        self.store = store
        self.projector = projector
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        default_poll = 1.0 if getattr(store, "scheme", "") == "postgresql" else 0.1
        self.poll_interval = default_poll if poll_interval is None else seconds("poll_interval", poll_interval)
        self.lock_poll_interval = seconds("lock_poll_interval", lock_poll_interval)
        self.reconnect_backoff = seconds("reconnect_backoff", reconnect_backoff)
        self.max_reconnect_backoff = seconds("max_reconnect_backoff", max_reconnect_backoff)
        self.listen_lease = seconds("listen_lease", listen_lease)
        self.idle_checkpoint_interval = seconds("idle_checkpoint_interval", idle_checkpoint_interval, allow_zero=True)
        self.until_caught_up = until_caught_up
        self.rebuild = rebuild
        self.handle_signals = handle_signals
        self.listen = listen
        self.caught_up = threading.Event()
        self.leading = threading.Event()
        self.position = 0  # the stored checkpoint, as this instance last wrote or read it
        self._cursor = 0  # where reading goes on from: the checkpoint, or past events the filters left out
        self._idle_due = 0.0
        self.events_handled = 0
        self.batches = 0
        self.error: BaseException | None = None
        self._backend: _Backend | None = None
        self._thread: threading.Thread | None = None
        self._rebuilt = False
        self._held = False
        self._failures = 0  # reconnections in a row without progress (exponential backoff)

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def start(self) -> "ProjectionRunner":
        """Run in a daemon thread; errors end up in `error` (and `join()` re-raises them)."""
        def target():
            try:
                self.run()
            except BaseException as exc:  # noqa: BLE001 - kept for join()
                self.error = exc
        self._thread = threading.Thread(target=target, name=f"eventcore-projection-{self.projector.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None and (self._thread is None or not self._thread.is_alive()):
            raise self.error

    def status(self) -> "ProjectionStatus | None":
        """The projector as the store records it (None before any instance ran): the stored
        checkpoint, so a waiting instance reports the same as the leader."""
        found = projection_status(self.store, self.projector.name)
        return found[0] if found else None

    def lag(self) -> int:
        """Head position minus the stored checkpoint (0: caught up), in positions: see ProjectionStatus
        (sparse on PostgreSQL; alert on `pending()` instead)."""
        st = self.status()
        return st.lag if st is not None else self.store.head_position()

    def pending(self) -> int:
        """Events after the stored checkpoint (any type), counted up to PENDING_CAP (10,000)."""
        st = self.status()
        return st.pending if st is not None else _count_after(self.store, 0)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> "ProjectionRunner":
        """Catch up, then follow live until stopped (or caught up, with `until_caught_up`)."""
        previous = self._install_signals()
        try:
            while not self.stop_event.is_set():
                backend = self._backend = _backend(self.store, self.projector.name, self.listen)
                backend.listen_lease = self.listen_lease
                try:
                    backend.open()
                    if not self._acquire(backend):
                        return self
                    try:
                        self._lead(backend)
                    except _Stopped:
                        pass
                    self._record(backend, "stopped", None)
                    return self
                except (_StoreFailed, _LostLeadership) as exc:
                    # The connection (and with it the lock) is gone, one of the projection's own
                    # statements failed, or another instance leads: start again from the stored
                    # checkpoint, backing off exponentially (reset by progress, see _lead).
                    delay = min(self.max_reconnect_backoff, self.reconnect_backoff * 2 ** min(self._failures, 30))
                    self._failures += 1
                    log.warning("projection %r: %s; reconnecting in %.2f s", self.projector.name,
                                _unprefixed(exc, self.projector.name), delay)
                    self.stop_event.wait(delay)
                except Exception as exc:
                    self.error = exc
                    if self._held and not backend.broken():
                        self._record(backend, "failed", str(exc) if isinstance(exc, ProjectionError)
                                     else _describe(exc))
                    raise
                finally:
                    self.leading.clear()
                    try:
                        if self._held and not backend.broken():
                            # Whatever ended the run (KeyboardInterrupt and SystemExit too): appends
                            # stop paying for NOTIFY now; a killed process's lease simply expires.
                            backend.stop_listening()
                        backend.release()
                        backend.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
                    self._held = False
            return self
        finally:
            self._restore_signals(previous)

    def _record(self, backend: _Backend, state: str, error) -> None:
        try:
            backend.set_state(state, error, _owner())
        except Exception as exc:  # noqa: BLE001 - the state is informative only
            log.warning("projection %r: cannot record state %r: %s", self.projector.name, state,
                        _unprefixed(exc, self.projector.name))

    def _acquire(self, backend: _Backend) -> bool:
        while not self.stop_event.is_set():
            if backend.try_acquire():
                self._held = True
                return True
            self.stop_event.wait(self.lock_poll_interval)
        return False

    def _lead(self, backend: _Backend) -> None:
        p = self.projector
        position = backend.load()
        with backend.transaction():
            # setup() first: reset() may empty tables that only setup() creates (a first run with rebuild).
            p.setup(ProjectionContext(self.store, p, backend.connection, position))
            if self.rebuild and not self._rebuilt:
                p.reset(ProjectionContext(self.store, p, backend.connection, position))
                backend.reset()
        if self.rebuild and not self._rebuilt:
            self._rebuilt = True
            position = 0
        backend.set_state("running", None, _owner())
        self.position = self._cursor = position
        self._idle_due = _time.monotonic() + self.idle_checkpoint_interval
        self.leading.set()
        log.info("projection %r: leading from position %d", p.name, position)
        retry = 0.0
        while not self.stop_event.is_set():
            backend.clear_wake()
            backend.keep_listening()  # before the read: an append it misses notifies
            before = self._cursor
            head = backend.head()
            rows, bound = backend.read_page(self._cursor, p.type_names, p.stream_prefix, p.batch_size)
            self._failures = 0  # the connection works: the next reconnection starts from the base backoff
            if rows:
                self._process(backend, rows)
            if len(rows) < p.batch_size and bound is not None:
                # A filtered read looked only up to `bound` (a window of the feed after the cursor)
                # and found less than a page: nothing else up to `bound` is for this projector, and
                # nothing can appear there later: `bound` is an event below the fence, so every
                # transaction that could write a position up to it has ended (the same reason as
                # for reading on from `head` below). Read on from there at once.
                self._cursor = max(self._cursor, bound)
                if self._cursor > self.position and _time.monotonic() >= self._idle_due:
                    self._save_cursor(backend)
                self.caught_up.clear()
                retry = 0.0
                continue
            if len(rows) < p.batch_size:
                # Everything up to `head` was read (head was read first): nothing up to it is left
                # for this projector, so reading goes on from there. The stored checkpoint follows
                # past such filtered-out events at most every `idle_checkpoint_interval` seconds
                # (and when the run ends), not a commit per idle wake-up.
                self._cursor = max(self._cursor, head)
                if self._cursor > self.position and _time.monotonic() >= self._idle_due:
                    self._save_cursor(backend)
                self.caught_up.set()
                if self.until_caught_up:
                    self._save_cursor(backend)
                    return
                if backend.committed_beyond(max(head, self._cursor)):
                    # Events are committed past the feed's fence, which waits for an older transaction
                    # still running: their NOTIFY came already, and none will come when the fence
                    # passes. Look again soon, backing off from 5 to 50 ms, for as long as that lasts
                    # (starting over whenever the position moves), rather than after a full poll.
                    retry = 0.005 if self._cursor != before or not retry else min(retry * 2, _FENCE_RETRY_MAX)
                    backend.wait(min(retry, self.poll_interval), self.stop_event)
                else:
                    retry = 0.0
                    backend.wait(self.poll_interval, self.stop_event)
            else:
                self.caught_up.clear()
                retry = 0.0
        self._save_cursor(backend)

    def _save_cursor(self, backend: _Backend) -> None:
        """Move the stored checkpoint up to the read cursor (past events the filters left out)."""
        self._idle_due = _time.monotonic() + self.idle_checkpoint_interval
        if self._cursor > self.position:
            with backend.transaction():
                backend.advance(self.position, self._cursor)
            self.position = self._cursor

    def _process(self, backend: _Backend, rows: list) -> None:
        events, errors = _decode(rows)
        i, n = 0, len(rows)
        while i < n:  # the page in hand is finished even when a stop is requested
            j = i
            while j < n and events[j] is not None:
                j += 1
            if j > i:
                self._apply_batch(backend, rows[i:j], events[i:j])
            if j < n:
                self._failed(backend, rows[j], None, errors[j], attempts=1)
            i = j + 1

    def _commit(self, backend: _Backend, rows: list, events: list) -> None:
        """One transaction: the handler over `events`, then the checkpoint moved to the last of `rows`."""
        p = self.projector
        new = rows[-1][0]
        with backend.transaction():
            if events:
                p.handle_batch(events, ProjectionContext(self.store, p, backend.connection, self.position))
            backend.advance(self.position, new)
        self.position = self._cursor = new
        self.events_handled += len(events)
        self.batches += 1

    def _apply_batch(self, backend: _Backend, rows: list, events: list) -> None:
        try:
            self._commit(backend, rows, events)
            return
        except (_LostLeadership, _StoreFailed, _Refused):
            raise
        except Exception as exc:  # noqa: BLE001 - the handler's error: find the failing event
            if backend.lost():
                raise _StoreFailed(f"projection connection lost: {exc}") from exc
            if len(events) == 1:
                self._failed(backend, rows[0], events[0], exc, attempts=1)
                return
        for row, event in zip(rows, events):  # one event per transaction, to isolate the failing one
            try:
                self._commit(backend, [row], [event])
            except (_LostLeadership, _StoreFailed, _Refused):
                raise
            except Exception as exc:  # noqa: BLE001
                if backend.lost():
                    raise _StoreFailed(f"projection connection lost: {exc}") from exc
                self._failed(backend, row, event, exc, attempts=1)

    def _failed(self, backend: _Backend, row, event, exc: BaseException, attempts: int) -> None:
        """Apply the error strategy to one event that failed (event None: it could not be decoded)."""
        p = self.projector
        strategy = p.on_error
        if isinstance(strategy, Retry):
            delay = strategy.backoff
            while event is not None and attempts < strategy.attempts:
                if self.stop_event.wait(delay):
                    raise _Stopped()
                delay = min(delay * 2, strategy.max_backoff)
                attempts += 1
                try:
                    self._commit(backend, [row], [event])
                    return
                except (_LostLeadership, _StoreFailed, _Refused):
                    raise
                except Exception as again:  # noqa: BLE001
                    if backend.lost():
                        raise _StoreFailed(f"projection connection lost: {again}") from again
                    exc = again
            strategy = strategy.then
        position, sid, version, _, type_name = row[:5]
        where = f"position {position} (stream {sid!r}, version {version}, type {type_name!r})"
        if strategy == SKIP:
            log.warning("projection %r: skipping the event at %s after %d attempt(s): %s",
                        p.name, where, attempts, _describe(exc))
            with backend.transaction():
                backend.dead_letter(row, _describe(exc), attempts)
                backend.advance(self.position, position)
            self.position = self._cursor = position
            return
        raise ProjectionError(
            f"projector {p.name!r} failed on the event at {where} after {attempts} attempt(s): {_describe(exc)}",
            p.name, position, event,
        ) from exc

    # -- signals -------------------------------------------------------------------------

    def _install_signals(self):
        if not self.handle_signals:
            return None
        if threading.current_thread() is not threading.main_thread():
            raise ValidationError("handle_signals=True needs the main thread")
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: self.stop_event.set())
        return previous

    def _restore_signals(self, previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def run_projection(store: EventStore, projector: Projector, **options) -> ProjectionRunner:
    """Run `projector` against `store` in this thread: catch up from its checkpoint, then follow live.

    Options: `stop_event` (a threading.Event that stops it), `handle_signals`
    (SIGTERM/SIGINT stop it; main thread only), `until_caught_up` (return once
    the feed is read to its head), `rebuild` (reset the checkpoint and the read
    model via `projector.reset(ctx)`, then replay), `poll_interval` (seconds
    between polls; on PostgreSQL the fallback behind LISTEN/NOTIFY, default 1.0,
    else 0.1), `lock_poll_interval` (how often a waiting instance tries to take
    over, 0.5 s), `listen` (PostgreSQL: False polls only, for poolers that drop
    LISTEN), `listen_lease` (PostgreSQL: appends NOTIFY while a listening projector's lease
    lasts, 30 s, renewed every third of it while it runs and ended when it stops; a killed or
    hung process stops costing appends a NOTIFY once its lease expires),
    `idle_checkpoint_interval` (a filtered projector's checkpoint moves past events its filters
    leave out at most this often, 5 s, and when the run ends), `reconnect_backoff` / `max_reconnect_backoff` (after a lost connection or a
    failed statement of its own, it reconnects after 0.5 s, doubling up to 30 s until it makes
    progress again; an error the handler raises, whatever its class, goes to the error
    strategy instead). Returns the runner once stopped; raises ProjectionError when
    the error strategy is "fatal" and an event fails.
    """
    return ProjectionRunner(store, projector, **options).run()


# -- status, dead letters, tail --------------------------------------------------------------


def projection_status(store: EventStore, name: str | None = None) -> list[ProjectionStatus]:
    """Every projector recorded in the store (or just `name`), with checkpoint, lag and state."""
    if isinstance(name, str) and forbidden_character(name):
        return []  # no projector can have that name
    scheme = getattr(store, "scheme", "")
    head = store.head_position()
    if scheme == "postgresql":
        from .stores.pg_projections import pg_status

        return pg_status(store, name, head)
    out = []
    if scheme == "memory":
        state = _memory_state(store)
        with state.lock:
            items = sorted(state.checkpoints.items())
            counts: dict = {}
            for proj, _ in state.dead_letters:
                counts[proj] = counts.get(proj, 0) + 1
        rows = [(n, cp["position"], cp["state"], cp["error"], cp["owner"], cp["updated_at"], counts.get(n, 0),
                 state.leaders.get(n) is not None and state.leaders[n].locked()) for n, cp in items]
    elif scheme == "sqlite":
        conn = _sqlite_connect(store)
        try:
            raw = conn.execute(
                "SELECT name, position, state, error, owner, updated_at, "
                "(SELECT count(*) FROM projection_dead_letters d WHERE d.projector = c.name) "
                "FROM projection_checkpoints c ORDER BY name").fetchall()
        finally:
            conn.close()
        rows = []
        for r in raw:
            probe = _SQLiteBackend(store, r[0])
            updated = _dt.datetime.fromisoformat(r[5]) if r[5] else None
            rows.append((*r[:5], updated, r[6], probe.lock_held()))
    else:
        raise ValidationError(f"projections are not supported on {type(store).__name__}")
    for n, position, st, error, owner, updated, dead, held in rows:
        if name is not None and n != name:
            continue
        pending = _count_after(store, position)
        out.append(ProjectionStatus(n, position, head, max(0, head - position), pending,
                                    _effective_state(st, held), error, owner, updated, dead))
    return out


def _effective_state(stored: str, held: bool) -> str:
    if held:
        return "running"
    if stored == "running":
        return "dead"
    return stored


def _count_after(store, position: int) -> int:
    """Events after `position`, counted up to PENDING_CAP."""
    scheme = getattr(store, "scheme", "")
    if scheme == "memory":
        return min(PENDING_CAP, max(0, store.head_position() - position))
    if scheme == "sqlite":
        return store._query("SELECT count(*) FROM (SELECT 1 FROM events WHERE position > ? LIMIT ?)",
                            (position, PENDING_CAP))[0][0]
    if scheme == "postgresql":
        from .stores.pg_projections import pg_count_after

        return pg_count_after(store, position, PENDING_CAP)
    raise ValidationError("unsupported store")


def dead_letters(store: EventStore, projector: "str | Projector") -> list[DeadLetter]:
    """The events a projector skipped, in position order, each with its error."""
    name = projector.name if isinstance(projector, Projector) else projector
    if isinstance(name, str) and forbidden_character(name):
        return []  # no projector can have that name
    scheme = getattr(store, "scheme", "")
    if scheme == "postgresql":
        from .stores.pg_projections import pg_dead_letters

        return pg_dead_letters(store, name)
    if scheme == "memory":
        state = _memory_state(store)
        with state.lock:
            records = [d for (n, _), d in sorted(state.dead_letters.items()) if n == name]
        rows = [(d["position"], d["stream_id"], d["version"], d["event_id"], d["type"], d["data"], d["metadata"],
                 d["recorded_at_us"], d["error"], d["attempts"], d["failed_at"]) for d in records]
    elif scheme == "sqlite":
        conn = _sqlite_connect(store)
        try:
            rows = conn.execute(
                "SELECT position, stream_id, version, event_id, type, data, metadata, recorded_at, error, attempts, "
                "failed_at FROM projection_dead_letters WHERE projector = ? ORDER BY position", (name,)).fetchall()
        finally:
            conn.close()
        rows = [(*r[:10], _dt.datetime.fromisoformat(r[10]) if r[10] else None) for r in rows]
    else:
        raise ValidationError(f"projections are not supported on {type(store).__name__}")
    return [
        DeadLetter(name, pos, sid, ver, uuid.UUID(bytes=bytes(eid)), t, _json_value(data), _json_value(md),
                   _EPOCH + _dt.timedelta(microseconds=at), err, att, failed)
        for pos, sid, ver, eid, t, data, md, at, err, att, failed in rows
    ]


def read_rows(store: EventStore, after: int, types=None, prefix: str | None = None, limit: int = 1000) -> list:
    """One page of the feed as stored rows (codec.ROW_COLUMNS), whether or not this process can decode them."""
    if getattr(store, "scheme", "") == "postgresql":
        from .stores.pg_projections import pg_read_rows

        return pg_read_rows(store, after, types, prefix, limit)
    return store._read_all_rows(after, types, prefix, limit)


def row_json(row) -> bytes:
    """One stored row as a JSON object whose keys are RecordedEvent's fields, in order (for `eventcore tail`)."""
    position, sid, version, event_id, type_name, data, metadata, recorded_us = row
    # Printed as stored, but never as broken JSON: a row corrupted behind the store's back (wrong
    # column types, bytes that are not UTF-8 JSON) is a SerializationError naming it, as on read.
    try:
        if type(position) is not int or type(version) is not int or not isinstance(sid, str) or (
                not isinstance(type_name, str)):
            raise TypeError("position and version must be ints, stream id and type strs")
        at = (_EPOCH + _dt.timedelta(microseconds=recorded_us)).isoformat()
        eid = str(uuid.UUID(bytes=bytes(event_id)))
        parts = []
        for part in (data, metadata):
            if part is not None:
                if not isinstance(part, (bytes, bytearray, memoryview, str)):
                    raise TypeError(f"a JSON column holds {type(part).__name__}")
                part = _as_bytes(part)
                part.decode("utf-8")
                _raw_json.decode(part)
            parts.append(part)
    except (TypeError, ValueError, OverflowError, msgspec.DecodeError, RecursionError) as exc:
        raise SerializationError(
            f"corrupt stored row at position {position!r} (stream {sid!r}, version {version!r}): "
            f"{'nested too deeply' if isinstance(exc, RecursionError) else exc}"
        ) from None
    return msgspec.json.encode({
        "stream_id": sid,
        "version": version,
        "position": position,
        "event_id": eid,
        "type": type_name,
        "data": msgspec.Raw(parts[0]),
        "metadata": msgspec.Raw(parts[1]) if parts[1] is not None else {},
        "recorded_at": at,
    })


_raw_json = msgspec.json.Decoder(msgspec.Raw)


def follow_waiter(store: EventStore):
    """For `eventcore tail --follow`: an object whose `wait(timeout, stop)` returns early when events are
    appended (LISTEN/NOTIFY on PostgreSQL; a plain sleep elsewhere). Close it with `close()`."""
    if getattr(store, "scheme", "") == "postgresql":
        from .stores.pg_projections import PostgresBackend

        backend = PostgresBackend(store, "")
        backend.open()
        return backend
    return _Backend(store, "")
