"""The asyncio in-memory store (`memory://`): the sync MemoryStore's primitives, called directly.

They hold the store's lock only for list appends and version checks and never block on I/O, so
they run on the event loop itself: no thread, no hand-off.
"""
from __future__ import annotations

from typing import Any

from ..stores.memory import MemoryStore
from .sync_backed import SyncBackedStore


class AsyncMemoryStore(SyncBackedStore):
    scheme = "memory"

    def __init__(self, sync: MemoryStore | None = None) -> None:
        #: The sync store holding the events: a test may hand one to both APIs.
        self.sync = MemoryStore() if sync is None else sync

    async def _call(self, function: Any, *args: Any) -> Any:
        return function(*args)

    async def aclose(self) -> None:
        await self._snapshots_written()
        self.sync.close()
        await super().aclose()
