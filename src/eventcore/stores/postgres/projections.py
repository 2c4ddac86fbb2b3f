"""Projection storage of the PostgreSQL store (the contract: projection_storage; the runner: eventcore.projections).

One dedicated connection per running projector does everything: it holds the
leader lock (a session advisory lock, so the server drops it the moment the
process dies or the connection breaks), LISTENs for appends, reads the feed and
runs each batch's transaction — the handler's read-model writes and the
checkpoint's compare-and-set commit together. Because the batch runs on the
connection that holds the lock, an instance that lost its connection cannot
commit anything afterwards; the compare-and-set on the old checkpoint catches
anything else. Tables and the NOTIFY trigger come from migration 3 (sql/migrations/).
Listings (status, dead letters, pending counts) and `eventcore tail` use the store's pool.
"""
from __future__ import annotations

import select
import threading
import time
import uuid
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg_pool import PoolTimeout

from ...errors import EventCoreError, StoreUnavailableError
from ..projection_storage import (
    CheckpointRecord, LostLeadership, ProjectionSession, ProjectionStorage, Refused, StoreFailed, effective_state,
)
from . import sql as pg_sql
from .connections import _one_line, _session_options

#: Seed of the 64-bit hash that keys a projector's session advisory lock: hashtextextended(key, LOCK_SEED).
#: The append path keys its stream locks with seed 0, so no stream id can name a projector's lock.
LOCK_SEED = 0x65637072  # 'ecpr'

_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, %s))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended(%s, %s))"
# A bigint advisory key shows in pg_locks as classid (high 32 bits), objid (low 32 bits), objsubid 1.
_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended({key}, {seed}))"
)
_ENSURE = "INSERT INTO {s}.projection_checkpoints (name) VALUES (%s) ON CONFLICT (name) DO NOTHING"
_LOAD = "SELECT position FROM {s}.projection_checkpoints WHERE name = %s"
_ADVANCE = "UPDATE {s}.projection_checkpoints SET position = %s, updated_at = now() WHERE name = %s AND position = %s"
_RESET = "UPDATE {s}.projection_checkpoints SET position = 0, updated_at = now() WHERE name = %s"
_CLEAR_DEAD = "DELETE FROM {s}.projection_dead_letters WHERE projector = %s"
_STATE = ("UPDATE {s}.projection_checkpoints SET state = %s, error = %s, owner = %s, "
          "listening_until = CASE WHEN %s THEN now() + make_interval(secs => %s) END, "
          "updated_at = now() WHERE name = %s")
_RENEW = "UPDATE {s}.projection_checkpoints SET listening_until = now() + make_interval(secs => %s) WHERE name = %s"
# Unfenced on purpose: committed events the fenced reads cannot see yet (an index probe).
_BEYOND = "SELECT EXISTS (SELECT 1 FROM {s}.events WHERE position > %s)"
_UNLISTEN = "UPDATE {s}.projection_checkpoints SET listening_until = NULL WHERE name = %s"
_CHANNEL = "SELECT 'eventcore_events_' || to_regclass(%s)::oid::text"
_COUNT_AFTER = "SELECT count(*) FROM (SELECT 1 FROM {s}.events WHERE position > %s AND position < " + pg_sql.FENCE + \
    " LIMIT %s) p"
_DEAD_LETTER = (
    "INSERT INTO {s}.projection_dead_letters (projector, position, stream_id, version, event_id, type, data, "
    "metadata, recorded_at, error, attempts) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, "
    "'epoch'::timestamptz + %s * interval '1 microsecond', %s, %s) "
    "ON CONFLICT (projector, position) DO UPDATE SET error = excluded.error, attempts = excluded.attempts, "
    "failed_at = now()"
)
_DEAD_LETTERS = (
    "SELECT position, stream_id, version, uuid_send(event_id), type, data::text, metadata::text, "
    "(extract(epoch FROM recorded_at) * 1000000)::bigint, error, attempts, failed_at "
    "FROM {s}.projection_dead_letters WHERE projector = %s ORDER BY position"
)
_STATUS = (
    "WITH f AS MATERIALIZED (SELECT " + pg_sql.FENCE + " AS fence), "
    # The fence as a scalar subquery (an index condition): max() reads one index entry, backwards.
    "h AS MATERIALIZED (SELECT coalesce((SELECT max(position) FROM {s}.events "
    "WHERE position < (SELECT fence FROM f)), 0) AS head) "
    "SELECT c.name, c.position, h.head, "
    "(SELECT count(*) FROM (SELECT 1 FROM {s}.events e, f WHERE e.position > c.position AND e.position < f.fence "
    "LIMIT %(cap)s) p), "
    "c.state, c.error, c.owner, c.updated_at, "
    "(SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projector = c.name), "
    + _LOCK_HELD.format(key="%(prefix)s || c.name", seed="%(seed)s") + " "
    "FROM {s}.projection_checkpoints c, h WHERE (%(name)s::text IS NULL OR c.name = %(name)s) ORDER BY c.name"
)


