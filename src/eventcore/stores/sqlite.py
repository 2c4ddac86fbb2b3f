"""Embedded SQLite store (`sqlite:///path`): the default backend, durable, no server needed.

WAL journal, `synchronous=FULL` by default (an acknowledged append survives a
power cut; `?synchronous=normal` trades that for speed), one connection per
thread, several processes may share one file. Writers serialise on SQLite's
database write lock (`BEGIN IMMEDIATE`), so versions are checked and positions
assigned under that lock: positions are in commit order and a reader of the
feed can never skip an event. Events are immutable: triggers reject UPDATE and
DELETE.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from contextlib import contextmanager
from importlib import resources
from urllib.parse import quote

import msgspec

from .. import _impl
from ..errors import (
    DuplicateCommandError, NotAnEventStoreError, SchemaVersionError, StoreNotFoundError, StoreTimeoutError,
    StoreUnavailableError, ValidationError,
)
from ..events import RecordedEvent
from ..options import boolean, seconds
from .base import EventStore, group_by_stream
from .ingest import ingest_lanes_differ, ingest_overlap
from .prepare import PreparedAppend
from .sqlite_projections import SQLiteProjectionStorage

log: logging.Logger = logging.getLogger("eventcore.store.sqlite")

#: 1: events and immutability triggers; 2: command_keys (idempotency keys) and ingest_progress;
#: 3: the header's application_id, ingest_holes, and the projection tables (made with the store, not
#: by the first projection); 4: each event's type version (events.type_version, also in dead letters);
#: 5: ingest holes recorded per lane (ingest_holes.lane, see _holes_per_lane); 6: snapshots.
SCHEMA_VERSION = 6

#: Columns added to a table after it was first made: (table, column, declaration). CREATE TABLE IF NOT
#: EXISTS leaves an older store's table as it is, so an upgrade adds these where they are missing
#: (ALTER TABLE ... ADD COLUMN with a constant default: no row is rewritten).
_ADDED_COLUMNS = (
    ("events", "type_version", "INTEGER NOT NULL DEFAULT 1 CHECK (type_version BETWEEN 1 AND 32767)"),
    ("projection_dead_letters", "type_version", "INTEGER NOT NULL DEFAULT 1"),
)

#: Seconds between tries of a refused switch to WAL (see SQLiteStore._switch_to_wal): the switch that
#: got in holds the file for a few milliseconds.
WAL_SWITCH_RETRY = 0.005

#: Written to the database header (`PRAGMA application_id`, bytes 68-71): the file is an eventcore
#: store. b"EvCo" as a big-endian integer. Another application's file never carries it, so eventcore
#: never takes one for its own (and never adds its tables, triggers or WAL mode to it).
APPLICATION_ID = int.from_bytes(b"EvCo", "big")
#: The immutability triggers on `events`: with it and a schema version, the mark of a store written
#: before application_id existed.
_OWN_TRIGGERS = {"events_are_immutable_update", "events_are_immutable_delete"}

#: Where an upgrade keeps an ingest_holes table of schema 3 or 4 (no lane column) while the new one is
#: made and filled (see _holes_per_lane).
_LANE_LESS_HOLES = "ingest_holes_without_lanes"


def _set_aside_lane_less_holes(conn: sqlite3.Connection) -> bool:
    """Rename an ingest_holes table without a lane column (its primary key changes, which SQLite can
    only do by making the table anew), so that the schema's statements make the new one; whether
    there was one."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ingest_holes)")}
    if not columns or "lane" in columns:
        return False
    conn.execute(f"ALTER TABLE ingest_holes RENAME TO {_LANE_LESS_HOLES}")
    return True


