"""The asyncio SQLite store (`sqlite:///path`): the sync SQLiteStore's primitives, on a thread of its own.

Every call of one store runs on one dedicated thread, in the order the event loop issued them, so
the loop never blocks on the disk (an fsync'd commit takes milliseconds) and the store's SQL, schema
upgrades and commit serialisation are the sync store's own. A library such as aiosqlite would do the
same (it also runs each connection on a thread) under a second copy of every statement; SQLite
serialises writers on the file anyway, so one thread per store costs no write throughput.

A task cancelled while its call runs leaves that call to finish on the thread: an append is one
SQLite transaction, committed whole or not at all (see AsyncEventStore.append for how to know which).
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import StoreUnavailableError
from ..events import RecordedEvent
from ..stores.prepare import PreparedAppend
from ..stores.sqlite import SQLiteStore
from .sync_backed import SyncBackedStore


class AsyncSQLiteStore(SyncBackedStore):
    scheme = "sqlite"

    def __init__(self, sync: SQLiteStore, thread: ThreadPoolExecutor) -> None:
        self.sync = sync
        self._thread = thread

    @classmethod
    async def open(cls, url: str, **options: Any) -> AsyncSQLiteStore:
        """Open (and create or upgrade, unless migrate=False) the store, on its thread."""
        from ..stores import connect

        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventcore-sqlite")
        try:
            sync = await asyncio.get_running_loop().run_in_executor(thread, functools.partial(connect, url, **options))
        except BaseException:
            thread.shutdown(wait=False)
            raise
        if not isinstance(sync, SQLiteStore):  # pragma: no cover - connect() chose by the scheme
            sync.close()
            raise TypeError(f"{url!r} did not open a SQLite store")
        return cls(sync, thread)

    async def _call(self, function: Any, *args: Any) -> Any:
        if self.closed:  # as the sync store, whose thread is gone
            raise StoreUnavailableError(f"{self!r} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _write(self, function: Any, *args: Any) -> Any:
        """A write on the store's thread. Cancelled before the thread took it, it is never run
        (`maybe_committed` False); after, it runs to its end, one transaction committed whole or not
        at all, and the CancelledError says it may have committed."""
        started = []

        def run() -> Any:
            started.append(True)
            return function(*args)

        try:
            return await self._call(run)
        except asyncio.CancelledError as exc:
            sent = bool(started)
            exc.maybe_committed = sent  # type: ignore[attr-defined]
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            if sent and add_note is not None:
                add_note("eventcore: the SQLite write was under way on the store's thread when its task was "
                             "cancelled: it may have committed (all of it or none); an idempotency key settles it")
            raise

    async def _append(self, prepared: PreparedAppend, /) -> list[RecordedEvent]:
        return await self._write(self.sync._append, prepared)

    async def _append_batch(self, prepared: PreparedAppend, /) -> tuple[int, int, dict[str, int]]:
        return await self._write(self.sync._append_batch, prepared)

    async def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                            progress: Any = None) -> tuple[int, int, dict]:
        return await self._write(self.sync._ingest_batch, stream_ids, events, metadatas, expected, progress)

    async def aclose(self) -> None:
        if not self.closed:
            await self._snapshots_written()
            try:
                await asyncio.get_running_loop().run_in_executor(self._thread, self.sync.close)
            finally:
                self._thread.shutdown(wait=False)
        await super().aclose()
