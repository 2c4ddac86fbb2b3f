"""`await eventcore.aio.run_projection(store, projector)`: a projector over an asyncio store's feed.

A projector's handlers are sync code writing the read model on `ctx.connection`, in the same
transaction as the checkpoint (see eventcore.projections): so the runner is the sync one, run on a
thread while the event loop goes on, against the same database (the memory and SQLite stores' own
sync store; for PostgreSQL, a small sync store on the same schema, opened for the run). Its options,
checkpoints, leader lock, error strategies and LISTEN/NOTIFY wake-ups are the sync runner's.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..errors import ValidationError
from ..projections import Projector
from ..projections.runner import ProjectionRunner
from .ingest import in_own_thread
from .store import AsyncEventStore

#: Connections of the sync store a PostgreSQL projection runs on: the runner's session holds one,
#: its status reads may take another.
PROJECTION_POOL_SIZE = 2


async def run_projection(store: AsyncEventStore, projector: Projector, *, stop: asyncio.Event | None = None,
                         **options: Any) -> ProjectionRunner:
    """Run `projector` against `store`: catch up from its checkpoint, then follow live until `stop` is
    set (or the task is cancelled, or with `until_caught_up=True` once the feed is read to its head).
    Takes `ec.run_projection`'s options but `stop_event` and `handle_signals`. Returns the runner once
    stopped; raises what `ec.run_projection` raises (ProjectionError for a "fatal" failure)."""
    if not isinstance(store, AsyncEventStore):
        raise ValidationError(f"store must be an eventcore.aio store, got {type(store).__name__}")
    if not isinstance(projector, Projector):
        raise ValidationError(f"run_projection takes an ec.Projector, got {type(projector).__name__}")
    if stop is not None and not isinstance(stop, asyncio.Event):
        raise ValidationError(f"stop must be an asyncio.Event or None, got {type(stop).__name__}")
    for name in ("stop_event", "handle_signals"):
        if name in options:
            raise ValidationError(f"eventcore.aio.run_projection takes no {name!r}: pass stop=asyncio.Event()")
    loop = asyncio.get_running_loop()
    sync_store, owned = await _sync_store(store, loop)
    stopped = threading.Event()
    try:
        runner = ProjectionRunner(sync_store, projector, stop_event=stopped, **options)
        done = in_own_thread(runner.run, f"eventcore-aio-projection-{projector.name}")
        waiter: asyncio.Future[Any] | None = None if stop is None else asyncio.ensure_future(stop.wait())
        try:
            if waiter is None:
                await asyncio.shield(done)
            else:
                await asyncio.wait([done, waiter], return_when=asyncio.FIRST_COMPLETED)
                if not done.done():
                    stopped.set()
                await asyncio.shield(done)
        except asyncio.CancelledError:
            stopped.set()  # ends after the batch in hand, its checkpoint saved
            try:
                await done
            except Exception:  # noqa: BLE001 - the cancellation is what the caller gets
                pass
            raise
        finally:
            if waiter is not None:
                waiter.cancel()
        return done.result()
    finally:
        if owned:
            await loop.run_in_executor(None, sync_store.close)


async def _sync_store(store: AsyncEventStore, loop: asyncio.AbstractEventLoop) -> tuple[Any, bool]:
    """The sync store a projection of `store` runs on, and whether it was opened for it."""
    sync = getattr(store, "sync", None)
    if sync is not None:
        return sync, False
    opener = getattr(store, "_open_sync_twin", None)
    if opener is None:
        raise ValidationError(f"projections are not supported on {type(store).__name__}")
    return await loop.run_in_executor(None, opener, PROJECTION_POOL_SIZE), True
