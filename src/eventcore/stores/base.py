"""The store contract every backend implements, and the validation they share.

A store appends events atomically across streams, each stream guarded by an
expected version, and reads them back by stream or as one global feed that never skips an event.
Encoding and validation happen here, before a backend takes any lock or opens
any transaction, so bad input is rejected with nothing written.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import threading
import weakref
import time
import uuid
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Mapping, Sequence

import msgspec

from .. import _impl
from ..errors import ConcurrencyError, DuplicateCommandError, EventCoreError, ValidationError
from ..events import (
    EMPTY_METADATA, Event, EventToWrite, Metadata, RawEvent, RecordedEvent, ValidatedItem, validate_raw_event,
    validate_type_name,
)
from ..expected import ANY, validate_expected
from ..streams import StreamId, forbidden_character, stream_id as _stream_id

#: Most events accepted by one `append`. A single append is one transaction
#: holding the write lock; past ~100k rows a batch belongs in the batch writer.
MAX_EVENTS_PER_APPEND = 100_000

#: Most events accepted by one `append_batch`: one transaction; a PostgreSQL
#: transaction can number at most 1,048,575 events (see pg_sql.POSITION_SHIFT).
MAX_EVENTS_PER_BATCH = 1_000_000

#: Rows per page of `read_all`: large enough that the per-query cost vanishes
#: (~1k rows decode in about a millisecond), small enough to bound memory.
DEFAULT_PAGE_SIZE = 1000

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_INT64_MAX = 2**63 - 1


class PreparedAppend:
    """An append validated and encoded, ready for a backend to check versions and write.

    Columns are parallel lists (one entry per event) so a backend can pass
    them as arrays in one statement; `expected` covers every participant
    stream, written or read-only.
    """

    __slots__ = ("stream_ids", "types", "payloads", "metadatas", "event_ids", "events", "metadata_objs",
                 "expected", "recorded_at_us", "key", "progress")

    def __init__(self, stream_ids, types, payloads, metadatas, event_ids, events, metadata_objs, expected):
        self.stream_ids = stream_ids
        self.types = types
        self.payloads = payloads
        self.metadatas = metadatas
        self.event_ids = event_ids
        self.events = events
        self.metadata_objs = metadata_objs
        self.expected = expected
        self.recorded_at_us = time.time_ns() // 1000
        #: The append's idempotency key (str) or None: recorded in the append's transaction;
        #: a key already recorded makes the backend raise DuplicateCommandError, writing nothing.
        self.key = None
        #: Ingest progress to record in the same transaction, or None: an IngestProgress.
        self.progress = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def recorded(self, versions: Sequence[int], positions: Sequence[int]) -> list[RecordedEvent]:
        """The `RecordedEvent`s of this append once the backend assigned versions and positions."""
        at = _EPOCH + _dt.timedelta(microseconds=self.recorded_at_us)
        return [
            RecordedEvent(sid, v, p, uuid.UUID(bytes=eid), t, ev, md if md is not None else EMPTY_METADATA, at)
            for sid, v, p, eid, t, ev, md in zip(
                self.stream_ids, versions, positions, self.event_ids, self.types, self.events, self.metadata_objs
            )
        ]


def prepare_append(
    events: Iterable[EventToWrite],
    expected: Mapping[str, int] | None,
    metadata: Metadata | None,
    limit: int = MAX_EVENTS_PER_APPEND,
) -> PreparedAppend:
    """Validate and encode an append. Raises ValidationError / SerializationError; writes nothing."""
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    exp: dict[str, int] = {}
    if expected:
        for sid, want in expected.items():
            sid = _stream_id(sid)
            exp[sid] = validate_expected(sid, want)
    stream_ids, types, payloads, metadatas, objs, mds = [], [], [], [], [], []
    encode_event = _impl.encode_event
    encode_metadata = _impl.encode_metadata
    default_md_bytes = encode_metadata(metadata)
    for item in events:
        if type(item) is not EventToWrite:
            raise ValidationError(
                f"append() takes ec.emit(stream, event) items, got {type(item).__name__}: {item!r}"
            )
        ev = item.event
        sid = item.stream_id
        if type(sid) is not StreamId:  # an EventToWrite built by hand, not by emit()
            sid = _stream_id(sid)
        if isinstance(ev, Event):
            type_name, payload = encode_event(ev)
        elif type(ev) is RawEvent:
            type_name, payload = validate_raw_event(ev)
        else:
            raise ValidationError(f"not an ec.Event: {type(ev).__name__}")
        md = item.metadata
        if md is None:
            md, md_bytes = metadata, default_md_bytes
        elif type(md) is not Metadata:  # an EventToWrite built by hand, not by emit()
            raise ValidationError(f"event metadata must be an ec.Metadata, got {type(md).__name__}: {md!r}")
        else:
            md_bytes = encode_metadata(md)
        stream_ids.append(sid)
        types.append(type_name)
        payloads.append(payload)
        metadatas.append(md_bytes)
        objs.append(ev)
        mds.append(md)
        if sid not in exp:
            exp[sid] = ANY
    if len(stream_ids) > limit:
        raise ValidationError(
            f"at most {limit:,} events per call, got {len(stream_ids):,}"
            + ("; use store.append_batch() for bulk writes" if limit == MAX_EVENTS_PER_APPEND else "")
        )
    event_ids = _impl.new_event_ids(len(stream_ids))
    return PreparedAppend(stream_ids, types, payloads, metadatas, event_ids, objs, mds, exp)


#: Longest idempotency key accepted (as a stream id: one B-tree entry on every backend).
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def validate_idempotency_key(value: object, what: str = "idempotency key") -> str:
    """Validate an idempotency key (or, as `what` says, an ingest resume key): a non-empty str of at
    most 255 characters without control characters (the stream id rules), or a uuid.UUID (stored as
    its canonical text)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str or uuid.UUID, got {type(value).__name__}: {value!r}")
    try:
        return str(_stream_id(value))
    except ValidationError as exc:
        raise ValidationError(str(exc).replace("stream id", what, 1)) from None


