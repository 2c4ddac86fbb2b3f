"""The command executor: read every stream, fold, decide, append with every version checked.

One attempt is: one `read_streams` round trip for the declared streams (plus
one per discovery round), a fold in global-position order, the command's pure
`handle`, and one atomic `append` whose expected versions cover every stream
read, written or not. No store lock or transaction is held while user code
runs; a conflict means someone wrote in between, so the attempt is repeated on
fresh state after an exponential, jittered, bounded backoff.
"""
from __future__ import annotations

import bisect
import datetime as _dt
import decimal
import enum
import logging
import math
import operator
import os
import random
import threading
import time
import types
import typing
import uuid
from collections import OrderedDict
from typing import Any

import msgspec

from . import _impl
from .commands import Command, declared_streams, stream_ids_of
from .errors import (
    BusinessRuleViolation,
    CommandTimeoutError,
    ConcurrencyError,
    DuplicateCommandError,
    EventVersionError,
    SerializationError,
    StoreTimeoutError,
    StoreUnavailableError,
    UndeclaredStreamError,
    ValidationError,
)
from .events import EventToWrite, Metadata, RawEvent, RecordedEvent
from .events import _generation as _event_classes_generation
from .metrics import MetricsCollector
from .options import described as _described, seconds
from .stores.base import EventStore, set_command_cache_factory
from .stores.prepare import validate_idempotency_key
from .snapshots import (
    COMMAND_SNAPSHOTS, SNAPSHOT_STATS, SnapshotPolicy, command_name, decode_state, encode_state, policy_of,
    snapshot_key, snapshot_written, state_version_of,
)
from .streams import stream_id as _stream_id

log: logging.Logger = logging.getLogger("eventcore.executor")

#: Discovery rounds per attempt before the command is declared unbounded.
#: A real resolver needs one or two (order -> product lines); 8 is generous.
MAX_DISCOVERY_ROUNDS = 8

#: Default overall timeout of `execute`, seconds (the original EventCore's default too).
DEFAULT_TIMEOUT = 30.0


#: Commands of one process on a common stream run one after the other, not side by side:
#: side by side, all but one would fail their version check and redo the work (with 16
#: threads transferring among 100 accounts, one command in three did). Streams map to
#: this many locks, taken in index order (so two commands never wait for each other in
#: a cycle); 1,024 makes two unrelated streams sharing a lock rare at any thread count
#: this library is used with. Streams found by discover() are not locked: they are
#: checked at the append, as every stream is.
STREAM_LOCK_STRIPES = 1024
_STREAM_LOCKS: list = []


def _new_stream_locks() -> None:
    # Re-entrant: a command that (against advice) runs another on the same stream from its
    # own thread must not hang. Made anew in a forked child: a lock held by another thread
    # at fork time would otherwise never be released there.
    _STREAM_LOCKS[:] = [threading.RLock() for _ in range(STREAM_LOCK_STRIPES)]


_new_stream_locks()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_stream_locks)


class RetryPolicy(msgspec.Struct, frozen=True):
    """How `execute` retries after a version conflict (or a store error that provably wrote nothing).

    Delay before retry n (1-based): uniform in [0, min(max_delay, base_delay * 2**(n-1))]
    ("full jitter"), which spreads racing writers apart fastest.
    """

    max_retries: int = 5
    #: 2 ms: a competing writer's commit takes about one WAL flush (0.25–0.4 ms on
    #: PostgreSQL, a few ms for SQLite's fsync), so the first retry waits a few flushes.
    base_delay: float = 0.002
    #: 200 ms cap keeps a hot stream's losers retrying rather than sleeping.
    max_delay: float = 0.2
    jitter: bool = True

    def __post_init__(self) -> None:
        # No upper bound: a huge max_retries retries until `timeout` (delay() never overflows).
        if type(self.max_retries) is not int or self.max_retries < 0:
            raise ValidationError(f"RetryPolicy.max_retries must be an int >= 0, got {self.max_retries!r}")
        seconds("RetryPolicy.base_delay", self.base_delay, allow_zero=True)
        seconds("RetryPolicy.max_delay", self.max_delay, allow_zero=True)
        if type(self.jitter) is not bool:
            raise ValidationError(f"RetryPolicy.jitter must be True or False, got {self.jitter!r}")

    def delay(self, retry: int) -> float:
        # Capped so the product cannot overflow (2.0 ** 1023 is the largest power of two a float holds):
        # that many retries in, any base_delay worth the name has long reached max_delay.
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(retry - 1, 1023))
        return random.uniform(0, ceiling) if self.jitter else ceiling


NO_RETRY = RetryPolicy(max_retries=0)
DEFAULT_RETRY = RetryPolicy()


class ExecutionResult(msgspec.Struct, frozen=True):
    """What `execute` did: the events it wrote, attempts made, and the version of every stream read.

    `replayed` is True when an earlier execution with the same idempotency key had
    committed: `events` are then the events that execution recorded (nothing new was
    written) and `stream_versions` the versions those events gave their streams.
    """

    events: list[RecordedEvent]
    attempts: int
    stream_versions: dict[str, int]
    replayed: bool = False

    @property
    def position(self) -> int | None:
        """Global position of the last event written, or None if the command emitted nothing."""
        return self.events[-1].position if self.events else None


def _fold(command: Command, by_stream: dict, streams: list) -> Any:
    if len(streams) == 1:
        events = by_stream[streams[0]]
    else:
        events = [e for sid in streams for e in by_stream[sid]]
        events.sort(key=_position)  # runs of sorted events: timsort merges them
    state = command.initial_state()
    apply = command.apply
    for e in events:
        state = apply(state, e)
    return state


_position = operator.attrgetter("position")


# The steps of a command that need the store, yielded by the executor's generators (see _steps) and
# carried out by a driver: `_drive` here, eventcore.aio's for the asyncio stores. So the logic of an
# attempt (fold, decide, validate, cache, retry) exists once, whatever runs its I/O.
#: (READ, stream ids) -> store.read_streams(ids)
READ = "read_streams"
#: (VERSIONS, stream ids) -> store.stream_versions(ids)
VERSIONS = "stream_versions"
#: (RECORDED, key) -> store.recorded_command(key)
RECORDED = "recorded_command"
#: (APPEND, events, expected, metadata, key) -> store.append(events, expected, metadata=..., idempotency_key=...)
APPEND = "append"
#: (SLEEP, seconds) -> time.sleep(seconds)
SLEEP = "sleep"
#: (READ_SNAPSHOT, key, state version, stream ids) -> store._read_after_snapshot(...)
READ_SNAPSHOT = "read_after_snapshot"
#: (SAVE_SNAPSHOT, key, command name, state version, covers, state, events) -> store._save_snapshot(...)
SAVE_SNAPSHOT = "save_snapshot"


class _DirectReads:
    """Reads of a command without a cache: every stream from the store."""

    __slots__ = ()

    def read_streams(self, stream_ids):
        return (yield (READ, stream_ids))


_DIRECT = _DirectReads()


