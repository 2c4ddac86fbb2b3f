"""The asyncio store contract: `EventStore`'s public methods as coroutines, over coroutine primitives.

`AsyncEventStore` is the peer of `eventcore.stores.base.EventStore`: the same public methods with the
same arguments, checks, errors and observer reports (the checks are the sync module's own functions),
awaited. A backend implements the same underscored primitives as a sync one, as coroutines:
PostgreSQL natively (psycopg's async connections, pool and COPY), SQLite and memory by running their
sync store's primitives (on one thread of its own, or directly). Stores of both kinds on one database
share it: same tables, same format, same guarantees.
"""
from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping

from ..errors import DuplicateCommandError, EventCoreError, ValidationError
from ..events import EventToWrite, Metadata, RecordedEvent
from ..stores.base import (
    _NOT_MADE, DEFAULT_PAGE_SIZE, BatchResult, ObservedStore, SnapshotInfo, StoreHealth, _command_cache_factory, _events_in, _stream_heads,
    _instances, _raw, _written_versions, decode_recorded_command, drop_snapshot_args, health_report, prepare_ingest_batch, read_all_args,
    read_stream_args, stream_id_list,
)
from ..snapshots import from_versions, snapshot_written
from ..stores.ingest import DEFAULT_INGEST_BATCH, IngestResult
from ..stores.observer import StoreObserver
from ..stores.prepare import MAX_EVENTS_PER_BATCH, PreparedAppend, prepare_append, validate_idempotency_key

if TYPE_CHECKING:
    from typing_extensions import Self


async def observed(observer: StoreObserver, store: Any, operation: str, streams: Iterable[str] | None,
                   expected: dict[str, int] | None, call: Callable[..., Any], args: tuple[Any, ...],
                   count: Callable[[Any], int] = len,
                   versions: Callable[[Any], dict[str, int] | None] | None = None) -> Any:
    """`await call(*args)` bracketed by `observer` (the coroutine twin of stores.observer.observed)."""
    token = observer.operation_started(store, operation, streams, expected)
    try:
        result = await call(*args)
    except BaseException as exc:
        observer.operation_ended(token, 0, exc)
        raise
    observer.operation_ended(token, count(result), None, None if versions is None else lambda: versions(result))
    return result


