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

import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import PoolTimeout

from ... import _impl
from ...errors import EventCoreError, SerializationError, StoreUnavailableError
from ..projection_storage import (
    CheckpointRecord, FeedPage, LostLeadership, ProjectionSession, ProjectionStorage, Refused, StoreFailed,
    effective_state,
)
from . import sql as pg_sql
from .connections import _one_line, _session_options, wait_readable
from .copy_reader import read_copy_decoded

#: Seed of the 64-bit hash that keys a projector's session advisory lock: hashtextextended(key, LOCK_SEED).
#: The append path keys its stream locks with seed 0, so no stream id can name a projector's lock.
LOCK_SEED = 0x65637072  # 'ecpr'

_P = pg_sql.PROJECTION_QUERIES  # the statements, from sql/projections.sql


def _window_sql(with_types: bool, with_prefix: bool) -> str:
    """The `window` statement (see projections.sql) with its type and/or stream prefix filter."""
    filters = (_P["by_type"] if with_types else "") + (" " + _P["by_prefix"] if with_prefix else "")
    return _P["window"].replace("[filters]", filters)


#: A filtered page looks at most this many events (times the page size, at least WINDOW_MIN) after the cursor.
WINDOW_PAGES = 10
WINDOW_MIN = 1000


def _key_prefix(schema: str) -> str:
    return f"{len(schema)}:{schema}:"


def _q(template: str, schema: str) -> str:
    """A statement's text for `schema`, rendered once (psycopg would compose a Composed at each call)."""
    return pg_sql.q(template, schema).as_string(None)


def status_params(schema: str, name: str | None, cap: int) -> dict[str, Any]:
    """The parameters of the `status` statement (projections.sql): every projector of `schema`, or `name`'s."""
    return {"seed": LOCK_SEED, "prefix": _key_prefix(schema), "name": name, "cap": cap}


def checkpoint_records(rows: list) -> list[CheckpointRecord]:
    """The `status` statement's rows as CheckpointRecords."""
    return [CheckpointRecord(n, position, head, pending, effective_state(state, held), error, owner, updated, dead)
            for n, position, head, pending, state, error, owner, updated, dead, held in rows]