def _holes_per_lane(conn: sqlite3.Connection) -> None:
    """Copy the holes of the set-aside table into the new one, each to every lane of its key (a hole
    recorded before holes had lanes held for every lane), and drop the old table."""
    lanes = dict(conn.execute("SELECT key, max(lanes) FROM ingest_progress GROUP BY key").fetchall())
    rows = [(key, lane, item) for key, item in conn.execute(f"SELECT key, item FROM {_LANE_LESS_HOLES}")
            for lane in range(lanes.get(key, 1))]
    conn.executemany("INSERT OR IGNORE INTO ingest_holes (key, lane, item) VALUES (?, ?, ?)", rows)
    conn.execute(f"DROP TABLE {_LANE_LESS_HOLES}")


def _schema_statements() -> list[str]:
    """The statements of sqlite_schema.sql, each whole: lines are gathered until SQLite says the
    text is a complete statement (a trigger's body holds ';' of its own)."""
    text = resources.files(__package__).joinpath("sqlite_schema.sql").read_text(encoding="utf-8")
    statements, pending = [], []
    for line in text.splitlines():
        if not pending and (not line.strip() or line.startswith("--")):
            continue
        pending.append(line)
        if sqlite3.complete_statement("\n".join(pending)):
            statements.append("\n".join(pending).strip().rstrip(";"))
            pending = []
    if pending:
        raise RuntimeError("sqlite_schema.sql ends inside a statement")
    return statements


#: The schema's statements (sqlite_schema.sql, package data), in order, then the header's mark.
_SCHEMA_STATEMENTS = (*_schema_statements(), f"PRAGMA application_id = {APPLICATION_ID}")

_COLUMNS = "position, stream_id, version, event_id, type, data, metadata, recorded_at, type_version"

# Stream ids travel as one JSON array parameter (json_each), so each statement
# has one fixed text and stays in sqlite3's statement cache whatever the number of streams.
# A stream's version as one MAX per stream: SQLite answers `MAX(version) ... WHERE stream_id = ?` from the
# end of the (stream_id, version) index, where a GROUP BY over the streams read every entry of each
# (an append to a 100,000-event stream: 12 ms, not 0.6). A stream without events reads 0.
_SQL_VERSIONS = (
    "SELECT value, COALESCE((SELECT MAX(version) FROM events WHERE stream_id = value), 0) FROM json_each(?)"
)
_SQL_VERSIONS_AND_HEAD = _SQL_VERSIONS + " UNION ALL SELECT NULL, MAX(position) FROM events"
_SQL_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SQL_TYPES = "SELECT type, type_version, count(*) FROM events GROUP BY type, type_version ORDER BY type, type_version"
_SQL_READ_STREAM = f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND version >= ? ORDER BY version LIMIT ?"
_SQL_READ_STREAMS = (
    f"SELECT {_COLUMNS} FROM events WHERE stream_id IN (SELECT value FROM json_each(?)) ORDER BY position"
)
_SQL_HEAD = "SELECT COALESCE(MAX(position), 0) FROM events"
#: Milliseconds a snapshot write waits for another process's write lock: about one commit's fsync.
SNAPSHOT_BUSY_TIMEOUT_MS = 20
# CROSS JOIN: SQLite keeps the streams as the outer loop, so each is read by the (stream_id, version)
# index from its version on (the planner otherwise scanned a 100,000-event stream whole: 12 ms, not 0.2).
_SQL_READ_STREAMS_FROM = (
    "SELECT " + ", ".join(f"events.{c.strip()}" for c in _COLUMNS.split(",")) + " FROM (SELECT json_extract(value, '$[0]') AS f_sid, "
    "json_extract(value, '$[1]') AS f_v FROM json_each(?)) AS f CROSS JOIN events "
    "WHERE events.stream_id = f.f_sid AND events.version >= f.f_v ORDER BY events.position"
)
_SQL_LOAD_SNAPSHOT = "SELECT state_version, covers, state FROM command_snapshots WHERE key = ?"
_SQL_SAVE_SNAPSHOT = (
    "INSERT INTO command_snapshots (key, command, state_version, covers, state, events, written_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET command = excluded.command, "
    "state_version = excluded.state_version, covers = excluded.covers, state = excluded.state, "
    "events = excluded.events, written_at = excluded.written_at "
    # The latest stays: a slower command's older snapshot (fewer events covered) does not replace it.
    "WHERE excluded.events >= command_snapshots.events OR excluded.state_version IS NOT command_snapshots.state_version"
)
# Cast: a row someone wrote by hand is listed as well as it can be, never a traceback.
_SQL_SNAPSHOT_ROWS = (
    "SELECT CAST(key AS TEXT), CAST(command AS TEXT), CAST(state_version AS INTEGER), length(state), "
    "CAST(events AS INTEGER), CAST(written_at AS REAL) / 1000000.0 FROM command_snapshots ORDER BY key"
)
_SQL_KEY_USED = "SELECT 1 FROM command_keys WHERE key = ?"
_SQL_RECORD_KEY = "INSERT INTO command_keys (key, first_position, event_count, recorded_at) VALUES (?, ?, ?, ?)"
_SQL_RECORDED_COMMAND = (
    f"SELECT {_COLUMNS} FROM events, (SELECT first_position AS f, event_count AS c FROM command_keys WHERE key = ?) "
    "WHERE position >= f AND position < f + c ORDER BY position"
)
# Compare-and-set: written only if the stored count is the one this run last saw (see PreparedAppend.progress).
_SQL_RECORD_PROGRESS = (
    "INSERT INTO ingest_progress (key, lane, lanes, items, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key, lane) DO UPDATE SET lanes = excluded.lanes, items = excluded.items, "
    "updated_at = excluded.updated_at WHERE items = ?"
)
_SQL_INGEST_PROGRESS = "SELECT lane, lanes, items FROM ingest_progress WHERE key = ?"
_SQL_OTHER_LANES = "SELECT 1 FROM ingest_progress WHERE key = ? AND lanes <> ? LIMIT 1"
_SQL_INGEST_HOLES = "SELECT lane, item FROM ingest_holes WHERE key = ?"
_SQL_OWN_HOLES = ("SELECT count(*) FROM ingest_holes WHERE key = ? AND lane = ? "
                  "AND item IN (SELECT value FROM json_each(?))")
