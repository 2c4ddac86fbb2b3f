"""`store.ingest`: any number of events streamed into a store, one transaction per batch, resumable.

The input is read lazily, validated item by item, and routed to lanes by stream (crc32 of the id, the
same in every run): each lane has one batch being filled and one in flight on a worker thread, so a
stream's events keep their input order and memory stays bounded whatever the input size. Each batch is
written by the backend's `_ingest_batch` in one transaction, with, under a resume key, how far into the
input its lane has committed and which passed-over items (holes) lie below that count: a second run
with the same key writes what the first did not, and nothing twice. When a batch fails, every batch in
flight is settled before the error reports what is committed.
"""
from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

import msgspec

from ..errors import ConcurrencyError, EventCoreError, ValidationError
from .. import _impl
from ..events import Event, EventToWrite, Metadata, RawEvent, RejectedItem, RowBlock, ValidatedItem
from ..evolution import check_raw_event
from ..expected import ANY, validate_expected
from ..streams import StreamId, stream_id as _stream_id
from .observer import observed
from .prepare import MAX_EVENTS_PER_BATCH, PreparedAppend, validate_idempotency_key


class IngestProgress(msgspec.Struct, frozen=True):
    """What one batch of a resumable ingest records in its own transaction.

    Input items are numbered from 0 in the order the input gives them; a None item (a line the reader
    passed over: blank, or rejected) keeps its number. For each lane, `items` is the count below which
    every item of that lane is committed, except the lane's holes: items that were None when one of
    the lane's batches passed them with its count, and that a later run writes in that lane if they
    are items of it by then. A None item has no stream, so no lane: each lane whose count passes it
    records it, as a hole of its own (another lane may have committed it before it was passed over).

    The backend records it only if the lane's stored count is still `before` and every hole in
    `filled` is still recorded (else ingest_overlap(), writing nothing): so two runs of one ingest
    cannot both write an item."""

    key: str
    lane: int
    lanes: int
    items: int
    before: int
    #: Holes of this lane to record (None items below `items`; one recorded already is left as it is).
    holes: list[int] = []
    #: Recorded holes of this lane that this batch writes (deleted with it, as holes of every lane:
    #: written once, an item is committed whichever lane it would go to in a later run).
    filled: list[int] = []
    #: The lane's first batch in this run: on PostgreSQL it first waits for any other first batch of
    #: the key to commit (an advisory lock), so that a run with another lane count is seen (see
    #: ingest_lanes_differ).
    first: bool = False


def ingest_overlap(progress: "IngestProgress", actual: int | None = None) -> ConcurrencyError:
    """The error of an ingest batch whose resume progress another run moved meanwhile."""
    key, lane, before = progress.key, progress.lane, progress.before
    return ConcurrencyError(
        f"ingest {key!r} lane {lane}", before, before if actual is None else actual,
        f"another run of ingest {key!r} committed part of the input meanwhile (lane {lane}: this run "
        f"expected {before:,} items committed{'' if actual is None else f', found {actual:,}'}); two runs "
        "of one resumable ingest must not overlap: nothing of this batch was written")


def ingest_lanes_differ(progress: "IngestProgress") -> ConcurrencyError:
    """The error of an ingest batch whose key another run records with another lane count: lane k of
    one count is not lane k of another, so both runs would write the same items."""
    key = progress.key
    return ConcurrencyError(
        f"ingest {key!r} lanes", progress.lanes, -1,
        f"another run of ingest {key!r} is writing it with a different parallel (this run: "
        f"{progress.lanes}); two runs of one resumable ingest must not overlap: nothing of this batch was written")


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

    def __reduce__(self) -> tuple[Any, ...]:
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
    """One ingest lane: the batch being filled and the batch in flight. A batch holds events (`evs`) and
    their ec.Metadata (`mds`) or, from RowBlocks, rows already encoded (`types`, `tvs`, `payloads`, and in
    `mds` the metadata's JSON); `sids` either way."""

    __slots__ = ("sids", "evs", "mds", "types", "tvs", "payloads", "start", "last", "pending", "filled")

    def __init__(self) -> None:
        self.sids: list = []
        self.evs: list = []
        self.mds: list = []
        self.types: list = []
        self.tvs: list = []
        self.payloads: list = []
        self.start = 0  # input index of the batch's first item
        self.last = 0  # input index of the batch's last item
        self.pending = None
        self.filled: list = []  # recorded holes (input indexes) this batch writes


