"""In-memory store (`memory://`): the contract with nothing durable, for tests and benchmarks.

Events are kept encoded, exactly as a database would hold them, and decoded on
read, so serialization behaves as on every other backend. One lock guards the
whole store; it is held only for version checks and list appends, never while
decoding.
"""
from __future__ import annotations

import threading
import time

from .. import _impl
from ..errors import DuplicateCommandError, StoreUnavailableError
from ..events import RecordedEvent
from .base import EventStore, group_by_stream
from .ingest import ingest_lanes_differ, ingest_overlap
from .memory_projections import MemoryProjectionStorage
from .prepare import PreparedAppend


class MemoryStore(EventStore):
    scheme = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple] = []  # row layout of formats.ROW_COLUMNS; index = position - 1
        self._streams: dict[str, list[int]] = {}  # stream -> row indexes, version order
        self._keys: dict[str, tuple[int, int]] = {}  # idempotency key -> (first position, events)
        self._progress: dict[str, dict[int, tuple[int, int]]] = {}  # ingest resume key -> lane -> (lanes, items)
        self._holes: dict[str, set] = {}  # ingest resume key -> (lane, input item) passed over (see IngestProgress)
        self._progress_order: dict[str, int] = {}  # ingest resume key -> appends so far when last written
        self._projections = MemoryProjectionStorage(self)  # checkpoints live as long as the events
        self._snapshots: dict[str, tuple] = {}  # key -> (command, state_version, covers, state, events, at)

    def __repr__(self) -> str:
        return "MemoryStore()"

    def _open(self) -> None:
        """Raise if the store was closed: a closed store refuses every operation, as on every backend."""
        if self.closed:
            raise StoreUnavailableError(f"{self!r} is closed")

    @property
    def url(self) -> str:
        return "memory://"

    def _projection_storage(self) -> MemoryProjectionStorage:
        return self._projections

    def _append(self, p: PreparedAppend) -> list[RecordedEvent]:
        self._open()
        streams = self._streams
        with self._lock:
            if p.key is not None and p.key in self._keys:
                raise DuplicateCommandError(p.key)
            current = {sid: len(streams.get(sid, ())) for sid in p.expected}
            _impl.check_expected_versions(p.expected, current)
            progress = p.progress
            holes: set = set()
            if progress is not None:
                if any(n != progress.lanes for n, _ in self._progress.get(progress.key, {}).values()):
                    raise ingest_lanes_differ(progress)
                stored = self._progress.get(progress.key, {}).get(progress.lane, (progress.lanes, 0))[1]
                if stored != progress.before:
                    raise ingest_overlap(progress, stored)
                holes = self._holes.setdefault(progress.key, set())
                filled = {(progress.lane, item) for item in progress.filled}
                if not holes.issuperset(filled):
                    raise ingest_overlap(progress)
            versions = _impl.assign_versions(p.stream_ids, current)
            rows = self._rows
            first = len(rows) + 1
            positions = range(first, first + len(p))
            # Stamped under the write lock: a stream's later versions never carry an earlier time.
            at = p.recorded_at_us = time.time_ns() // 1000
            for sid, v, pos, eid, t, data, md, tv in zip(
                p.stream_ids, versions, positions, p.event_ids, p.types, p.payloads, p.metadatas, p.type_versions
            ):
                rows.append((pos, sid, v, eid, t, data, md, at, tv))
                idx = streams.get(sid)
                if idx is None:
                    idx = streams[sid] = []
                idx.append(pos - 1)
            if p.key is not None and len(p):
                self._keys[p.key] = (first, len(p))
            if progress is not None:
                self._progress.setdefault(progress.key, {})[progress.lane] = (progress.lanes, progress.items)
                if progress.filled:  # written: committed whichever lane it would go to later
                    items = set(progress.filled)
                    holes.difference_update([h for h in holes if h[1] in items])
                holes.update((progress.lane, item) for item in progress.holes)
                self._progress_order[progress.key] = len(rows)
        return p.recorded(versions, positions)

    def _recorded_command_rows(self, key):
        self._open()
        with self._lock:
            found = self._keys.get(key)
            return [] if found is None else self._rows[found[0] - 1: found[0] - 1 + found[1]]

    def _ingest_progress(self, key):
        self._open()
        with self._lock:
            return dict(self._progress.get(key, {}))

    def _ingest_holes(self, key):
        self._open()
        with self._lock:
            return set(self._holes.get(key, ()))

    def _resume_keys(self, prefix):
        self._open()
        with self._lock:
            keys = [k for k in self._progress if k.startswith(prefix)]
            return sorted(keys, key=self._progress_order.__getitem__, reverse=True)

    supports_snapshots = True

    def _load_snapshot(self, key):
        self._open()
        with self._lock:
            found = self._snapshots.get(key)
        return None if found is None else found[1:4]

    def _save_snapshot(self, key, command, state_version, covers, state, events):
        self._open()
        with self._lock:
            old = self._snapshots.get(key)
            if old is None or events >= old[4] or state_version != old[1]:  # the latest stays
                self._snapshots[key] = (command, state_version, covers, state, events, time.time())

    def _snapshot_rows(self):
        self._open()
        with self._lock:
            return [(k, c, sv, len(st), ev, at) for k, (c, sv, _, st, ev, at) in sorted(self._snapshots.items())]

    def _drop_snapshots(self, command, before=None):
        self._open()
        with self._lock:
            keys = [k for k, v in self._snapshots.items()
                    if (command is None or v[0] == command) and (before is None or v[5] < before)]
            for k in keys:
                del self._snapshots[k]
        return len(keys)

    def _read_streams_from(self, from_versions, raw=False):
        self._open()
        with self._lock:
            idx = [i for sid, v in from_versions.items() for i in self._streams.get(sid, ())[max(v, 1) - 1:]]
            rows = [self._rows[i] for i in sorted(idx)]
        return group_by_stream(list(from_versions), _impl.decode_rows(rows, raw))

    def _read_stream(self, stream_id, from_version, limit, raw=False):
        self._open()
        with self._lock:
            idx = self._streams.get(stream_id, ())
            stop = None if limit is None else from_version - 1 + limit
            rows = [self._rows[i] for i in idx[from_version - 1 : stop]]
        return _impl.decode_rows(rows, raw)

    def _read_streams(self, stream_ids, raw=False):
        self._open()
        with self._lock:
            idx = [i for sid in stream_ids for i in self._streams.get(sid, ())]
            rows = [self._rows[i] for i in sorted(idx)]
        return group_by_stream(stream_ids, _impl.decode_rows(rows, raw))

    def _stream_versions(self, stream_ids):
        self._open()
        with self._lock:
            return {sid: len(self._streams.get(sid, ())) for sid in stream_ids}

    def _read_all_page(self, after, types, prefix, limit, raw=False):
        return _impl.decode_rows(self._read_all_rows(after, types, prefix, limit), raw)

    def _type_counts(self):
        self._open()
        counts: dict = {}
        with self._lock:
            for row in self._rows:
                key = (row[4], row[8])
                counts[key] = counts.get(key, 0) + 1
        return [(t, v, n) for (t, v), n in sorted(counts.items())]

    def _head_position(self):
        self._open()
        with self._lock:
            return len(self._rows)

    def _read_all_rows(self, after, types, prefix, limit):
        """Like `_read_all_page`, but the stored rows undecoded (layout formats.ROW_COLUMNS)."""
        self._open()
        out = []
        with self._lock:
            rows = self._rows
            for i in range(after, len(rows)):
                row = rows[i]
                if types is not None and row[4] not in types:
                    continue
                if prefix is not None and not row[1].startswith(prefix):
                    continue
                out.append(row)
                if len(out) >= limit:
                    break
        return out
