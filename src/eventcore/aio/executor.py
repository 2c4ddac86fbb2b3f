"""`await eventcore.aio.execute(store, command)`: the command executor on an event loop.

The logic of an attempt (read, fold, decide, check, append, retry, the command cache and idempotency
keys) is the sync executor's own: its generator of steps (`eventcore.executor._steps`), driven here by
awaiting each step on an AsyncEventStore instead of calling a sync one. Only what differs between a
thread and a task lives here: commands of one process on a common stream wait for each other on
asyncio locks (as threads do on the executor's stripe locks), back-off sleeps are `asyncio.sleep`,
and the timeout runs on the loop's clock and bounds the whole call, lock and pool waits included.

Cancellation: a task cancelled (or timed out) while its append is in flight may or may not have
committed it; the store holds all of that append's events or none. The CancelledError then has
`maybe_committed = True` (and a note saying so), a timeout is CommandTimeoutError(maybe_committed=True); running the command again with
the same idempotency key settles it (`ExecutionResult.replayed`). Cancelled anywhere else, nothing was
written.
"""
from __future__ import annotations

import asyncio
import uuid
import weakref
from typing import Any

from ..commands import Command, declared_streams
from ..errors import CommandTimeoutError
from ..events import Metadata
from ..executor import (
    APPEND, DEFAULT_TIMEOUT, READ, READ_SNAPSHOT, RECORDED, SLEEP, STORE_CACHE, STREAM_LOCK_STRIPES, VERSIONS,
    ExecutionResult, RetryPolicy, StateCache, _Snap, _steps, check_arguments,
)
from ..snapshots import COMMAND_SNAPSHOTS, SnapshotPolicy
from ..metrics import MetricsCollector
from .store import AsyncEventStore


class _InFlight:
    """Whether the append of a command is in flight (sent, its outcome not yet known)."""

    __slots__ = ("append", "ambiguous")

    def __init__(self) -> None:
        self.append = False
        #: The errors of earlier attempts whose write may have committed (under an idempotency key).
        self.ambiguous: list = []


async def execute(
    store: AsyncEventStore,
    command: Command,
    *,
    retry: RetryPolicy | None = None,
    metadata: Metadata | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    cache: StateCache | None = STORE_CACHE,
    metrics: MetricsCollector | None = None,
    idempotency_key: str | uuid.UUID | None = None,
    snapshots: SnapshotPolicy | None = COMMAND_SNAPSHOTS,
) -> ExecutionResult:
    """Run a command against an asyncio store and return what it wrote: `ec.execute`'s arguments,
    results and errors (see there), awaited. `timeout` bounds the whole call on the loop's clock."""
    policy, timeout, cache, metrics, key, snap = check_arguments(
        AsyncEventStore, store, command, retry, metadata, timeout, cache, metrics, idempotency_key,
        "await eventcore.aio.connect(...)", snapshots)
    if metrics is None:
        return await _execute(store, command, policy, metadata, timeout, cache, None, key, snap)
    run = metrics._command_start(command, declared_streams(command))
    try:
        result = await _execute(store, command, policy, metadata, timeout, cache, run, key, snap)
    except BaseException as exc:
        metrics._command_end(run, None, exc)
        raise
    metrics._command_end(run, result, None)
    return result


def _stream_locks(store: AsyncEventStore, streams: list) -> list:
    """The asyncio locks of these streams of this store on the running loop, in one global order (no
    two commands wait for each other in a cycle); made on first use, so a store costs nothing for
    streams never used. Per loop: an asyncio.Lock belongs to the loop that first waits on it, and a
    memory or SQLite store may be used from one loop after another."""
    per_loop = store._task_locks
    if per_loop is None:
        per_loop = store._task_locks = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    locks = per_loop.get(loop)
    if locks is None:
        locks = per_loop[loop] = {}
    out = []
    for k in sorted({hash(sid) % STREAM_LOCK_STRIPES for sid in streams}):
        lock = locks.get(k)
        if lock is None:
            lock = locks[k] = asyncio.Lock()
        out.append(lock)
    return out


