"""The projection runner: one projector against one store, catching up from its checkpoint, then live.

The runner asks the store for its projection storage (`store._projection_storage()`) and drives a
session of it: take the projector's leader lock (or wait to take it over), load the checkpoint, then
read a page of the feed after the cursor, decoded (`ProjectionSession.read_events`), hand the events
to the projector and move the checkpoint in the same transaction, again and again; when the feed is
read to its head, wait for a wake-up or the poll interval. A failing batch is replayed one event per transaction to find the
failing event, which goes to the projector's error strategy. A lost connection, or a failure of one
of the session's own statements, ends the session: the runner reconnects with exponential backoff
and resumes from the stored checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time as _time
from typing import TYPE_CHECKING, TypedDict

from ..errors import ValidationError
from ..options import seconds
from ..stores.base import EventStore
from ..stores.projection_storage import FeedPage, LostLeadership, ProjectionSession, Refused, StoreFailed
from .projector import SKIP, ProjectionContext, ProjectionError, Projector, Retry
from .status import ProjectionStatus, count_after, projection_status, storage_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

log: logging.Logger = logging.getLogger("eventcore.projections")

#: Longest pause between looks while committed events wait behind the feed's fence (PostgreSQL).
_FENCE_RETRY_MAX = 0.05
#: Events an unfiltered projector reads at once (in whole batches): one read's start-up (on PostgreSQL
#: a COPY, ~0.2 ms) shared by 2 batches of the default 2,000 (8 of 500) instead of paid for each; measured in
#: bench/test_reads.py (projection catch-up). Bounded so a page stays a few MB in memory.
READ_AHEAD_EVENTS = 4000



class _Stopped(Exception):
    """A stop was requested while retrying an event."""



def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _unprefixed(exc: BaseException, name: str) -> str:
    """An error's message without a leading "projection 'name': " (the log line says it already)."""
    text, prefix = str(exc), f"projection {name!r}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"



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
        self.store: EventStore = store
        self.projector: Projector = projector
        self.stop_event: threading.Event = stop_event if stop_event is not None else threading.Event()
        #: Seconds between looks at the feed while idle (None: the store's default, see run()).
        self.poll_interval: float | None = None if poll_interval is None else seconds("poll_interval", poll_interval)
        self.lock_poll_interval: float = seconds("lock_poll_interval", lock_poll_interval)
        self.reconnect_backoff: float = seconds("reconnect_backoff", reconnect_backoff)
        self.max_reconnect_backoff: float = seconds("max_reconnect_backoff", max_reconnect_backoff)
        self.listen_lease: float = seconds("listen_lease", listen_lease)
        self.idle_checkpoint_interval: float = seconds("idle_checkpoint_interval", idle_checkpoint_interval, allow_zero=True)
        self.until_caught_up: bool = until_caught_up
        self.rebuild: bool = rebuild
        self.handle_signals: bool = handle_signals
        self.listen: bool = listen
        self.caught_up: threading.Event = threading.Event()
        self.leading: threading.Event = threading.Event()
        self.position: int = 0  # the stored checkpoint, as this instance last wrote or read it
        self._cursor = 0  # where reading goes on from: the checkpoint, or past events the filters left out
        self._idle_due = 0.0
        self.events_handled: int = 0
        self.batches: int = 0
        self.error: BaseException | None = None
        self._session: ProjectionSession | None = None
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
        return st.pending if st is not None else count_after(self.store, 0)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> "ProjectionRunner":
        """Catch up, then follow live until stopped (or caught up, with `until_caught_up`)."""
        previous = self._install_signals()
        try:
            while not self.stop_event.is_set():
                storage = storage_of(self.store)
                if self.poll_interval is None:
                    self.poll_interval = storage.poll_interval
                session = self._session = storage.session(self.projector.name, self.listen)
                session.listen_lease = self.listen_lease
                try:
                    session.open()
                    if not self._acquire(session):
                        return self
                    try:
                        self._lead(session)
                    except _Stopped:
                        pass
                    self._record(session, "stopped", None)
                    return self
                except (StoreFailed, LostLeadership) as exc:
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
                    if self._held and not session.broken():
                        self._record(session, "failed", str(exc) if isinstance(exc, ProjectionError)
                                     else _describe(exc))
                    raise
                finally:
                    self.leading.clear()
                    try:
                        if self._held and not session.broken():
                            # Whatever ended the run (KeyboardInterrupt and SystemExit too): appends
                            # stop paying for NOTIFY now; a killed process's lease simply expires.
                            session.stop_listening()
                        session.release()
                        session.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
                    self._held = False
            return self
        finally:
            self._restore_signals(previous)

    def _record(self, session: ProjectionSession, state: str, error) -> None:
        try:
            session.set_state(state, error, _owner())
        except Exception as exc:  # noqa: BLE001 - the state is informative only
            log.warning("projection %r: cannot record state %r: %s", self.projector.name, state,
                        _unprefixed(exc, self.projector.name))

    def _acquire(self, session: ProjectionSession) -> bool:
        while not self.stop_event.is_set():
            if session.try_acquire():
                self._held = True
                return True
            self.stop_event.wait(self.lock_poll_interval)
        return False

    def _lead(self, session: ProjectionSession) -> None:
        p = self.projector
        position = session.load()
        with session.transaction():
            # setup() first: reset() may empty tables that only setup() creates (a first run with rebuild).
            p.setup(ProjectionContext(self.store, p, session.connection, position))
            if self.rebuild and not self._rebuilt:
                p.reset(ProjectionContext(self.store, p, session.connection, position))
                session.reset()
        if self.rebuild and not self._rebuilt:
            self._rebuilt = True
            position = 0
        session.set_state("running", None, _owner())
        self.position = self._cursor = position
        self._idle_due = _time.monotonic() + self.idle_checkpoint_interval
        self.leading.set()
        log.info("projection %r: leading from position %d", p.name, position)
        retry = 0.0
        # An unfiltered projector reads whole batches, about READ_AHEAD_EVENTS, per read (each batch still
        # its own transaction); a filtered one reads a batch through its window of the feed.
        unfiltered = p.type_names is None and p.stream_prefix is None
        limit = p.batch_size * (max(1, READ_AHEAD_EVENTS // p.batch_size) if unfiltered else 1)
        need_head = False  # catching up, pages come full: the head is read once one comes short
        while not self.stop_event.is_set():
            session.clear_wake()
            session.keep_listening()  # before the read: an append it misses notifies
            before = self._cursor
            # The head, read before the page, is what a short page has caught up to. After a full page
            # another one is likely, so it is not read; a short page read without it is read again,
            # with it (once per catch-up).
            head = session.head() if need_head else None
            page, bound = session.read_events(self._cursor, p.type_names, p.stream_prefix, limit, p.decoding)
            self._failures = 0  # the connection works: the next reconnection starts from the base backoff
            if page:
                self._process(session, page)
            need_head = len(page) < limit
            if len(page) < limit and bound is not None:
                # A filtered read looked only up to `bound` (a window of the feed after the cursor)
                # and found less than a page: nothing else up to `bound` is for this projector, and
                # nothing can appear there later: `bound` is an event below the fence, so every
                # transaction that could write a position up to it has ended (the same reason as
                # for reading on from `head` below). Read on from there at once.
                self._cursor = max(self._cursor, bound)
                if self._cursor > self.position and _time.monotonic() >= self._idle_due:
                    self._save_cursor(session)
                self.caught_up.clear()
                retry = 0.0
                continue
            if len(page) < limit:
                if head is None:
                    continue  # read again, the head first
                # Everything up to `head` was read (head was read first): nothing up to it is left
                # for this projector, so reading goes on from there. The stored checkpoint follows
                # past such filtered-out events at most every `idle_checkpoint_interval` seconds
                # (and when the run ends), not a commit per idle wake-up.
                self._cursor = max(self._cursor, head)
                if self._cursor > self.position and _time.monotonic() >= self._idle_due:
                    self._save_cursor(session)
                self.caught_up.set()
                if self.until_caught_up:
                    self._save_cursor(session)
                    return
                if session.committed_beyond(max(head, self._cursor)):
                    # Events are committed past the feed's fence, which waits for an older transaction
                    # still running: their NOTIFY came already, and none will come when the fence
                    # passes. Look again soon, backing off from 5 to 50 ms, for as long as that lasts
                    # (starting over whenever the position moves), rather than after a full poll.
                    retry = 0.005 if self._cursor != before or not retry else min(retry * 2, _FENCE_RETRY_MAX)
                    session.wait(min(retry, self.poll_interval), self.stop_event)
                else:
                    retry = 0.0
                    session.wait(self.poll_interval, self.stop_event)
            else:
                self.caught_up.clear()
                retry = 0.0
        self._save_cursor(session)

    def _save_cursor(self, session: ProjectionSession) -> None:
        """Move the stored checkpoint up to the read cursor (past events the filters left out)."""
        self._idle_due = _time.monotonic() + self.idle_checkpoint_interval
        if self._cursor > self.position:
            with session.transaction():
                session.advance(self.position, self._cursor)
            self.position = self._cursor

    def _process(self, session: ProjectionSession, page: FeedPage) -> None:
        events = page.events
        i, n, most = 0, len(events), self.projector.batch_size
        while i < n:  # the page in hand is finished even when a stop is requested
            j = i
            while j < n and j - i < most and events[j] is not None:
                j += 1
            if j > i:
                self._apply_batch(session, page, i, j)
            if j < n and events[j] is None:
                self._failed(session, page.row(j), None, page.errors[j], attempts=1)
                j += 1
            i = j

    def _commit(self, session: ProjectionSession, events: list) -> None:
        """One transaction: the handler over `events`, then the checkpoint moved to the last of them."""
        p = self.projector
        new = events[-1].position
        with session.transaction():
            p.handle_batch(events, ProjectionContext(self.store, p, session.connection, self.position))
            session.advance(self.position, new)
        self.position = self._cursor = new
        self.events_handled += len(events)
        self.batches += 1

    def _apply_batch(self, session: ProjectionSession, page: FeedPage, i: int, j: int) -> None:
        """Events i..j-1 of the page (all decoded) in one transaction, else one per transaction."""
        events = page.events[i:j]
        try:
            self._commit(session, events)
            return
        except (LostLeadership, StoreFailed, Refused):
            raise
        except Exception as exc:  # noqa: BLE001 - the handler's error: find the failing event
            if session.lost():
                raise StoreFailed(f"projection connection lost: {exc}") from exc
            if len(events) == 1:
                self._failed(session, page.row(i), events[0], exc, attempts=1)
                return
        for k, event in enumerate(events, i):  # one event per transaction, to isolate the failing one
            try:
                self._commit(session, [event])
            except (LostLeadership, StoreFailed, Refused):
                raise
            except Exception as exc:  # noqa: BLE001
                if session.lost():
                    raise StoreFailed(f"projection connection lost: {exc}") from exc
                self._failed(session, page.row(k), event, exc, attempts=1)

    def _failed(self, session: ProjectionSession, row, event, exc: BaseException, attempts: int) -> None:
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
                    self._commit(session, [event])
                    return
                except (LostLeadership, StoreFailed, Refused):
                    raise
                except Exception as again:  # noqa: BLE001
                    if session.lost():
                        raise StoreFailed(f"projection connection lost: {again}") from again
                    exc = again
            strategy = strategy.then
        position, sid, version, _, type_name = row[:5]
        where = f"position {position} (stream {sid!r}, version {version}, type {type_name!r})"
        if strategy == SKIP:
            log.warning("projection %r: skipping the event at %s after %d attempt(s): %s",
                        p.name, where, attempts, _describe(exc))
            with session.transaction():
                session.dead_letter(row, _describe(exc), attempts)
                session.advance(self.position, position)
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


class RunOptions(TypedDict, total=False):
    """The keyword options of `run_projection`, the arguments of `ProjectionRunner` after the store
    and the projector (see `run_projection` for what each does): a type checker reports a misspelt one."""

    stop_event: threading.Event | None
    poll_interval: float | None
    lock_poll_interval: float
    until_caught_up: bool
    rebuild: bool
    handle_signals: bool
    reconnect_backoff: float
    max_reconnect_backoff: float
    listen: bool
    listen_lease: float
    idle_checkpoint_interval: float


def run_projection(store: EventStore, projector: Projector, **options: Unpack[RunOptions]) -> ProjectionRunner:
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
