"""The asyncio PostgreSQL store (`await eventcore.aio.connect("postgresql://...")`): the sync
PostgresStore's peer on psycopg's AsyncConnectionPool.

Same schema, same SQL and same server functions as eventcore.stores.postgres (whose statements,
encoders and error translations it imports): a sync and an asyncio process share one store.
Appends run append_one (a lone append) or append_group (a group commit of concurrent tasks'
appends), batches and ingests a binary COPY after reserve_append, reads a binary COPY decoded
by the hot path's decode_copy part by part as it arrives. The client-side deadline of a call
(statement_timeout plus a margin, as the sync store's watchdog) runs on the loop's clock.

Cancellation. A task cancelled while its append is being written leaves all of its events or
none (one statement, one transaction), and its CancelledError carries a note saying so and how
to tell which (its idempotency key). A connection whose statement or COPY was interrupted is
closed, never handed back to the pool. Group commit: a group is written by a task of its own,
so a member cancelled while its group is in flight only stops waiting for it: the others' appends
are neither cancelled nor delayed, and the next group starts as soon as this one is written.
A member cancelled while still queued is dropped from the queue: nothing of it was sent.

Live projections: `wait_for_events` LISTENs on the schema's channel through one async connection.

The schema is migrated (or checked) by the sync store's own code, migrations.py, on a connection of
its own in a worker thread: at open, and by `migrate()` and `schema_version()`. A store belongs to
the event loop that opened it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg import sql as pgsql
from psycopg.errors import error_from_result
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import _impl
from ..errors import EventCoreError, StoreUnavailableError, ValidationError
from ..events import RawEvent, RecordedEvent
from ..formats import INT64_MAX
from ..stores.base import group_by_stream, prepare_ingest_batch, projection_health
from ..stores.dsn import DEFAULT_SCHEMA, redact
from ..stores.prepare import PreparedAppend
from ..stores.projection_storage import PENDING_CAP
from ..stores.postgres import copy_writer, migrations
from ..stores.postgres.connections import RECONNECT_TIMEOUT, _Connections, _connection_lost, _one_line, \
    _session_options
from ..stores.postgres.copy_reader import _BINARY, _DUPLICATE_STATEMENT, _TUPLES_OK, _UNDEFINED_STATEMENT, \
    DECODE_AFTER_ROWS, split_part
from ..stores.postgres.group_commit import GROUPS_IN_FLIGHT, _EMPTY_GROUP, _LONE_EMPTY_MEMBER, _encode_group, \
    _GroupCommitter
from ..stores.postgres.projections import checkpoint_records, status_params
from ..stores.postgres.sql import PROJECTION_QUERIES, QUERIES, SCHEMA_VERSION, q, read_all_params, read_all_sql
from ..stores.postgres.store import (
    _PREPARED_READS, ANALYZE_EVENTS, ANALYZE_MIN_EVENTS, ANALYZE_TARGET_SQL, BACKEND_GONE_TIMEOUT_MS,
    EVENTS_ROW_ESTIMATE, needs_analyze, DEFAULT_POOL_SIZE, FIRST_ROWS, PostgresStore, _prepared_name,
    _remember_long, _text_array, after_snapshot, remember_longest, check_progress, committed_rows, configure,
    group_outcomes, save_snapshot_params,
    lost_check_only, no_connection_reason, outcome_unknown, pool_stats_of, progress_params, raise_write_error,
    read_error, reserve_params, split_url, write_each_alone,
)
from ..stores.postgres.watchdog import CLIENT_DEADLINE_MARGIN
from .store import AsyncEventStore

log: logging.Logger = logging.getLogger("eventcore.store.postgres")

_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_IDLE = pq.TransactionStatus.IDLE
#: How often `wait_for_events` looks at the head when no notification comes (appends notify only while a
#: listening projector's lease lasts, and a pooler may drop LISTEN): the sync projections' poll_interval.
POLL_INTERVAL = 1.0
# Statements without the schema (Any: psycopg's types ask for literal strings).
_TERMINATE_BACKEND: Any = QUERIES["terminate_backend"]
_BACKEND_ALIVE: Any = QUERIES["backend_alive"]
_CHANNEL: Any = PROJECTION_QUERIES["channel"]


_asyncio_timeout = getattr(asyncio, "timeout", None)


def _timeout(delay: float | None) -> Any:
    """asyncio.timeout(delay) (Python 3.11+), or the same for this module's use (one deadline per call)."""
    if _asyncio_timeout is not None:
        return _asyncio_timeout(delay)
    return _timeout_before_311(delay)


@asynccontextmanager
async def _timeout_before_311(delay: float | None) -> AsyncIterator[None]:
    if delay is None:
        yield
        return
    task = asyncio.current_task()
    fired: list = []

    def fire() -> None:
        fired.append(True)
        if task is not None:
            task.cancel()

    handle = asyncio.get_running_loop().call_later(delay, fire)
    try:
        yield
    except asyncio.CancelledError as exc:
        if fired:
            raise TimeoutError from exc
        raise
    finally:
        handle.cancel()


