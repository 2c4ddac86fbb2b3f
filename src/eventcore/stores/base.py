"""The store contract every backend implements: public methods validate, backends implement the primitives.

A store appends events atomically across streams, each stream guarded by an
expected version, and reads them back by stream or as one global feed that never skips an event.
Each write is validated and encoded first (`prepare`), before a backend takes any lock or opens
any transaction, so bad input is rejected with nothing written. Ingestion has its module (`ingest`),
and so has what a store tells an observer (`observer`).
"""
from __future__ import annotations

import itertools
import operator
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, TypeVar, overload

import msgspec

from .. import _impl
from ..errors import DuplicateCommandError, EventVersionError, UnknownEventTypeError, ValidationError
from ..formats import INT64_MAX
from ..events import Event, EventToWrite, Metadata, RawEvent, RecordedEvent
from ..snapshots import from_versions
from ..streams import forbidden_character, stream_id as _stream_id
from .ingest import DEFAULT_INGEST_BATCH, IngestResult, ingest
from .observer import StoreObserver, observed
from .projection_storage import PENDING_CAP, ProjectionStorage
from .prepare import (
    MAX_EVENTS_PER_BATCH, PreparedAppend, prepare_append, type_names as _type_names, validate_idempotency_key,
)

if TYPE_CHECKING:
    from typing_extensions import Self

_COMMAND_CACHE_LOCK = threading.Lock()
_NOT_MADE: Any = object()
#: What makes a store's command_cache: registered by eventcore.executor, which defines StateCache (the
#: stores import nothing above them).
_command_cache_factory: list[Callable[[], Any] | None] = [None]


def set_command_cache_factory(make: Callable[[], Any]) -> None:
    """Register what makes each store's command_cache (eventcore.executor does, on import)."""
    _command_cache_factory[0] = make


#: An event class named in `read_all(types=[...])`: the type of the events' `data`.
E = TypeVar("E", bound=Event)

#: Rows per page of `read_all`: large enough that the per-query cost vanishes
#: (~1k rows decode in about a millisecond), small enough to bound memory.
DEFAULT_PAGE_SIZE = 1000



class StoreHealth(msgspec.Struct, frozen=True):
    """What `store.health()` found: `ok` is True when the store answered and its schema is current.

    `latency_ms`: one round trip (the head position read); `pool`: see `pool_stats()`;
    `projections`: one dict per projector (name, state, position, lag, pending, dead_letters);
    `schema`: the PostgreSQL schema checked (None for other backends); `problem`, when not ok:
    "unreachable" (no answer), "missing" (no store there), "not_an_event_store" (something else is
    there) or "schema_version" (a store at another schema version)."""

    ok: bool
    backend: str
    url: str
    connected: bool
    latency_ms: float
    head_position: int | None
    schema_version: int | None
    schema_expected: int | None
    pool: dict[str, Any] | None
    projections: list[dict[str, Any]]
    error: str | None
    schema: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (what `eventcore health --json` prints)."""
        return msgspec.structs.asdict(self)


class SnapshotInfo(msgspec.Struct, frozen=True):
    """One stored snapshot (see eventcore.snapshots): its key, the command class it is of, the state
    version it was made under, its state's size in bytes, the events it covers and when it was written."""

    key: str
    command: str
    state_version: int
    size: int
    events: int
    written_at: float


class BatchResult(msgspec.Struct, frozen=True):
    """What `append_batch` wrote: how many events, their position range, each written stream's version after."""

    count: int
    first_position: int
    last_position: int
    stream_versions: dict[str, int]
    duration_s: float


#: Numbers every store object opened in this process: a store's `instance` is never reused, unlike
#: its id(), which CPython hands to the next object once a store is freed.
_instances = itertools.count(1)


