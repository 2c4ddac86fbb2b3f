"""Asyncio stores whose I/O is a sync store's: the primitives of `memory://` and `sqlite://` awaited.

Each primitive is the sync store's own, so there is one implementation of each backend's storage and
the async store shares it byte for byte. How a call reaches it is the subclass's: directly (memory,
which never blocks) or on a thread of the store's own (SQLite, whose calls block on the disk).
"""
from __future__ import annotations

from typing import Any

from ..events import RecordedEvent
from ..stores.base import EventStore, projection_health
from ..stores.prepare import PreparedAppend
from ..stores.projection_storage import PENDING_CAP
from .store import AsyncEventStore


class SyncBackedStore(AsyncEventStore):
    """An AsyncEventStore over a sync store's primitives (`self.sync`), each run by `_call`."""

    sync: EventStore

    async def _call(self, function: Any, *args: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sync!r})"

    @property
    def url(self) -> str:
        return self.sync.url

    def pool_stats(self) -> dict[str, Any] | None:
        return self.sync.pool_stats()

    async def _schema_versions(self) -> tuple[int | None, int | None]:
        return await self._call(self.sync._schema_versions)

    async def _projection_checkpoints(self) -> list[dict[str, Any]]:
        return projection_health(await self._call(lambda: self.sync._projection_storage().checkpoints(None, PENDING_CAP)))

    async def _append(self, prepared: PreparedAppend, /) -> list[RecordedEvent]:
        return await self._call(self.sync._append, prepared)

    async def _append_batch(self, prepared: PreparedAppend, /) -> tuple[int, int, dict[str, int]]:
        return await self._call(self.sync._append_batch, prepared)

    async def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                            progress: Any = None) -> tuple[int, int, dict]:
        return await self._call(self.sync._ingest_batch, stream_ids, events, metadatas, expected, progress)

    async def _recorded_command_rows(self, key: str) -> list:
        return await self._call(self.sync._recorded_command_rows, key)

    async def _read_stream(self, stream_id: str, from_version: int, limit: int | None,
                           raw: bool = False) -> list[RecordedEvent]:
        return await self._call(self.sync._read_stream, stream_id, from_version, limit, raw)

    async def _read_streams(self, stream_ids: list[str], raw: bool = False) -> dict[str, list[RecordedEvent]]:
        return await self._call(self.sync._read_streams, stream_ids, raw)

    async def _stream_versions(self, stream_ids: list[str]) -> dict[str, int]:
        return await self._call(self.sync._stream_versions, stream_ids)

    async def _read_all_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int,
                             raw: bool = False) -> list[RecordedEvent]:
        return await self._call(self.sync._read_all_page, after, types, prefix, limit, raw)

    async def _read_all_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None,
                             limit: int) -> list[tuple]:
        return await self._call(self.sync._read_all_rows, after, types, prefix, limit)

    async def _head_position(self) -> int:
        return await self._call(self.sync._head_position)

    async def _type_counts(self) -> list:
        return await self._call(self.sync._type_counts)

    async def _ingest_progress(self, key: str) -> dict:
        return await self._call(self.sync._ingest_progress, key)

    async def _ingest_holes(self, key: str) -> set:
        return await self._call(self.sync._ingest_holes, key)

    async def _resume_keys(self, prefix: str) -> list:
        return await self._call(self.sync._resume_keys, prefix)

    @property
    def supports_snapshots(self) -> bool:  # type: ignore[override]
        return self.sync.supports_snapshots

    async def _load_snapshot(self, key: str) -> tuple[int, str, bytes] | None:
        return await self._call(self.sync._load_snapshot, key)

    async def _save_snapshot(self, key: str, command: str, state_version: int, covers: str, state: bytes,
                             events: int) -> None:
        await self._call(self.sync._save_snapshot, key, command, state_version, covers, state, events)

    async def _snapshot_rows(self) -> list:
        return await self._call(self.sync._snapshot_rows)

    async def _drop_snapshots(self, command: str | None, before: float | None = None) -> int:
        return await self._call(self.sync._drop_snapshots, command, before)

    async def _read_after_snapshot(self, key: str, state_version: int, stream_ids: list) -> tuple:
        return await self._call(self.sync._read_after_snapshot, key, state_version, stream_ids)

    async def _read_streams_from(self, from_versions: dict[str, int],
                                 raw: bool = False) -> dict[str, list[RecordedEvent]]:
        return await self._call(self.sync._read_streams_from, from_versions, raw)