#: Most ingest lanes (connections writing at once); past the server's cores more only adds contention.
MAX_INGEST_LANES = 32
#: Distinct stream ids remembered as validated during one ingest before the memo is reset.
_VALID_ID_MEMO = 100_000


def _finish_lanes(lanes: list, done: list, read: int, key: str, parallel: int, new_holes: list, lock, write) -> None:
    """Once every item is read and every batch committed, every lane's count becomes `read`.

    A resumable ingest with several lanes ends with one empty batch per lane whose count is behind
    (a lane that got no items near the end, or none at all): it records the lane's count and its
    holes below it, and writes no event. Then a finished ingest is committed up to its input's end
    in every lane, which a later run of it (a line fixed) reads as such: every item below that is
    committed but the holes, and is passed over without being checked against its class (see
    committed_items). With one lane its count is the input's end already, but for passed-over items
    at the end, which are holes either way."""
    for lane in lanes:
        if lane.pending is not None:
            lane.pending.result()  # raises _BatchFailed: the lanes are not all committed
            lane.pending = None
    for lane_no in range(parallel):
        if done[lane_no] >= read:
            continue
        with lock:
            passed = [h for h in new_holes[lane_no] if h < read]
        progress = IngestProgress(key, lane_no, parallel, read, done[lane_no], passed, [], True)
        done[lane_no] = read
        write([], [], [], read, progress)


def _ingest_item(item, metadata, valid_ids: dict):
    """(stream id, event, metadata) of one ingest item, validated."""
    if type(item) is ValidatedItem:  # a JSON line, validated when it was read
        return item[0], item[1], metadata if item[2] is None else item[2]
    if type(item) is EventToWrite:
        sid, ev, md = item.stream_id, item.event, item.metadata
    elif type(item) is tuple and 2 <= len(item) <= 3:
        sid, ev = item[0], item[1]
        md = item[2] if len(item) == 3 else None
    elif type(item) is RejectedItem:
        raise item.error
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
    if not isinstance(ev, Event) and type(ev) is not RawEvent:
        raise ValidationError(f"not an ec.Event: {type(ev).__name__}")
    if md is None:
        md = metadata
    elif type(md) is not Metadata:
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(md).__name__}")
    return sid, ev, md


def committed_items(store: Any, resume_key: str | None, parallel: int) -> Callable[[int], bool] | None:
    """For a resumed ingest: a predicate telling whether the input item of an index was committed by
    an earlier run (below every lane's count and a hole of none), or None when nothing was. A reader
    passes such items over without checking them against their class (see jsonl.JsonLinesReader)."""
    if resume_key is None:
        return None
    recorded = store._ingest_progress(resume_key)
    below = committed_below(recorded, parallel)
    if below == 0:
        return None
    holes = {item for _, item in store._ingest_holes(resume_key)}
    return lambda index: index < below and index not in holes


def committed_below(recorded: dict[int, tuple[int, int]], parallel: int) -> int:
    """The input index below which an earlier run committed every item but holes, from the progress its
    lanes recorded (store._ingest_progress: lane -> (lanes, count)); 0 when nothing is."""
    if not recorded:
        return 0
    return min(recorded.get(lane, (0, 0))[1] for lane in range(parallel))