class PostgresProjectionStorage(ProjectionStorage):
    #: Appends wake a live projector (LISTEN/NOTIFY): polling is only the fallback, for poolers that drop LISTEN.
    poll_interval: float = 1.0

    def session(self, name: str, listen: bool = True) -> "PostgresProjectionSession":
        return PostgresProjectionSession(self, name, listen, listen_at_once=False)

    def checkpoints(self, name: str | None, cap: int) -> list[CheckpointRecord]:
        store = self.store
        rows = _fetch(store, _q(_P["status"], store.schema), status_params(store.schema, name, cap), jit=False)
        return checkpoint_records(rows)

    def count_after(self, position: int, cap: int) -> int:
        return _fetch(self.store, _q(_P["count_after"], self.store.schema), (position, cap))[0][0]

    def dead_letters(self, name: str) -> list[tuple[Any, ...]]:
        return _fetch(self.store, _q(_P["dead_letters"], self.store.schema), (name,))

    def read_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple[Any, ...]]:
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
            ("ensure", _P["ensure"]), ("load", _P["load"]), ("advance", _P["advance"]), ("reset", _P["reset"]),
            ("clear", _P["clear_dead_letters"]),
            ("state", _P["set_state"]), ("dead", _P["dead_letter"]), ("head", pg_sql.QUERIES["head"]), ("renew", _P["renew"]),
            ("beyond", _P["beyond"]),
            ("unlisten", _P["unlisten"]))}
        self._renew_at: float | None = None  # monotonic time the lease is due for renewal (None: not listening)
        self._read = {(t, p): _q(pg_sql.read_all_sql(t, p), s) for t in (False, True) for p in (False, True)}
        self._copy_read = _q(pg_sql.copy_read_all_sql(False, False), s)
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
                client_encoding="UTF8",  # its catch-up reads by binary COPY (see the store's connections)
                **store._keepalives,
            )
            if self.listen:
                # The channel of this schema's appends (migration 3): named after the events table's oid.
                events = sql.SQL("{}.events").format(sql.Identifier(store.schema)).as_string(self.connection)
                channel = self.connection.execute(_P["channel"], (events,)).fetchone()[0]
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
        self._held = bool(self._exec(_P["try_lock"], (self._key, LOCK_SEED))[0][0])
        if self._held and self._channel is not None and not self.listen_at_once:
            # Before any read of the leader: an append committed after this notifies it.
            self._exec(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        return self._held

    def release(self) -> None:
        if self._held and not self.broken():
            try:
                self._exec(_P["unlock"], (self._key, LOCK_SEED))
            except EventCoreError:
                pass
        self._held = False

    # -- checkpoint --------------------------------------------------------------------

    def load(self) -> int:
        self._exec(self._sql["ensure"], (self.name,))
        return self._exec(self._sql["load"], (self.name,))[0][0]

    def head(self) -> int:
        return self._exec(self._sql["head"])[0][0]

    def read_rows(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> list[tuple[Any, ...]]:
        return self._exec(self._read[types is not None, prefix is not None],
                          pg_sql.read_all_params(after, types, prefix, limit))

    def read_page(self, after: int, types: tuple[str, ...] | None, prefix: str | None,
                  limit: int) -> tuple[list[tuple[Any, ...]], int | None]:
        if types is None and prefix is None:
            return self.read_rows(after, types, prefix, limit), None
        params = {"after": after, "k": max(WINDOW_PAGES * limit, WINDOW_MIN) - 1, "limit": limit,
                  "types": list(types) if types is not None else None, "prefix": prefix}
        result = self._exec(self._window[types is not None, prefix is not None], params)
        bound = result[0][0]
        return [r[1:] for r in result if r[1] is not None], bound

    def read_events(self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int,
                    decoding: str = "strict") -> tuple[FeedPage, int | None]:
        """An unfiltered page by binary COPY, decoded straight into events (see decode_copy). A page
        holding an event this process cannot decode is read again as rows, each decoded alone;
        a filtered page is read as rows through its window (read_page)."""
        if types is not None or prefix is not None:
            return super().read_events(after, types, prefix, limit, decoding)
        raw = decoding == "raw"
        try:
            events = read_copy_decoded(self.connection, self._copy_read,
                                       pg_sql.read_all_params(after, None, None, limit),
                                       lambda buffer: _impl.decode_copy(buffer, raw))
        except psycopg.Error as exc:
            self._own_failure(exc)
        except SerializationError:
            return super().read_events(after, types, prefix, limit, decoding)
        return FeedPage(events, [None] * len(events), load_rows=lambda: self._rows_of(events, after, limit)), None

    def _rows_of(self, events: list, after: int, limit: int) -> list:
        """The stored rows of a page read by COPY (for dead letters). Read again, they are the same
        events: nothing can appear below the fence the page was read under."""
        rows = self.read_rows(after, None, None, limit)[:len(events)]
        if [r[0] for r in rows] != [e.position for e in events]:
            raise StoreFailed(f"projection {self.name!r}: the feed's rows after position {after} differ from "
                              "the page read before")
        return rows

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

    def dead_letter(self, row: tuple[Any, ...], error: str, attempts: int) -> None:
        position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
        self._write(self._sql["dead"], (
            self.name, position, sid, version, uuid.UUID(bytes=bytes(event_id)), type_name, data, metadata,
            recorded_us, type_version, error, attempts))

    def reset(self) -> None:
        self._write(self._sql["reset"], (self.name,))
        self._write(self._sql["clear"], (self.name,))

    def set_state(self, state: str, error: str | None, owner: str | None) -> None:
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
                readable = wait_readable(self.connection.fileno(), min(left, 0.2))
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