class IngestProgress(msgspec.Struct, frozen=True):
    """What one batch of a resumable ingest records in its own transaction.

    Input items are numbered from 0 in the order the input gives them; a None item (a line the reader
    passed over: blank, or rejected) keeps its number. For each lane, `items` is the count below which
    every item of that lane is committed, except the numbers recorded as holes: items that were None
    when a batch's count passed them, and that a later run writes if they are items by then.

    The backend records it only if the lane's stored count is still `before` and every hole in
    `filled` is still recorded (else ingest_overlap(), writing nothing): so two runs of one ingest
    cannot both write an item."""

    key: str
    lane: int
    lanes: int
    items: int
    before: int
    #: Holes to record (None items below `items`, ON CONFLICT ignored: several lanes may record one).
    holes: list = []
    #: Recorded holes this batch writes (deleted with it).
    filled: list = []


def ingest_overlap(progress: "IngestProgress", actual: int | None = None) -> ConcurrencyError:
    """The error of an ingest batch whose resume progress another run moved meanwhile."""
    key, lane, before = progress.key, progress.lane, progress.before
    return ConcurrencyError(
        f"ingest {key!r} lane {lane}", before, before if actual is None else actual,
        f"another run of ingest {key!r} committed part of the input meanwhile (lane {lane}: this run "
        f"expected {before:,} items committed{'' if actual is None else f', found {actual:,}'}); two runs "
        "of one resumable ingest must not overlap: nothing of this batch was written")


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
    pool: dict | None
    projections: list
    error: str | None
    schema: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict:
        return msgspec.structs.asdict(self)


class BatchResult(msgspec.Struct, frozen=True):
    """What `append_batch` wrote: how many events, their position range, each written stream's version after."""

    count: int
    first_position: int
    last_position: int
    stream_versions: dict[str, int]
    duration_s: float