def ingest(
    store: Any,
    items: Iterable[Any],
    *,
    batch_size: int = DEFAULT_INGEST_BATCH,
    expected: Mapping[str, int] | None = None,
    metadata: Metadata | None = None,
    on_batch: Callable[[int], object] | None = None,
    parallel: int = 1,
    resume_key: str | None = None,
) -> IngestResult:
    """`EventStore.ingest` (see its documentation) for `store`."""
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_EVENTS_PER_BATCH:
        raise ValidationError(f"batch_size must be an int in 1..{MAX_EVENTS_PER_BATCH}, got {batch_size!r}")
    if type(parallel) is not int or not 1 <= parallel <= MAX_INGEST_LANES:
        raise ValidationError(f"parallel must be an int in 1..{MAX_INGEST_LANES}, got {parallel!r}")
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    # Every item may take it: a value it refuses is refused at the call; RowBlocks take it encoded.
    metadata_json = _impl.encode_metadata(metadata)
    if on_batch is not None and not callable(on_batch):
        raise ValidationError(f"on_batch must be a function or None, got {on_batch!r:.80}")
    checks = {_stream_id(s): validate_expected(s, v) for s, v in (expected or {}).items()}
    done = [0] * parallel  # per lane: input items below this index are committed already (but holes)
    holes: set = set()  # (lane, item): items an earlier run passed over (None) below the lane's count
    if resume_key is not None:
        resume_key = validate_idempotency_key(resume_key, "resume key")
        recorded = store._ingest_progress(resume_key)
        if recorded:
            lanes_before = {n for n, _ in recorded.values()}
            if lanes_before != {parallel}:
                raise ValidationError(
                    f"ingest {resume_key!r} was started with parallel={min(lanes_before)}; resume it with the "
                    f"same parallel (each stream's lane depends on it) or use another resume key")
            for lane_no, (_, items_done) in recorded.items():
                done[lane_no] = items_done
            holes = store._ingest_holes(resume_key)
    # Per lane, holes found by this run that no committed batch of the lane has recorded yet, in input
    # order: a None item at or above a lane's count is a hole of that lane (if it is an item of that
    # lane in a later run, this lane has not written it); below, it is one already or the lane wrote it.
    new_holes: list = [[] for _ in range(parallel)]
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

    observer = store._observer
    ingest_run = None if observer is None else observer.operation_started(store, "ingest", None)

    def write(sids: list, evs: list, mds: list, start: int, progress) -> None:
        with lock:
            moved = [sid for sid in dict.fromkeys(sids) if sid in rebase]
        if moved:
            try:
                current = store.stream_versions(moved)
            except EventCoreError as exc:
                raise _BatchFailed(start, exc) from exc
            with lock:
                for sid in moved:
                    checks[sid] = current[sid]
                    rebase.discard(sid)
        with lock:
            exp = {sid: checks.get(sid, ANY) for sid in dict.fromkeys(sids)}
        if type(evs) is PreparedAppend:  # rows of RowBlocks, encoded on the reading thread (see flush)
            evs.expected, evs.progress = exp, progress  # (every store stamps the time under its write lock)
            call, args = store._append_batch, (evs,)
        else:
            call, args = store._ingest_batch, (sids, evs, mds, exp, progress)
        try:
            if observer is None:
                first, last, after = call(*args)
            else:
                first, last, after = observed(observer, store, "ingest_batch", None, None, call, args,
                                              lambda _: len(sids))
        except EventCoreError as exc:
            raise _BatchFailed(start, exc) from exc
        with lock:
            if progress is not None and progress.holes:
                recorded_holes = set(progress.holes)
                lane_holes = new_holes[progress.lane]
                lane_holes[:] = [h for h in lane_holes if h not in recorded_holes]
            for sid in checks.keys() & after.keys():
                checks[sid] = after[sid]
            if not sids:  # a lane's closing count (see _finish_lanes): no events, not a batch of them
                return
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
                passed = [h for h in new_holes[lane_no] if h < count]
            # No batch in flight before: the lane's first batch of this run.
            progress = IngestProgress(resume_key, lane_no, parallel, count, done[lane_no], passed, lane.filled,
                                      lane.pending is None)
            done[lane_no] = count
        evs: Any
        if lane.payloads:
            # Rows of RowBlocks: the batch's rows made ready here, while the lane's batch in flight is
            # written, so that its worker only sends them (PostgreSQL: frames them into the COPY).
            n = len(lane.sids)
            # As the events and their metadata objects: the payloads and None (a store whose _append_batch
            # goes through _append hands them back in RecordedEvents, of which ingest reads only versions
            # and positions).
            evs = PreparedAppend(lane.sids, lane.types, lane.tvs, lane.payloads, lane.mds, _impl.new_event_ids(n),
                                 lane.payloads, [None] * n, {})
        else:
            evs = lane.evs
        batch = (lane.sids, evs, lane.mds, lane.start, progress)
        lane.sids, lane.evs, lane.mds, lane.filled = [], [], [], []
        lane.types, lane.tvs, lane.payloads = [], [], []
        if lane.pending is not None:
            lane.pending.result()  # one batch in flight per lane: order within the lane, bounded memory
        lane.pending = pool.submit(write, *batch)

    def admit(index: int, sid: StreamId, lane_no: int) -> bool:
        """Whether input item `index` (of stream `sid`, in lane `lane_no`) is to be written by this run:
        not if an earlier run with the resume key committed it (then it is counted as skipped)."""
        nonlocal skipped
        if (lane_no, index) in holes:
            lanes[lane_no].filled.append(index)  # passed over before, an item now: written, once
            return True
        if index < done[lane_no]:
            skipped += 1
            if sid in checks and sid not in rebase:
                # An earlier run wrote this stream (and checked `expected` then): from here
                # on it is checked against the version it has when this run first writes it.
                with lock:
                    rebase.add(sid)
            return False
        return True

    lane_memo: dict = {}  # stream id -> its lane (parallel > 1), bounded like valid_ids

    def lane_of(sid: str) -> int:
        lane_no = lane_memo.get(sid)
        if lane_no is None:
            # A stream's lane must be the same in every run (resume_key): crc32, not hash(),
            # which Python salts per process.
            lane_no = zlib.crc32(sid.encode()) % parallel
            if len(lane_memo) >= _VALID_ID_MEMO:
                lane_memo.clear()
            lane_memo[sid] = lane_no
        return lane_no

    def add_rows(lane_no: int, index: int, block: RowBlock, picked: list | None) -> None:
        """Rows of `block` (input items from `index`; all of them, or the offsets `picked`) into lane
        `lane_no`'s batches, a slice at a time, each batch flushed as it fills."""
        lane = lanes[lane_no]
        total = len(block) if picked is None else len(picked)
        pos = 0
        while pos < total:
            take = min(batch_size - len(lane.sids), total - pos)
            if picked is None:
                a, b = pos, pos + take
                if not lane.sids:
                    lane.start = index + a
                lane.last = index + b - 1
                lane.sids += block.stream_ids[a:b]
                lane.types += block.types[a:b]
                lane.tvs += block.type_versions[a:b]
                lane.payloads += block.payloads[a:b]
                lane.mds += block.metadatas[a:b]
            else:
                rows = picked[pos:pos + take]
                if not lane.sids:
                    lane.start = index + rows[0]
                lane.last = index + rows[-1]
                for column, into in ((block.stream_ids, lane.sids), (block.types, lane.types),
                                     (block.type_versions, lane.tvs), (block.payloads, lane.payloads),
                                     (block.metadatas, lane.mds)):
                    into += [column[i] for i in rows]
            pos += take
            if len(lane.sids) >= batch_size:
                flush(lane_no, lane)

    def place_block(index: int, block: RowBlock) -> None:
        """A RowBlock's rows (input items `index`..) into their lanes: in bulk, unless an earlier run
        with the resume key committed some of them (then row by row, as items)."""
        if metadata_json is not None and None in block.metadatas:
            block.metadatas = [metadata_json if md is None else md for md in block.metadatas]
        if not holes and index >= max(done):
            if parallel == 1:
                add_rows(0, index, block, None)
            else:
                row_lanes = [lane_of(sid) for sid in block.stream_ids]
                for lane_no in range(parallel):
                    picked = [i for i, at in enumerate(row_lanes) if at == lane_no]
                    if picked:
                        add_rows(lane_no, index, block, picked)
            return
        for offset, sid in enumerate(block.stream_ids):
            lane_no = lane_of(sid) if parallel > 1 else 0
            if admit(index + offset, sid, lane_no):
                add_rows(lane_no, index, block, [offset])

    failure: tuple | None = None  # (item index, in a batch?, cause)
    read = 0  # input items read (None items included; a RowBlock counts its rows)
    rows_mode: bool | None = None  # whether the input is RowBlocks (they and other items do not mix)
    try:
        for item in items:
            index = read
            if type(item) is RowBlock:
                read = index + len(item)
                if rows_mode is False:
                    failure = (index, False, ValidationError("ingest takes RowBlocks or items, not both"))
                    break
                rows_mode = True
                place_block(index, item)
                continue
            read = index + 1
            if item is None:  # an input record passed over: it keeps its number
                if resume_key is not None:
                    with lock:
                        for lane_no in range(parallel):
                            if index >= done[lane_no]:
                                new_holes[lane_no].append(index)
                continue
            try:
                sid, ev, md = _ingest_item(item, metadata, valid_ids)
                if rows_mode:
                    raise ValidationError("ingest takes RowBlocks or items, not both")
            except EventCoreError as exc:
                failure = (index, False, exc)
                break
            rows_mode = False
            lane_no = lane_of(sid) if parallel > 1 else 0
            if not admit(index, sid, lane_no):
                continue
            if type(ev) is RawEvent and type(item) is not ValidatedItem:
                # Checked against its class only now that it is to be written: an item an earlier run
                # committed is passed over unchecked (that run checked it against the class of its day,
                # which may have changed since: a resumed ingest must be able to finish).
                try:
                    t, data, tv = check_raw_event(ev)
                except EventCoreError as exc:
                    failure = (index, False, exc)
                    break
                if ev.version != tv:
                    ev = RawEvent(t, data, tv)
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
            if resume_key is not None and parallel > 1:
                _finish_lanes(lanes, done, read, resume_key, parallel, new_holes, lock, write)
    except _BatchFailed as exc:
        failure = (exc.start, True, exc.cause)
    except BaseException as exc:  # e.g. the caller's iterable raised: the span must still end
        if ingest_run is not None:
            observer.operation_ended(ingest_run, state["events"], exc)
        raise
    finally:
        # Settle every batch in flight (they may still commit) before reporting what is committed, or
        # before an error that is not a batch's (on_batch raised, the input raised) leaves.
        unsettled: BaseException | None = None
        for lane in lanes:
            if lane.pending is not None:
                try:
                    lane.pending.result()
                except _BatchFailed as exc:
                    if failure is None:
                        failure = (exc.start, True, exc.cause)
                except BaseException as exc:  # noqa: BLE001 - raised once every lane is settled
                    if unsettled is None:
                        unsettled = exc
                lane.pending = None
        pool.shutdown(wait=True)
    if unsettled is not None:
        if ingest_run is not None and observer is not None:
            observer.operation_ended(ingest_run, state["events"], unsettled)
        raise unsettled
    after = getattr(store, "_after_ingest", None)
    if after is not None:  # the backend's statistics brought up to date (PostgreSQL); never an error
        after(state["events"])
    if ingest_run is not None:
        observer.operation_ended(ingest_run, state["events"], None if failure is None else failure[2])
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