def _window_sql(with_types: bool, with_prefix: bool) -> str:
    """A filtered page bounded by a window: `bound` = the position of the %(k)s+1-th event after the
    cursor when it is below the fence (else NULL: fewer than that many events lie below the fence,
    the window reaches it), then the matching events up to it. Both ranges are index conditions,
    so a selective filter costs at most the window, never a scan up to the fence. The window's end
    is found without the fence (a fence condition whose value the planner cannot see can make it
    prefer a bitmap scan of the whole range, then a sort). One statement: one snapshot, one fence.
    The first row always carries the bound (with NULL columns when nothing matched)."""
    filters = (" AND type = ANY(%(types)s::text[])" if with_types else "") + (
        " AND starts_with(stream_id, %(prefix)s)" if with_prefix else "")
    return (
        f"WITH f AS MATERIALIZED (SELECT {pg_sql.FENCE} AS fence), "
        "k AS MATERIALIZED (SELECT (SELECT position FROM {s}.events WHERE position > %(after)s "
        "ORDER BY position OFFSET %(k)s LIMIT 1) AS kth), "
        "w AS MATERIALIZED (SELECT CASE WHEN k.kth < f.fence THEN k.kth END AS bound FROM k, f), "
        f"m AS MATERIALIZED (SELECT {pg_sql.COLUMNS} FROM {{s}}.events WHERE position > %(after)s "
        "AND position < (SELECT fence FROM f) "
        "AND position <= coalesce((SELECT bound FROM w), 9223372036854775807)"
        f"{filters} ORDER BY position LIMIT %(limit)s) "
        "SELECT w.bound, m.* FROM w LEFT JOIN m ON true ORDER BY m.position"
    )


#: A filtered page looks at most this many events (times the page size, at least WINDOW_MIN) after the cursor.
WINDOW_PAGES = 10
WINDOW_MIN = 1000


def _key_prefix(schema: str) -> str:
    return f"{len(schema)}:{schema}:"


def _q(template: str, schema: str) -> sql.Composed:
    return pg_sql.q(template, schema)


class PostgresProjectionStorage(ProjectionStorage):
    #: Appends wake a live projector (LISTEN/NOTIFY): polling is only the fallback, for poolers that drop LISTEN.
    poll_interval = 1.0

    def session(self, name: str, listen: bool = True) -> "PostgresProjectionSession":
        return PostgresProjectionSession(self, name, listen, listen_at_once=False)

    def checkpoints(self, name, cap):
        store = self.store
        params = {"seed": LOCK_SEED, "prefix": _key_prefix(store.schema), "name": name, "cap": cap}
        rows = _fetch(store, _q(_STATUS, store.schema), params, jit=False)
        return [CheckpointRecord(n, position, head, pending, effective_state(state, held), error, owner, updated, dead)
                for n, position, head, pending, state, error, owner, updated, dead, held in rows]

    def count_after(self, position, cap):
        return _fetch(self.store, _q(_COUNT_AFTER, self.store.schema), (position, cap))[0][0]

    def dead_letters(self, name):
        return _fetch(self.store, _q(_DEAD_LETTERS, self.store.schema), (name,))

    def read_rows(self, after, types, prefix, limit):
        return _fetch(self.store, _q(pg_sql.read_all_sql(types is not None, prefix is not None), self.store.schema),
                      pg_sql.read_all_params(after, types, prefix, limit))

    def waiter(self) -> "PostgresProjectionSession":
        """A session that LISTENs at once (it holds no lock): woken by every append to the schema."""
        waiter = PostgresProjectionSession(self, "", listen_at_once=True)
        waiter.open()
        return waiter


