"""Projection storage of the SQLite store: checkpoint and dead-letter tables in the store's file.

The tables (`projection_checkpoints`, `projection_dead_letters`) are made with the store (schema 3,
see sqlite.py). Each running projector has its own connection to the file; a batch is one
`BEGIN IMMEDIATE` transaction on it holding the handler's read-model writes (`ctx.connection`) and
the checkpoint's compare-and-set. The leader lock is an exclusive `flock` on
`<database>.projection-<hash of name>.lock` (msvcrt's lock on Windows), dropped by the OS when the
process dies. Live projectors poll: SQLite has no way to wake another process.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sqlite3
from contextlib import contextmanager
from typing import Any

from .projection_storage import (
    CheckpointRecord, LostLeadership, ProjectionSession, ProjectionStorage, StoreFailed, as_bytes, effective_state,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

_NOW = "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"
_ENSURE = "INSERT OR IGNORE INTO projection_checkpoints (name) VALUES (?)"
_LOAD = "SELECT position FROM projection_checkpoints WHERE name = ?"
_ADVANCE = f"UPDATE projection_checkpoints SET position = ?, updated_at = {_NOW} WHERE name = ? AND position = ?"
_DEAD_LETTER = (
    "INSERT OR REPLACE INTO projection_dead_letters (projector, position, stream_id, version, event_id, type, "
    f"data, metadata, recorded_at, type_version, error, attempts, failed_at) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NOW})"
)
_RESET = f"UPDATE projection_checkpoints SET position = 0, updated_at = {_NOW} WHERE name = ?"
_CLEAR_DEAD = "DELETE FROM projection_dead_letters WHERE projector = ?"
_STATE = f"UPDATE projection_checkpoints SET state = ?, error = ?, owner = ?, updated_at = {_NOW} WHERE name = ?"
_CHECKPOINTS = (
    "SELECT name, position, state, error, owner, updated_at, "
    "(SELECT count(*) FROM projection_dead_letters d WHERE d.projector = c.name) "
    "FROM projection_checkpoints c ORDER BY name"
)
_DEAD_LETTERS = (
    "SELECT position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version, error, "
    "attempts, failed_at FROM projection_dead_letters WHERE projector = ? ORDER BY position"
)
_COUNT_AFTER = "SELECT count(*) FROM (SELECT 1 FROM events WHERE position > ? LIMIT ?)"


def _connect(store) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(store.path, timeout=store.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous = {store.synchronous}")  # the tables are the store's own (schema 3)
    except sqlite3.Error as exc:
        raise StoreFailed(f"cannot open the projection tables in {store.path!r}: {exc}") from exc
    return conn


def _timestamp(text: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(text) if text else None


class SQLiteProjectionStorage(ProjectionStorage):
    def session(self, name: str, listen: bool = True) -> "SQLiteProjectionSession":
        return SQLiteProjectionSession(self, name)

    def _select(self, sql: str, params=()) -> list:
        """A statement on a connection of its own, closed after (a listing never holds the file open)."""
        conn = _connect(self.store)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def checkpoints(self, name: str | None, cap: int) -> list[CheckpointRecord]:
        head = self.store.head_position()
        out = []
        for n, position, state, error, owner, updated, dead in self._select(_CHECKPOINTS):
            if name is not None and n != name:
                continue
            held = self.session(n).lock_held()
            out.append(CheckpointRecord(n, position, head, self.count_after(position, cap),
                                        effective_state(state, held), error, owner, _timestamp(updated), dead))
        return out

    def count_after(self, position: int, cap: int) -> int:
        return self.store._query(_COUNT_AFTER, (position, cap))[0][0]

    def dead_letters(self, name: str) -> list[tuple[Any, ...]]:
        return [(*r[:11], _timestamp(r[11])) for r in self._select(_DEAD_LETTERS, (name,))]


class SQLiteProjectionSession(ProjectionSession):
    """A projector's batches on SQLite: `connection` is the store file's sqlite3 connection."""

    connection: sqlite3.Connection | None

    def __init__(self, storage: SQLiteProjectionStorage, name: str) -> None:
        super().__init__(storage, name)
        self._lock_file: int | None = None

    def open(self) -> None:
        self.connection = _connect(self.store)
        self._lock_file = None

    def close(self) -> None:
        self.release()
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _lock_path(self) -> str:
        # The real path: every process (whatever its working directory, through whichever
        # symlink it opened the database) locks the same file.
        path = os.path.realpath(self.store.path)
        return f"{path}.projection-{hashlib.sha256(self.name.encode()).hexdigest()[:16]}.lock"

    def try_acquire(self) -> bool:
        fd = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return False
        self._lock_file = fd
        return True

    def release(self) -> None:
        fd, self._lock_file = self._lock_file, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def lock_held(self) -> bool:
        """Does an instance (in any process) hold this projector's lock now?"""
        if not os.path.exists(self._lock_path()):
            return False
        if self.try_acquire():
            self.release()
            return False
        return True

    def _run(self, sql, params=()):
        try:
            return self.connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreFailed(f"SQLite projection statement failed on {self.store.path!r}: {exc}") from exc

    def load(self) -> int:
        self._run(_ENSURE, (self.name,))
        return self._run(_LOAD, (self.name,))[0][0]

    @contextmanager
    def transaction(self):
        conn = self.connection
        self._run("BEGIN IMMEDIATE")  # errors become StoreFailed
        try:
            yield self
            conn.execute("COMMIT")
        except BaseException:  # the handler's error or a failed COMMIT: nothing of the batch stays
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def advance(self, old: int, new: int) -> None:
        if self.connection.execute(_ADVANCE, (new, self.name, old)).rowcount != 1:
            raise LostLeadership(f"checkpoint of {self.name!r} is no longer at {old}")

    def dead_letter(self, row: tuple[Any, ...], error: str, attempts: int) -> None:
        position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
        self.connection.execute(_DEAD_LETTER, (
            self.name, position, sid, version, bytes(event_id), type_name, as_bytes(data),
            None if metadata is None else as_bytes(metadata), recorded_us, type_version, error, attempts))

    def reset(self) -> None:
        self.connection.execute(_RESET, (self.name,))
        self.connection.execute(_CLEAR_DEAD, (self.name,))

    def set_state(self, state: str, error: str | None, owner: str | None) -> None:
        self._run(_ENSURE, (self.name,))
        self._run(_STATE, (state, error, owner, self.name))