def _cancelled_append(exc: BaseException, p: PreparedAppend, sent: bool) -> None:
    """Mark the CancelledError of an append: `maybe_committed` (as eventcore.aio.execute marks its own) and
    a note saying what happened to it and how to tell (see cancelled_note)."""
    exc.maybe_committed = sent  # type: ignore[attr-defined]
    _add_note(exc, cancelled_note(p, sent))


def _add_note(exc: BaseException, note: str) -> None:
    """exc.add_note(note) (Python 3.11+), or its attribute where there is no add_note."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]


def cancelled_note(p: PreparedAppend, sent: bool) -> str:
    """What a cancelled append's CancelledError says about its outcome."""
    if not sent:
        return "eventcore: the append was cancelled before it was sent to PostgreSQL: nothing of it was written"
    how = (f"run it again with the same idempotency key {p.key!r} (DuplicateCommandError then carries what it "
           "wrote) or look it up with recorded_command(key)" if p.key is not None else
           "it has no idempotency key: read its streams to tell (appends with one settle it by running again)")
    return ("eventcore: the append was cancelled after it was sent to PostgreSQL: it may have committed (all of "
            f"its events) or not (none); {how}")


def batch_cancelled_note(sent: bool, progress: Any) -> str:
    """What a cancelled batch's (append_batch, an ingest's) CancelledError says about its outcome."""
    if not sent:
        return "eventcore: the batch was cancelled before its commit was sent: nothing of it was written"
    how = ("running the ingest again with the same resume_key writes what is missing, once" if progress is not None
           else "read its streams' versions to tell")
    return ("eventcore: the batch was cancelled while its commit was in flight: it may have committed (all of its "
            f"events) or not (none); {how}")