class ObservedStore:
    """What every store (sync or asyncio, see eventcore.aio) does with the observer it reports to."""

    #: The attached StoreObserver (see `attach`); None: nothing is measured.
    _observer: StoreObserver | None = None

    def attach(self, collector: StoreObserver) -> None:
        """Measure this store with `collector` (an `ec.MetricsCollector`, or another StoreObserver):
        every command executed on it and every store operation, until `detach()`. One collector per
        store; a collector may watch many stores."""
        if not isinstance(collector, StoreObserver):
            raise ValidationError(f"attach() takes an ec.MetricsCollector, got {type(collector).__name__}")
        self.detach()
        self._observer = collector
        collector.store_attached(self)

    def detach(self) -> None:
        """Stop measuring this store."""
        observer = self._observer
        if observer is not None:
            self._observer = None
            observer.store_detached(self)

    @property
    def metrics(self) -> StoreObserver | None:
        """The attached MetricsCollector (or other StoreObserver), or None."""
        return self._observer

    def pool_stats(self) -> dict[str, Any] | None:
        """The connection pool's state (PostgreSQL), or None for backends without a pool."""
        return None


class EventStore(ObservedStore, ABC):
    """The store contract. Backends implement the underscored primitives; the public methods validate."""

    #: The URL scheme this backend answers to (e.g. "sqlite").
    scheme: str = ""
    #: See command_cache.
    _command_cache: Any = _NOT_MADE
    #: Lanes `eventcore ingest FILE` writes with when --parallel is not given (see cli.ingest): one
    #: where commits are serialised anyway.
    default_ingest_lanes: int = 1
    instance: int
    closed: bool
    _dependants: weakref.WeakSet[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = super().__new__(cls)
        #: This store object's number, unique in the process for its lifetime (see `_instances`):
        #: what in-process caches key their entries by.
        self.instance = next(_instances)
        #: Objects holding entries for this store (StateCaches), told by close() to drop them.
        self._dependants = weakref.WeakSet()
        #: True once close() was called: every later operation raises StoreUnavailableError.
        self.closed = False
        return self

    def _schema_versions(self) -> tuple[int | None, int | None]:
        """(schema version in place, version this eventcore needs); (None, None) when not applicable."""
        return None, None

    def _projection_storage(self) -> ProjectionStorage:
        """Where this store keeps projection checkpoints, dead letters and leader locks (see
        projection_storage); a backend with projections returns its own."""
        raise ValidationError(f"projections are not supported on {type(self).__name__}")

    @property
    def url(self) -> str:
        """The store's URL, with no password in it."""
        raise NotImplementedError

    def health(self) -> StoreHealth:
        """Connectivity, schema version, pool state and the projectors' checkpoints (lag = head position
        - checkpoint), read now. Never raises for an unreachable store: `ok` is False and `error` says
        why (with no password in it)."""
        error = None
        head = schema = expected = None
        latency_ms = 0.0
        try:
            started = time.perf_counter()
            head = self.head_position()
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            schema, expected = self._schema_versions()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            error = str(exc) or type(exc).__name__
        try:
            pool = self.pool_stats()
        except Exception:  # noqa: BLE001 - a closed pool reports nothing
            pool = None
        projections: list[dict[str, Any]] = []
        if error is None:
            try:
                projections = projection_health(self._projection_storage().checkpoints(None, PENDING_CAP))
            except Exception:  # noqa: BLE001 - no projection tables yet, or a backend without projections
                projections = []
        return health_report(self, head, latency_ms, schema, expected, pool, projections, error)

    # -- writing ----------------------------------------------------------------

    def append(
        self,
        events: Iterable[EventToWrite],
        expected: Mapping[str, int] | None = None,
        *,
        metadata: Metadata | None = None,
        idempotency_key: str | uuid.UUID | None = None,
    ) -> list[RecordedEvent]:
        """Append events to one or more streams atomically.

        `expected` maps stream id -> expected version (an int, `ec.NO_STREAM`,
        `ec.ANY`, `ec.STREAM_EXISTS`). Streams listed without events are
        read-only participants: checked, not written. Streams written but not
        listed are not checked. Either every event is written, with gap-free
        versions and consecutive positions, or none is and ConcurrencyError
        names the first conflicting stream (in sorted order).

        `idempotency_key`: recorded in the same transaction as the events (only
        when there are events to write). If an append with that key has already
        committed, nothing is written and DuplicateCommandError carries the events
        that append recorded. Keys are never forgotten.
        """
        prepared = prepare_append(events, expected, metadata)
        if idempotency_key is not None:
            prepared.key = validate_idempotency_key(idempotency_key)
        if not prepared.expected:
            return []
        observer = self._observer
        try:
            if observer is None:
                return self._append(prepared)
            exp = prepared.expected
            return observed(observer, self, "append", exp, exp, self._append, (prepared,), len, _written_versions)
        except DuplicateCommandError as exc:
            raise self._with_original(exc) from None

    def _with_original(self, exc: "DuplicateCommandError") -> "DuplicateCommandError":
        """The DuplicateCommandError a backend raised, with the original events looked up if it has none."""
        if exc.events is not None:
            return exc
        return DuplicateCommandError(exc.key, self.recorded_command(exc.key))

    def recorded_command(self, key: str | uuid.UUID) -> list[RecordedEvent] | None:
        """The events an append with idempotency key `key` recorded, or None if no append committed with it."""
        rows = self._recorded_command_rows(validate_idempotency_key(key))
        if not rows:
            return None
        return decode_recorded_command(rows)

    @abstractmethod
    def _recorded_command_rows(self, key: str) -> list:
        """The stored rows (formats.ROW_COLUMNS layout, position order) of the append recorded under `key`."""

    @abstractmethod
    def _append(self, prepared: PreparedAppend, /) -> list[RecordedEvent]:
        """Check every expected version and write every event, atomically."""

    def append_batch(
        self,
        events: Iterable[EventToWrite],
        expected: Mapping[str, int] | None = None,
        *,
        metadata: Metadata | None = None,
    ) -> "BatchResult":
        """Write many events in one transaction, with `append`'s guarantees, at bulk speed.

        Same contract as `append` (every expectation checked first; all or
        nothing), up to MAX_EVENTS_PER_BATCH events, but returns a summary
        instead of one `RecordedEvent` per event. On PostgreSQL it is a binary
        COPY into the events table.
        """
        started = time.perf_counter()
        prepared = prepare_append(events, expected, metadata, limit=MAX_EVENTS_PER_BATCH)
        if not prepared.expected:
            return BatchResult(0, 0, 0, {}, 0.0)
        observer = self._observer
        if observer is None:
            first, last, versions = self._append_batch(prepared)
        else:
            exp = prepared.expected
            first, last, versions = observed(observer, self, "append_batch", exp, exp, self._append_batch,
                                             (prepared,), lambda _: len(prepared), operator.itemgetter(2))
        return BatchResult(len(prepared), first, last, versions, time.perf_counter() - started)

    def _append_batch(self, prepared: PreparedAppend, /) -> tuple[int, int, dict[str, int]]:
        """(first position, last position, stream -> version after). Backends may override for speed."""
        recorded = self._append(prepared)
        versions = {e.stream_id: e.version for e in recorded}  # later events of a stream overwrite earlier
        if not recorded:
            return 0, 0, versions
        return recorded[0].position, recorded[-1].position, versions

    def ingest(
        self,
        items: Iterable[EventToWrite | tuple[Any, ...]],
        *,
        batch_size: int = DEFAULT_INGEST_BATCH,
        expected: Mapping[str, int] | None = None,
        metadata: Metadata | None = None,
        on_batch: Callable[[int], object] | None = None,
        parallel: int = 1,
        resume_key: str | None = None,
    ) -> IngestResult:
        """Stream any number of events into the store, one transaction per `batch_size` events.

        `items`: `ec.emit(...)` objects or `(stream_id, event[, metadata])` tuples,
        consumed lazily, so memory stays bounded (one batch in hand and one in
        flight per lane) whatever the input size.

        The atomicity unit is the batch: it commits whole or not at all. An error
        stops the ingest with IngestError; batches committed before it stay.
        Versions are checked like `append`: streams named in `expected` are
        checked against it in the first batch that writes them and against the
        version this ingest left them at in every later batch; other streams are
        appended at whatever version they have. `on_batch(events_so_far)` is
        called after each commit.

        `parallel` > 1 writes through that many connections at once (lanes). Each
        stream is routed to one lane, so every stream's events keep their input
        order, but batches of different lanes commit in any order. On PostgreSQL
        two lanes roughly double what one COPY stream can take on 2 cores.

        `resume_key` makes the ingest resumable and re-runnable: each batch's
        transaction also records, under that key, how far into `items` its lane
        has committed. Run again with the same key and the same items (and the
        same `parallel`), items already committed are passed over, not written
        again (`IngestResult.skipped`), so an ingest killed half-way is finished
        by running it again, and running a finished one again writes nothing.
        Items are numbered by their place in the input, which must be the same
        each time: a None item stands for an input record passed over (a blank
        or rejected line) and keeps its place; if a later run finds an item
        there (the line was fixed) it writes it, once. Items added at the end of
        the input are ingested by the next run. Items already committed must not
        change.
        """
        return ingest(self, items, batch_size=batch_size, expected=expected, metadata=metadata, on_batch=on_batch,
                      parallel=parallel, resume_key=resume_key)

    def ingest_columns(
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
        """`ingest` from columns (needs numpy: `pip install 'pyeventcore[numpy]'`): row i is an event of
        type `types` (one name or Event class, or an array of names, one per row) to stream `stream_ids[i]`,
        whose fields are taken from `data` (field name -> 1-D array, or a structured array).

        A column follows its field's annotation (int: integer dtype; float: float or integer; bool;
        str: str_, StringDType or object; datetime: datetime64, read as UTC; anything else: object). A
        masked entry, or None in an object column, is no value: None for a nullable field, else the
        field's default. `metadata`: None, one ec.Metadata for every row, or columns of Metadata fields.
        Every guarantee and option of `ingest` holds, row i being item i: a bad row stops the ingest
        with IngestError naming it, nothing of its batch written. Column shapes and dtypes are checked
        at the call (ValidationError, nothing written).
        """
        from ..columns import ingest_columns

        return ingest_columns(self, stream_ids, types, data, metadata, batch_size=batch_size, expected=expected,
                              on_batch=on_batch, parallel=parallel, resume_key=resume_key)

    def read_columns(self, *, after_position: int = 0, types: Any = None, fields: Iterable[str] = (),
                     stream_prefix: str | None = None, limit: int | None = None,
                     page_size: int = 10_000) -> dict[str, Any]:
        """The feed (as `read_all` selects it) as a dict of 1-D numpy arrays (needs numpy): position
        (int64), stream_id (object), version (int64), recorded_at (datetime64[us], UTC), type (object),
        and one numpy.ma.MaskedArray per name in `fields`, typed by the field's annotation in the classes
        of `types` (int: int64, float: float64, bool, str: object, datetime: datetime64[us] in UTC,
        `X | None` as X, anything else: object), masked where an event has no such field or holds None."""
        from ..columns import read_columns

        return read_columns(self, after_position, types, fields, stream_prefix, limit, page_size,
                            read_all_args(after_position, types, stream_prefix, limit, page_size, True))

    def ingest_frame(self, df: Any, *, stream: str, type: Any, fields: Iterable[str] | None = None,
                     **options: Any) -> IngestResult:
        """`ingest_columns` from a pandas DataFrame (needs pandas): `stream` names the column of stream
        ids, `type` is one type (name or class) or the name of a column of type names, the other columns
        (or those in `fields`) are event fields. None, NaN, NaT and pandas.NA are no value. Options as
        `ingest_columns`."""
        from ..columns import frame_columns

        stream_ids, types, data = frame_columns(df, stream, type, fields)
        return self.ingest_columns(stream_ids, types, data, **options)

    def read_frame(self, **options: Any) -> Any:
        """`read_columns` as a pandas DataFrame (needs pandas): masked ints and bools become pandas'
        nullable Int64 and boolean, masked floats NaN, datetimes NaT, objects None."""
        from ..columns import to_frame

        return to_frame(self.read_columns(**options))

    def _ingest_progress(self, key: str) -> dict:
        """lane -> (lanes, input items committed) recorded under an ingest resume key ({} if none).
        A backend that records PreparedAppend.progress overrides this and the two below; the others
        refuse resume keys."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _ingest_holes(self, key: str) -> set:
        """The (lane, input item) pairs recorded as holes under an ingest resume key (see IngestProgress)."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _resume_keys(self, prefix: str) -> list:
        """The ingest resume keys starting with `prefix`, most recently written first."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                      progress=None) -> tuple[int, int, dict]:
        """Write one validated ingest batch atomically, with `progress` (see PreparedAppend.progress):
        (first position, last position, stream -> version after)."""
        return self._append_batch(prepare_ingest_batch(stream_ids, events, metadatas, expected, progress))

    # -- reading ----------------------------------------------------------------

    @overload
    def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None,
                    decode: Literal[True] = True) -> list[RecordedEvent]: ...
    @overload
    def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None,
                    decode: Literal[False]) -> list[RecordedEvent[dict[str, Any]]]: ...
    @overload
    def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None,
                    decode: bool = True) -> list[RecordedEvent]: ...

    def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None,
                    decode: bool = True) -> list[RecordedEvent]:
        """A stream's events in version order, from `from_version` (1-based).

        `decode=False`: every event as stored, whatever its type (see `read_all`)."""
        sid, raw = read_stream_args(stream_id, from_version, limit, decode)
        observer = self._observer
        if observer is None:
            return self._read_stream(sid, from_version, limit, raw) if raw else self._read_stream(sid, from_version, limit)
        args = (sid, from_version, limit, raw) if raw else (sid, from_version, limit)
        return observed(observer, self, "read", [sid], None, self._read_stream, args, len, _written_versions)

    @overload
    def read_streams(self, stream_ids: Iterable[str], *,
                     decode: Literal[True] = True) -> dict[str, list[RecordedEvent]]: ...
    @overload
    def read_streams(self, stream_ids: Iterable[str], *,
                     decode: Literal[False]) -> dict[str, list[RecordedEvent[dict[str, Any]]]]: ...
    @overload
    def read_streams(self, stream_ids: Iterable[str], *, decode: bool = True) -> dict[str, list[RecordedEvent]]: ...

    def read_streams(self, stream_ids: Iterable[str], *, decode: bool = True) -> dict[str, list[RecordedEvent]]:
        """Every event of several streams, read at one point in time (one round trip where possible).

        Returns stream id -> events in version order; streams without events map to [].
        `decode=False`: every event as stored, whatever its type (see `read_all`).
        """
        ids = stream_id_list(stream_ids)
        raw = _raw(decode)
        if not ids:
            return {}
        args = (ids, raw) if raw else (ids,)
        observer = self._observer
        if observer is None:
            return self._read_streams(*args)
        return observed(observer, self, "read", ids, None, self._read_streams, args, _events_in, _stream_heads)

    def stream_version(self, stream_id: str) -> int:
        """A stream's current version (0 if it has no events)."""
        return self.stream_versions([stream_id])[_stream_id(stream_id)]

    def stream_versions(self, stream_ids: Iterable[str]) -> dict[str, int]:
        """Current version of each stream (0 for streams without events)."""
        ids = stream_id_list(stream_ids)
        if not ids:
            return {}
        return self._stream_versions(ids)

    # Typed by what is asked for: classes only, decoded -> RecordedEvent[those classes]; decode=False ->
    # RecordedEvent[dict[str, Any]]; otherwise (type names, or a mix) RecordedEvent[Any].
    @overload
    def read_all(self, *, after_position: int = 0, types: Iterable[type[E]], stream_prefix: str | None = None,
                 limit: int | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 decode: Literal[True] = True) -> Iterator[RecordedEvent[E]]: ...
    @overload
    def read_all(self, *, after_position: int = 0, types: Iterable[str | type] | None = None,
                 stream_prefix: str | None = None, limit: int | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 decode: Literal[False]) -> Iterator[RecordedEvent[dict[str, Any]]]: ...
    @overload
    def read_all(self, *, after_position: int = 0, types: Iterable[str | type] | None = None,
                 stream_prefix: str | None = None, limit: int | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 decode: bool = True) -> Iterator[RecordedEvent]: ...

    def read_all(
        self,
        *,
        after_position: int = 0,
        types: Iterable[str | type] | None = None,
        stream_prefix: str | None = None,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        decode: bool = True,
    ) -> Iterator[RecordedEvent]:
        """Every event after `after_position`, in ascending global position, fetched page by page.

        Filters: `types` (type names, or Event classes: a class also matches its aliases) and
        `stream_prefix`. A position once returned is never followed by a lower one on a later call.

        Decoded (the default), each event's `data` is an instance of its class at the class's
        current version (older versions through the upcasters). `decode=False` never needs a
        class and never raises for an unknown type: `data` is the stored JSON object as a dict,
        `type` and `type_version` the stored name and version (see RecordedEvent).
        """
        return self._iter_all(*read_all_args(after_position, types, stream_prefix, limit, page_size, decode))

    def _iter_all(self, after, names, prefix, limit, page_size, raw=False) -> Iterator[RecordedEvent]:
        remaining = limit
        while remaining is None or remaining > 0:
            n = page_size if remaining is None else min(page_size, remaining)
            args = (after, names, prefix, n, raw) if raw else (after, names, prefix, n)
            observer = self._observer
            if observer is None:
                page = self._read_all_page(*args)
            else:
                page = observed(observer, self, "read_all", None, None, self._read_all_page, args)
            yield from page
            if len(page) < n:
                return
            after = page[-1].position
            if remaining is not None:
                remaining -= len(page)

    # -- snapshots (eventcore.snapshots) ------------------------------------------------

    #: Whether this backend stores snapshots (the primitives below); commands on a store without
    #: them fold every event.
    supports_snapshots: bool = False

    def snapshots(self) -> list[SnapshotInfo]:
        """Every stored snapshot of a command's state (see `ec.SnapshotPolicy`), by key."""
        return [SnapshotInfo(*row) for row in self._snapshot_rows()]

    def drop_snapshots(self, command: str | None = None, *, older_than: float | None = None) -> int:
        """Remove the snapshots of one command class (by the name `snapshots()` shows) or of all, or only
        those written more than `older_than` seconds ago (a retention sweep for snapshots of commands no
        longer run): safe at any time (a command folds from its streams' first events until it writes
        a new one). Returns how many were removed."""
        return self._drop_snapshots(*drop_snapshot_args(command, older_than))

    def _no_snapshots(self) -> ValidationError:
        return ValidationError(f"the {self.scheme or type(self).__name__} store does not store snapshots")

    def _load_snapshot(self, key: str) -> tuple[int, str, bytes] | None:
        """(state version, covers as JSON, state) of the snapshot stored under `key`, or None."""
        raise self._no_snapshots()

    def _save_snapshot(self, key: str, command: str, state_version: int, covers: str, state: bytes,
                       events: int) -> None:
        """Store (or replace) the snapshot under `key`."""
        raise self._no_snapshots()

    def _snapshot_rows(self) -> list:
        """(key, command, state version, size, events, written at as a Unix time) of every snapshot."""
        raise self._no_snapshots()

    def _drop_snapshots(self, command: str | None, before: float | None = None) -> int:
        """Remove snapshots (of `command`, or all; written before the Unix time `before`, if given)."""
        raise self._no_snapshots()

    def _read_streams_from(self, from_versions: dict[str, int], raw: bool = False) -> dict[str, list[RecordedEvent]]:
        """Each stream's events from a version on (stream -> version), read at one point in time."""
        raise self._no_snapshots()

    def _read_after_snapshot(self, key: str, state_version: int, stream_ids: list) -> tuple:
        """A command's read through its snapshot: (the snapshot stored under `key` or None, stream ->
        its events from `from_versions(...)` on, those from versions, and the position below which no
        event can commit later, or None where events commit in position order). A backend may do it in
        one round trip (PostgreSQL); this one makes two calls."""
        stored = self._load_snapshot(key)
        froms = from_versions(stored, state_version, stream_ids)
        return stored, self._read_streams_from(froms), froms, None

    @property
    def command_cache(self) -> Any:
        """The `ec.StateCache` that `ec.execute` uses for this store unless told otherwise: an exact one
        (`reuse_state=False`), made on first use. Set it to None to have commands read every stream
        every time, or to a StateCache of your own."""
        cache = self._command_cache
        if cache is _NOT_MADE:
            with _COMMAND_CACHE_LOCK:
                cache = self._command_cache
                if cache is _NOT_MADE:
                    make = _command_cache_factory[0]
                    cache = self._command_cache = None if make is None else make()
        return cache

    @command_cache.setter
    def command_cache(self, cache: Any) -> None:
        self._command_cache = cache

    def head_position(self) -> int:
        """The highest global position visible to readers (0 for an empty store)."""
        return self._head_position()

    def type_counts(self) -> list[tuple[str, int, int]]:
        """(stored type name, type version, events) for every type name and version stored, sorted by
        name then version: what `eventcore types` shows. Reads every event once (a planning tool)."""
        return [tuple(row) for row in self._type_counts()]

    def _type_counts(self) -> list:
        """(type, type_version, count) rows of the whole events table, by type and version."""
        raise NotImplementedError(f"{type(self).__name__} cannot count its types")

    # The read primitives take `raw` (decode=False) as a last argument, passed only when true.

    @abstractmethod
    def _read_stream(self, stream_id: str, from_version: int, limit: int | None,
                     raw: bool = False) -> list[RecordedEvent]: ...

    @abstractmethod
    def _read_streams(self, stream_ids: list[str], raw: bool = False) -> dict[str, list[RecordedEvent]]: ...

    @abstractmethod
    def _stream_versions(self, stream_ids: list[str]) -> dict[str, int]: ...

    @abstractmethod
    def _read_all_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int,
                       raw: bool = False) -> list[RecordedEvent]: ...

    @abstractmethod
    def _head_position(self) -> int: ...

    def _read_all_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple]:
        """One page of the feed as stored rows, undecoded (layout formats.ROW_COLUMNS).

        For readers that must see every event even when it cannot be decoded in
        this process (projections, `eventcore tail`); a backend without it raises.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read raw rows")

    # -- life cycle ---------------------------------------------------------------

    def close(self) -> None:
        """Release connections. The store cannot be used afterwards.

        Backends release their own resources and then call this, which makes every StateCache
        drop what it holds for this store (and add nothing more: they look at `closed`)."""
        self.closed = True
        for dependant in list(self._dependants):
            dependant._drop_store(self.instance)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raw(decode: object) -> bool:
    """The `raw` flag of the read primitives from a `decode` argument (a bool)."""
    if type(decode) is not bool:
        raise ValidationError(f"decode must be True or False, got {decode!r}")
    return not decode


def _written_versions(events: list[RecordedEvent]) -> dict[str, int] | None:
    """stream -> version after `events` (a later event of a stream overwrites an earlier one)."""
    return {e.stream_id: e.version for e in events} or None


def _events_in(by_stream: dict) -> int:
    return sum(map(len, by_stream.values()))


def _stream_heads(by_stream: dict) -> dict[str, int]:
    return {s: (evs[-1].version if evs else 0) for s, evs in by_stream.items()}


def group_by_stream(stream_ids: list[str], events: list[RecordedEvent]) -> dict[str, list[RecordedEvent]]:
    """Split position-ordered events of several streams into stream -> events (version order)."""
    out: dict[str, list[RecordedEvent]] = {sid: [] for sid in stream_ids}
    for e in events:
        out[e.stream_id].append(e)
    return out


# -- argument checks and pure parts shared with the asyncio stores (eventcore.aio) ----------------------


def drop_snapshot_args(command: Any, older_than: Any) -> tuple[str | None, float | None]:
    """`drop_snapshots`' arguments checked: (command or None, Unix time before which to drop, or None)."""
    if command is not None and (not isinstance(command, str) or not command or forbidden_character(command)):
        raise ValidationError(f"command must be a name snapshots() shows (a str without control characters, NUL or "
                              f"lone surrogates) or None, got {command!r:.80}")
    if older_than is None:
        return command, None
    if (isinstance(older_than, bool) or not isinstance(older_than, (int, float))
            or not 0 <= older_than <= MAX_SNAPSHOT_AGE):
        raise ValidationError(f"older_than must be a number of seconds in 0..{MAX_SNAPSHOT_AGE:.0e} or None, "
                              f"got {older_than!r}")
    return command, time.time() - older_than