# An item written is committed whichever lane it would go to later: its holes of every lane go.
_SQL_FILL_HOLES = "DELETE FROM ingest_holes WHERE key = ? AND item IN (SELECT value FROM json_each(?))"
_SQL_RECORD_HOLES = "INSERT OR IGNORE INTO ingest_holes (key, lane, item) SELECT ?, ?, value FROM json_each(?)"
# Keys by prefix: substr, not LIKE, so '%' and '_' in a key are plain characters.
_SQL_RESUME_KEYS = (
    "SELECT key FROM ingest_progress WHERE substr(key, 1, ?) = ? GROUP BY key ORDER BY max(updated_at) DESC, key"
)


def _read_all_sql(with_types: bool, with_prefix: bool) -> str:
    sql = f"SELECT {_COLUMNS} FROM events WHERE position > ?"
    if with_types:
        sql += " AND type IN (SELECT value FROM json_each(?))"
    if with_prefix:
        sql += " AND substr(stream_id, 1, ?) = ?"
    return sql + " ORDER BY position LIMIT ?"


_SQL_READ_ALL = {(t, p): _read_all_sql(t, p) for t in (False, True) for p in (False, True)}

_json = msgspec.json.Encoder(enc_hook=str)  # StreamId is a str subclass msgspec does not know
_SYNCHRONOUS = {"off", "normal", "full", "extra"}


def _json_list(items) -> str:
    return _json.encode(list(items)).decode()