class AsyncEventStore(ObservedStore, ABC):
    """The asyncio store contract (`await eventcore.aio.connect(url)`). Backends implement the
    underscored coroutine primitives; the public methods check their arguments as the sync store's do."""

    scheme: str = ""
    _command_cache: Any = _NOT_MADE
    default_ingest_lanes: int = 1
    instance: int
    closed: bool
    _dependants: weakref.WeakSet[Any]
    #: Event loop -> stripe -> asyncio.Lock: commands of this process on a common stream run one after
    #: the other (see eventcore.aio.executor), as threads' do on the sync executor's stream locks.
    _task_locks: weakref.WeakKeyDictionary[Any, dict[int, Any]] | None = None
    #: Snapshot writes of this store's commands still running (see _save_snapshot_soon).
    _snapshot_writes: set[Any] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = super().__new__(cls)
        # Numbered in the same sequence as the sync stores: caches and stream locks key a store by it.
        self.instance = next(_instances)
        self._dependants = weakref.WeakSet()
        self.closed = False
        return self

    @property
    def url(self) -> str:
        raise NotImplementedError

    async def _schema_versions(self) -> tuple[int | None, int | None]:
        return None, None

    async def _projection_checkpoints(self) -> list[dict[str, Any]]:
        """StoreHealth.projections (a backend with projection storage reports its checkpoints)."""
        return []

    async def health(self) -> StoreHealth:
        """Connectivity, schema version, pool state and the projectors' checkpoints, read now (see
        EventStore.health). Never raises for an unreachable store: `ok` is False and `error` says why."""
        error = None
        head = schema = expected = None
        latency_ms = 0.0
        try:
            started = time.perf_counter()
            head = await self.head_position()
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            schema, expected = await self._schema_versions()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            error = str(exc) or type(exc).__name__
        try:
            pool = self.pool_stats()
        except Exception:  # noqa: BLE001 - a closed pool reports nothing
            pool = None
        projections: list[dict[str, Any]] = []
        if error is None:
            try:
                projections = await self._projection_checkpoints()
            except Exception:  # noqa: BLE001 - no projection tables yet
                projections = []
        return health_report(self, head, latency_ms, schema, expected, pool, projections, error)

    # -- writing ----------------------------------------------------------------

    async def append(
        self,
        events: Iterable[EventToWrite],
        expected: Mapping[str, int] | None = None,
        *,
        metadata: Metadata | None = None,
        idempotency_key: str | uuid.UUID | None = None,
    ) -> list[RecordedEvent]:
        """Append events to one or more streams atomically (see EventStore.append).

        A task cancelled while its append is in flight may or may not have committed it (all of its
        events or none): the CancelledError carries a note saying so; running the append again with
        the same idempotency key settles it (DuplicateCommandError with the events if it had)."""
        prepared = prepare_append(events, expected, metadata)
        if idempotency_key is not None:
            prepared.key = validate_idempotency_key(idempotency_key)
        if not prepared.expected:
            return []
        observer = self._observer
        try:
            if observer is None:
                return await self._append(prepared)
            exp = prepared.expected
            return await observed(observer, self, "append", exp, exp, self._append, (prepared,), len,
                                  _written_versions)
        except DuplicateCommandError as exc:
            raise (await self._with_original(exc)) from None

    async def _with_original(self, exc: DuplicateCommandError) -> DuplicateCommandError:
        if exc.events is not None:
            return exc
        return DuplicateCommandError(exc.key, await self.recorded_command(exc.key))

    async def recorded_command(self, key: str | uuid.UUID) -> list[RecordedEvent] | None:
        """The events an append with idempotency key `key` recorded, or None if none committed with it."""
        rows = await self._recorded_command_rows(validate_idempotency_key(key))
        return decode_recorded_command(rows) if rows else None

    async def append_batch(
        self,
        events: Iterable[EventToWrite],
        expected: Mapping[str, int] | None = None,
        *,
        metadata: Metadata | None = None,
    ) -> BatchResult:
        """Many events in one transaction, with `append`'s guarantees, at bulk speed (see EventStore.append_batch)."""
        started = time.perf_counter()
        prepared = prepare_append(events, expected, metadata, limit=MAX_EVENTS_PER_BATCH)
        if not prepared.expected:
            return BatchResult(0, 0, 0, {}, 0.0)
        observer = self._observer
        if observer is None:
            first, last, versions = await self._append_batch(prepared)
        else:
            exp = prepared.expected
            first, last, versions = await observed(
                observer, self, "append_batch", exp, exp, self._append_batch, (prepared,),
                lambda _: len(prepared), lambda r: r[2])
        return BatchResult(len(prepared), first, last, versions, time.perf_counter() - started)

    async def _append_batch(self, prepared: PreparedAppend, /) -> tuple[int, int, dict[str, int]]:
        recorded = await self._append(prepared)
        versions = {e.stream_id: e.version for e in recorded}
        if not recorded:
            return 0, 0, versions
        return recorded[0].position, recorded[-1].position, versions

    async def ingest(
        self,
        items: Any,
        *,
        batch_size: int = DEFAULT_INGEST_BATCH,
        expected: Mapping[str, int] | None = None,
        metadata: Metadata | None = None,
        on_batch: Callable[[int], object] | None = None,
        parallel: int = 1,
        resume_key: str | None = None,
    ) -> IngestResult:
        """Stream any number of events into the store, one transaction per `batch_size` events (see
        EventStore.ingest: the same arguments, guarantees and errors). `items` may be an iterable or an
        async iterable; `on_batch` may be a function or a coroutine function."""
        from .ingest import ingest

        return await ingest(self, items, batch_size=batch_size, expected=expected, metadata=metadata,
                            on_batch=on_batch, parallel=parallel, resume_key=resume_key)

    async def ingest_columns(
        self,
        stream_ids: Any,
        types: Any,
        data: Any,
        *,
        metadata: Any = None,
        batch_size: int = DEFAULT_INGEST_BATCH,
        expected: Mapping[str, int] | None = None,
        on_batch: Callable[[int], object] | None = None,
        parallel: int = 1,
        resume_key: str | None = None,
    ) -> IngestResult:
        """`ingest` from numpy columns (see EventStore.ingest_columns: the same arguments, guarantees and
        errors). Columns are checked at the call; rows are encoded on the ingest's own thread."""
        from ..columns import column_items, committed_resume

        committed = None
        holes: set = set()
        if resume_key is not None:  # the store's records of the key, read on the loop (see committed_resume)
            key: Any = resume_key
            try:
                key = validate_idempotency_key(resume_key, "resume key")  # as store.ingest takes it
                recorded = await self._ingest_progress(key)
                if recorded:
                    holes = await self._ingest_holes(key)
            except EventCoreError:
                recorded = None  # store.ingest says why
            if recorded:
                committed = committed_resume({"resume_key": key, "parallel": parallel}, lambda _: recorded,
                                             lambda _: holes)
        _, items = column_items(stream_ids, types, data, metadata, committed)
        return await self.ingest(items, batch_size=batch_size, expected=expected, on_batch=on_batch,
                                 parallel=parallel, resume_key=resume_key)

    async def read_columns(self, *, after_position: int = 0, types: Any = None, fields: Iterable[str] = (),
                           stream_prefix: str | None = None, limit: int | None = None,
                           page_size: int = 10_000) -> dict[str, Any]:
        """The feed as a dict of 1-D numpy arrays (see EventStore.read_columns). Each page is written into
        the arrays on the event loop as it arrives (PostgreSQL: its COPY decoded straight into them)."""
        from ..columns import ColumnFiller, read_plan

        plan = read_plan(types, fields)
        filler = ColumnFiller(plan, limit, page_size)
        direct = getattr(self, "_read_columns_page", None)
        if direct is not None:  # PostgreSQL: each page's COPY decoded straight into the columns
            after, names, prefix, remaining, size, _ = read_all_args(after_position, types, stream_prefix, limit,
                                                                     page_size, True)
            while remaining is None or remaining > 0:
                n = size if remaining is None else min(size, remaining)
                got, last = await direct(after, names, prefix, n, filler)
                if got < n:
                    break
                after = last
                if remaining is not None:
                    remaining -= got
            return filler.result()
        page: list = []
        async for event in self.read_all(after_position=after_position, types=types, stream_prefix=stream_prefix,
                                         limit=limit, page_size=page_size, decode=bool(plan.fields)):
            page.append(event)
            if len(page) == page_size:
                filler.add(page)
                page = []
        filler.add(page)
        return filler.result()

    async def ingest_frame(self, df: Any, *, stream: str, type: Any, fields: Iterable[str] | None = None,
                           **options: Any) -> IngestResult:
        """`ingest_columns` from a pandas DataFrame (see EventStore.ingest_frame)."""
        from ..columns import frame_columns

        stream_ids, types, data = frame_columns(df, stream, type, fields)
        return await self.ingest_columns(stream_ids, types, data, **options)

    async def read_frame(self, **options: Any) -> Any:
        """`read_columns` as a pandas DataFrame (see EventStore.read_frame)."""
        from ..columns import to_frame

        return to_frame(await self.read_columns(**options))

    # -- reading ----------------------------------------------------------------

    async def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None,
                          decode: bool = True) -> list[RecordedEvent]:
        """A stream's events in version order, from `from_version` (1-based); see EventStore.read_stream."""
        sid, raw = read_stream_args(stream_id, from_version, limit, decode)
        args: tuple[Any, ...] = (sid, from_version, limit, raw) if raw else (sid, from_version, limit)
        observer = self._observer
        if observer is None:
            return await self._read_stream(*args)
        return await observed(observer, self, "read", [sid], None, self._read_stream, args, len, _written_versions)

    async def read_streams(self, stream_ids: Iterable[str], *, decode: bool = True) -> dict[str, list[RecordedEvent]]:
        """Every event of several streams, read at one point in time (see EventStore.read_streams)."""
        ids = stream_id_list(stream_ids)
        raw = _raw(decode)
        if not ids:
            return {}
        args: tuple[Any, ...] = (ids, raw) if raw else (ids,)
        observer = self._observer
        if observer is None:
            return await self._read_streams(*args)
        return await observed(observer, self, "read", ids, None, self._read_streams, args, _events_in,
                              _stream_heads)

    async def stream_version(self, stream_id: str) -> int:
        ids = stream_id_list([stream_id])
        return (await self._stream_versions(ids))[ids[0]]

    async def stream_versions(self, stream_ids: Iterable[str]) -> dict[str, int]:
        ids = stream_id_list(stream_ids)
        if not ids:
            return {}
        return await self._stream_versions(ids)

    def read_all(
        self,
        *,
        after_position: int = 0,
        types: Iterable[str | type] | None = None,
        stream_prefix: str | None = None,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        decode: bool = True,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after `after_position`, in ascending global position, fetched page by page:
        `async for event in store.read_all(...)` (see EventStore.read_all; arguments are checked here,
        at the call). Each page is read on a connection of its own, released before the page's events
        are handed out, so a loop that stops (break, cancellation) holds no connection."""
        return self._iter_all(*read_all_args(after_position, types, stream_prefix, limit, page_size, decode))

    async def _iter_all(self, after, names, prefix, limit, page_size, raw=False) -> AsyncIterator[RecordedEvent]:
        remaining = limit
        while remaining is None or remaining > 0:
            n = page_size if remaining is None else min(page_size, remaining)
            args: tuple[Any, ...] = (after, names, prefix, n, raw) if raw else (after, names, prefix, n)
            observer = self._observer
            if observer is None:
                page = await self._read_all_page(*args)
            else:
                page = await observed(observer, self, "read_all", None, None, self._read_all_page, args)
            for event in page:
                yield event
            if len(page) < n:
                return
            after = page[-1].position
            if remaining is not None:
                remaining -= len(page)

    async def head_position(self) -> int:
        """The highest global position visible to readers (0 for an empty store)."""
        return await self._head_position()

    async def type_counts(self) -> list[tuple[str, int, int]]:
        """(stored type name, type version, events) for every type stored (see EventStore.type_counts)."""
        return [tuple(row) for row in await self._type_counts()]

    # -- snapshots (eventcore.snapshots; see EventStore.snapshots) ----------------------

    supports_snapshots: bool = False

    async def snapshots(self) -> list[SnapshotInfo]:
        """Every stored snapshot of a command's state, by key (see EventStore.snapshots); the snapshots
        this store's commands are still writing included."""
        await self._snapshots_written()
        return [SnapshotInfo(*row) for row in await self._snapshot_rows()]

    def _save_snapshot_soon(self, snapshot: tuple) -> None:
        """Write a command's snapshot in a task of its own: the command returns at once, and nothing
        that interrupts it (a timeout, a cancellation) can fall after its outcome is settled."""
        task = asyncio.get_running_loop().create_task(self._save_snapshot_logged(snapshot))
        if self._snapshot_writes is None:
            self._snapshot_writes = set()
        self._snapshot_writes.add(task)
        task.add_done_callback(self._snapshot_writes.discard)

    async def _save_snapshot_logged(self, snapshot: tuple) -> None:
        try:
            await self._save_snapshot(*snapshot)
        except Exception as exc:  # noqa: BLE001 - costs only the snapshot
            snapshot_written(snapshot[0], exc)
        else:
            snapshot_written(snapshot[0], None)

    async def _snapshots_written(self) -> None:
        """Wait for the snapshots this store's commands are writing."""
        if self._snapshot_writes:
            await asyncio.gather(*list(self._snapshot_writes), return_exceptions=True)

    async def drop_snapshots(self, command: str | None = None, *, older_than: float | None = None) -> int:
        """Remove the snapshots of one command class or of all (see EventStore.drop_snapshots)."""
        return await self._drop_snapshots(*drop_snapshot_args(command, older_than))

    def _no_snapshots(self) -> ValidationError:
        return ValidationError(f"the {self.scheme or type(self).__name__} store does not store snapshots")

    async def _load_snapshot(self, key: str) -> tuple[int, str, bytes] | None:
        raise self._no_snapshots()

    async def _save_snapshot(self, key: str, command: str, state_version: int, covers: str, state: bytes,
                             events: int) -> None:
        raise self._no_snapshots()

    async def _snapshot_rows(self) -> list:
        raise self._no_snapshots()

    async def _drop_snapshots(self, command: str | None, before: float | None = None) -> int:
        raise self._no_snapshots()

    async def _read_streams_from(self, from_versions: dict[str, int],
                                 raw: bool = False) -> dict[str, list[RecordedEvent]]:
        raise self._no_snapshots()

    async def _read_after_snapshot(self, key: str, state_version: int, stream_ids: list) -> tuple:
        """See EventStore._read_after_snapshot."""
        stored = await self._load_snapshot(key)
        froms = from_versions(stored, state_version, stream_ids)
        return stored, await self._read_streams_from(froms), froms, None

    @property
    def command_cache(self) -> Any:
        """The `ec.StateCache` that `eventcore.aio.execute` uses for this store unless told otherwise
        (see EventStore.command_cache)."""
        cache = self._command_cache
        if cache is _NOT_MADE:
            make = _command_cache_factory[0]
            cache = self._command_cache = None if make is None else make()
        return cache

    @command_cache.setter
    def command_cache(self, cache: Any) -> None:
        self._command_cache = cache

    # -- primitives -----------------------------------------------------------------

    @abstractmethod
    async def _append(self, prepared: PreparedAppend, /) -> list[RecordedEvent]: ...

    @abstractmethod
    async def _recorded_command_rows(self, key: str) -> list: ...

    @abstractmethod
    async def _read_stream(self, stream_id: str, from_version: int, limit: int | None,
                           raw: bool = False) -> list[RecordedEvent]: ...

    @abstractmethod
    async def _read_streams(self, stream_ids: list[str], raw: bool = False) -> dict[str, list[RecordedEvent]]: ...

    @abstractmethod
    async def _stream_versions(self, stream_ids: list[str]) -> dict[str, int]: ...

    @abstractmethod
    async def _read_all_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int,
                             raw: bool = False) -> list[RecordedEvent]: ...

    @abstractmethod
    async def _head_position(self) -> int: ...

    async def _type_counts(self) -> list:
        raise NotImplementedError(f"{type(self).__name__} cannot count its types")

    async def _read_all_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None,
                             limit: int) -> list[tuple]:
        raise NotImplementedError(f"{type(self).__name__} cannot read raw rows")

    async def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                            progress: Any = None) -> tuple[int, int, dict]:
        return await self._append_batch(prepare_ingest_batch(stream_ids, events, metadatas, expected, progress))

    async def _ingest_progress(self, key: str) -> dict:
        raise self._cannot_resume()

    async def _ingest_holes(self, key: str) -> set:
        raise self._cannot_resume()

    async def _resume_keys(self, prefix: str) -> list:
        raise self._cannot_resume()

    def _cannot_resume(self) -> ValidationError:
        return ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    # -- life cycle ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Release connections (and threads). The store cannot be used afterwards. Backends release
        their own resources and then call this (after `_snapshots_written`)."""
        self.closed = True
        for dependant in list(self._dependants):
            dependant._drop_store(self.instance)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