#: The largest `older_than` of drop_snapshots, seconds: ~3,000 years, so that now minus it is a time every
#: backend can hold (a float, SQLite's int64 microseconds, PostgreSQL's timestamptz).
MAX_SNAPSHOT_AGE = 1e11


def stream_id_list(stream_ids: Iterable[str]) -> list[str]:
    """Stream ids, checked, without repeats, in the order given."""
    return list(dict.fromkeys(_stream_id(s) for s in stream_ids))


def read_stream_args(stream_id: str, from_version: int, limit: int | None, decode: bool) -> tuple[str, bool]:
    """`read_stream`'s arguments checked: (stream id, raw)."""
    sid = _stream_id(stream_id)
    if type(from_version) is not int or not 1 <= from_version <= INT64_MAX:
        raise ValidationError(f"from_version must be an int in 1..2**63-1, got {from_version!r}")
    if limit is not None and (type(limit) is not int or not 0 <= limit <= INT64_MAX):
        raise ValidationError(f"limit must be an int in 0..2**63-1 or None, got {limit!r}")
    return sid, _raw(decode)


def read_all_args(after_position: int, types: Iterable[str | type] | None, stream_prefix: str | None,
                  limit: int | None, page_size: int, decode: bool) -> tuple:
    """`read_all`'s arguments checked: (after, type names or None, prefix or None, limit, page size, raw)."""
    # Bounded to int64: the databases' integers (a larger one would be an OverflowError or a server error).
    if type(after_position) is not int or not 0 <= after_position <= INT64_MAX:
        raise ValidationError(f"after_position must be an int in 0..2**63-1, got {after_position!r}")
    if type(page_size) is not int or not 1 <= page_size <= INT64_MAX:
        raise ValidationError(f"page_size must be an int in 1..2**63-1, got {page_size!r}")
    if limit is not None and (type(limit) is not int or not 0 <= limit <= INT64_MAX):
        raise ValidationError(f"limit must be an int in 0..2**63-1 or None, got {limit!r}")
    if stream_prefix is not None and (not isinstance(stream_prefix, str) or forbidden_character(stream_prefix)):
        raise ValidationError(
            f"stream_prefix must be a str without control characters, NUL or lone surrogates, got {stream_prefix!r}"
        )
    return after_position, _type_names(types), stream_prefix or None, limit, page_size, _raw(decode)