class _Deadline:
    """Cancels the task running a command at `when` (the loop's clock; None: never), and says whether
    it did: asyncio.timeout_at's work, which Python 3.10 lacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        self.expired = False
        self._task = asyncio.current_task()
        self._handle = None if when is None else loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def _execute(store, command, policy, metadata, timeout, cache, obs, key, snapshots=None) -> ExecutionResult:
    streams = declared_streams(command) if obs is None else obs.streams
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    in_flight = _InFlight()
    bound = _Deadline(loop, deadline)
    held = []
    locks = _stream_locks(store, streams)
    try:
        for lock in locks:
            await lock.acquire()
            held.append(lock)
        entry = None if cache is None else cache._folded_entry_for(store, (store.instance, type(command), tuple(streams)))
        snap = None if snapshots is None else _Snap(command, streams, snapshots)
        return await _drive(store, _steps(store, command, streams, policy, metadata, timeout, deadline, entry, cache,
                                          obs, key, loop.time, in_flight.ambiguous, snap), in_flight)
    except asyncio.CancelledError as exc:
        # The store says False when the append was cancelled before anything of it was sent.
        sent = in_flight.append and getattr(exc, "maybe_committed", None) is not False
        unsure = sent or bool(in_flight.ambiguous)
        cancelled_by_caller = not bound.expired or _cancelling(bound._task) > 1
        if cancelled_by_caller:
            if unsure:
                _maybe_committed(exc, command)
            raise
        _uncancel(bound._task)
        name = type(command).__name__
        if unsure:
            raise CommandTimeoutError(
                f"{name} timed out after {timeout}s while a write of it was unsettled: it may have committed (all of "
                "its events or none); run the command again with the same idempotency key to settle it",
                maybe_committed=True) from None
        if len(held) < len(locks):
            raise CommandTimeoutError(
                f"{name} timed out after {timeout}s waiting for other commands of this process on the same streams; "
                "nothing was written") from None
        raise CommandTimeoutError(f"{name} timed out after {timeout}s; nothing was written") from None
    finally:
        bound.cancel()
        for lock in reversed(held):
            lock.release()


def _cancelling(task: Any) -> int:
    """Cancellation requests pending on `task` (Python 3.11+; 1 before: the deadline's own)."""
    cancelling = getattr(task, "cancelling", None)
    return 1 if cancelling is None else cancelling()


def _uncancel(task: Any) -> None:
    """Withdraw the deadline's own cancellation request (3.11+ counts them; a later one still cancels)."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def _maybe_committed(exc: BaseException, command: Command) -> None:
    """Mark a CancelledError raised while the command's append was in flight (`maybe_committed`, and
    a note where exceptions take notes)."""
    exc.maybe_committed = True  # type: ignore[attr-defined]
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(f"eventcore: {type(command).__name__} was cancelled while a write of it was unsettled: it may have "
                 "committed (all of its events or none); run the command again with the same idempotency key to "
                 "settle it")


async def _drive(store: AsyncEventStore, steps: Any, in_flight: _InFlight) -> Any:
    """Run a generator of steps (see eventcore.executor.READ) against an asyncio store."""
    send, throw = steps.send, steps.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = send(value) if error is None else throw(error)
        except StopIteration as done:
            return done.value
        error = value = None
        op = step[0]
        try:
            if op is READ:
                value = await store.read_streams(step[1])
            elif op is APPEND:
                in_flight.append = True
                value = await store.append(step[1], step[2], metadata=step[3], idempotency_key=step[4])
                in_flight.append = False
            elif op is VERSIONS:
                value = await store.stream_versions(step[1])
            elif op is RECORDED:
                value = await store.recorded_command(step[1])
            elif op is SLEEP:
                await asyncio.sleep(step[1])
            elif op is READ_SNAPSHOT:
                value = await store._read_after_snapshot(step[1], step[2], step[3])
            else:
                store._save_snapshot_soon(step[1:])
        except asyncio.CancelledError as exc:
            error = exc  # in_flight.append stays as it was: the append may have been sent
        except BaseException as exc:  # noqa: BLE001 - thrown into the steps, which decide
            in_flight.append = False
            error = exc