class _AsyncConnections(_Connections):
    """The pool's connection class (an AsyncConnection) recording why the latest attempt failed (see _Connections)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        records = self

        class Connection(psycopg.AsyncConnection):
            @classmethod
            async def connect(cls, conninfo="", **kwargs):
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except Exception as exc:
                    records._error, records._at = _one_line(exc, records._dsn), time.monotonic()
                    raise
                records._error = None
                return conn

        self.async_connection_class: type[psycopg.AsyncConnection[Any]] = Connection


class _AsyncGroupCommitter(_GroupCommitter):
    """Group commit for tasks: the sync committer's queue and grouping (`_take`), with `in_flight`
    tokens. A task that finds a token free starts a group at once (its append and every one queued,
    up to MAX_GROUP, never two on one stream); the others queue. Each group is written by a task of
    its own, which settles every member's future and then starts the next group from the queue
    with the same token: no member, leader or not, can leave the others waiting by being cancelled."""

    def __init__(self, store: AsyncPostgresStore, in_flight: int) -> None:
        super().__init__(store, in_flight)
        self._writing: set[asyncio.Task] = set()

    async def submit(self, prepared: PreparedAppend) -> list[RecordedEvent]:  # type: ignore[override]
        req: Any = self._Request(prepared)
        req.done = asyncio.get_running_loop().create_future()
        if self._free > 0:
            self._free -= 1
            self._start(req)
        else:
            self._queue.append(req)
        try:
            return await req.done
        except asyncio.CancelledError as exc:
            if not req.lead and req in self._queue:
                self._queue.remove(req)
            _cancelled_append(exc, prepared, sent=req.lead)
            raise

    def _start(self, own) -> None:
        """Write `own` and the appends queued (those still waiting) as one group, on a task of its own."""
        if self._queue:
            self._queue = deque(r for r in self._queue if not r.done.done())
        group = self._take(own)
        for r in group:
            r.lead = True  # here: taken into a group, sent with it
        task = asyncio.get_running_loop().create_task(self._write(group), name="eventcore-pg-group-commit")
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, group: list) -> None:
        cancelled: BaseException | None = None  # what ends this task once every member is settled
        try:
            results = await self._store._append_group([r.prepared for r in group])
        except asyncio.CancelledError as exc:  # the loop is shutting down
            cancelled = exc
            results = [StoreUnavailableError("the store's event loop cancelled a group commit in flight; whether it "
                                             "committed is unknown", maybe_committed=True)] * len(group)
        except BaseException as exc:  # noqa: BLE001 - every member must be settled
            results = [exc] * len(group)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the members get it, and the loop
                cancelled = exc
        self.groups += 1
        self.appends += len(group)
        for r, res in zip(group, results):
            if not r.done.done():  # a member cancelled meanwhile has stopped waiting
                if isinstance(res, BaseException):
                    r.done.set_exception(res)
                else:
                    r.done.set_result(res)
        heir = None
        while self._queue and cancelled is None and heir is None:
            heir = self._queue.popleft()
            if heir.done.done():  # cancelled while queued: nothing of it is sent
                heir = None
        if heir is not None:
            self._start(heir)  # the token goes on to the next group
        else:
            self._free += 1
        if cancelled is not None:
            raise cancelled

    async def drain(self) -> None:
        """Until every group in flight (and those they start) is written."""
        while self._writing:
            await asyncio.gather(*list(self._writing), return_exceptions=True)


async def _one_row(cur: Any) -> tuple:
    """The row of a statement that returns exactly one."""
    return cast(tuple, await cur.fetchone())


async def _readable(fd: int, or_writable: bool = False) -> None:
    """Until `fd` can be read (or written, with `or_writable`: libpq's rule while a send is unflushed)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    if or_writable:
        loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
        if or_writable:
            loop.remove_writer(fd)


async def _result(conn, pgconn, send, args):
    """copy_reader._result, awaiting the socket: send one statement, wait for its one result."""
    send(*args)
    while pgconn.flush():
        await _readable(pgconn.socket, or_writable=True)
        pgconn.consume_input()
    return await _results(conn, pgconn, (_TUPLES_OK, _COMMAND_OK))


async def read_prepared(conn: psycopg.AsyncConnection, name: bytes, query: str, params: list) -> pq.abc.PGresult:
    """copy_reader.read_prepared on an AsyncConnection: the result (values in binary) of `query` run as the
    connection's prepared statement `name`, prepared on first use (again, once, if the server lost it)."""
    if conn.info.encoding != "utf-8":
        await conn.execute("SET client_encoding TO 'UTF8'")
    prepared = conn.__dict__.setdefault("eventcore_prepared", set())
    pgconn = conn.pgconn
    for attempt in (1, 2):
        if name not in prepared:
            await prepare(conn, name, query)
        try:
            return cast(pq.abc.PGresult,
                        await _result(conn, pgconn, pgconn.send_query_prepared, (name, params, None, _BINARY)))
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _UNDEFINED_STATEMENT or attempt == 2:
                raise
            prepared.discard(name)
    raise AssertionError("unreachable")


async def prepare(conn: psycopg.AsyncConnection, name: bytes, query: str) -> None:
    """copy_reader.prepare on an AsyncConnection."""
    pgconn = conn.pgconn
    try:
        await _result(conn, pgconn, pgconn.send_prepare, (name, query.encode()))
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != _DUPLICATE_STATEMENT:
            raise
    conn.__dict__.setdefault("eventcore_prepared", set()).add(name)


async def _results(conn, pgconn, ok: tuple):
    """Every result of the statement in flight, read (the connection left idle): the last one whose
    status is in `ok`, or the first error (copy_reader._results, awaiting the socket)."""
    out = error = None
    while True:
        while pgconn.is_busy():
            await _readable(pgconn.socket)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status in ok:
            out = result
        elif error is None:
            error = error_from_result(result, encoding=conn.info.encoding)
    if error is not None:
        raise error
    return out


async def read_copy_decoded(conn: psycopg.AsyncConnection, query: Any, params, decode) -> list:
    """copy_reader.read_copy_decoded on an AsyncConnection: the events of a COPY ... TO STDOUT (FORMAT
    BINARY), each part decoded as soon as it has arrived (see split_part), while the server sends the next.
    Interrupted (cancelled, or past its deadline) mid-COPY, the connection is closed: it cannot be reused."""
    out = bytearray()
    events: list = []
    failure: BaseException | None = None
    rows = 0
    last = 0
    if conn.info.encoding != "utf-8":
        await conn.execute("SET client_encoding TO 'UTF8'")
    async with conn.cursor().copy(query, params):
        pgconn = conn.pgconn
        get = pgconn.get_copy_data
        try:
            while True:
                size, data = get(1)
                if size > 0:
                    out += data
                    rows += 1
                    last = size
                elif size == 0:
                    if decode is not None and rows > max(1, DECODE_AFTER_ROWS):
                        part, out = split_part(out, last)
                        try:
                            events += decode(part)
                        except Exception as exc:
                            failure, decode = exc, None  # the rest is read, not kept
                        rows = 1
                    elif decode is None and failure is not None:
                        out = bytearray()
                        rows = 0
                    await _readable(pgconn.socket)
                    pgconn.consume_input()
                else:
                    break
            await _results(conn, pgconn, (_COMMAND_OK,))
        except BaseException as exc:
            if not isinstance(exc, psycopg.Error):
                pgconn.finish()  # interrupted mid-COPY: psycopg's Copy then leaves it as it is (closed)
            raise
    if failure is not None:
        raise failure
    if decode is not None:
        events += decode(out)
    return events


class AsyncPostgresStore(AsyncEventStore):
    """The PostgreSQL store for asyncio (`await AsyncPostgresStore.open(url, **options)`): the options,
    validation and errors of the sync PostgresStore (see its module)."""

    scheme = "postgresql"
    default_ingest_lanes = 2
    schema: str
    pool_size: int
    pool_min_size: int
    connect_timeout: float
    statement_timeout: float
    pool_timeout: float
    # Set by configure(), as PostgresStore's (see there).
    _dsn: str
    _dsn_options: str
    _keepalives: dict[str, Any]
    _application_name: dict[str, str]
    _long_streams: set[str]
    #: Statements rendered for the schema (Any: psycopg's types ask for literal strings).
    _sql: dict[str, Any]
    _read_all_sql: dict[tuple[bool, bool], Any]
    _read_columns_sql: dict[tuple[bool, bool, bool], Any]
    _connect_kwargs: dict[str, Any]
    #: Seconds between looks at the head while `wait_for_events` hears nothing.
    poll_interval: float = POLL_INTERVAL

    @classmethod
    async def open(cls, url: str, **options: Any) -> AsyncPostgresStore:
        """The store a postgresql:// URL (or libpq key=value string) names, opened: the URL and options
        of PostgresStore.from_url, checked the same way before anything connects."""
        dsn, options = split_url(url, options)
        store = cls(dsn, **options)
        await store._open()
        return store

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_min_size: int = 1,
        connect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        pool_timeout: float = 30.0,
        migrate: bool = True,
        group_commit: bool = True,
    ) -> None:
        """Options checked, nothing opened: use `open`."""
        group_commit, migrate = configure(self, dsn, schema, pool_size, pool_min_size, connect_timeout,
                                          statement_timeout, pool_timeout, migrate, group_commit)
        self._migrate_on_open = migrate
        st = self.statement_timeout
        #: The client-side deadline of one statement (the sync store's watchdog's), None: none.
        self._client_deadline: float | None = None if st == 0 else st + max(CLIENT_DEADLINE_MARGIN, st / 4)
        self._group = _AsyncGroupCommitter(self, GROUPS_IN_FLIGHT) if group_commit else None
        self._connections = _AsyncConnections(dsn)
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=self.pool_min_size,
            max_size=self.pool_size,
            timeout=self.pool_timeout,
            kwargs=self._connect_kwargs,
            connection_class=self._connections.async_connection_class,
            open=False,
            name=f"eventcore:{self.schema}",
            configure=self._warm_up,
            reconnect_timeout=RECONNECT_TIMEOUT,
        )
        self._listener: asyncio.Task | None = None
        self._listening: asyncio.Future | None = None
        self._wake: asyncio.Event | None = None

    async def _open(self) -> None:
        # The schema is checked (or migrated) first, on a connection of its own, by the sync code that
        # does it for PostgresStore (migrations.py) in a thread: a DSN that never worked fails here at
        # once with libpq's reason, where the pool would retry it until connect_timeout.
        await asyncio.to_thread(self._prepare_schema, self._migrate_on_open)
        try:
            await self._pool.open(wait=True, timeout=self.connect_timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            message = (f"cannot connect to PostgreSQL at {redact(self._dsn)}: "
                       f"{self._no_connection_reason(self.connect_timeout)}")
            log.info("%s", message)
            raise StoreUnavailableError(message) from exc
        except BaseException:
            await self._pool.close()
            raise
        log.info("opened PostgreSQL store %s schema %r for asyncio (pool %d..%d, group commit %s)", redact(self._dsn),
                 self.schema, self.pool_min_size, self.pool_size, "on" if self._group is not None else "off")

    def _sync_connection(self) -> psycopg.Connection:
        try:
            return psycopg.Connection.connect(self._dsn, **self._connect_kwargs)
        except psycopg.Error as exc:
            message = f"cannot connect to PostgreSQL at {redact(self._dsn)}: {_one_line(exc, self._dsn)}"
        log.info("%s", message)
        raise StoreUnavailableError(message) from None

    def _prepare_schema(self, migrate: bool, reapply_functions: bool = False) -> int:
        with self._sync_connection() as conn:
            if migrate:
                return migrations.migrate(conn, self.schema, self._dsn, reapply_functions=reapply_functions)
            migrations.check_schema(conn, self.schema)
            return SCHEMA_VERSION

    async def _warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """Run on every new pool connection: have the server compile the append functions and plan their
        statements (see PostgresStore._warm_up). Writes nothing; errors are ignored."""
        try:
            await conn.execute(self._sql["append_group"], (_EMPTY_GROUP,))
            await conn.execute(self._sql["append_one"], (_LONE_EMPTY_MEMBER,))
            await conn.execute(self._sql["reserve"], ([], [], [], 0))
            for name in _PREPARED_READS:
                await prepare(conn, _prepared_name(name), self._sql[name])
        except psycopg.Error:
            pass

    def _no_connection_reason(self, waited: float) -> str:
        return no_connection_reason(self._connections, waited)

    def __repr__(self) -> str:
        return f"AsyncPostgresStore({redact(self._dsn)!r}, schema={self.schema!r})"

    @property
    def url(self) -> str:
        return redact(self._dsn)

    def pool_stats(self) -> dict[str, Any]:
        """See PostgresStore.pool_stats."""
        return pool_stats_of(self)

    async def aclose(self) -> None:
        log.debug("closing PostgreSQL store %s schema %r", redact(self._dsn), self.schema)
        await self._snapshots_written()
        await self._stop_listening()
        if self._group is not None:
            await self._group.drain()  # groups in flight end within their deadline
        await self._pool.close()
        await super().aclose()

    def _open_sync_twin(self, pool_size: int) -> PostgresStore:
        """A sync PostgresStore on this store's database and schema, with its options (what
        eventcore.aio.run_projection runs a projector on)."""
        return PostgresStore(self._dsn, schema=self.schema, pool_size=pool_size,
                             pool_min_size=min(self.pool_min_size, pool_size), connect_timeout=self.connect_timeout,
                             statement_timeout=self.statement_timeout, pool_timeout=self.pool_timeout, migrate=False,
                             group_commit=False)

    async def _projection_checkpoints(self) -> list[dict[str, Any]]:
        """StoreHealth.projections: the projectors' checkpoints, read as the sync store's status does
        (in a transaction with JIT off, see stores.postgres.projections._fetch)."""
        async def run(conn, query, params):
            async with conn.transaction():
                await conn.execute("SET LOCAL jit = off")
                return await (await conn.execute(query, params)).fetchall()
        query = q(PROJECTION_QUERIES["status"], self.schema).as_string(None)
        rows = await self._read(run, query, status_params(self.schema, None, PENDING_CAP))
        return projection_health(checkpoint_records(rows))

    # -- schema ----------------------------------------------------------------------

    def _check_open(self, doing: str) -> None:
        if self.closed:
            raise StoreUnavailableError(f"cannot {doing}: the store is closed")

    async def migrate(self, *, reapply_functions: bool = False) -> int:
        """See PostgresStore.migrate (run by the same code, on a connection of its own, in a thread)."""
        self._check_open("migrate")
        return await asyncio.to_thread(self._prepare_schema, True, reapply_functions)

    async def schema_version(self) -> int:
        """The migration version of this store's schema (0: not created)."""
        self._check_open("read the schema version")

        def read() -> int:
            with self._sync_connection() as conn:
                return migrations.schema_version(conn, self.schema)
        return await asyncio.to_thread(read)

    async def _schema_versions(self):
        return await self.schema_version(), SCHEMA_VERSION

    # -- connections and deadlines ----------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled connection (the wait bounded by pool_timeout). Left by a cancellation, a deadline or
        anything but an error the statement ended with, it is closed, never handed back mid-statement."""
        conn = await self._pool.getconn()
        try:
            yield conn
        except BaseException as exc:
            if (not isinstance(exc, Exception) or isinstance(exc, TimeoutError)
                    or conn.pgconn.transaction_status != _IDLE):
                await conn.close()
            raise
        finally:
            await self._pool.putconn(conn)

    def _deadline(self, statements: int = 1):
        """The client-side deadline of a call of `statements` statements, its wait for a pooled connection
        included (TimeoutError once passed): the sync store's watchdog's, on the loop's clock."""
        d = self._client_deadline
        return _timeout(None if d is None else statements * d)

    def _no_answer(self, statements: int = 1, connected: bool = True) -> psycopg.OperationalError:
        """What a call whose deadline passed failed with. Connected: its connection lost (closed by the
        client, as the sync store's watchdog makes it), so a write's outcome is looked up; else no
        connection came from the pool in time, and nothing was sent."""
        seconds = statements * (self._client_deadline or 0)
        if not connected:
            return psycopg.OperationalError(f"no connection from the pool within the call's deadline ({seconds:.1f}s)")
        return psycopg.OperationalError(
            f"no answer from PostgreSQL within {seconds:.1f}s (statement_timeout + margin): the client closed "
            "the connection")

    # -- reading -------------------------------------------------------------------------

    async def _read(self, run, name_or_sql, params: Any):
        """`run(conn, query, params)` on a pooled connection under the client-side deadline, its failures
        as eventcore's errors (those of the sync store's reads)."""
        query = self._sql.get(name_or_sql, name_or_sql)
        conn = None
        try:
            try:
                async with self._deadline(), self._connection() as conn:
                    return await run(conn, query, params)
            except TimeoutError as exc:
                raise self._no_answer(connected=conn is not None) from exc
        except (PoolTimeout, psycopg.Error) as exc:
            raise read_error(self, exc) from exc

    async def _fetch(self, name_or_sql, params: tuple) -> list:
        async def run(conn, query, values):
            return await (await conn.execute(query, values)).fetchall()
        return await self._read(run, name_or_sql, params)

    async def _copy_events(self, name_or_sql, params: tuple, raw: bool) -> list[RecordedEvent]:
        def decode(buffer):
            return _impl.decode_copy(buffer, raw)

        async def run(conn, query, values):
            return await read_copy_decoded(conn, query, values, decode)
        return await self._read(run, name_or_sql, params)

    async def _after_ingest(self, events: int) -> None:
        """As PostgresStore._after_ingest: the events table analyzed after an ingest that grew it by more
        than ANALYZE_GROWTH; a failure is only logged."""
        if events < ANALYZE_MIN_EVENTS:
            return

        async def run(conn, query, values):
            found = await (await conn.execute(EVENTS_ROW_ESTIMATE, (self.schema,), prepare=False)).fetchone()
            if needs_analyze(events, found):
                async with conn.transaction():
                    await conn.execute(ANALYZE_TARGET_SQL, prepare=False)
                    await conn.execute(q(ANALYZE_EVENTS, self.schema), prepare=False)
        try:
            await self._read(run, "events_row_estimate", ())  # `run` states its own statements
        except EventCoreError as exc:
            log.debug("events table not analyzed after an ingest of %s events: %s", events, exc)

    async def _recorded_command_rows(self, key):
        return await self._fetch("recorded_command", (key,))

    async def _ingest_progress(self, key):
        return {lane: (lanes, items) for lane, lanes, items in await self._fetch("ingest_progress", (key,))}

    async def _ingest_holes(self, key):
        return {(lane, item) for lane, item in await self._fetch("ingest_holes", (key,))}

    async def _resume_keys(self, prefix):
        return [key for (key,) in await self._fetch("resume_keys", (prefix,))]

    async def _prepared_read(self, name: str, params: list, raw: bool) -> list[RecordedEvent]:
        """The events of one of the sync store's _PREPARED_READS: prepared, fetched in binary."""
        statement = _prepared_name(name)

        async def run(conn, query, values):
            return await read_prepared(conn, statement, query, values)
        return _impl.decode_copy(_impl.copy_from_result(await self._read(run, name, params)), raw)

    async def _read_stream(self, stream_id, from_version, limit, raw=False):
        # As PostgresStore._read_stream: FIRST_ROWS events by prepared statement, the rest by COPY from
        # the next version; a stream known to be long by COPY at once.
        long = self._long_streams
        if stream_id in long and (limit is None or limit > FIRST_ROWS):
            return await self._copy_events("read_stream", (stream_id, from_version, limit), raw)
        first = FIRST_ROWS if limit is None else min(limit, FIRST_ROWS)
        events = await self._prepared_read(
            "read_stream_first", [stream_id.encode(), b"%d" % from_version, b"%d" % first], raw)
        if len(events) == FIRST_ROWS and limit != FIRST_ROWS:
            events += await self._copy_events(
                "read_stream", (stream_id, events[-1].version + 1, None if limit is None else limit - FIRST_ROWS), raw)
            _remember_long(long, (stream_id,))
        return events

    async def _read_streams(self, stream_ids, raw=False):
        if len(stream_ids) == 1:
            return {stream_ids[0]: await self._read_stream(stream_ids[0], 1, None, raw)}
        # One statement: the streams are read at one point in time (the executor counts on it).
        if any(s in self._long_streams for s in stream_ids):
            return group_by_stream(stream_ids, await self._copy_events("read_streams", (stream_ids,), raw))
        out = group_by_stream(stream_ids, await self._prepared_read("read_streams_prepared",
                                                                    [_text_array(stream_ids)], raw))
        remember_longest(self._long_streams, out)
        return out

    async def _stream_versions(self, stream_ids):
        out = dict.fromkeys(stream_ids, 0)
        out.update(await self._fetch("stream_versions", (stream_ids,)))
        return out

    # -- snapshots (as PostgresStore's: the same statements) ------------------------------

    supports_snapshots = True

    async def _read_after_snapshot(self, key, state_version, stream_ids):
        return after_snapshot(await self._fetch("read_after_snapshot", (key, state_version, list(stream_ids))),
                              state_version, stream_ids)

    async def _save_snapshot(self, key, command, state_version, covers, state, events):
        async def run(conn, query, values):
            await conn.execute(query, values)
        await self._read(run, "save_snapshot", save_snapshot_params(key, command, state_version, covers, state, events))

    async def _load_snapshot(self, key):
        rows = await self._fetch("load_snapshot", (key,))
        return (rows[0][0], rows[0][1], bytes(rows[0][2])) if rows else None

    async def _read_streams_from(self, from_versions, raw=False):
        ids = list(from_versions)
        rows = await self._fetch("read_streams_from", (ids, [max(v, 1) for v in from_versions.values()]))
        return group_by_stream(ids, _impl.decode_rows(rows, raw))

    async def _snapshot_rows(self):
        return await self._fetch("snapshot_rows", ())

    async def _drop_snapshots(self, command, before=None):
        return (await self._fetch("drop_snapshots", (command, command, before, before)))[0][0]

    async def _read_all_page(self, after, types, prefix, limit, raw=False):
        return await self._copy_events(self._read_all_sql[types is not None, prefix is not None],
                                       read_all_params(after, types, prefix, limit), raw)

    async def _read_columns_page(self, after, types, prefix, limit, filler):
        """As the sync store's: one page of read_all by COPY, decoded straight into `filler`'s columns."""
        decode = filler._page_decoder(limit)

        async def run(conn, query, values):
            return await read_copy_decoded(conn, query, values, decode)
        await self._read(run, self._read_columns_sql[types is not None, prefix is not None, bool(filler.plan.fields)],
                         read_all_params(after, types, prefix, limit))
        return decode.done()

    async def _read_all_rows(self, after, types, prefix, limit):
        query = q(read_all_sql(types is not None, prefix is not None), self.schema).as_string(None)
        return await self._fetch(query, read_all_params(after, types, prefix, limit))

    async def _type_counts(self):
        return await self._fetch("type_counts", ())

    async def _head_position(self):
        return (await self._fetch("head", ()))[0][0]

    # -- writing -----------------------------------------------------------------------

    async def _append(self, p: PreparedAppend) -> list[RecordedEvent]:
        if self._group is not None:
            return await self._group.submit(p)
        result = (await self._append_group([p]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def _append_group(self, group: list) -> list:
        """PostgresStore._append_group: one transaction, one round trip, for one or several appends on
        distinct streams; each member's recorded events or exception, in order. Cancelled (the caller's
        task, without group commit), its CancelledError says whether the append was sent."""
        sent: list = []
        try:
            return await self._write_group(group, sent)
        except asyncio.CancelledError as exc:
            if len(group) == 1:
                _cancelled_append(exc, group[0], sent=bool(sent))
            raise

    async def _write_group(self, group: list, sent: list) -> list:
        doc = _encode_group(group)
        backend = None  # set once the append may have reached the server
        statement = self._sql["append_one" if len(group) == 1 else "append_group"]
        try:
            try:
                async with self._deadline(), self._connection() as conn:
                    backend = conn.info.backend_pid
                    sent.append(backend)
                    rows = await (await conn.execute(statement, (doc,))).fetchall()
            except TimeoutError as exc:
                raise self._no_answer(connected=backend is not None) from exc
        except (pg_errors.Error, PoolTimeout) as exc:
            if backend is not None and _connection_lost(exc):
                out: list = []
                for p in group:  # the backend is ended once, by the first lookup
                    try:
                        out.append(await self._resolve_ambiguous(p, exc, backend))
                    except Exception as err:  # noqa: BLE001 - handed to that append's caller
                        out.append(err)
                    backend = None
                return out
            if write_each_alone(group, exc):
                return await self._append_each(group)
            try:
                raise_write_error(self, exc)
            except Exception as err:  # noqa: BLE001
                return [err] * len(group)
        return group_outcomes(group, rows)

    async def _append_each(self, group: list) -> list:
        out = []
        for p in group:
            try:
                result = (await self._append_group([p]))[0]
            except Exception as exc:  # noqa: BLE001
                result = exc
            out.append(result)
        return out

    async def _find_committed(self, event_ids: list, cause: Exception, backend_pid: int | None) -> list[tuple]:
        """PostgresStore._find_committed: end the lost connection's backend, then look the write's events up."""
        if not event_ids:
            raise lost_check_only(cause) from cause
        unknown = outcome_unknown(cause)
        log.warning("connection lost during a write (backend %s); finding out whether it committed: %s",
                    backend_pid, cause)
        try:
            async with self._deadline(3), self._connection() as conn:
                if backend_pid is not None:
                    await conn.execute(_TERMINATE_BACKEND, (backend_pid, BACKEND_GONE_TIMEOUT_MS), prepare=False)
                    cur = await conn.execute(_BACKEND_ALIVE, (backend_pid,), prepare=False)
                    if (await _one_row(cur))[0]:
                        raise unknown from cause
                cur = await conn.execute(self._sql["event_by_id"], (uuid.UUID(bytes=event_ids[0]),))
                found = await cur.fetchall()
                rows = []
                if found:
                    rows = await (await conn.execute(self._sql["committed_rows"], (found[0][0], len(event_ids)))).fetchall()
        except (psycopg.Error, PoolTimeout, TimeoutError):
            raise unknown from cause
        return committed_rows(event_ids, found, rows, cause)

    async def _resolve_ambiguous(self, p: PreparedAppend, cause: Exception, backend_pid: int | None) -> list[RecordedEvent]:
        rows = await self._find_committed(p.event_ids, cause, backend_pid)
        return p.recorded([r[2] for r in rows], [r[0] for r in rows])

    async def _reserve_and_copy(self, expected: dict, rows, progress=None) -> tuple[int, int, dict]:
        """PostgresStore._reserve_and_copy: reserve, the ingest progress if any, then the binary COPY,
        in one transaction."""
        streams, reserve, counts = reserve_params(expected, rows.stream_ids)
        n = len(rows.stream_ids)
        event_ids: list = []
        sent = False
        backend = None
        try:
            try:
                try:
                    async with self._deadline(3), self._connection() as conn:
                        backend = conn.info.backend_pid
                        async with conn.transaction():
                            if progress is not None and progress.first:
                                await conn.execute(self._sql["ingest_key_lock"], (progress.key,))
                            before, first, at_us = await _one_row(await conn.execute(self._sql["reserve"], reserve))
                            heads: dict[str, int] = dict(zip(streams, before or ()))  # no events: no heads
                            if progress is not None:
                                cur = await conn.execute(self._sql["record_progress"], progress_params(progress))
                                check_progress(progress, await _one_row(cur))
                            async with conn.cursor().copy(self._sql["copy_events"]) as copy:
                                for buf in copy_writer.buffers(rows, first, heads, at_us):
                                    await copy.write(buf)
                            event_ids = rows.event_ids
                            sent = True  # from here on, a lost connection may have committed
                except TimeoutError as exc:
                    raise self._no_answer(3, connected=backend is not None) from exc
            except (pg_errors.Error, PoolTimeout) as exc:
                if sent and _connection_lost(exc):
                    found = await self._find_committed(event_ids, exc, backend)
                    return found[0][0], found[-1][0], {r[1]: r[2] for r in found}
                raise_write_error(self, exc)
        except asyncio.CancelledError as exc:
            exc.maybe_committed = sent  # type: ignore[attr-defined]
            _add_note(exc, batch_cancelled_note(sent, progress))
            raise
        if not n:
            return 0, 0, {}
        return first, first + n - 1, {s: heads[s] for s in counts}

    async def _append_batch(self, p: PreparedAppend) -> tuple[int, int, dict]:
        return await self._reserve_and_copy(p.expected, copy_writer.EncodedRows(p), p.progress)

    async def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                            progress=None) -> tuple[int, int, dict]:
        if any(type(ev) is RawEvent for ev in events):
            return await self._append_batch(prepare_ingest_batch(stream_ids, events, metadatas, expected, progress))
        return await self._reserve_and_copy(expected, copy_writer.Events(stream_ids, events, metadatas), progress)

    # -- live ----------------------------------------------------------------------------

    async def wait_for_events(self, after_position: int, timeout: float) -> bool:
        """Whether the head passed `after_position` within `timeout` seconds: woken by the NOTIFY of an
        append to this schema (from any process; sent while a listening projector's lease lasts, see
        functions/notify_events.sql), else by looking at the head every `poll_interval` seconds."""
        if type(after_position) is not int or not 0 <= after_position <= INT64_MAX:
            raise ValidationError(f"after_position must be an int in 0..2**63-1, got {after_position!r}")
        if type(timeout) not in (int, float) or not 0 <= timeout < float("inf"):
            raise ValidationError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._listen(), timeout)  # connecting counts in the timeout
        except asyncio.TimeoutError:
            pass
        while True:
            wake = self._wake  # taken before the head is read: a NOTIFY from now on sets it
            if await self._head_position() > after_position:
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            if wake is None or self._listener is None or self._listener.done():  # not listening: poll
                await asyncio.sleep(min(left, self.poll_interval))
                try:
                    await asyncio.wait_for(self._listen(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await asyncio.wait_for(wake.wait(), min(left, self.poll_interval))
            except asyncio.TimeoutError:
                pass

    async def _listen(self) -> None:
        """The listener task running and LISTENing (or, if it cannot connect, none: callers poll)."""
        listening = self._listening
        if self._listener is not None and not self._listener.done() and listening is not None:
            await asyncio.shield(listening)
            return
        self._check_open("wait for events")
        loop = asyncio.get_running_loop()
        self._listening = listening = loop.create_future()
        self._wake = asyncio.Event()
        self._listener = loop.create_task(self._listen_loop(listening), name="eventcore-pg-listen")
        await asyncio.shield(listening)

    async def _listen_loop(self, listening: asyncio.Future) -> None:
        conn = None
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                options=_session_options(f"-c statement_timeout={int(self.statement_timeout * 1000)}",
                                         self._dsn_options),
                application_name=f"eventcore-listen:{self.schema}"[:63], client_encoding="UTF8",
                **self._keepalives)
            events = pgsql.SQL("{}.events").format(pgsql.Identifier(self.schema)).as_string(conn)
            channel = (await _one_row(await conn.execute(_CHANNEL, (events,))))[0]
            if channel is None:
                raise EventCoreError(f"schema {self.schema!r} has no events table: run `eventcore migrate`")
            await conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
            listening.set_result(None)
            async for _ in conn.notifies():
                wake, self._wake = self._wake, asyncio.Event()
                if wake is not None:
                    wake.set()
        except (psycopg.Error, EventCoreError, OSError) as exc:
            log.info("PostgreSQL store %s: not listening for appends (polling): %s", redact(self._dsn),
                     _one_line(exc, self._dsn))
        finally:
            if not listening.done():
                listening.set_result(None)
            if conn is not None:
                await conn.close()

    async def _stop_listening(self) -> None:
        task, self._listener = self._listener, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
