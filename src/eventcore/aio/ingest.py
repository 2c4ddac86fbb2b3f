"""`await store.ingest(items)` for asyncio stores: the sync ingest's logic, the store's I/O awaited.

Batching, lanes, version checks and resume bookkeeping (`eventcore.stores.ingest.ingest`) run as they
do for a sync store, on a thread of this call's own, against a view of the asyncio store whose every
operation (each lane's batch transaction, the resume lookups) is a coroutine run on the caller's event
loop: batches are written through the store's async connections, lanes side by side, while the loop
stays free. So there is one implementation of what makes an ingest resumable and exact. `items` may be
an async iterable (pulled on the loop, one item at a time, as the sync ingest reads lazily) and
`on_batch` a coroutine function (awaited on the loop).

Cancelled, the ingest stops at the next item or batch; batches in flight finish (each commits whole
or not at all) before the CancelledError propagates, so what is committed is settled when it does.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from typing import Any, Callable, Iterator

from ..errors import ValidationError
from ..stores.ingest import IngestResult, ingest as ingest_sync


class _Stopped(BaseException):
    """Raised in the ingest's thread once its caller was cancelled (a BaseException: the sync ingest
    settles its batches in flight and re-raises it, as it does for an input that raised)."""


def in_own_thread(function: Callable[[], Any], name: str) -> "asyncio.Future[Any]":
    """`function()` on a daemon thread of its own, as a future of the running loop. Not the loop's default
    executor: an ingest or a live projection holds its thread for as long as it runs, and a few of them
    would take every thread of that executor from the application's `asyncio.to_thread` calls."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class _StoreOnLoop:
    """What the sync ingest uses of a store, each operation run on `loop` by the asyncio store."""

    def __init__(self, store: Any, loop: asyncio.AbstractEventLoop, stopped: threading.Event) -> None:
        self._store, self._loop, self._stopped = store, loop, stopped

    def __getattr__(self, name: str) -> Any:  # scheme, url, instance...: what an observer may ask
        return getattr(self._store, name)

    @property
    def _observer(self) -> Any:
        return self._store._observer

    def _run(self, coroutine: Any) -> Any:
        if self._stopped.is_set():
            coroutine.close()
            raise _Stopped
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                      progress: Any = None) -> tuple:
        return self._run(self._store._ingest_batch(stream_ids, events, metadatas, expected, progress))

    def _append_batch(self, prepared: Any) -> tuple:
        return self._run(self._store._append_batch(prepared))

    def _after_ingest(self, events: int) -> None:
        """The store's statistics after the ingest (never an error): not once the caller was cancelled."""
        after = getattr(self._store, "_after_ingest", None)
        if after is None or self._stopped.is_set():
            return
        try:
            asyncio.run_coroutine_threadsafe(after(events), self._loop).result()
        except concurrent.futures.CancelledError:
            pass  # the loop is shutting down: the statistics wait for autovacuum

    def _ingest_progress(self, key: str) -> dict:
        return self._run(self._store._ingest_progress(key))

    def _ingest_holes(self, key: str) -> set:
        return self._run(self._store._ingest_holes(key))

    def stream_versions(self, stream_ids: Any) -> dict:
        return self._run(self._store.stream_versions(stream_ids))


class _Pulling:
    """The pull of the next item in flight (so that a cancellation can end it: a source waiting on a
    queue or a socket may never give one)."""

    future: Any = None


def _pulled(items: Any, loop: asyncio.AbstractEventLoop, stopped: threading.Event, pulling: _Pulling) -> Iterator[Any]:
    """An async iterable's items, each pulled on the loop (from the ingest's thread)."""
    iterator = items.__aiter__()
    while True:
        if stopped.is_set():
            raise _Stopped
        pulling.future = asyncio.run_coroutine_threadsafe(_next(iterator), loop)
        try:
            yield pulling.future.result()
        except StopAsyncIteration:
            return
        except concurrent.futures.CancelledError:
            raise _Stopped from None


async def _next(iterator: Any) -> Any:
    return await iterator.__anext__()


def _stopping(items: Any, stopped: threading.Event) -> Iterator[Any]:
    for item in items:
        if stopped.is_set():
            raise _Stopped
        yield item


def _on_loop(on_batch: Callable[[int], object], loop: asyncio.AbstractEventLoop,
             stopped: threading.Event) -> Callable[[int], None]:
    """`on_batch` called (and awaited, if it returns an awaitable) on the loop, from the ingest's thread."""
    async def call(events: int) -> None:
        result = on_batch(events)
        if inspect.isawaitable(result):
            await result

    def callback(events: int) -> None:
        if not stopped.is_set():
            asyncio.run_coroutine_threadsafe(call(events), loop).result()

    return callback


async def ingest(store: Any, items: Any, *, on_batch: Callable[[int], object] | None = None,
                 **options: Any) -> IngestResult:
    """AsyncEventStore.ingest (see there)."""
    loop = asyncio.get_running_loop()
    if on_batch is not None and not callable(on_batch):
        raise ValidationError(f"on_batch must be a function (or a coroutine function) or None, got {on_batch!r:.80}")
    stopped = threading.Event()
    pulling = _Pulling()
    source = _pulled(items, loop, stopped, pulling) if hasattr(items, "__aiter__") else _stopping(items, stopped)
    callback = None if on_batch is None else _on_loop(on_batch, loop, stopped)
    view = _StoreOnLoop(store, loop, stopped)
    done = in_own_thread(lambda: ingest_sync(view, source, on_batch=callback, **options), "eventcore-aio-ingest")
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        stopped.set()
        if pulling.future is not None:
            pulling.future.cancel()  # a source still waiting for its next item gives none now
        try:
            await done  # batches in flight settle: what is committed is known when this returns
        except (_Stopped, Exception):  # noqa: BLE001 - the cancellation is what the caller gets
            pass
        raise
