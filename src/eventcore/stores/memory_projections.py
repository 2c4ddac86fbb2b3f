"""Projection storage of the memory store: checkpoints, dead letters and leader locks in the store object.

The memory store creates one `MemoryProjectionStorage` and keeps it for its lifetime, so every runner
of that store sees the same checkpoints. A batch's checkpoint move and dead letters are applied
together under one lock at commit, after a compare-and-set on the old position; the handler's own
effects are in-process and theirs to make atomic. Live projectors poll (appends wake nobody).
"""
from __future__ import annotations

import datetime as _dt
import threading
from contextlib import contextmanager
from typing import Any

from .projection_storage import (
    CheckpointRecord, LostLeadership, ProjectionSession, ProjectionStorage, as_bytes, effective_state,
)


def _new_checkpoint() -> dict:
    return {"position": 0, "state": "idle", "error": None, "owner": None, "updated_at": None}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class MemoryProjectionStorage(ProjectionStorage):
    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.lock: threading.RLock = threading.RLock()
        self.checkpoints_by_name: dict[str, dict[str, Any]] = {}
        self.dead: dict[tuple[str, int], tuple[Any, ...]] = {}  # (projector, position) -> row (DEAD_LETTER_COLUMNS)
        self.leaders: dict[str, threading.Lock] = {}

    def session(self, name: str, listen: bool = True) -> "MemoryProjectionSession":
        return MemoryProjectionSession(self, name)

    def checkpoints(self, name: str | None, cap: int) -> list[CheckpointRecord]:
        head = self.store.head_position()
        with self.lock:
            items = sorted(self.checkpoints_by_name.items())
            counts: dict = {}
            for projector, _ in self.dead:
                counts[projector] = counts.get(projector, 0) + 1
            found = [(n, dict(cp), counts.get(n, 0), n in self.leaders and self.leaders[n].locked())
                     for n, cp in items if name is None or n == name]
        return [CheckpointRecord(n, cp["position"], head, self.count_after(cp["position"], cap),
                                 effective_state(cp["state"], held), cp["error"], cp["owner"], cp["updated_at"], dead)
                for n, cp, dead, held in found]

    def count_after(self, position: int, cap: int) -> int:
        return min(cap, max(0, self.store.head_position() - position))

    def dead_letters(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [row for (n, _), row in sorted(self.dead.items()) if n == name]


class MemoryProjectionSession(ProjectionSession):
    storage: MemoryProjectionStorage

    def __init__(self, storage: MemoryProjectionStorage, name: str) -> None:
        super().__init__(storage, name)
        with storage.lock:
            self.leader: threading.Lock = storage.leaders.setdefault(name, threading.Lock())
        self.held: bool = False
        self._ops: list | None = None
        self._expect: int | None = None

    def try_acquire(self) -> bool:
        self.held = self.leader.acquire(blocking=False)
        return self.held

    def release(self) -> None:
        if self.held:
            self.held = False
            self.leader.release()

    def close(self) -> None:
        self.release()

    def load(self) -> int:
        with self.storage.lock:
            return self.storage.checkpoints_by_name.setdefault(self.name, _new_checkpoint())["position"]

    @contextmanager
    def transaction(self):
        self._ops, self._expect = [], None
        try:
            yield self
            storage = self.storage
            with storage.lock:  # all or nothing: the compare-and-set first, then every write
                cp = storage.checkpoints_by_name[self.name]
                if self._expect is not None and cp["position"] != self._expect:
                    raise LostLeadership(f"checkpoint of {self.name!r} is at {cp['position']}, "
                                         f"expected {self._expect}")
                for op in self._ops:
                    op()
        finally:
            self._ops = None

    def advance(self, old: int, new: int) -> None:
        def op():
            cp = self.storage.checkpoints_by_name[self.name]
            cp["position"] = new
            cp["updated_at"] = _now()
        self._expect = old
        self._ops.append(op)

    def dead_letter(self, row: tuple[Any, ...], error: str, attempts: int) -> None:
        position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
        record = (position, sid, version, bytes(event_id), type_name, as_bytes(data),
                  None if metadata is None else as_bytes(metadata), recorded_us, type_version, error, attempts,
                  _now())
        self._ops.append(lambda: self.storage.dead.__setitem__((self.name, position), record))

    def reset(self) -> None:
        def op():
            storage = self.storage
            storage.checkpoints_by_name[self.name]["position"] = 0
            for key in [k for k in storage.dead if k[0] == self.name]:
                del storage.dead[key]
        self._ops.append(op)

    def set_state(self, state: str, error: str | None, owner: str | None) -> None:
        with self.storage.lock:
            cp = self.storage.checkpoints_by_name.setdefault(self.name, _new_checkpoint())
            cp.update(state=state, error=error, owner=owner, updated_at=_now())