class IngestResult(msgspec.Struct, frozen=True):
    """What `ingest` committed: events and batches (one transaction each), position range, time taken."""

    events: int
    batches: int
    first_position: int
    last_position: int
    duration_s: float
    #: Input items passed over because an earlier run with the same `resume_key` committed them.
    skipped: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.duration_s if self.duration_s > 0 else 0.0


class IngestError(EventCoreError):
    """An ingest stopped at a batch. Every earlier batch is committed; nothing of the failed one is.

    `committed` is the number of events committed before the failure, `item`
    the 0-based index of the item being read or the first item of the failed
    batch; the original error is the `__cause__`.
    """

    def __init__(self, message: str, committed: int, item: int):
        self.committed = committed
        self.item = item
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.committed, self.item))


#: Events per ingest transaction: big enough that per-transaction costs (lock,
#: reserve, commit flush) vanish, small enough to bound memory (~10 MB of rows).
DEFAULT_INGEST_BATCH = 10_000


class _BatchFailed(Exception):
    """Internal: an ingest batch failed in its lane; carries the batch's first item index."""

    def __init__(self, start: int, cause: EventCoreError):
        self.start = start
        self.cause = cause
        super().__init__(str(cause))


class _Lane:
    """One ingest lane: the batch being filled and the batch in flight."""

    __slots__ = ("sids", "evs", "mds", "start", "last", "pending", "filled")

    def __init__(self) -> None:
        self.sids: list = []
        self.evs: list = []
        self.mds: list = []
        self.start = 0  # input index of the batch's first item
        self.last = 0  # input index of the batch's last item
        self.pending = None
        self.filled: list = []  # recorded holes (input indexes) this batch writes


#: Most ingest lanes (connections writing at once); past the server's cores more only adds contention.
MAX_INGEST_LANES = 32
#: Distinct stream ids remembered as validated during one ingest before the memo is reset.
_VALID_ID_MEMO = 100_000


def _ingest_item(item, metadata, valid_ids: dict):
    """(stream id, event, metadata) of one ingest item, validated."""
    if type(item) is ValidatedItem:  # a JSON line, validated when it was read
        return item[0], item[1], metadata if item[2] is None else item[2]
    if type(item) is EventToWrite:
        sid, ev, md = item.stream_id, item.event, item.metadata
    elif type(item) is tuple and 2 <= len(item) <= 3:
        sid, ev = item[0], item[1]
        md = item[2] if len(item) == 3 else None
    else:
        raise ValidationError(
            f"ingest takes ec.emit(...) items or (stream_id, event[, metadata]) tuples, got {type(item).__name__}"
        )
    if type(sid) is str:
        known = valid_ids.get(sid)
        if known is None:
            known = _stream_id(sid)
            if len(valid_ids) >= _VALID_ID_MEMO:
                valid_ids.clear()
            valid_ids[sid] = known
        sid = known
    elif type(sid) is not StreamId:
        sid = _stream_id(sid)
    if not isinstance(ev, Event):
        if type(ev) is not RawEvent:
            raise ValidationError(f"not an ec.Event: {type(ev).__name__}")
        validate_raw_event(ev)
    if md is None:
        md = metadata
    elif type(md) is not Metadata:
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(md).__name__}")
    return sid, ev, md


def _type_names(types) -> tuple[str, ...] | None:
    if types is None:
        return None
    if isinstance(types, (str, type)):
        types = (types,)
    names = []
    for t in types:
        if isinstance(t, type) and issubclass(t, Event):
            names.append(t.__event_type__)
        elif isinstance(t, str):
            names.append(validate_type_name(t, "a types filter name"))  # no NUL/surrogate reaches SQL
        else:
            raise ValidationError(f"types filter takes event type names or ec.Event classes, got {t!r}")
    return tuple(names)


#: Numbers every store object opened in this process: a store's `instance` is never reused, unlike
#: its id(), which CPython hands to the next object once a store is freed.
_instances = itertools.count(1)