class PostgresProjectionSession(ProjectionSession):
    """A projector's dedicated connection: leader lock, LISTEN, reads and batch transactions."""

    def __init__(self, storage: PostgresProjectionStorage, name: str, listen: bool = True,
                 listen_at_once: bool = True) -> None:
        super().__init__(storage, name)
        store = self.store
        self.listen = listen
        # A projector LISTENs only once it leads (try_acquire): a waiting instance does not read its
        # socket, and a listener that does not drain notifications holds back the cluster's queue.
        self.listen_at_once = listen_at_once
        self._channel: str | None = None
        self.connection: psycopg.Connection | None = None
        self._held = False
        self._woken = threading.Event()
        s = store.schema
        self._key = _key_prefix(s) + name
        self._sql = {k: _q(v, s) for k, v in (
            ("ensure", _ENSURE), ("load", _LOAD), ("advance", _ADVANCE), ("reset", _RESET), ("clear", _CLEAR_DEAD),
            ("state", _STATE), ("dead", _DEAD_LETTER), ("head", pg_sql.QUERIES["head"]), ("renew", _RENEW), ("beyond", _BEYOND),
            ("unlisten", _UNLISTEN))}
        self._renew_at: float | None = None  # monotonic time the lease is due for renewal (None: not listening)
        self._read = {(t, p): _q(pg_sql.read_all_sql(t, p), s) for t in (False, True) for p in (False, True)}
        self._window = {(t, p): _q(_window_sql(t, p), s) for t, p in ((True, False), (False, True), (True, True))}

    # -- connection --------------------------------------------------------------------

    def open(self) -> None:
        store = self.store
        try:
            self.connection = psycopg.connect(
                store._dsn, autocommit=True, connect_timeout=max(1, int(store.connect_timeout)),
                options=_session_options(f"-c statement_timeout={int(store.statement_timeout * 1000)}",
                                        store._dsn_options),
                application_name=f"eventcore-projection:{self.name}"[:63],
                **store._keepalives,
            )
            if self.listen:
                # The channel of this schema's appends (migration 3): named after the events table's oid.
                events = sql.SQL("{}.events").format(sql.Identifier(store.schema)).as_string(self.connection)
                channel = self.connection.execute(_CHANNEL, (events,)).fetchone()[0]
                if channel is None:
                    raise EventCoreError(f"schema {store.schema!r} has no events table: run `eventcore migrate`")
                self.connection.add_notify_handler(lambda n: self._woken.set())
                self._channel = channel
                if self.listen_at_once:
                    self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            self.close()
            raise StoreFailed(f"projection {self.name!r} cannot connect to {store.url}: {_one_line(exc, store._dsn)}") from exc

    def close(self) -> None:
        conn, self.connection = self.connection, None
        self._held = False
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def broken(self) -> bool:
        return self.connection is None or self.connection.broken or self.connection.closed

    def lost(self) -> bool:
        """Whether the connection is unusable, asking the server when psycopg has not noticed:
        an OperationalError (a statement timeout, a deadlock, a lock timeout) leaves a live
        connection behind, and only a lost connection means reconnecting."""
        if self.broken():
            return True
        conn = self.connection
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                return False  # inside a transaction: its owner rolls back; a dead socket shows as broken later
            conn.execute("SELECT 1")
            return False
        except psycopg.Error:
            return True

    def _exec(self, query, params=()) -> list:
        try:
            cur = self.connection.execute(query, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            self._own_failure(exc)

    def _own_failure(self, exc: psycopg.Error):
        """One of the projection's own statements failed: reconnect (lost connection, or an
        operational failure such as a timeout: worth retrying after a backoff), or stop on an
        error retrying cannot mend (a missing table)."""
        if self.lost():
            raise StoreFailed(f"projection {self.name!r}: connection lost: {exc}") from exc
        if isinstance(exc, psycopg.OperationalError):
            raise StoreFailed(f"projection {self.name!r}: PostgreSQL failed: {exc}") from exc
        hint = " (run `eventcore migrate`: projections need schema version 3)" if isinstance(
            exc, psycopg.errors.UndefinedTable) else ""
        raise Refused(f"projection {self.name!r}: PostgreSQL refused a statement: {exc}{hint}") from exc

    # -- leadership --------------------------------------------------------------------

    def try_acquire(self) -> bool:
        self._held = bool(self._exec(_TRY_LOCK, (self._key, LOCK_SEED))[0][0])
        if self._held and self._channel is not None and not self.listen_at_once:
            # Before any read of the leader: an append committed after this notifies it.
            self._exec(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        return self._held

    def release(self) -> None:
        if self._held and not self.broken():
            try:
                self._exec(_UNLOCK, (self._key, LOCK_SEED))
            except EventCoreError:
                pass
        self._held = False

    # -- checkpoint --------------------------------------------------------------------

    def load(self) -> int:
        self._exec(self._sql["ensure"], (self.name,))
        return self._exec(self._sql["load"], (self.name,))[0][0]

    def head(self) -> int:
        return self._exec(self._sql["head"])[0][0]

    def read_rows(self, after, types, prefix, limit) -> list:
        return self._exec(self._read[types is not None, prefix is not None],
                          pg_sql.read_all_params(after, types, prefix, limit))

    def read_page(self, after, types, prefix, limit) -> tuple[list, "int | None"]:
        if types is None and prefix is None:
            return self.read_rows(after, types, prefix, limit), None
        params = {"after": after, "k": max(WINDOW_PAGES * limit, WINDOW_MIN) - 1, "limit": limit,
                  "types": list(types) if types is not None else None, "prefix": prefix}
        result = self._exec(self._window[types is not None, prefix is not None], params)
        bound = result[0][0]
        return [r[1:] for r in result if r[1] is not None], bound

    @contextmanager
    def transaction(self):
        """The batch's transaction. An error from inside it (the handler's, whatever its class)
        propagates as it is while the connection lives, for the error strategy to handle; only a
        lost connection becomes StoreFailed (reconnect)."""
        try:
            with self.connection.transaction():
                yield self
        except psycopg.Error as exc:
            if self.lost():
                raise StoreFailed(f"projection {self.name!r}: connection lost: {exc}") from exc
            raise

    def _write(self, query, params):
        """A statement of the machinery inside the batch's transaction (its errors are not the handler's)."""
        try:
            return self.connection.execute(query, params)
        except psycopg.Error as exc:
            self._own_failure(exc)

    def advance(self, old: int, new: int) -> None:
        cur = self._write(self._sql["advance"], (new, self.name, old))
        if cur.rowcount != 1:
            raise LostLeadership(f"checkpoint of {self.name!r} is no longer at {old}")

    def dead_letter(self, row, error: str, attempts: int) -> None:
        position, sid, version, event_id, type_name, data, metadata, recorded_us = row
        self._write(self._sql["dead"], (
            self.name, position, sid, version, uuid.UUID(bytes=bytes(event_id)), type_name, data, metadata,
            recorded_us, error, attempts))

    def reset(self) -> None:
        self._write(self._sql["reset"], (self.name,))
        self._write(self._sql["clear"], (self.name,))

    def set_state(self, state: str, error, owner) -> None:
        self._exec(self._sql["ensure"], (self.name,))
        # While it runs and listens, appends send NOTIFY (see migration 3); otherwise they need not.
        # The claim is a lease (listening_until), renewed by keep_listening(): a process that dies
        # without saying so (SIGKILL, a crash, a hang) stops costing appends a NOTIFY when it expires.
        listening = self.listen and state == "running"
        self._exec(self._sql["state"], (state, error, owner, listening, self.listen_lease, self.name))
        self._renew_at = time.monotonic() + self.listen_lease / 3 if listening else None

    def committed_beyond(self, position: int) -> bool:
        return bool(self._exec(self._sql["beyond"], (position,))[0][0])

    def keep_listening(self) -> None:
        if self._renew_at is not None and time.monotonic() >= self._renew_at:
            self._renew_at = time.monotonic() + self.listen_lease / 3
            self._exec(self._sql["renew"], (self.listen_lease, self.name))

    def stop_listening(self) -> None:
        if self._renew_at is None:
            return
        self._renew_at = None
        try:
            if self.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                self._exec(self._sql["unlisten"], (self.name,))
        except Exception:  # noqa: BLE001 - best effort on the way out; the lease expires anyway
            pass

    # -- waiting -----------------------------------------------------------------------

    def clear_wake(self) -> None:
        self._woken.clear()

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Until a NOTIFY arrives (or arrived since clear_wake), `timeout` passes or `stop` is set.
        True if a notification ended it.

        Notifications are taken by a notify handler only (psycopg calls it for those that arrive
        during any statement): the connection's socket is watched, and when it is readable a
        trivial statement makes psycopg read what came in.
        """
        if not self.listen:
            stop.wait(timeout)
            return False
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not self._woken.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                readable, _, _ = select.select([self.connection.fileno()], [], [], min(left, 0.2))
            except (OSError, ValueError, psycopg.Error) as exc:
                raise StoreFailed(f"projection {self.name!r}: connection lost while waiting: {exc}") from exc
            if readable:
                self._exec("SELECT 1")
            self.keep_listening()
        return self._woken.is_set()


def _fetch(store, query, params=(), jit: bool = True) -> list:
    """A statement on a connection of the store's pool (status, dead letters, tail). jit=False: in a
    transaction with JIT off (the status query's estimates over an unanalysed checkpoint table can
    make it compile tens of milliseconds of JIT code for a query that takes a fraction of one)."""
    try:
        with store._pool.connection() as conn:
            if jit:
                return conn.execute(query, params).fetchall()
            with conn.transaction():
                conn.execute("SET LOCAL jit = off")
                return conn.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise EventCoreError(f"schema {store.schema!r} has no projection tables: run `eventcore migrate` "
                             f"(projections need schema version 3): {exc}") from exc
    except PoolTimeout as exc:
        raise StoreUnavailableError(f"PostgreSQL read failed: {store._no_connection_reason(store.pool_timeout)}") from exc
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"PostgreSQL read failed: {exc}") from exc