def _read_and_fold(reader, command: Command, streams: list, rounds: list | None = None):
    """Read the streams (one round trip, plus one per discovery round) and fold them (a generator of
    steps, see READ).

    Returns (state, versions of every stream read). Appends one to `rounds` per discovery round:
    after one, the state mixes reads made at different times (see _attempts)."""
    by_stream = yield from reader.read_streams(streams)
    state = _fold(command, by_stream, streams)
    for _ in range(MAX_DISCOVERY_ROUNDS):
        found = command.discover(state)
        if found:
            found = stream_ids_of(found, f"{type(command).__name__}.discover()")
        new = [s for s in dict.fromkeys(_stream_id(x) for x in found) if s not in by_stream] if found else []
        if not new:
            break
        by_stream.update((yield from reader.read_streams(new)))
        if rounds is not None:
            rounds.append(1)
        streams = streams + new
        state = _fold(command, by_stream, streams)
    else:
        raise ValidationError(
            f"{type(command).__name__}.discover() still found new streams after "
            f"{MAX_DISCOVERY_ROUNDS} rounds; discovery must converge"
        )
    return state, {sid: (evs[-1].version if evs else 0) for sid, evs in by_stream.items()}


def _handle(command: Command, state: Any, versions: dict) -> list:
    """The command's decision, checked: emit() items, to streams it read."""
    emitted = command.handle(state)
    out = list(emitted) if emitted is not None else []
    for item in out:
        if type(item) is not EventToWrite:
            raise ValidationError(
                f"{type(command).__name__}.handle() must return ec.emit(stream, event) items, "
                f"got {type(item).__name__}: {item!r}"
            )
        if item.stream_id not in versions:
            raise UndeclaredStreamError(item.stream_id, type(command).__name__, list(versions))
    return out


class _Folded:
    """A command type's folded state over some streams, and the versions it was folded at."""

    __slots__ = ("state", "versions", "valid")

    def __init__(self) -> None:
        self.state: Any = None
        self.versions: dict = {}
        self.valid = False


class _WarmSnapshot:
    """What a StateCache keeps of a snapshotted command: its state as stored (the snapshot's blob, decoded
    afresh for every command), the events of each stream after it (as the cache keeps a stream's
    events) and the versions they end at."""

    __slots__ = ("state_version", "blob", "versions", "tails", "count", "size")

    def __init__(self, state_version: int, blob: bytes, versions: dict, tails: dict) -> None:
        self.state_version, self.blob, self.versions, self.tails = state_version, blob, versions, tails
        self.count = sum(map(len, tails.values()))
        self.size = 0