class EventStore(ABC):
    """The store contract. Backends implement the underscored primitives; the public methods validate."""

    #: The URL scheme this backend answers to (e.g. "sqlite").
    scheme: str = ""
    #: The attached MetricsCollector (see `attach`); None: nothing is measured.
    _metrics = None

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        #: This store object's number, unique in the process for its lifetime (see `_instances`):
        #: what in-process caches key their entries by.
        self.instance = next(_instances)
        #: Objects holding entries for this store (StateCaches), told by close() to drop them.
        self._dependants = weakref.WeakSet()
        #: True once close() was called: every later operation raises StoreUnavailableError.
        self.closed = False
        return self

    # -- observability ------------------------------------------------------------

    def attach(self, collector) -> None:
        """Measure this store with `collector` (an `ec.MetricsCollector`): every command executed on
        it and every store operation, until `detach()`. One collector per store; a collector may
        watch many stores."""
        from ..metrics import MetricsCollector  # the collector sits beside the executor, above the stores

        if not isinstance(collector, MetricsCollector):
            raise ValidationError(f"attach() takes an ec.MetricsCollector, got {type(collector).__name__}")
        self.detach()
        self._metrics = collector
        collector._attached(self)

    def detach(self) -> None:
        """Stop measuring this store."""
        m = self._metrics
        if m is not None:
            self._metrics = None
            m._detached(self)

    @property
    def metrics(self):
        """The attached MetricsCollector, or None."""
        return self._metrics

    def pool_stats(self) -> dict | None:
        """The connection pool's state (PostgreSQL), or None for backends without a pool."""
        return None

    def _schema_versions(self) -> tuple[int | None, int | None]:
        """(schema version in place, version this eventcore needs); (None, None) when not applicable."""
        return None, None

    def health(self) -> "StoreHealth":
        """Connectivity, schema version, pool state and projection lag, read now. Never raises for an
        unreachable store: `ok` is False and `error` says why (with no password in it)."""
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
        projections: list = []
        if error is None:
            try:
                from ..projections import projection_status  # the read side, imported only when asked

                projections = [{"name": p.name, "state": p.state, "position": p.position, "lag": p.lag,
                                "pending": p.pending, "dead_letters": p.dead_letters} for p in projection_status(self)]
            except Exception:  # noqa: BLE001 - no projection tables yet
                projections = []
        ok = error is None and (schema is None or schema == expected)
        problem = None if ok else "unreachable" if error is not None else "schema_version"
        if error is None and not ok:
            error = (f"schema is at version {schema}, this eventcore needs {expected}: "
                     + ("upgrade eventcore" if schema > expected else "run `eventcore migrate`"))
        return StoreHealth(ok=ok, backend=self.scheme, url=self.url, connected=head is not None,
                           latency_ms=latency_ms, head_position=head, schema_version=schema,
                           schema_expected=expected, pool=pool, projections=projections, error=error,
                           schema=getattr(self, "schema", None), problem=problem)

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
        m = self._metrics
        if m is None:
            try:
                return self._append(prepared)
            except DuplicateCommandError as exc:
                raise self._with_original(exc) from None
        exp = prepared.expected
        run = m._op_start(self, "append", exp, exp)
        try:
            recorded = self._append(prepared)
        except BaseException as exc:
            m._op_end(run, 0, exc)
            if isinstance(exc, DuplicateCommandError):
                raise self._with_original(exc) from None
            raise
        m._op_end(run, len(recorded), None, lambda: {e.stream_id: e.version for e in recorded})
        return recorded

    def _with_original(self, exc: "DuplicateCommandError") -> "DuplicateCommandError":
        """The DuplicateCommandError a backend raised, with the original events looked up if it has none."""
        if exc.events is not None:
            return exc
        return DuplicateCommandError(exc.key, self.recorded_command(exc.key))

    def recorded_command(self, key: str | uuid.UUID) -> list[RecordedEvent] | None:
        """The events an append with idempotency key `key` recorded, or None if no append committed with it."""
        rows = self._recorded_command_rows(validate_idempotency_key(key))
        return _impl.decode_rows(rows) if rows else None

    @abstractmethod
    def _recorded_command_rows(self, key: str) -> list:
        """The stored rows (codec.ROW_COLUMNS layout, position order) of the append recorded under `key`."""

    @abstractmethod
    def _append(self, prepared: PreparedAppend) -> list[RecordedEvent]:
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
        m = self._metrics
        if m is None:
            first, last, versions = self._append_batch(prepared)
        else:
            exp = prepared.expected
            run = m._op_start(self, "append_batch", exp, exp)
            try:
                first, last, versions = self._append_batch(prepared)
            except BaseException as exc:
                m._op_end(run, 0, exc)
                raise
            m._op_end(run, len(prepared), None, versions)
        return BatchResult(len(prepared), first, last, versions, time.perf_counter() - started)

    def _append_batch(self, prepared: PreparedAppend) -> tuple[int, int, dict[str, int]]:
        """(first position, last position, stream -> version after). Backends may override for speed."""
        recorded = self._append(prepared)
        versions = {e.stream_id: e.version for e in recorded}  # later events of a stream overwrite earlier
        if not recorded:
            return 0, 0, versions
        return recorded[0].position, recorded[-1].position, versions

    def ingest(
        self,
        items: Iterable,
        *,
        batch_size: int = DEFAULT_INGEST_BATCH,
        expected: Mapping[str, int] | None = None,
        metadata: Metadata | None = None,
        on_batch=None,
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
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_EVENTS_PER_BATCH:
            raise ValidationError(f"batch_size must be an int in 1..{MAX_EVENTS_PER_BATCH}, got {batch_size!r}")
        if type(parallel) is not int or not 1 <= parallel <= MAX_INGEST_LANES:
            raise ValidationError(f"parallel must be an int in 1..{MAX_INGEST_LANES}, got {parallel!r}")
        if metadata is not None and not isinstance(metadata, Metadata):
            raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
        checks = {_stream_id(s): validate_expected(s, v) for s, v in (expected or {}).items()}
        done = [0] * parallel  # per lane: input items below this index are committed already (but holes)
        holes: set = set()  # items an earlier run passed over (None) below a lane's count: not committed
        if resume_key is not None:
            resume_key = validate_idempotency_key(resume_key, "resume key")
            recorded = self._ingest_progress(resume_key)
            if recorded:
                lanes_before = {n for n, _ in recorded.values()}
                if lanes_before != {parallel}:
                    raise ValidationError(
                        f"ingest {resume_key!r} was started with parallel={min(lanes_before)}; resume it with the "
                        f"same parallel (each stream's lane depends on it) or use another resume key")
                for lane_no, (_, items_done) in recorded.items():
                    done[lane_no] = items_done
                holes = self._ingest_holes(resume_key)
        # A None item below every lane's count and not a hole was committed by an earlier run (its line
        # has changed since): nothing to record. Above it, it may be an item no lane has written: a hole.
        all_done = min(done)
        # Holes found by this run that no committed batch has recorded yet, in input order: every batch
        # records those below its count, so whichever lane a later fix of the line goes to, it is written.
        new_holes: list = []
        skipped = 0
        rebase: set = set()  # streams in `expected` that an earlier run of this ingest already wrote
        started = time.perf_counter()
        state = {"events": 0, "batches": 0, "first": 0, "last": 0}
        lock = threading.Lock()
        lanes = [_Lane() for _ in range(parallel)]
        # One code path for any number of lanes: worker threads write, one batch in flight per
        # lane, while this thread reads and validates the next. With one lane this measured no
        # faster than writing inline (71k vs 73k events/s, noise): the server is the bottleneck.
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="eventcore-ingest")
        # Stream ids repeat: validate each distinct one once (bounded, so memory stays flat).
        valid_ids: dict = {}

        m = self._metrics
        ingest_run = None if m is None else m._op_start(self, "ingest", None)

        def write(sids: list, evs: list, mds: list, start: int, progress) -> None:
            with lock:
                moved = [sid for sid in dict.fromkeys(sids) if sid in rebase]
            if moved:
                try:
                    current = self.stream_versions(moved)
                except EventCoreError as exc:
                    raise _BatchFailed(start, exc) from exc
                with lock:
                    for sid in moved:
                        checks[sid] = current[sid]
                        rebase.discard(sid)
            with lock:
                exp = {sid: checks.get(sid, ANY) for sid in dict.fromkeys(sids)}
            run = None if m is None else m._op_start(self, "ingest_batch", None)
            try:
                first, last, after = self._ingest_batch(sids, evs, mds, exp, progress)
            except EventCoreError as exc:
                if run is not None:
                    m._op_end(run, 0, exc)
                raise _BatchFailed(start, exc) from exc
            if run is not None:
                m._op_end(run, len(sids), None)
            with lock:
                if progress is not None and progress.holes:
                    recorded_holes = set(progress.holes)
                    new_holes[:] = [h for h in new_holes if h not in recorded_holes]
                for sid in checks.keys() & after.keys():
                    checks[sid] = after[sid]
                state["events"] += len(sids)
                state["batches"] += 1
                state["first"] = first if not state["first"] else min(state["first"], first)
                state["last"] = max(state["last"], last)
                total = state["events"]
            if on_batch is not None:
                on_batch(total)

        def flush(lane_no: int, lane: "_Lane") -> None:
            progress = None
            if resume_key is not None:
                # Lanes write one batch at a time, so the previous batch's count is the one stored. A
                # batch of fixed lines only (all below the count) leaves the count where it was.
                count = max(done[lane_no], lane.last + 1)
                with lock:
                    passed = [h for h in new_holes if h < count]
                progress = IngestProgress(resume_key, lane_no, parallel, count, done[lane_no], passed, lane.filled)
                done[lane_no] = count
            batch = (lane.sids, lane.evs, lane.mds, lane.start, progress)
            lane.sids, lane.evs, lane.mds, lane.filled = [], [], [], []
            if lane.pending is not None:
                lane.pending.result()  # one batch in flight per lane: order within the lane, bounded memory
            lane.pending = pool.submit(write, *batch)

        failure: tuple | None = None  # (item index, in a batch?, cause)
        try:
            for index, item in enumerate(items):
                if item is None:  # an input record passed over: it keeps its number
                    if resume_key is not None and index >= all_done and index not in holes:
                        with lock:
                            new_holes.append(index)
                    continue
                try:
                    sid, ev, md = _ingest_item(item, metadata, valid_ids)
                except EventCoreError as exc:
                    failure = (index, False, exc)
                    break
                # A stream's lane must be the same in every run (resume_key): crc32, not hash(),
                # which Python salts per process.
                lane_no = zlib.crc32(sid.encode()) % parallel if parallel > 1 else 0
                if index in holes:
                    lanes[lane_no].filled.append(index)  # passed over before, an item now: written, once
                elif index < done[lane_no]:
                    skipped += 1
                    if sid in checks and sid not in rebase:
                        # An earlier run wrote this stream (and checked `expected` then): from here
                        # on it is checked against the version it has when this run first writes it.
                        with lock:
                            rebase.add(sid)
                    continue
                lane = lanes[lane_no]
                if not lane.sids:
                    lane.start = index
                lane.last = index
                lane.sids.append(sid)
                lane.evs.append(ev)
                lane.mds.append(md)
                if len(lane.sids) >= batch_size:
                    flush(lane_no, lane)
            else:
                for lane_no, lane in enumerate(lanes):
                    if lane.sids:
                        flush(lane_no, lane)
        except _BatchFailed as exc:
            failure = (exc.start, True, exc.cause)
        except BaseException as exc:  # e.g. the caller's iterable raised: the span must still end
            if ingest_run is not None:
                m._op_end(ingest_run, state["events"], exc)
            raise
        finally:
            # Settle every batch in flight (they may still commit) before reporting what is committed.
            for lane in lanes:
                if lane.pending is not None:
                    try:
                        lane.pending.result()
                    except _BatchFailed as exc:
                        if failure is None:
                            failure = (exc.start, True, exc.cause)
                    lane.pending = None
            pool.shutdown(wait=True)
        if ingest_run is not None:
            m._op_end(ingest_run, state["events"], None if failure is None else failure[2])
        if failure is not None:
            item, in_batch, cause = failure
            where = f"the batch starting with item {item}" if in_batch else f"item {item}"
            unsure = in_batch and getattr(cause, "maybe_committed", False)
            if resume_key is not None:
                lanes_note = f"; run it again with resume_key={resume_key!r} to finish it"
            elif parallel > 1:
                lanes_note = ("; with several lanes there is no single resume point (other lanes' partly filled "
                              "batches were not written): pass a resume_key to make an ingest resumable")
            else:
                lanes_note = ""
            fate = ("that batch may or may not have committed (the connection was lost after it was sent)"
                    if unsure else f"none of {'that' if in_batch else 'its'} batch")
            raise IngestError(
                f"ingest stopped at {where}: {cause} ({state['events']:,} events committed before it, "
                f"{fate}{lanes_note})",
                state["events"], item,
            ) from cause
        return IngestResult(state["events"], state["batches"], state["first"], state["last"],
                            time.perf_counter() - started, skipped)

    def _ingest_progress(self, key: str) -> dict:
        """lane -> (lanes, input items committed) recorded under an ingest resume key ({} if none).
        A backend that records PreparedAppend.progress overrides this and the two below; the others
        refuse resume keys."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _ingest_holes(self, key: str) -> set:
        """The input items recorded as holes under an ingest resume key (see IngestProgress)."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _resume_keys(self, prefix: str) -> list:
        """The ingest resume keys starting with `prefix`, most recently written first."""
        raise ValidationError(f"the {self.scheme or type(self).__name__} store cannot resume an ingest (resume_key)")

    def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                      progress=None) -> tuple[int, int, dict]:
        """Write one validated ingest batch atomically, with `progress` (see PreparedAppend.progress):
        (first position, last position, stream -> version after)."""
        encode_event = _impl.encode_event
        encode_metadata = _impl.encode_metadata
        types, payloads, md_bytes = [], [], []
        for ev, md in zip(events, metadatas):
            t, data = encode_event(ev) if type(ev) is not RawEvent else (ev.type, ev.data)
            types.append(t)
            payloads.append(data)
            md_bytes.append(encode_metadata(md))
        prepared = PreparedAppend(
            list(stream_ids), types, payloads, md_bytes, _impl.new_event_ids(len(stream_ids)),
            list(events), list(metadatas), expected,
        )
        prepared.progress = progress
        return self._append_batch(prepared)

    # -- reading ----------------------------------------------------------------

    def read_stream(self, stream_id: str, *, from_version: int = 1, limit: int | None = None) -> list[RecordedEvent]:
        """A stream's events in version order, from `from_version` (1-based)."""
        sid = _stream_id(stream_id)
        if type(from_version) is not int or not 1 <= from_version <= _INT64_MAX:
            raise ValidationError(f"from_version must be an int in 1..2**63-1, got {from_version!r}")
        if limit is not None and (type(limit) is not int or not 0 <= limit <= _INT64_MAX):
            raise ValidationError(f"limit must be an int in 0..2**63-1 or None, got {limit!r}")
        m = self._metrics
        if m is None:
            return self._read_stream(sid, from_version, limit)
        run = m._op_start(self, "read", [sid])
        try:
            events = self._read_stream(sid, from_version, limit)
        except BaseException as exc:
            m._op_end(run, 0, exc)
            raise
        m._op_end(run, len(events), None, lambda: {sid: events[-1].version} if events else None)
        return events

    def read_streams(self, stream_ids: Iterable[str]) -> dict[str, list[RecordedEvent]]:
        """Every event of several streams, read at one point in time (one round trip where possible).

        Returns stream id -> events in version order; streams without events map to [].
        """
        ids = list(dict.fromkeys(_stream_id(s) for s in stream_ids))
        if not ids:
            return {}
        m = self._metrics
        if m is None:
            return self._read_streams(ids)
        run = m._op_start(self, "read", ids)
        try:
            by_stream = self._read_streams(ids)
        except BaseException as exc:
            m._op_end(run, 0, exc)
            raise
        m._op_end(run, sum(map(len, by_stream.values())),
                  None, lambda: {s: (evs[-1].version if evs else 0) for s, evs in by_stream.items()})
        return by_stream

    def stream_version(self, stream_id: str) -> int:
        """A stream's current version (0 if it has no events)."""
        return self.stream_versions([stream_id])[_stream_id(stream_id)]

    def stream_versions(self, stream_ids: Iterable[str]) -> dict[str, int]:
        """Current version of each stream (0 for streams without events)."""
        ids = list(dict.fromkeys(_stream_id(s) for s in stream_ids))
        if not ids:
            return {}
        return self._stream_versions(ids)

    def read_all(
        self,
        *,
        after_position: int = 0,
        types: Iterable[str | type] | None = None,
        stream_prefix: str | None = None,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[RecordedEvent]:
        """Every event after `after_position`, in ascending global position, fetched page by page.

        Filters: `types` (type names or Event classes) and `stream_prefix`.
        A position once returned is never followed by a lower one on a later call.
        """
        # Bounded to int64: the databases' integers (a larger one was an OverflowError or a server error).
        if type(after_position) is not int or not 0 <= after_position <= _INT64_MAX:
            raise ValidationError(f"after_position must be an int in 0..2**63-1, got {after_position!r}")
        if type(page_size) is not int or not 1 <= page_size <= _INT64_MAX:
            raise ValidationError(f"page_size must be an int in 1..2**63-1, got {page_size!r}")
        if limit is not None and (type(limit) is not int or not 0 <= limit <= _INT64_MAX):
            raise ValidationError(f"limit must be an int in 0..2**63-1 or None, got {limit!r}")
        if stream_prefix is not None and (not isinstance(stream_prefix, str) or forbidden_character(stream_prefix)):
            raise ValidationError(
                f"stream_prefix must be a str without control characters, NUL or lone surrogates, got {stream_prefix!r}"
            )
        names = _type_names(types)
        return self._iter_all(after_position, names, stream_prefix or None, limit, page_size)

    def _iter_all(self, after, names, prefix, limit, page_size) -> Iterator[RecordedEvent]:
        remaining = limit
        while remaining is None or remaining > 0:
            n = page_size if remaining is None else min(page_size, remaining)
            m = self._metrics
            if m is None:
                page = self._read_all_page(after, names, prefix, n)
            else:
                run = m._op_start(self, "read_all", None)
                try:
                    page = self._read_all_page(after, names, prefix, n)
                except BaseException as exc:
                    m._op_end(run, 0, exc)
                    raise
                m._op_end(run, len(page), None)
            yield from page
            if len(page) < n:
                return
            after = page[-1].position
            if remaining is not None:
                remaining -= len(page)

    def head_position(self) -> int:
        """The highest global position visible to readers (0 for an empty store)."""
        return self._head_position()

    @abstractmethod
    def _read_stream(self, stream_id: str, from_version: int, limit: int | None) -> list[RecordedEvent]: ...

    @abstractmethod
    def _read_streams(self, stream_ids: list[str]) -> dict[str, list[RecordedEvent]]: ...

    @abstractmethod
    def _stream_versions(self, stream_ids: list[str]) -> dict[str, int]: ...

    @abstractmethod
    def _read_all_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[RecordedEvent]: ...

    @abstractmethod
    def _head_position(self) -> int: ...

    def _read_all_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple]:
        """One page of the feed as stored rows, undecoded (layout codec.ROW_COLUMNS).

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_by_stream(stream_ids: list[str], events: list[RecordedEvent]) -> dict[str, list[RecordedEvent]]:
    """Split position-ordered events of several streams into stream -> events (version order)."""
    out: dict[str, list[RecordedEvent]] = {sid: [] for sid in stream_ids}
    for e in events:
        out[e.stream_id].append(e)
    return out