def decode_recorded_command(rows: list) -> list[RecordedEvent]:
    """The events of an idempotency key's rows (see `recorded_command`)."""
    try:
        return _impl.decode_rows(rows)
    except (UnknownEventTypeError, EventVersionError):
        # The command's events as stored for a type this process does not know (a RawEvent it wrote),
        # or at a version newer than its class (a later release wrote it): a replay or a duplicate
        # still hands back what was recorded, those events raw (`decode=False`'s shape), the rest decoded.
        out = []
        for row in rows:
            try:
                out.extend(_impl.decode_rows([row]))
            except (UnknownEventTypeError, EventVersionError):
                out.extend(_impl.decode_rows([row], True))
        return out


def prepare_ingest_batch(stream_ids: list, events: list, metadatas: list, expected: dict,
                         progress: Any = None) -> PreparedAppend:
    """One validated ingest batch, encoded for `_append_batch` (see `_ingest_batch`)."""
    encode_event = _impl.encode_event
    encode_metadata = _impl.encode_metadata
    types, type_versions, payloads, md_bytes = [], [], [], []
    for ev, md in zip(events, metadatas):
        if type(ev) is RawEvent:  # validated, its version resolved (ingest._ingest_item, jsonl)
            t, data, tv = ev.type, ev.data, ev.version
        else:
            (t, data), tv = encode_event(ev), type(ev).__event_version__
        types.append(t)
        type_versions.append(tv)
        payloads.append(data)
        md_bytes.append(encode_metadata(md))
    prepared = PreparedAppend(
        list(stream_ids), types, type_versions, payloads, md_bytes, _impl.new_event_ids(len(stream_ids)),
        list(events), list(metadatas), expected,
    )
    prepared.progress = progress
    return prepared


def projection_health(checkpoints: Iterable[Any]) -> list[dict[str, Any]]:
    """The `projections` of a StoreHealth from projection storage's checkpoints."""
    return [{"name": p.name, "state": p.state, "position": p.position, "lag": max(0, p.head - p.position),
             "pending": p.pending, "dead_letters": p.dead_letters} for p in checkpoints]


def health_report(store: Any, head: int | None, latency_ms: float, schema: int | None, expected: int | None,
                  pool: dict[str, Any] | None, projections: list[dict[str, Any]], error: str | None) -> StoreHealth:
    """A StoreHealth from what a health check read (`error`: why it could not read, else None)."""
    ok = error is None and (schema is None or schema == expected)
    problem = None if ok else "unreachable" if error is not None else "schema_version"
    if error is None and not ok:
        error = (f"schema is at version {schema}, this eventcore needs {expected}: "
                 + ("upgrade eventcore" if schema > expected else "run `eventcore migrate`"))
    return StoreHealth(ok=ok, backend=store.scheme, url=store.url, connected=head is not None,
                       latency_ms=latency_ms, head_position=head, schema_version=schema,
                       schema_expected=expected, pool=pool, projections=projections, error=error,
                       schema=getattr(store, "schema", None), problem=problem)