class StateCache:
    """Bounded, in-process cache of what commands read: `execute(..., cache=cache)`.

    Every store has one by default, `store.command_cache`, made with `reuse_state=False` (see
    below): an exact cache, which `execute` uses unless given another one or `cache=None`.

    It keeps, per store, two things. Per stream: its version and, for streams of at
    most `max_stream_events` events, the events themselves. Per command type and
    streams: the state last folded and the versions it was folded at. A command
    whose streams are all known here skips the read: it reuses the folded state if
    those streams have not moved since, else folds the cached events (a transfer
    between two accounts other commands touched), and goes straight to the
    version-checked append: one round trip in all. Streams not cached are read (only
    those), and remembered. Every append through the cache moves its entries on.

    If anyone else wrote to one of those streams meanwhile, the append's expected
    versions no longer match, nothing is written, the command's streams are
    forgotten and it runs again on state read afresh (that retry is not counted
    against the retry policy). So a decision made on stale state can never commit.

    A decision that writes nothing is made final the same way: when `handle`
    refuses the command, emits nothing, or raises, on state that came from the
    cache, the versions it was made on are checked against the store (one small
    query); if one has moved, the command runs again on state read afresh, as
    after a conflict. So a cached command answers as an uncached one would.

    Entries are per store object (its `instance` number, never reused in the
    process) and are dropped when that store is closed, so one cache may serve
    many stores. The cache assumes that `initial_state()` and
    `apply()` depend only on the events, not on the command's other fields, and
    that `handle()` does not modify the state it is given (the cache keeps it).
    Bounds: `max_entries` streams and as many folded states, least recently used
    evicted first, and at most `max_events` events held in all.

    `reuse_state=False` makes it exact, with no assumption about the command's code: it keeps
    each stream's events as the rows a read returns (immutable values: ids, numbers, the JSON
    text of payloads and metadata) and decodes them afresh for every command, which folds them
    with its own `initial_state()` and `apply()`, as after a read. An event whose data holds only
    immutable values (numbers, strings, UUIDs, datetimes, tuples and frozen structs of them, no
    custom metadata) is kept instead as a copy of what a read returns, and handed out as a new
    shallow copy (nothing in it can change in place). No folded state is kept, no object a
    command was given is given to another, so nothing `handle()` or `apply()` does to what they
    get can reach a later command; the version checks above make every decision as final as
    after a read. It saves the read's round trip for streams of up to `max_stream_events`
    events, at the cost of copying (~0.3 µs) or decoding (~1.5 µs) each of their events per
    command.
    `max_bytes` bounds what an exact cache holds by the size of those rows (their JSON and ~100
    bytes of the rest each); a stream whose rows alone exceed it keeps its version only.

    For a command with snapshots (eventcore.snapshots) on streams longer than it keeps, it keeps
    instead what the command's read gave: the snapshot's state as stored (decoded afresh for every
    command) and the events after it, counted in the same bounds; the next executions fold those
    without a read, under the same checks as above, until the command's `every` events followed
    the snapshot (then a read makes a newer one).
    """

    def __init__(self, max_entries: int = 10_000, max_stream_events: int = 1_000, max_events: int = 200_000,
                 *, reuse_state: bool = True, max_bytes: int | None = None) -> None:
        for name, value in (("max_entries", max_entries), ("max_stream_events", max_stream_events),
                            ("max_events", max_events)):
            if type(value) is not int or value < (1 if name == "max_entries" else 0):
                raise ValidationError(f"{name} must be an int >= {1 if name == 'max_entries' else 0}, got {value!r}")
        if type(reuse_state) is not bool:
            raise ValidationError(f"reuse_state must be a bool, got {reuse_state!r}")
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            raise ValidationError(f"max_bytes must be an int >= 0 or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.max_stream_events = max_stream_events
        self.max_events = max_events
        self.reuse_state = reuse_state
        self._folded: OrderedDict = OrderedDict()
        #: (store.instance, stream id) -> (version, tuple of events or None when not kept)
        self._streams: OrderedDict = OrderedDict()
        self._events = 0
        self._sizes: dict = {}  # key -> bytes of its kept rows (exact caches)
        self._bytes = 0
        #: (store.instance, snapshot key) -> _WarmSnapshot: a snapshotted command's state and the events after it
        self._snapshots: OrderedDict = OrderedDict()
        self._snapshot_events = 0  # of self._events, what the snapshot entries hold
        self._snapshot_bytes = 0
        self._lock = threading.Lock()
        #: Commands served without a read, commands that read, and cache hits that proved stale.
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def __len__(self) -> int:
        """Streams known to the cache."""
        return len(self._streams)

    def clear(self) -> None:
        with self._lock:
            self._folded.clear()
            self._streams.clear()
            self._snapshots.clear()
            self._snapshot_events = self._snapshot_bytes = 0
            self._events = 0
            self._sizes.clear()
            self._bytes = 0

    def _drop_store(self, instance: int) -> None:
        """Forget every entry of one store (called when it closes)."""
        with self._lock:
            for key in [k for k in self._folded if k[0] == instance]:
                del self._folded[key]
            for key in [k for k in self._streams if k[0] == instance]:
                self._forget_key(key)
            for key in [k for k in self._snapshots if k[0] == instance]:
                self._forget_snapshot_key(key)

    def _folded_entry_for(self, store, key) -> "_Folded":
        """The folded-state entry `key` (whose first item is store.instance), registering this cache
        with the store so its entries go when the store closes (a closed store's entry is not kept)."""
        if self not in store._dependants:
            store._dependants.add(self)
        return self._folded_entry(key, store)

    def _folded_entry(self, key, store) -> _Folded:
        with self._lock:
            if store.closed:  # checked under the lock close() drops entries under: none is added after
                return _Folded()
            entry = self._folded.get(key)
            if entry is None:
                entry = self._folded[key] = _Folded()
                while len(self._folded) > self.max_entries:
                    self._folded.popitem(last=False)
            else:
                self._folded.move_to_end(key)
            return entry

    def _versions(self, store, stream_ids) -> dict | None:
        """Cached versions of these streams, or None if one is not cached."""
        sid_key = store.instance
        streams = self._streams
        out = {}
        for sid in stream_ids:
            entry = streams.get((sid_key, sid))
            if entry is None:
                return None
            out[sid] = entry[0]
        return out

    def _events_of(self, store, stream_ids) -> dict:
        """{stream: events} for the streams whose events are cached (exact: decoded afresh)."""
        sid_key = store.instance
        out = {}
        with self._lock:
            for sid in stream_ids:
                key = (sid_key, sid)
                entry = self._streams.get(key)
                if entry is not None and entry[1] is not None:
                    self._streams.move_to_end(key)
                    out[sid] = list(entry[1])
        if not self.reuse_state:
            out = {sid: _handed_out(kept) for sid, kept in out.items()}
        return out

    def _serves(self, store, stream_ids) -> bool:
        """Whether these streams are the cache's to serve (a command with snapshots reads the others
        from its snapshot): every one of them is cached with its events, or known to be at most
        `max_stream_events` long (its first read will keep them)."""
        sid_key = store.instance
        streams = self._streams
        for sid in stream_ids:
            entry = streams.get((sid_key, sid))
            if entry is None or (entry[1] is None and entry[0] > self.max_stream_events):
                return False
        return True

    def _remember_versions(self, store, versions: dict) -> None:
        """Know these streams' versions (not their events) where nothing is cached for them yet."""
        sid_key = store.instance
        with self._lock:
            if store.closed:
                return
            for sid, version in versions.items():
                if (sid_key, sid) not in self._streams:
                    self._set((sid_key, sid), version, None)

    def _kept(self, events, written: bool = False) -> tuple | None:
        """What the cache holds of a stream's events (`written`: by an append, else read): the
        events, or (exact) copies and rows (see _kept_read); None (the version alone) if one cannot
        be laid out as a row, which a read then gives instead."""
        if self.reuse_state:
            return tuple(events)
        try:
            return tuple(map(_kept_written if written else _kept_read, events))
        except Exception:  # noqa: BLE001 - never fail a command (perhaps committed) over its cache entry
            return None

    def _set(self, key, version: int, events, size: int | None = None) -> None:
        """Store one stream's entry (call with the lock held); `size`: its rows' (exact), if known."""
        self._forget_key(key)
        if events is not None and len(events) > self.max_stream_events:
            events = None
        if events is None or self.reuse_state:
            size = 0
        elif size is None:
            size = _rows_size(events)
        if self.max_bytes is not None and size > self.max_bytes:
            events, size = None, 0
        self._streams[key] = (version, events)
        if events is not None:
            self._events += len(events)
        if size:
            self._sizes[key] = size
            self._bytes += size
        self._shrink()

    def _shrink(self) -> None:
        """Evict least recently used entries until the cache is within its bounds (lock held)."""
        while len(self._streams) > self.max_entries:
            self._forget_key(next(iter(self._streams)))
        while len(self._snapshots) > self.max_entries:
            self._forget_snapshot_key(next(iter(self._snapshots)))
        while self._events > self.max_events or (self.max_bytes is not None and self._bytes > self.max_bytes):
            # Only entries that hold something free room: snapshot entries while they hold at least half of
            # what is over its bound, else streams' events. (An entry of a stream's version alone frees
            # nothing, and a snapshot entry is of use only while its streams' versions are known here.)
            if self._events > self.max_events:
                snapshots_first = self._snapshot_events * 2 >= self._events
            else:
                snapshots_first = self._snapshot_bytes * 2 >= self._bytes
            holding = None if snapshots_first and self._snapshots else self._oldest_holding_stream()
            if holding is not None:
                self._forget_key(holding)
            elif self._snapshots:
                self._forget_snapshot_key(next(iter(self._snapshots)))
            else:
                break

    def _oldest_holding_stream(self):
        """The least recently used stream entry that keeps events, or None."""
        for key, entry in self._streams.items():
            if entry[1] is not None:
                return key
        return None

    def _remember_read(self, store, by_stream: dict) -> None:
        sid_key = store.instance
        with self._lock:
            if store.closed:
                return
            for sid, events in by_stream.items():
                self._set((sid_key, sid), events[-1].version if events else 0, self._kept(events))

    def _remember_append(self, store, recorded: list, before: dict) -> None:
        """Move the entries of the streams an append wrote on from `before` (their versions as checked)."""
        written: dict = {}
        for e in recorded:
            written.setdefault(e.stream_id, []).append(e)
        sid_key = store.instance
        with self._lock:
            if store.closed:
                return
            for sid, events in written.items():
                key = (sid_key, sid)
                entry = self._streams.get(key)
                if entry is None or entry[0] != before.get(sid):
                    self._forget_key(key)  # moved by someone else meanwhile: read it afresh next time
                    continue
                kept, size = entry[1], None
                if kept is not None:
                    more = self._kept(events, written=True)
                    if more is None:
                        kept = None
                    else:
                        if not self.reuse_state:  # the rows kept already are counted: add the new ones'
                            size = self._sizes.get(key, 0) + _rows_size(more)
                        kept = kept + more
                self._set(key, events[-1].version, kept, size)

    def _warm_snapshot(self, store, snap: "_Snap", stream_ids) -> tuple | None:
        """A snapshotted command's state from this cache: (state blob, {stream: events after it}, versions),
        if its entry is of the command's state version, its streams have not moved as far as this process
        knows (their entries here are at the entry's versions) and fewer than `snap.every` events came
        after the state (else a read makes a newer snapshot); None otherwise."""
        key = (store.instance, snap.key)
        with self._lock:
            warm = self._snapshots.get(key)
            if warm is None:
                return None
            if warm.state_version != snap.state_version or warm.count >= snap.every or \
                    self._versions(store, stream_ids) != warm.versions:
                self._forget_snapshot_key(key)
                return None
            self._snapshots.move_to_end(key)
            for sid in stream_ids:
                self._streams.move_to_end((store.instance, sid))
            tails = {sid: list(kept) for sid, kept in warm.tails.items()}
            blob, versions = warm.blob, dict(warm.versions)
        if not self.reuse_state:
            tails = {sid: _handed_out(kept) for sid, kept in tails.items()}
        return blob, tails, versions

    def _kept_tails(self, events: list, stream_ids) -> dict | None:
        """What the cache keeps of the events after a snapshot's state ({stream: kept events}), taken before
        a fold sees them (apply() may change an event's data in place); None if one cannot be kept."""
        by_stream: dict = {sid: [] for sid in stream_ids}
        for e in events:
            by_stream[e.stream_id].append(e)
        out = {}
        for sid, evs in by_stream.items():
            kept = self._kept(evs)
            if kept is None:
                return None
            out[sid] = kept
        return out

    def _keep_snapshot(self, store, snap: "_Snap", blob: bytes, tails: dict, versions: dict) -> None:
        """Keep a snapshotted command's state (`blob`) and the events after it (`tails`, see _kept_tails),
        as of `versions` (just read): its next execution folds them without a read (see _warm_snapshot)."""
        sid_key = store.instance
        with self._lock:
            if store.closed:
                return
            for sid, version in versions.items():
                entry = self._streams.get((sid_key, sid))
                if entry is None or entry[0] != version:
                    self._set((sid_key, sid), version, None)
            self._put_snapshot((sid_key, snap.key), _WarmSnapshot(snap.state_version, blob, dict(versions), tails))

    def _snapshot_appended(self, store, snap: "_Snap", recorded: list, before: dict) -> None:
        """Move a snapshot entry on by what its command's append wrote (at `before`, the versions checked)."""
        key = (store.instance, snap.key)
        with self._lock:
            warm = self._snapshots.get(key)
            if warm is None:
                return
            if warm.versions != before or store.closed:
                self._forget_snapshot_key(key)
                return
            more = self._kept(recorded, written=True)
            if more is None or warm.count + len(more) >= snap.every:
                self._forget_snapshot_key(key)  # the next command reads, and makes a newer snapshot
                return
            tails, versions = dict(warm.tails), dict(warm.versions)
            for e, kept in zip(recorded, more):
                if e.stream_id not in tails:
                    self._forget_snapshot_key(key)
                    return
                tails[e.stream_id] = tails[e.stream_id] + (kept,)
                versions[e.stream_id] = e.version
            size = warm.size + (0 if self.reuse_state else _rows_size(more))
            self._put_snapshot(key, _WarmSnapshot(warm.state_version, warm.blob, versions, tails), size)

    def _put_snapshot(self, key, warm: "_WarmSnapshot", size: int | None = None) -> None:
        """Store one snapshot entry (lock held), counted in the cache's bounds like a stream's events;
        `size`: its bytes, if known."""
        self._forget_snapshot_key(key)
        warm.size = size if size is not None else len(warm.blob) + (
            0 if self.reuse_state else sum(map(_rows_size, warm.tails.values())))
        if (self.max_bytes is not None and warm.size > self.max_bytes) or warm.count > self.max_events:
            return  # would push out everything else, then itself
        self._snapshots[key] = warm
        self._events += warm.count
        self._bytes += warm.size
        self._snapshot_events += warm.count
        self._snapshot_bytes += warm.size
        self._shrink()

    def _forget_snapshot_key(self, key) -> None:
        warm = self._snapshots.pop(key, None)
        if warm is not None:
            self._events -= warm.count
            self._bytes -= warm.size
            self._snapshot_events -= warm.count
            self._snapshot_bytes -= warm.size

    def _forget_snapshot(self, store, snap: "_Snap") -> None:
        with self._lock:
            self._forget_snapshot_key((store.instance, snap.key))

    def _forget_key(self, key) -> None:
        entry = self._streams.pop(key, None)
        if entry is not None and entry[1] is not None:
            self._events -= len(entry[1])
            self._bytes -= self._sizes.pop(key, 0)

    def _forget(self, store, stream_ids) -> None:
        sid_key = store.instance
        with self._lock:
            for sid in stream_ids:
                self._forget_key((sid_key, sid))


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_MICROSECOND = _dt.timedelta(microseconds=1)


#: Bytes counted for a kept row besides its JSON: the tuple, its ints, ids and strings.
_ROW_OVERHEAD = 100


def _rows_size(kept) -> int:
    return sum(k[2] if len(k) == 4 else len(k[5]) + len(k[6] or b"") for k in kept) + _ROW_OVERHEAD * len(kept)


#: Field types whose values cannot be changed in place: an event made only of them (and its
#: RecordedEvent, frozen) is handed out as a shallow copy, which shares nothing that can change.
_IMMUTABLE_TYPES = frozenset({int, float, str, bool, bytes, type(None), uuid.UUID, _dt.datetime, _dt.date, _dt.time,
                              _dt.timedelta, decimal.Decimal})
_shareable_cache: dict = {}


def _shareable(cls) -> bool:
    """Whether every field of this Struct class holds an immutable value (see _IMMUTABLE_TYPES)."""
    known = _shareable_cache.get(cls)
    if known is None:
        try:
            known = all(_immutable(f.type, set()) for f in msgspec.structs.fields(cls))
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: decoded afresh instead
            known = False
        _shareable_cache[cls] = known
    return known


def _immutable(tp, seen: set) -> bool:
    if tp in _IMMUTABLE_TYPES or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return True
    if origin is typing.Annotated:
        return _immutable(args[0], seen)
    if origin in (typing.Union, types.UnionType, frozenset):
        return all(_immutable(a, seen) for a in args)
    if origin is tuple:
        return all(a is Ellipsis or _immutable(a, seen) for a in args)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp.__struct_config__.frozen:
        if tp in seen:
            return True
        seen.add(tp)
        return all(_immutable(f.type, seen) for f in msgspec.structs.fields(tp))
    return False


_replace = msgspec.structs.replace


def _kept_read(e: RecordedEvent) -> tuple:
    """What an exact cache keeps of an event a read returned: a copy of it, (COPY, event, bytes of
    its payload and metadata, the event classes' generation), when it shares nothing that can
    change (its data's fields immutable, no custom metadata); else its row."""
    data = e.data
    if not e.metadata.custom and _shareable(type(data)):
        size = len(_impl.encode_event(data)[1]) + len(_impl.encode_metadata(e.metadata) or b"")
        return (_COPY, _copied(e), size, _event_classes_generation[0])
    return _stored_row(e)


def _kept_written(e: RecordedEvent) -> tuple:
    """The same for an event an append wrote: kept as a read will return it, i.e. decoded from its
    row (its data is the object `handle` made, which the stored JSON may not give back alike)."""
    row = _stored_row(e)
    if e.metadata.custom or not _shareable(type(e.data)):
        return row
    return (_COPY, _impl.decode_rows([row])[0], len(row[5]) + len(row[6] or b""), _event_classes_generation[0])


def _copied(e: RecordedEvent) -> RecordedEvent:
    """A new event equal to `e`, sharing only immutable values with it: its data copied without
    running `__post_init__` again (as a read does not), its metadata new (its `custom` empty)."""
    return _replace(e, data=e.data.__copy__(), metadata=_replace(e.metadata, custom={}))


_COPY = "copy"


def _handed_out(kept) -> list:
    """A command's own events from what an exact cache keeps: copies, and rows decoded afresh (a copy
    made before an event class was defined or registered again is decoded from its row, as a
    read would, into the class registered now)."""
    out: list = []
    rows: list = []
    generation = _event_classes_generation[0]
    for item in kept:
        if len(item) == 4 and item[3] == generation:
            if rows:
                out += _impl.decode_rows(rows)
                rows = []
            out.append(_copied(item[1]))
        else:
            rows.append(item if len(item) != 4 else _stored_row(item[1]))
    if rows:
        out += _impl.decode_rows(rows)
    return out


def _stored_row(e: RecordedEvent) -> tuple:
    """An event as a read's row (formats.ROW_COLUMNS), which decode_rows makes the same event of:
    its payload and metadata as their stored JSON, at the type version it was decoded to."""
    return (e.position, e.stream_id, e.version, e.event_id.bytes, e.type, _impl.encode_event(e.data)[1],
            _impl.encode_metadata(e.metadata), (e.recorded_at - _EPOCH) // _MICROSECOND, e.type_version)


class _CachedReads:
    """`read_streams` through a StateCache: cached streams from memory, the rest in one read (`fresh`:
    every stream read), and what is read remembered."""

    __slots__ = ("cache", "store", "reads", "cached", "fresh")

    def __init__(self, cache: StateCache, store, fresh: bool = False) -> None:
        self.cache, self.store, self.reads, self.cached, self.fresh = cache, store, 0, 0, fresh

    def read_streams(self, stream_ids):
        got = {} if self.fresh else self.cache._events_of(self.store, stream_ids)
        self.cached += len(got)
        missing = [s for s in stream_ids if s not in got]
        if missing:
            fresh = yield (READ, missing)
            self.reads += 1
            self.cache._remember_read(self.store, fresh)
            got.update(fresh)
        return {s: got[s] for s in stream_ids}


def _cached_state(cache: StateCache, entry: _Folded, store, command: Command, streams: list, rounds: list):
    """State and versions for one attempt through the cache, and whether any of it came from the
    cache (and so may be stale): the folded state if its streams have not moved as far as this
    process knows, else a fold of cached events and of reads of the streams not cached (one entry
    in `rounds` per discovery round)."""
    if cache.reuse_state and entry.valid and cache._versions(store, entry.versions) == entry.versions:
        found = command.discover(entry.state)
        if found:
            found = stream_ids_of(found, f"{type(command).__name__}.discover()")
        if not found or all(_stream_id(x) in entry.versions for x in found):
            cache.hits += 1
            return entry.state, dict(entry.versions), True
    reader = _CachedReads(cache, store)
    state, versions = yield from _read_and_fold(reader, command, streams, rounds)
    if cache.reuse_state:  # fresh state is worth keeping even if handle() refuses
        entry.state, entry.versions, entry.valid = state, dict(versions), True
    if reader.reads:
        cache.misses += 1
    else:
        cache.hits += 1
    return state, versions, reader.cached > 0


def _fresh_state(cache: StateCache, entry: _Folded, store, command: Command, streams: list, rounds: list):
    """State and versions from a read of every stream (the cache only takes what is read)."""
    entry.valid = False
    reader = _CachedReads(cache, store, fresh=True)
    state, versions = yield from _read_and_fold(reader, command, streams, rounds)
    cache.misses += 1
    if cache.reuse_state:
        entry.state, entry.versions, entry.valid = state, dict(versions), True
    return state, versions


class _Snap:
    """One execution's snapshot settings: where its command's snapshot is stored, and when to write one."""

    __slots__ = ("key", "name", "state_version", "every")

    def __init__(self, command: Command, streams: list, policy: SnapshotPolicy) -> None:
        self.name = command_name(command)
        self.key = snapshot_key(self.name, streams)
        self.state_version = state_version_of(command)
        self.every = policy.every


def _folded_in_order(command: Command, state: Any, tails: dict, streams: list) -> Any:
    if len(streams) == 1:
        events = tails[streams[0]]
    else:
        events = [e for sid in streams for e in tails[sid]]
        events.sort(key=_position)
    apply = command.apply
    for e in events:
        state = apply(state, e)
    return state


def _snapshot_state(snap: _Snap, command: Command, streams: list, rounds: list, cache: "StateCache | None" = None,
                    store: Any = None, warm: bool = False):
    """State and versions of the streams from the command's snapshot and the events after it (a full
    fold when there is no usable snapshot), the snapshot to store once the command is done (or None:
    one is made of this state when at least `every` events were folded beyond the last one), and
    whether the state came from `cache` (`warm`: it may; then it may be stale, see _attempts).

    With a cache, what the read gave is kept there (the snapshot's state and the events after it), and
    while fewer than `every` events follow it, the next execution folds it from the cache without a
    read: one round trip, the version-checked append, as for a short stream."""
    if warm and cache is not None:
        got = cache._warm_snapshot(store, snap, streams)
        if got is not None:
            blob, tails, versions = got
            state: Any = None
            try:
                state = _folded_in_order(command, decode_state(command, blob), tails, streams)
                usable = not command.discover(state)
            except Exception:  # noqa: BLE001 - perhaps stale: the read below decides, and raises it if it holds
                usable = False
            if usable:
                SNAPSHOT_STATS["cached"] += 1
                return state, versions, None, True
            cache._forget_snapshot(store, snap)
    stored, by_stream, froms, fence = yield (READ_SNAPSHOT, snap.key, snap.state_version, streams)
    covers = state = None
    if stored is None:
        SNAPSHOT_STATS["none"] += 1
    elif stored[0] != snap.state_version:
        SNAPSHOT_STATS["stale_state_version"] += 1
        log.debug("%s: snapshot %s made under state version %s, not %s: full fold", type(command).__name__,
                  snap.key, stored[0], snap.state_version)
    else:
        try:
            covers = msgspec.json.decode(stored[1])
            if not isinstance(covers, dict) or set(covers) != set(streams):
                raise ValueError(f"it covers other streams: {covers!r:.200}")
            for sid in streams:
                version, event_id = covers[sid]
                if type(version) is not int or version < 0 or froms[sid] != max(1, version) or type(event_id) is not str:
                    raise ValueError(f"what it covers of {sid!r} is not what was read: {covers[sid]!r:.100}")
            state = decode_state(command, stored[2])
        except Exception as exc:  # noqa: BLE001 - a snapshot is never an error to the caller
            SNAPSHOT_STATS["undecodable"] += 1
            log.debug("%s: snapshot %s cannot be used (%s): full fold", type(command).__name__, snap.key, exc)
            covers = None
    if covers is not None:
        # The last event each stream's snapshot covers was read again: that it is the one folded shows
        # the stream's history is the one the snapshot was made of (a store restored or rebuilt differs).
        for sid in streams:
            version, event_id = covers[sid]
            if version == 0:
                continue
            events = by_stream[sid]
            if not events or events[0].version != version or events[0].event_id.hex != event_id:
                SNAPSHOT_STATS["history_mismatch"] += 1
                log.debug("%s: snapshot %s covers %r up to version %s, which is not the stream's history: full "
                          "fold", type(command).__name__, snap.key, sid, version)
                covers = None
                break
    if covers is None and any(v > 1 for v in froms.values()):
        by_stream = yield (READ, streams)  # read from a snapshot that cannot be used: every event
    if covers is None:
        state = command.initial_state()
        tails = by_stream
        covered: dict[str, Any] = {str(sid): [0, ""] for sid in streams}
    else:
        SNAPSHOT_STATS["used"] += 1
        tails = {sid: (by_stream[sid][1:] if covers[sid][0] else by_stream[sid]) for sid in streams}
        covered = {str(sid): covers[sid] for sid in streams}
    if len(streams) == 1:
        events = tails[streams[0]]
    else:
        events = [e for sid in streams for e in tails[sid]]
        events.sort(key=_position)
    # A snapshot covers only events below the fence (PostgreSQL): one that commits later, at a lower
    # position than some read here, then always comes after what a snapshot covers, as in a full fold.
    cut = len(events) if fence is None else bisect.bisect_left(events, fence, key=_position)
    # What the cache will keep of the events after the state it keeps (see _keep_snapshot), taken before
    # apply() sees them: the events after a newer snapshot, else those after the one read.
    start = cut if cut >= snap.every else 0 if covers is not None else None
    tails_kept = None if cache is None or start is None else cache._kept_tails(events[start:], streams)
    apply = command.apply
    for e in events[:cut]:
        state = apply(state, e)
    blob = None
    if cut >= snap.every:
        blob = encode_state(command, state)  # now: handle() may change the state it is given, apply() too
        for e in events[:cut]:
            covered[str(e.stream_id)] = [e.version, e.event_id.hex]
    for e in events[cut:]:
        state = apply(state, e)
    found = command.discover(state)
    if found:
        # Streams found from the state: a command that discovers reads them all, from the start.
        state, versions = yield from _read_and_fold(_DIRECT, command, streams, rounds)
        return state, versions, None, False
    versions = {sid: (by_stream[sid][-1].version if by_stream[sid] else 0) for sid in streams}
    if cache is not None and tails_kept is not None:
        if blob is not None and start == cut:
            cache._keep_snapshot(store, snap, blob, tails_kept, versions)
        elif blob is None and start == 0 and covers is not None and stored is not None:
            cache._keep_snapshot(store, snap, stored[2], tails_kept, versions)
    if blob is None:
        return state, versions, None, False
    return state, versions, (snap.key, snap.name, snap.state_version, msgspec.json.encode(covered).decode(), blob,
                             sum(entry[0] for entry in covered.values())), False


def _save_snapshot(snapshot: tuple):
    """Store a snapshot: the driver writes it (sync: now; asyncio: in a task of its own, so nothing can
    interrupt a command whose outcome is settled) and a failure costs only the snapshot."""
    yield (SAVE_SNAPSHOT, *snapshot)


def save_snapshot_now(store, snapshot: tuple) -> None:
    """Write a snapshot; a failure is counted and logged, never raised (the command's outcome is settled)."""
    try:
        store._save_snapshot(*snapshot)
    except Exception as exc:  # noqa: BLE001
        snapshot_written(snapshot[0], exc)
    else:
        snapshot_written(snapshot[0], None)


def _confirm_current(versions: dict):
    """Check that the streams a decision was made on are still at `versions` (one small read of their
    versions); raise ConcurrencyError naming the first that moved, as a failed append would."""
    current = yield (VERSIONS, list(versions))
    for sid in sorted(versions):
        if current[sid] != versions[sid]:
            raise ConcurrencyError(
                sid, versions[sid], current[sid],
                f"the state a decision was made on is stale: stream {sid!r} was read at version "
                f"{versions[sid]} and is at version {current[sid]}")


def _remember(entry: _Folded, command: Command, state: Any, recorded: list, versions: dict) -> None:
    """Cache the state after a successful append: it succeeded at exactly the versions
    folded, so folding what it wrote gives the state as stored now."""
    entry.valid = False
    try:
        for e in recorded:
            state = command.apply(state, e)
    except Exception:  # noqa: BLE001 - the events are committed; only the cache entry is lost
        return
    entry.state, entry.versions, entry.valid = state, dict(versions), True


#: Bounds of a store's own exact cache (store.command_cache): the streams of the commands a process
#: runs most, kept as rows (~150-400 bytes for small events); 16 MiB of them at most a store,
#: whatever the events' sizes.
STORE_CACHE_STREAMS = 10_000
STORE_CACHE_STREAM_EVENTS = 1_000
STORE_CACHE_EVENTS = 50_000
STORE_CACHE_BYTES = 16 * 1024 * 1024


class _StoreCacheDefault:
    """The default of `execute(cache=...)`: the store's own cache."""

    def __repr__(self) -> str:
        return "<the store's command_cache>"


STORE_CACHE: Any = _StoreCacheDefault()


def _new_store_cache() -> StateCache:
    return StateCache(STORE_CACHE_STREAMS, STORE_CACHE_STREAM_EVENTS, STORE_CACHE_EVENTS, reuse_state=False,
                      max_bytes=STORE_CACHE_BYTES)


set_command_cache_factory(_new_store_cache)


def execute(
    store: EventStore,
    command: Command,
    *,
    retry: RetryPolicy | None = None,
    metadata: Metadata | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    cache: StateCache | None = STORE_CACHE,
    metrics: MetricsCollector | None = None,
    idempotency_key: str | uuid.UUID | None = None,
    snapshots: SnapshotPolicy | None = COMMAND_SNAPSHOTS,
) -> ExecutionResult:
    """Run a command against a store and return what it wrote.

    Raises BusinessRuleViolation (from `require`, never retried),
    ConcurrencyError (conflicts outlasted `retry.max_retries`),
    UndeclaredStreamError, ValidationError, SerializationError,
    StoreUnavailableError and CommandTimeoutError (`timeout` seconds overall; None for no limit).
    `cache`: the store's exact cache, `store.command_cache`, unless given another `StateCache` (see
    there) or None (read every stream, every time). `metrics`: an `ec.MetricsCollector` for this
    command's counters and hooks (default: the one attached to the store, if any).

    `idempotency_key` (a str of 1-255 characters or a UUID, unique per store): recorded in the
    append's transaction. If a command with this key has already committed, nothing is
    written and its original result comes back (`ExecutionResult.replayed`), also when this
    attempt's `handle` would now refuse the command or emit nothing. So a caller that does not
    know whether a command committed (its process died, or StoreUnavailableError with
    `maybe_committed`) runs it again with the same key; with a key, `execute` itself retries
    such errors within `retry` and `timeout`.

    `snapshots`: an `ec.SnapshotPolicy` to fold the command's streams from a stored snapshot of its
    state (see eventcore.snapshots), None for none; default: the command class's `__snapshots__`.
    """
    policy, timeout, cache, metrics, key, snap = check_arguments(
        EventStore, store, command, retry, metadata, timeout, cache, metrics, idempotency_key, snapshots=snapshots)
    if metrics is None:
        # The unobserved path (or a store observer that does not count commands): no clock read, no allocation.
        return _execute(store, command, policy, metadata, timeout, cache, None, key, snap)
    run = metrics._command_start(command, declared_streams(command))
    try:
        result = _execute(store, command, policy, metadata, timeout, cache, run, key, snap)
    except BaseException as exc:
        metrics._command_end(run, None, exc)
        raise
    metrics._command_end(run, result, None)
    return result


def check_arguments(store_class: type, store: Any, command: Any, retry: Any, metadata: Any, timeout: Any, cache: Any,
                    metrics: Any, idempotency_key: Any, opened_by: str = "ec.connect(...)",
                    snapshots: Any = COMMAND_SNAPSHOTS) -> tuple:
    """`execute`'s arguments checked (the sync one's and eventcore.aio's): (retry policy, timeout, cache,
    metrics collector or None, idempotency key or None, snapshot policy or None)."""
    # Every argument is checked before anything is read or written, so a mistake fails at once,
    # naming the argument, instead of at the first conflict or deadline that happens to use it.
    if not isinstance(store, store_class) or not isinstance(getattr(store, "instance", None), int):
        # (`instance`: what the stream locks and caches key a store by; a proxy registered as an
        # EventStore must forward it.)
        raise ValidationError(f"store must be an eventcore store ({opened_by}), got {_described(store)}")
    if not isinstance(command, Command):
        raise ValidationError(f"command must be an ec.Command instance, got {_described(command)}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValidationError(f"retry must be an ec.RetryPolicy or None, got {_described(retry)}")
    policy = DEFAULT_RETRY if retry is None else retry
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata or None, got {_described(metadata)}")
    if timeout is not None:  # longer than a lock can wait: waits as long as it can (see _execute)
        timeout = seconds("timeout", timeout, maximum=math.inf)
    if cache is STORE_CACHE:
        cache = getattr(store, "command_cache")  # noqa: B009 - any store class (sync or asyncio)
        if cache is not None and not isinstance(cache, StateCache):
            raise ValidationError(f"store.command_cache must be an ec.StateCache or None, got {_described(cache)}")
    elif cache is not None and not isinstance(cache, StateCache):
        raise ValidationError(f"cache must be an ec.StateCache or None, got {_described(cache)}")
    if metrics is not None and not isinstance(metrics, MetricsCollector):
        raise ValidationError(f"metrics must be an ec.MetricsCollector or None, got {_described(metrics)}")
    key = None if idempotency_key is None else validate_idempotency_key(idempotency_key)
    if metrics is None:
        metrics = getattr(store, "_observer", None)
        if not isinstance(metrics, MetricsCollector):
            metrics = None
    snapshot_policy = policy_of(command, snapshots)
    if snapshot_policy is not None and not getattr(store, "supports_snapshots", False):
        snapshot_policy = None  # a backend without snapshots folds every event, as without a policy
    return policy, timeout, cache, metrics, key, snapshot_policy


def _execute(store, command, policy, metadata, timeout, cache, obs, key, snapshots=None) -> ExecutionResult:
    streams = declared_streams(command) if obs is None else obs.streams
    store_key = store.instance
    locks = sorted({hash((store_key, sid)) % STREAM_LOCK_STRIPES for sid in streams})
    held = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for k in locks:
            lock = _STREAM_LOCKS[k]
            # A timeout longer than a lock can wait (threading.TIMEOUT_MAX) waits as long as it can.
            wait = -1 if deadline is None else min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
            if not lock.acquire(timeout=wait):
                raise CommandTimeoutError(
                    f"{type(command).__name__} timed out after {timeout}s waiting for other commands of this "
                    "process on the same streams; nothing was written"
                )
            held.append(lock)
        entry = None if cache is None else cache._folded_entry_for(store, (store_key, type(command), tuple(streams)))
        snap = None if snapshots is None else _Snap(command, streams, snapshots)
        return _drive(store, _steps(store, command, streams, policy, metadata, timeout, deadline, entry, cache, obs,
                                    key, time.monotonic, None, snap))
    finally:
        for lock in reversed(held):
            lock.release()


def _replayed(events: list, attempt: int) -> ExecutionResult:
    """The result of a command whose idempotency key had already committed these events."""
    return ExecutionResult(events, attempt, {e.stream_id: e.version for e in events}, True)


def _drive(store, steps) -> Any:
    """Run a generator of steps (see READ) against a sync store: each step's result sent back into it,
    each step's exception thrown into it. Returns what the generator returns."""
    send, throw = steps.send, steps.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = send(value) if error is None else throw(error)
        except StopIteration as done:
            return done.value
        error = value = None
        op = step[0]
        try:
            if op is READ:
                value = store.read_streams(step[1])
            elif op is APPEND:
                value = store.append(step[1], step[2], metadata=step[3], idempotency_key=step[4])
            elif op is VERSIONS:
                value = store.stream_versions(step[1])
            elif op is RECORDED:
                value = store.recorded_command(step[1])
            elif op is SLEEP:
                time.sleep(step[1])
            elif op is READ_SNAPSHOT:
                value = store._read_after_snapshot(step[1], step[2], step[3])
            else:
                save_snapshot_now(store, step[1:])
        except BaseException as exc:  # noqa: BLE001 - thrown into the steps, which decide
            error = exc


def _steps(store, command, streams, policy, metadata, timeout, deadline, entry, cache, obs, key, clock,
           ambiguous: list | None = None, snap: "_Snap | None" = None):
    """Every attempt of one command, as a generator of steps (see READ); returns its ExecutionResult.
    `clock`: what `deadline` is measured on (time.monotonic, or an event loop's time). `ambiguous`
    collects, under a key, the errors of attempts whose write may have committed."""
    if ambiguous is None:
        ambiguous = []
    try:
        return (yield from _attempts(store, command, streams, policy, metadata, timeout, deadline, entry, cache,
                                     obs, key, ambiguous, clock, snap))
    except (StoreUnavailableError, CommandTimeoutError, ConcurrencyError) as exc:
        # (Not BusinessRuleViolation: the key is looked up before one is raised, so an ambiguous
        # attempt before it did not commit.)
        if not ambiguous or getattr(exc, "maybe_committed", False):
            raise
        # A later attempt's failure must not hide that an earlier one may have committed.
        message = (f"{type(command).__name__}: an attempt's write may have committed (the connection was lost "
                   f"after it was sent: {ambiguous[0]}) and no later attempt could settle it: {exc}. Run the "
                   "command again with the same idempotency key to settle it")
        if isinstance(exc, CommandTimeoutError):
            raise CommandTimeoutError(message, maybe_committed=True) from exc
        raise StoreUnavailableError(message, maybe_committed=True) from exc


def _attempts(store, command, streams, policy, metadata, timeout, deadline, entry, cache, obs, key,
              ambiguous: list, clock, snap):
    attempt = 0
    free_retry_used = False
    while True:
        attempt += 1
        from_cache = False
        rounds: list = []
        versions: dict = {}  # until the read succeeds: a read that fails forgets the declared streams
        snapshot = None  # a snapshot to store once the command is done (see _snapshot_state)
        try:
            if snap is not None and (entry is None or not cache._serves(store, streams)):
                # Streams longer than the cache keeps (or not known yet): from the command's snapshot and
                # the events after it (kept in the cache, see _snapshot_state); the cache learns their
                # versions, so short ones go to it next time.
                state, versions, snapshot, from_cache = yield from _snapshot_state(
                    snap, command, streams, rounds, cache, store, warm=entry is not None and not free_retry_used)
                if entry is not None:
                    cache._remember_versions(store, versions)
            elif entry is None:
                state, versions = yield from _read_and_fold(_DIRECT, command, streams, rounds)
            elif free_retry_used:
                # After a stale cache hit the command's other attempts read every stream (and keep what
                # they read): a stream found only on fresh state may be stale in the cache too, and
                # would cost it a real retry.
                state, versions = yield from _fresh_state(cache, entry, store, command, streams, rounds)
            else:
                try:
                    state, versions, from_cache = yield from _cached_state(cache, entry, store, command, streams,
                                                                            rounds)
                except (StoreUnavailableError, CommandTimeoutError):
                    raise
                except Exception:  # noqa: BLE001 - user code failing on cached state
                    # A fold that fails on cached events may have failed on stale ones: a stream's
                    # cached past joined to another's fresh read is a mix no history had. Final only
                    # on a fresh read, which raises it again if it holds.
                    free_retry_used = True
                    rounds = []
                    state, versions = yield from _fresh_state(cache, entry, store, command, streams, rounds)
            # Streams discovered later were read later: after a discovery round the state is no single
            # point in time, so a decision that writes nothing is confirmed as one made on cached state.
            unconfirmed = from_cache or bool(rounds)
            try:
                events = _handle(command, state, versions)
            except Exception:
                if unconfirmed:  # a refusal (or an error) decided on cached state: final only if it is current
                    yield from _confirm_current(versions)
                raise
            if not events:
                if unconfirmed:  # "nothing to do" decided on cached state: likewise
                    yield from _confirm_current(versions)
                if key is not None:  # perhaps nothing is left to do because this command already ran
                    prior = yield (RECORDED, key)
                    if prior:
                        return _replayed(prior, attempt)
                if snapshot is not None:
                    yield from _save_snapshot(snapshot)
                return ExecutionResult([], attempt, versions)
            if deadline is not None and clock() > deadline:
                raise CommandTimeoutError(
                    f"{type(command).__name__} timed out after {timeout}s ({attempt} attempt(s))"
                    + ("" if ambiguous else "; nothing was written")
                )
            try:
                recorded = yield (APPEND, events, versions, metadata, key)
            except (ValidationError, SerializationError, UndeclaredStreamError):
                if unconfirmed:  # events decided on cached state that cannot be written: as a refusal
                    yield from _confirm_current(versions)
                raise
            # A RawEvent is written in its stored form, and a read gives it back as the class it decodes
            # to (through the upcasters): the cache would hold what no read returns. Its streams are
            # forgotten instead, and read afresh by the next command.
            raw = entry is not None and any(type(e.data) is RawEvent for e in recorded)
            if raw:
                entry.valid = False
                cache._forget(store, {*versions, *(e.stream_id for e in recorded)})
                if snap is not None:
                    cache._forget_snapshot(store, snap)
            elif entry is not None:
                cache._remember_append(store, recorded, versions)
                if snap is not None:
                    cache._snapshot_appended(store, snap, recorded, versions)
            for e in recorded:
                versions[e.stream_id] = e.version
            if entry is not None and not raw and cache.reuse_state:
                _remember(entry, command, state, recorded, versions)
            if snapshot is not None:
                yield from _save_snapshot(snapshot)
            return ExecutionResult(recorded, attempt, versions)
        except ConcurrencyError as exc:
            failure: Exception = exc
            if entry is not None:
                entry.valid = False
                cache._forget(store, versions)
            if from_cache and not free_retry_used:
                # The cached state was stale: read afresh at once, not counted as a retry.
                cache.stale += 1
                free_retry_used = True
                if obs is not None:
                    obs.collector._retry(obs, attempt, "stale_cache", 0.0, exc)
                attempt -= 1
                continue
        except DuplicateCommandError as exc:
            if entry is not None:  # the state read did not include the earlier execution's events
                entry.valid = False
                cache._forget(store, versions)
            return _replayed(exc.events, attempt)
        except StoreUnavailableError as exc:
            if entry is not None:
                entry.valid = False
                cache._forget(store, versions or streams)
            # A write that may have committed is retried only under an idempotency key: the
            # retry then finds the key if it did. A closed store stays closed: no retry.
            if isinstance(exc, StoreTimeoutError) or (exc.maybe_committed and key is None) or store.closed:
                raise
            if exc.maybe_committed:
                ambiguous.append(exc)
            failure = exc
        except EventVersionError:
            # Events newer than this code's classes (a later release wrote them; a rolling deploy). If
            # this very command already ran, its replay needs no read of them.
            if entry is not None:
                entry.valid = False
            if key is not None:
                prior = yield (RECORDED, key)
                if prior:
                    return _replayed(prior, attempt)
            raise
        except BusinessRuleViolation:
            if key is not None:  # refused now perhaps because this very command already ran
                prior = yield (RECORDED, key)
                if prior:
                    return _replayed(prior, attempt)
            raise  # handle() is pure and the state was current: the cached state is still good
        except BaseException:
            if entry is not None:
                entry.valid = False
            raise
        if attempt > policy.max_retries:
            raise failure
        pause = policy.delay(attempt)
        if deadline is not None and clock() + pause > deadline:
            raise CommandTimeoutError(
                f"{type(command).__name__} timed out after {timeout}s ({attempt} attempt(s)); "
                f"last failure: {failure}"
            ) from failure
        if obs is not None:
            obs.collector._retry(
                obs, attempt, "conflict" if isinstance(failure, ConcurrencyError) else "store_error", pause, failure)
        log.debug("%s attempt %d failed, retrying in %.4f s: %s", type(command).__name__, attempt, pause, failure)
        yield (SLEEP, pause)