class SQLiteStore(EventStore):
    """Events in one SQLite file. Thread-safe and multi-process safe.

    `timeout` (seconds) bounds how long a writer waits for another writer's lock
    before StoreUnavailableError.
    """

    scheme = "sqlite"

    def __init__(self, path: str, *, timeout: float = 10.0, synchronous: str = "full", migrate: bool = True) -> None:
        if not path or path == ":memory:":
            raise ValidationError("sqlite store needs a file path (sqlite:///events.db); use memory:// for a throwaway store")
        synchronous = str(synchronous).lower()
        if synchronous not in _SYNCHRONOUS:
            raise ValidationError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}")
        timeout = seconds("timeout", timeout, text=True)
        migrate = boolean("migrate", migrate)
        self.path: str = os.path.abspath(path)
        self.timeout = timeout
        self.synchronous = synchronous
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._busy: set = set()  # connections a thread is running a statement on (see _acquire)
        self._conns_lock = threading.Lock()
        self._write_lock = _write_lock_for(self.path)
        _after_fork_reset.add(self)
        # Looked at before any connection is opened on it: SQLite would create a missing file, and a
        # connection to another application's WAL database may checkpoint it when it closes.
        found = inspect_file(self.path)
        if found != "store" and not migrate:
            raise StoreNotFoundError(
                f"no eventcore store at {self.path!r}: "
                + ("the file does not exist" if found == "missing" else "the database is empty")
                + " (nothing was created; the first write creates one: ec.connect(url), whose migrate=True is the "
                "default, or `eventcore ingest`)")
        if found == "missing" and not os.path.isdir(os.path.dirname(self.path)):
            raise StoreUnavailableError(
                f"cannot create SQLite store {self.path!r}: directory {os.path.dirname(self.path)!r} does not exist")
        try:
            if migrate:
                self._init_schema()
            else:
                self._check_schema()
        except BaseException:
            self.close()
            raise
        log.info("opened SQLite store %s (synchronous=%s)", self.path, synchronous)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def _schema_versions(self):
        return self._query("PRAGMA user_version", ())[0][0], SCHEMA_VERSION

    def _projection_storage(self) -> SQLiteProjectionStorage:
        return SQLiteProjectionStorage(self)

    # -- connections ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.closed:
            raise StoreUnavailableError(f"{self!r} is closed")
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        with self._conns_lock:
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        return conn if conn is not None else self._connect()

    def _acquire(self) -> sqlite3.Connection:
        """This thread's connection, marked busy until _release. close() closes only connections no
        thread is using (closing one under a running statement crashes the interpreter); a busy one is
        closed by its own thread in _release. No lock: set.add/discard are atomic, and the order (mark
        busy, then look at `closed`; close() sets `closed`, then looks at what is busy) means a
        connection is either skipped by close() or never used after it."""
        conn = self._conn()
        busy = self._busy
        busy.add(conn)
        if self.closed:
            busy.discard(conn)
            raise StoreUnavailableError(f"{self!r} is closed")
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        self._busy.discard(conn)
        if self.closed:
            try:
                conn.close()  # close() may have skipped it while it was busy (closing twice is harmless)
            except sqlite3.Error:
                pass

    def _reset_after_fork(self) -> None:
        # A SQLite connection must not be used across fork(): the child opens its own.
        self._local = threading.local()
        self._conns = []
        self._busy = set()
        self._conns_lock = threading.Lock()
        self._write_lock = _write_lock_for(self.path)

    def _init_schema(self) -> None:
        """Create or upgrade the schema, under the write lock, after checking again (another process may
        have written the file since inspect_file looked) that the file is an eventcore store or empty.
        A new file gets its schema and application_id before it switches to WAL, so they are in the
        main file's header at once (inspect_file reads it there)."""
        conn = self._conn()
        try:
            with immediate_transaction(conn):
                found = classify(conn, self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"{self.path!r} has schema version {version}, newer than this eventcore "
                        f"understands ({SCHEMA_VERSION}); upgrade eventcore", version, SCHEMA_VERSION)
                if found == "empty" or version < SCHEMA_VERSION:
                    if found == "store":
                        log.info("upgrading SQLite store %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
                    lane_less = _set_aside_lane_less_holes(conn)
                    for statement in _SCHEMA_STATEMENTS:
                        conn.execute(statement)
                    if lane_less:
                        _holes_per_lane(conn)
                    for table, column, declaration in _ADDED_COLUMNS:
                        have = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
                        if column not in have:
                            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {declaration}')
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._switch_to_wal(conn)
        except sqlite3.Error as exc:
            raise _store_error(exc, f"cannot initialise SQLite store {self.path!r}") from exc

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """WAL journal mode, once per file. The switch needs the file to itself: when several processes
        open a new store at once, SQLite refuses all but one at once (SQLITE_BUSY without waiting,
        to avoid a deadlock between readers that each want it), so a refused switch is tried again
        until the store's timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(WAL_SWITCH_RETRY)
        if str(mode).lower() != "wal":
            raise StoreUnavailableError(f"cannot switch {self.path!r} to WAL journal mode (got {mode!r})")

    def _check_schema(self) -> None:
        """For a store opened with migrate=False: its schema must be the one this eventcore needs."""
        version = self._query("PRAGMA user_version", ())[0][0]
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path!r} has schema version {version}, this eventcore needs {SCHEMA_VERSION}: "
                + ("upgrade eventcore" if version > SCHEMA_VERSION else
                   "open it once with migrate=True (the default) to upgrade it"), version, SCHEMA_VERSION)

    def close(self) -> None:
        self.closed = True  # before looking at what is busy (see _acquire)
        with self._conns_lock:
            conns = [c for c in self._conns if c not in self._busy]  # the busy ones close themselves
            self._conns = []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
        super().close()

    # -- writing -------------------------------------------------------------------

    def _append(self, p: PreparedAppend) -> list[RecordedEvent]:
        # Threads of one process queue on a Python lock rather than on SQLite's busy
        # handler, which sleeps in steps of up to 100 ms: with 8 threads on the deposit
        # workload this cut P99 from 134 ms to 17 ms and max from 735 ms to 45 ms.
        with self._write_lock:
            conn = self._acquire()
            try:
                return self._append_locked(conn, p)
            finally:
                self._release(conn)

    def _append_locked(self, conn: sqlite3.Connection, p: PreparedAppend) -> list[RecordedEvent]:
        try:
            with immediate_transaction(conn):
                if p.key is not None and conn.execute(_SQL_KEY_USED, (p.key,)).fetchone():
                    raise DuplicateCommandError(p.key)
                current = {}
                head = 0
                for sid, v in conn.execute(_SQL_VERSIONS_AND_HEAD, (_json_list(p.expected),)):
                    if sid is None:
                        head = v or 0
                    else:
                        current[sid] = v
                _impl.check_expected_versions(p.expected, current)
                versions = _impl.assign_versions(p.stream_ids, current)
                positions = range(head + 1, head + 1 + len(p))
                # Stamped under the write lock: a stream's later versions never carry an earlier time.
                at = p.recorded_at_us = time.time_ns() // 1000
                conn.executemany(
                    _SQL_INSERT,
                    [
                        (pos, sid, v, eid, t, data, md, at, tv)
                        for pos, sid, v, eid, t, data, md, tv in zip(
                            positions, p.stream_ids, versions, p.event_ids, p.types, p.payloads, p.metadatas,
                            p.type_versions,
                        )
                    ],
                )
                if p.key is not None and len(p):
                    conn.execute(_SQL_RECORD_KEY, (p.key, head + 1, len(p), at))
                progress = p.progress
                if progress is not None:
                    key = progress.key
                    # Under the write lock: every other run's progress is committed or not begun.
                    if conn.execute(_SQL_OTHER_LANES, (key, progress.lanes)).fetchone() is not None:
                        raise ingest_lanes_differ(progress)
                    if conn.execute(_SQL_RECORD_PROGRESS, (key, progress.lane, progress.lanes, progress.items, at,
                                                           progress.before)).rowcount != 1:
                        raise ingest_overlap(progress)
                    if progress.filled:
                        filled = _json_list(progress.filled)
                        if conn.execute(_SQL_OWN_HOLES, (key, progress.lane, filled)).fetchone()[0] != len(
                                progress.filled):
                            raise ingest_overlap(progress)  # another run wrote one of these items meanwhile
                        conn.execute(_SQL_FILL_HOLES, (key, filled))
                    if progress.holes:
                        conn.execute(_SQL_RECORD_HOLES, (key, progress.lane, _json_list(progress.holes)))
        except sqlite3.Error as exc:
            # A failed COMMIT in SQLite leaves nothing behind, so the outcome is never ambiguous.
            raise _store_error(exc, f"SQLite append failed on {self.path!r}; nothing was written") from exc
        return p.recorded(versions, positions)

    # -- reading -------------------------------------------------------------------

    def _query(self, sql: str, params: tuple) -> list:
        conn = self._acquire()
        try:
            return self._query_on(conn, sql, params)
        finally:
            self._release(conn)

    def _query_on(self, conn: sqlite3.Connection, sql: str, params: tuple) -> list:
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "Could not decode to UTF-8" not in str(exc):
                raise _store_error(exc, f"SQLite read failed on {self.path!r}") from exc
            # A stored row holds TEXT that is not UTF-8 (written by something other than eventcore):
            # read it again keeping the bad bytes as surrogates, to name the row in a typed error.
            from ..errors import SerializationError

            conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
            try:
                rows = conn.execute(sql, params).fetchall()
            except sqlite3.Error as again:
                raise _store_error(again, f"SQLite read failed on {self.path!r}") from again
            finally:
                conn.text_factory = str
            for row in rows:
                for i, value in enumerate(row):
                    if isinstance(value, str):
                        try:
                            value.encode("utf-8")
                        except UnicodeEncodeError:
                            where = (f"at position {row[0]!r} (stream {row[1]!r}, version {row[2]!r})"
                                     if len(row) == 9 else f"{row[:3]!r}")  # 9: an events row (ROW_COLUMNS)
                            raise SerializationError(
                                f"corrupt stored row {where}: column {i} holds text that is not UTF-8: {value[:60]!r}"
                            ) from None
            return rows
        except sqlite3.Error as exc:
            raise _store_error(exc, f"SQLite read failed on {self.path!r}") from exc

    def _recorded_command_rows(self, key):
        return self._query(_SQL_RECORDED_COMMAND, (key,))

    def _ingest_progress(self, key):
        return {lane: (lanes, items) for lane, lanes, items in self._query(_SQL_INGEST_PROGRESS, (key,))}

    def _ingest_holes(self, key):
        return {(lane, item) for lane, item in self._query(_SQL_INGEST_HOLES, (key,))}

    def _resume_keys(self, prefix):
        return [key for (key,) in self._query(_SQL_RESUME_KEYS, (len(prefix), prefix))]

    def _read_stream(self, stream_id, from_version, limit, raw=False):
        rows = self._query(_SQL_READ_STREAM, (stream_id, from_version, -1 if limit is None else limit))
        return _impl.decode_rows(rows, raw)

    def _read_streams(self, stream_ids, raw=False):
        rows = self._query(_SQL_READ_STREAMS, (_json_list(stream_ids),))
        return group_by_stream(stream_ids, _impl.decode_rows(rows, raw))

    supports_snapshots = True

    def _read_streams_from(self, from_versions, raw=False):
        pairs = msgspec.json.encode([[str(sid), max(v, 1)] for sid, v in from_versions.items()]).decode()
        rows = self._query(_SQL_READ_STREAMS_FROM, (pairs,))
        return group_by_stream(list(from_versions), _impl.decode_rows(rows, raw))

    def _load_snapshot(self, key):
        rows = self._query(_SQL_LOAD_SNAPSHOT, (key,))
        return tuple(rows[0]) if rows else None

    def _save_snapshot(self, key, command, state_version, covers, state, events):
        # Only when the database is free at once: a snapshot is worth a write, never a wait (another
        # thread's or process's write lock would hold the command up for the busy timeout).
        params = (key, command, state_version, covers, state, events, int(time.time() * 1_000_000))
        if not self._write_lock.acquire(blocking=False):
            raise StoreTimeoutError(f"snapshot not written: another thread of this process is writing {self.path!r}")
        try:
            conn = self._acquire()
            try:
                conn.execute(f"PRAGMA busy_timeout = {SNAPSHOT_BUSY_TIMEOUT_MS}")
                try:
                    with immediate_transaction(conn):
                        conn.execute(_SQL_SAVE_SNAPSHOT, params)
                finally:
                    conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.Error as exc:
                raise _store_error(exc, f"SQLite snapshot write failed on {self.path!r}") from exc
            finally:
                self._release(conn)
        finally:
            self._write_lock.release()

    def _snapshot_rows(self):
        return [(k, c, sv, n, ev, at / 1_000_000) for k, c, sv, n, ev, at in self._query(_SQL_SNAPSHOT_ROWS, ())]

    def _drop_snapshots(self, command, before=None):
        params = (command, command, None if before is None else int(before * 1_000_000))
        with self._write_lock:
            conn = self._acquire()
            try:
                with immediate_transaction(conn):
                    return conn.execute("DELETE FROM command_snapshots WHERE (? IS NULL OR command = ?) "
                                        "AND (?3 IS NULL OR written_at < ?3)", params).rowcount
            except sqlite3.Error as exc:
                raise _store_error(exc, f"SQLite snapshot drop failed on {self.path!r}") from exc
            finally:
                self._release(conn)

    def _stream_versions(self, stream_ids):
        out = dict.fromkeys(stream_ids, 0)
        out.update(self._query(_SQL_VERSIONS, (_json_list(stream_ids),)))
        return out

    def _read_all_page(self, after, types, prefix, limit, raw=False):
        return _impl.decode_rows(self._read_all_rows(after, types, prefix, limit), raw)

    def _type_counts(self):
        return self._query(_SQL_TYPES, ())

    def _head_position(self):
        return self._query(_SQL_HEAD, ())[0][0]

    def _read_all_rows(self, after, types, prefix, limit):
        """Like `_read_all_page`, but the stored rows undecoded (layout formats.ROW_COLUMNS)."""
        params: list = [after]
        if types is not None:
            params.append(_json_list(types))
        if prefix is not None:
            params += [len(prefix), prefix]
        params.append(limit)
        return self._query(_SQL_READ_ALL[types is not None, prefix is not None], tuple(params))


_SQLITE_HEADER = b"SQLite format 3\x00"


def inspect_file(path: str) -> str:
    """What is at `path`, without opening a SQLite connection that could change it: "missing", "empty"
    (a file of 0 bytes or a database without tables) or "store" (an eventcore store). Anything else
    raises NotAnEventStoreError, and the file is left exactly as it was."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise StoreUnavailableError(f"cannot read {path!r}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise NotAnEventStoreError(f"{path!r} is a directory, not an eventcore store")
    if not stat.S_ISREG(mode):  # a FIFO would block the read below; a device is nobody's store
        raise NotAnEventStoreError(f"{path!r} is not a regular file, so not an eventcore store")
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise StoreUnavailableError(f"cannot read {path!r}: {exc.strerror}") from None
    if not header:
        return "empty"
    if len(header) < 100 or not header.startswith(_SQLITE_HEADER):
        raise NotAnEventStoreError(
            f"{path!r} is not a SQLite database, so not an eventcore store; it was left as it was")
    if int.from_bytes(header[68:72], "big") == APPLICATION_ID:
        return "store"
    # No application id in the header: an eventcore store made before schema 3 (or whose id is still in
    # its WAL), an empty database, or another application's. Look inside, read-only: `immutable` reads
    # the main file without creating the -wal and -shm files a read-only WAL connection leaves behind;
    # with a WAL file present its content counts, so read through it (its -shm is there already), and
    # a rollback journal means a writer is busy with the file: read it with locks too.
    busy = os.path.exists(path + "-wal") or os.path.exists(path + "-journal")
    try:
        conn = sqlite3.connect(f"file:{quote(path, safe='/')}?{'mode=ro' if busy else 'immutable=1'}", uri=True,
                               timeout=10)
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"cannot open {path!r} to inspect it: {exc}") from None
    try:
        return classify(conn, path)
    except sqlite3.OperationalError as exc:  # locked, or a writer's journal in the way: try again later
        raise StoreUnavailableError(f"cannot inspect {path!r} now: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise NotAnEventStoreError(f"{path!r} is not a readable SQLite database ({exc}); it was left as it was") from None
    finally:
        conn.close()


def classify(conn: sqlite3.Connection, path: str) -> str:
    """"empty" or "store" for the database `conn` is open on; NotAnEventStoreError for another
    application's database."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    objects = conn.execute("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view', 'trigger')").fetchall()
    if app_id == APPLICATION_ID:
        return "store"
    tables = {name for kind, name in objects if kind == "table"}
    triggers = {name for kind, name in objects if kind == "trigger"}
    if app_id == 0 and not objects and version == 0:
        return "empty"
    # Made by an eventcore from before application_id: its events table with the immutability triggers
    # and its schema version. Other tables may be there too (read models a projection wrote into the
    # store's file, ANALYZE's statistics): the store is still eventcore's.
    if app_id == 0 and 1 <= version < SCHEMA_VERSION and "events" in tables and _OWN_TRIGGERS <= triggers:
        return "store"
    owner = f"SQLite application_id {app_id:#x}" if app_id else f"tables {sorted(tables)[:6]}"
    raise NotAnEventStoreError(
        f"{path!r} is another application's SQLite database ({owner}), not an eventcore store; eventcore "
        "refuses it and left it as it was (point the URL at a new file to create a store)")


_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


def _store_error(exc: sqlite3.Error, what: str) -> StoreUnavailableError:
    """StoreTimeoutError when another connection held the lock past the busy timeout, else
    StoreUnavailableError. A failed SQLite statement or COMMIT leaves nothing behind."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(exc):
        return StoreTimeoutError(f"{what}: the database stayed locked past the busy timeout: {exc}")
    return StoreUnavailableError(f"{what}: {exc}")


@contextmanager
def commit_or_roll_back(conn: sqlite3.Connection):
    """End the open transaction: `COMMIT` after the block; on any error, including a failed
    COMMIT, roll back if it is still open and re-raise."""
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def immediate_transaction(conn: sqlite3.Connection):
    """`BEGIN IMMEDIATE` (the database write lock, taken now), then as commit_or_roll_back."""
    conn.execute("BEGIN IMMEDIATE")
    with commit_or_roll_back(conn):
        yield conn


def _write_lock_for(path: str) -> threading.Lock:
    """One lock per database file per process, shared by every store object opened on it."""
    with _write_locks_guard:
        lock = _write_locks.get(path)
        if lock is None:
            lock = _write_locks[path] = threading.Lock()
        return lock


class _ForkRegistry:
    def __init__(self) -> None:
        self._stores: "weakref.WeakSet[SQLiteStore]" = weakref.WeakSet()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def add(self, store: SQLiteStore) -> None:
        self._stores.add(store)

    def _reset(self) -> None:
        # A lock held by another thread at fork() stays held forever in the child: start afresh.
        global _write_locks_guard
        _write_locks.clear()
        _write_locks_guard = threading.Lock()
        for store in list(self._stores):
            store._reset_after_fork()


_after_fork_reset = _ForkRegistry()
