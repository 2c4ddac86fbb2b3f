"""A sync facade over an `eventcore.aio` store, so that the sync suites run unchanged against the asyncio API.

An `AioAdapter` owns an event loop running on a thread of its own. Each method of the sync store
contract calls the asyncio store's method of the same name with the same arguments, awaits it on
that loop (`asyncio.run_coroutine_threadsafe(...).result()`) and returns what it returned or raises
what it raised. It adds nothing: no retry, no cache, no translation of errors, no argument checks of
its own. `read_all` hands out the asyncio iterator's events, pulled one page at a time (a page's
worth of `__anext__` per hop), so a page is read when the sync iterator would read it.

`execute` is the sync `ec.execute`'s stand-in: it runs `eventcore.aio.execute` on the adapter's
asyncio store, on the adapter's loop. A test module that runs the sync suites on adapters puts it
in place of `eventcore.execute` with `patch_execute(monkeypatch)`, and only there.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Iterator

import eventcore as ec
import eventcore.aio as eca
from eventcore.stores.base import DEFAULT_PAGE_SIZE


class _Loop:
    """An event loop running forever on a daemon thread, until `stop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-adapter-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a sync call on the adapter's own loop would wait for itself")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


class AioAdapter:
    """The sync store contract over `store`, an open `eventcore.aio` store, run on `loop`."""

    def __init__(self, store: eca.AsyncEventStore, loop: _Loop) -> None:
        self.async_store = store
        self._loop = loop
        # The loop thread ends with the adapter even when a test forgets to shut it down.
        self._finalizer = weakref.finalize(self, loop.stop)

    @classmethod
    def connect(cls, url: str, **options: Any) -> AioAdapter:
        """`await eca.connect(url, **options)` on a new loop of the adapter's own."""
        loop = _Loop()
        try:
            store = loop.run(eca.connect(url, **options))
        except BaseException:
            loop.stop()
            raise
        return cls(store, loop)

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run(coroutine)

    def shutdown(self) -> None:
        """Close the store if still open, then stop the loop and its thread (the fixtures' teardown)."""
        try:
            if not self.async_store.closed:
                self.close()
        finally:
            self._finalizer()

    def __repr__(self) -> str:
        return f"AioAdapter({self.async_store!r})"

    # -- what the store is ---------------------------------------------------------

    @property
    def instance(self) -> int:
        return self.async_store.instance

    @property
    def scheme(self) -> str:
        return self.async_store.scheme

    @property
    def url(self) -> str:
        return self.async_store.url

    @property
    def schema(self) -> Any:
        return self.async_store.schema  # PostgreSQL only: AttributeError elsewhere, as on a sync store

    @property
    def closed(self) -> bool:
        return self.async_store.closed

    @property
    def command_cache(self) -> Any:
        return self.async_store.command_cache

    @command_cache.setter
    def command_cache(self, cache: Any) -> None:
        self.async_store.command_cache = cache

    @property
    def metrics(self) -> Any:
        return self.async_store.metrics

    def attach(self, collector: Any) -> None:
        self.async_store.attach(collector)

    def detach(self) -> None:
        self.async_store.detach()

    def pool_stats(self) -> Any:
        return self.async_store.pool_stats()

    # -- the contract, awaited on the loop -------------------------------------------------

    def append(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.append(*args, **kwargs))

    def append_batch(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.append_batch(*args, **kwargs))

    def ingest(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.ingest(*args, **kwargs))

    def ingest_columns(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.ingest_columns(*args, **kwargs))

    def read_columns(self, **kwargs: Any) -> Any:
        return self._run(self.async_store.read_columns(**kwargs))

    def ingest_frame(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.ingest_frame(*args, **kwargs))

    def read_frame(self, **kwargs: Any) -> Any:
        return self._run(self.async_store.read_frame(**kwargs))

    def recorded_command(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.recorded_command(*args, **kwargs))

    def read_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.read_stream(*args, **kwargs))

    def read_streams(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.read_streams(*args, **kwargs))

    def stream_version(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.stream_version(*args, **kwargs))

    def stream_versions(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.async_store.stream_versions(*args, **kwargs))

    def head_position(self) -> Any:
        return self._run(self.async_store.head_position())

    def type_counts(self) -> Any:
        return self._run(self.async_store.type_counts())

    def health(self) -> Any:
        return self._run(self.async_store.health())

    def read_all(self, **kwargs: Any) -> Iterator[Any]:
        # Called here, as the sync read_all is: its arguments are checked at the call.
        events = self.async_store.read_all(**kwargs)
        return self._pulled(events, kwargs.get("page_size", DEFAULT_PAGE_SIZE))

    def _pulled(self, events: Any, page: int) -> Iterator[Any]:
        try:
            while True:
                chunk, more = self._run(_take(events, page))
                yield from chunk
                if not more:
                    return
        finally:
            if not self._loop.loop.is_closed():
                self._run(events.aclose())

    def close(self) -> None:
        self._run(self.async_store.aclose())

    def __enter__(self) -> AioAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _take(events: Any, n: int) -> tuple[list, bool]:
    """Up to `n` events of an async iterator, and whether it may have more."""
    out = []
    for _ in range(n):
        try:
            out.append(await events.__anext__())
        except StopAsyncIteration:
            return out, False
    return out, True


_SYNC_EXECUTE = ec.execute


def execute(store: Any, command: Any, **options: Any) -> Any:
    """`ec.execute(store, command, **options)` as `eventcore.aio.execute`: on an adapter, its asyncio
    store on its loop; anything else is handed to `eca.execute` as it is (on a loop of this call's),
    which refuses what is not an asyncio store as it should."""
    if isinstance(store, AioAdapter):
        return store._run(eca.execute(store.async_store, command, **options))
    return asyncio.run(eca.execute(store, command, **options))


def patch_execute(monkeypatch: Any) -> None:
    """Make `ec.execute`, as the sync suites call it (`ec.execute(...)`, eventcore imported as ec),
    run `eventcore.aio.execute`, until the test ends."""
    monkeypatch.setattr(ec, "execute", execute)
