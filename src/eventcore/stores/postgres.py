"""PostgreSQL store (`postgresql://...`): the production backend.

One round trip per append whatever the number of streams (the server-side
function `append_group` locks every participant in sorted order, checks every
expected version before writing anything, advances the heads and inserts the
events), one round trip for `read_streams`, statements rendered once and
prepared on first use (`prepare_threshold=0`), a psycopg_pool of autocommit
connections, group commit (appends from concurrent threads share one
transaction), and a global feed that never skips (see `pg_sql` on the position
fence).

Options (keyword arguments or URL query parameters; keywords win):
schema (default "eventcore"), pool_size (10), pool_min_size (1),
connect_timeout (seconds, 10), statement_timeout (seconds, 30; 0 = none),
pool_timeout (seconds to wait for a free connection, 30), migrate (true),
group_commit (true).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from contextlib import contextmanager
from urllib.parse import parse_qsl

import msgspec

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "the PostgreSQL backend needs psycopg 3 and psycopg_pool: pip install 'pyeventcore[postgres]'"
    ) from exc

from .. import _impl
from ..options import boolean, count, seconds
from ..errors import (
    ConcurrencyError,
    DuplicateCommandError,
    EventCoreError,
    NotAnEventStoreError,
    SchemaVersionError,
    SerializationError,
    StoreNotFoundError,
    StoreTimeoutError,
    StoreUnavailableError,
    ValidationError,
)
from ..events import RawEvent, RecordedEvent
from .._pure import copy as _copy
from . import pg_sql
from .base import EventStore, PreparedAppend, group_by_stream
from .ingest import ingest_overlap
# Redaction lives in a module without a driver (the CLI shows URLs of every backend); these names stay here too.
from .dsn import DEFAULT_SCHEMA, check_url, redact, split_query
from .dsn import without_secrets as _without_secrets
from .pg_projections import PostgresProjectionStorage

log = logging.getLogger("eventcore.store.postgres")

#: Pool size: the machine this was tuned on has 2 cores shared by client and
#: server; 10 connections keep every core busy with room for blocked writers.
DEFAULT_POOL_SIZE = 10
#: Rows encoded per call of the COPY encoder (~100 KiB of rows of ~100-byte events).
COPY_CHUNK_ROWS = 1000
#: Bytes buffered before handing them to psycopg. Measured (ingest of 300k events,
#: medians of 3, this 2-core VM): 16 KiB 63.0k events/s, 64 KiB 62.6k, 256 KiB 55.2k,
#: 1 MiB 60.0k, 4 MiB 52.9k: flat within noise up to 1 MiB, slower past it. 64 KiB
#: means one write per encoder chunk and flat memory.
COPY_FLUSH_BYTES = 64 * 1024
#: TCP keepalives for every connection unless the URL sets them: a server that vanished without
#: closing its sockets (host down, network cut) is found dead after 10 + 3 x 3 = ~19 s of silence
#: instead of the OS default of over two hours, so a call waiting on it fails rather than hangs.
#: (statement_timeout cannot help there: it runs on the server.) Ignored on Unix sockets.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3}
#: How long psycopg_pool keeps retrying one failed connection attempt (with backoff doubling from 1 s)
#: before giving it up, after which the next request starts a fresh attempt at once. Its default,
#: 300 s, let the backoff grow so long that after a 40 s outage the first call succeeded 18.4 s after
#: the server was back (15 s outage: 10.5 s); with 5 s: 0.08 s and 0.02 s (measured, fault tests).
RECONNECT_TIMEOUT = 5.0
#: How long to wait for a lost connection's backend to end before declaring the outcome unknown.
BACKEND_GONE_TIMEOUT_MS = 5000
_OPTIONS = {"schema", "pool_size", "pool_min_size", "connect_timeout", "statement_timeout", "pool_timeout", "migrate",
            "group_commit"}
#: Most appends one group commit carries: enough to share a WAL flush widely, few enough
#: that the server function's per-member scans stay short.
MAX_GROUP = 64
#: Most events one group carries (one append alone may bring up to MAX_EVENTS_PER_APPEND):
#: a transaction numbers its events below 2**20 (pg_sql.POSITION_SHIFT).
MAX_GROUP_EVENTS = 100_000
#: Group commits written at once (see _GroupCommitter).
GROUPS_IN_FLIGHT = 2


#: Longest statement_timeout PostgreSQL takes: the setting is an int32 of milliseconds.
MAX_STATEMENT_TIMEOUT = 2_147_483.647


def _schema_name(schema) -> str:
    """The `schema` option, checked: every name PostgreSQL keeps as given (quotes, spaces, unicode, ...)
    except those the migrations or PostgreSQL would mangle."""
    try:
        size = len(schema.encode("utf-8")) if isinstance(schema, str) else 0
    except UnicodeEncodeError:  # a lone surrogate
        size = 0
    # Over 63 bytes PostgreSQL truncates the name silently (two long names would share a schema);
    # `$` could end the migrations' dollar-quoted function bodies ($$); `%` would read as a
    # placeholder in the statements that take parameters; pg_ names and information_schema (the SQL
    # standard's catalog views, present in every database) belong to the system.
    if (not 1 <= size <= 63 or any(c in schema for c in "\x00$%") or schema.startswith("pg_")
            or schema == "information_schema"):
        raise ValidationError(
            "schema must be a name of 1..63 bytes (UTF-8) without NUL, '$' or '%', not starting with 'pg_', "
            f"and not information_schema, got {schema!r}")
    return schema


class _GroupCommitter:
    """Library-level group commit: appends issued meanwhile by other threads share one transaction.

    Leadership is a token; there are `in_flight` of them. An append that finds a
    token free takes it and goes out at once, carrying with it every append
    already queued (up to MAX_GROUP, and never two appends on one stream: a
    group's members are checked independently, so the second waits for the next
    group). An append that finds every token taken queues. When a leader's group
    is written, it hands its token to the oldest queued append, which leads the
    next group. A lone append therefore never waits, and with two tokens one
    group is being written while the next one's WAL flush is pending.
    """

    class _Request:
        __slots__ = ("prepared", "streams", "done", "result", "lead")

        def __init__(self, prepared: PreparedAppend) -> None:
            self.prepared = prepared
            self.streams = prepared.expected.keys()
            self.done = None  # a threading.Event, made only for an append that has to queue
            self.result = None
            self.lead = False

    def __init__(self, store: "PostgresStore", in_flight: int) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._free = in_flight
        #: Transactions written and appends carried, for measurement.
        self.groups = 0
        self.appends = 0

    def submit(self, prepared: PreparedAppend) -> list[RecordedEvent]:
        req = self._Request(prepared)
        with self._lock:
            lead = self._free > 0
            if lead:
                self._free -= 1
            else:
                req.done = threading.Event()
                self._queue.append(req)
        if not lead:
            req.done.wait()
            lead = req.lead
        if lead:
            self._lead(req)
        if isinstance(req.result, BaseException):
            raise req.result
        return req.result

    def _take(self, own: "_GroupCommitter._Request") -> list:
        """Own request plus queued ones on other streams, oldest first (call with the lock held)."""
        group = [own]
        if not self._queue:
            return group
        taken = set(own.streams)
        events = len(own.prepared)
        kept: deque = deque()
        queue = self._queue
        while queue and len(group) < MAX_GROUP:
            r = queue.popleft()
            if taken.isdisjoint(r.streams) and events + len(r.prepared) <= MAX_GROUP_EVENTS:
                taken.update(r.streams)
                events += len(r.prepared)
                group.append(r)
            else:
                kept.append(r)
        kept.extend(queue)
        self._queue = kept
        return group

    def _lead(self, own: "_GroupCommitter._Request") -> None:
        with self._lock:
            group = self._take(own)
        try:
            results = self._store._append_group([r.prepared for r in group])
        except BaseException as exc:  # noqa: BLE001 - every waiter must be released
            results = [exc] * len(group)
        self.groups += 1
        self.appends += len(group)
        for r, res in zip(group, results):
            r.result = res
            if r is not own:
                r.done.set()
        with self._lock:
            if not self._queue:
                self._free += 1
                return
            heir = self._queue.popleft()
        heir.lead = True  # it leads the next group, its own append first
        heir.done.set()


#: Stream ids are a str subclass, which msgspec hands to the hook: encoded as plain strings.
_encode_json = msgspec.json.Encoder(enc_hook=str).encode
_Raw = msgspec.Raw


#: An append_group argument with no members: what _warm_up sends.
_EMPTY_GROUP = '{"n": 0, "g": []}'


def _encode_group(group: list) -> str:
    """The append_group argument: {"n": participants, "g": [[participants, events, key], ...]} (see
    pg_sql migrations 2 and 4). Payloads and metadata are already JSON: embedded verbatim, never re-encoded.
    Events are numbered 1, 2, ... across the group: their positions are the base position + that."""
    members = []
    n = 0
    ordinal = 0
    for p in group:
        expected = p.expected
        written = set(p.stream_ids)
        n += len(expected)
        events = []
        for sid, eid, t, d, md in zip(p.stream_ids, p.event_ids, p.types, p.payloads, p.metadatas):
            ordinal += 1
            events.append((sid, eid.hex(), t, _Raw(d), None if md is None else _Raw(md), ordinal))
        participants = [(s, expected[s], 1 if s in written else 0) for s in sorted(expected)]
        members.append((participants, events) if p.key is None else (participants, events, p.key))
    return _encode_json({"n": n, "g": members}).decode()


#: A call gets no answer for statement_timeout + this (or + a quarter of statement_timeout if that is
#: more) -> its connection is shut down from the client side (see _Watchdog). The server cancels a
#: statement at statement_timeout and its error arrives at once; the margin covers the commit (not
#: under statement_timeout) and the network. A server that is alive but frozen (SIGSTOP, a hung VM)
#: keeps its sockets open and answers TCP keepalives, so only a client-side deadline ends the wait.
CLIENT_DEADLINE_MARGIN = 2.0
#: How often the watchdog looks at the calls in flight: the precision of the deadline.
WATCHDOG_INTERVAL = 0.25


class _Watchdog:
    """Shuts down the socket of a connection whose call has run past its deadline.

    A call registers (connection, deadline) before it sends anything and removes it when it is
    done: two dict operations. One thread per store, started at the first call (again in a forked
    child), looks at the calls in flight every WATCHDOG_INTERVAL. Shutting the socket down (on a
    duplicate of its descriptor, never closing the one libpq owns) wakes the waiting call with
    "server closed the connection", which the store handles as a lost connection: a read raises
    StoreUnavailableError, a write looks up whether it committed (maybe_committed if it cannot tell).
    `seconds` None (statement_timeout 0): no deadline, watch() and done() do nothing.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._calls: dict = {}
        self._tokens = itertools.count()
        self._started = False
        self._lock = threading.Lock()  # a call's end and its shutdown never cross (see _run)
        self._closed = threading.Event()
        _WATCHDOGS.add(self)

    def watch(self, conn, statements: int = 1):
        if self.seconds is None:
            return None
        token = next(self._tokens)
        if not self._started:
            self._start()
        self._calls[token] = (time.monotonic() + statements * self.seconds, conn)
        return token

    def done(self, token) -> None:
        if token is not None:
            with self._lock:
                self._calls.pop(token, None)

    def close(self) -> None:
        self._closed.set()

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="eventcore-pg-watchdog", daemon=True).start()

    def _after_fork(self) -> None:
        # The child has no watchdog thread, and the parent's calls in flight are not its own (shutting
        # their inherited sockets would cut the parent's connections).
        self._lock = threading.Lock()
        self._calls.clear()
        self._started = False

    def _run(self) -> None:
        while not self._closed.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            late = []
            for token, (deadline, _) in list(self._calls.items()):
                if now > deadline:
                    # Under the lock: the call cannot end (and hand its connection back to the
                    # pool, to another caller) between the check and the shutdown.
                    with self._lock:
                        call = self._calls.pop(token, None)
                        if call is not None and self._shut(call[1]):
                            late.append(token)
            if late:
                log.warning("PostgreSQL gave no answer within %.1fs (statement_timeout + margin): "
                            "shut down %d connection(s)", self.seconds, len(late))

    @staticmethod
    def _shut(conn) -> bool:
        try:
            fd = os.dup(conn.pgconn.socket)
        except (OSError, psycopg.Error):
            return False  # already closed
        with socket.socket(fileno=fd) as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        return True


_WATCHDOGS: "weakref.WeakSet[_Watchdog]" = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [w._after_fork() for w in list(_WATCHDOGS)])


def _conninfo(dsn: str) -> dict:
    """The parameters the DSN sets, decoded; ValidationError if libpq cannot parse it, or could misread
    where the password of a URL ends (before the pool tries to connect: psycopg_pool would log libpq's
    message, which may quote the password, at every attempt)."""
    check_url(dsn)
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValidationError(f"invalid PostgreSQL DSN {redact(dsn)}: {_one_line(exc, dsn)}") from None


def _session_options(ours: str, dsn_options: str) -> str:
    """libpq's `options` for a connection: eventcore's `-c` settings, then the DSN's own. A connection
    keyword replaces the DSN's parameter of that name, so without this the DSN's would be lost; after
    ours, its settings win where both set one (the server applies them in order)."""
    return f"{ours} {dsn_options}" if dsn_options.strip() else ours


def _connection_lost(exc: Exception) -> bool:
    """A failure after which the server may or may not have committed.

    Client-side failures (no SQLSTATE: the socket broke), connection exceptions
    (class 08) and server shutdowns (57P01-57P03). Not errors the server raised
    for the statement itself (a deadlock, a cancelled statement, a lock timeout),
    which roll the transaction back for certain.
    """
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state.startswith("57P")


def _one_line(exc: BaseException, dsn: str) -> str:
    """libpq's message (psycopg's for a host that does not resolve) on one line, without the DSN's secrets."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _without_secrets("; ".join(lines) or type(exc).__name__, dsn)


class _Connections:
    """The pool's connection class (public API of psycopg_pool), made per store, and what it records.

    - The outcome of the latest connection attempt: psycopg_pool retries a failed attempt in the
      background and logs its error, so a caller waiting on the pool would learn only that it timed
      out. The error that says the pool had no connection says why its latest attempt failed.
    - A connection handed over: the store's first connection, made directly (see PostgresStore),
      becomes the pool's first instead of being closed and made again.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._error: str | None = None  # redacted, one line
        self._at = 0.0
        self._spare = None
        self._lock = threading.Lock()
        records = self

        class Connection(psycopg.Connection):
            @classmethod
            def connect(cls, conninfo="", **kwargs):
                spare = records.take_back()
                if spare is not None:
                    if not (spare.closed or spare.broken):
                        return spare
                    spare.close()
                try:
                    conn = super().connect(conninfo, **kwargs)
                except Exception as exc:
                    records._error, records._at = _one_line(exc, records._dsn), time.monotonic()
                    raise
                records._error = None
                return conn

        self.connection_class = Connection

    def hand_over(self, conn) -> None:
        """`conn` (made by connection_class, idle) is the next connection the pool asks for."""
        with self._lock:
            self._spare = conn

    def take_back(self):
        with self._lock:
            spare, self._spare = self._spare, None
        return spare

    def failure(self) -> str | None:
        """'<n> s ago: <reason>' when the latest attempt failed (none has succeeded since), else None."""
        error, at = self._error, self._at
        return None if error is None else f"{time.monotonic() - at:.1f} s ago: {error}"


class PostgresStore(EventStore):
    scheme = "postgresql"

    @classmethod
    def from_url(cls, url: str, **options) -> "PostgresStore":
        # The URL goes to libpq as written, minus eventcore's own parameters: re-encoding it would change
        # values (a %20 is not a +) and the URL the store shows.
        check_url(url)
        base, query = split_query(url)
        merged, libpq_query = {}, []
        for pair in query.split("&") if query else ():
            parsed = parse_qsl(pair, keep_blank_values=True)
            if parsed and parsed[0][0] in _OPTIONS:
                merged[parsed[0][0]] = parsed[0][1]
            elif pair:
                libpq_query.append(pair)
        merged.update(options)
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValidationError(f"unknown postgresql option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        # libpq knows the scheme in lower case only.
        dsn = "postgresql" + base[base.index("://"):] + ("?" + "&".join(libpq_query) if libpq_query else "")
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)  # libpq's own parser: rejects unknown parameters at once
        except psycopg.ProgrammingError as exc:
            raise ValidationError(f"invalid PostgreSQL URL {redact(dsn)}: {_one_line(exc, dsn)}") from None
        return cls(dsn, **merged)

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
        self.schema = _schema_name(schema)
        self.pool_size = count("pool_size", pool_size, 1, text=True)
        self.pool_min_size = min(count("pool_min_size", pool_min_size, 0, text=True), self.pool_size)
        self.connect_timeout = seconds("connect_timeout", connect_timeout, text=True)
        self.statement_timeout = seconds("statement_timeout", statement_timeout, allow_zero=True, text=True,
                                          maximum=MAX_STATEMENT_TIMEOUT)
        self.pool_timeout = seconds("pool_timeout", pool_timeout, text=True)
        self._dsn = dsn
        st = self.statement_timeout
        self._watchdog = _Watchdog(None if st == 0 else st + max(CLIENT_DEADLINE_MARGIN, st / 4))
        given = _conninfo(dsn)
        #: The DSN's `options` (server settings for the session), else PGOPTIONS, as libpq would take them;
        #: every connection the store makes passes them after its own (see _session_options).
        self._dsn_options = given["options"] if "options" in given else os.environ.get("PGOPTIONS", "")
        self._keepalives = {k: v for k, v in KEEPALIVES.items() if k not in given}
        # Names the store's sessions in pg_stat_activity (an operator can tell them apart; unless the URL names them).
        self._application_name = {} if "application_name" in given else {"application_name": f"eventcore:{schema}"[:63]}
        self._group = _GroupCommitter(self, GROUPS_IN_FLIGHT) if boolean("group_commit", group_commit) else None
        migrate = boolean("migrate", migrate)
        # Rendered once: psycopg would otherwise compose each statement's bytes on every call.
        self._sql = {name: pg_sql.q(getattr(pg_sql, name), schema).as_string(None) for name in (
            "APPEND_GROUP", "RESERVE", "COPY_EVENTS", "READ_STREAM", "READ_STREAMS", "STREAM_VERSIONS", "HEAD",
            "EVENT_BY_ID", "COMMITTED_ROWS", "RECORDED_COMMAND", "INGEST_PROGRESS", "INGEST_HOLES", "RESUME_KEYS",
            "RECORD_PROGRESS")}
        self._read_all_sql = {
            (t, p): pg_sql.q(pg_sql.read_all_sql(t, p), schema).as_string(None) for t in (False, True) for p in (False, True)
        }
        # plan_cache_mode: the prepared statements of these connections are planned for each call's
        # values. A plan cached while the tables were small (a new store, before autovacuum's
        # ANALYZE) stays a sequential scan as they grow: a read of one stream went from 0.3 ms to
        # 7 ms after 40,000 more streams, until ANALYZE. Planning anew costs ~0.03-0.06 ms; parsing is
        # still saved. The append functions keep their cached plans (they set it back; see pg_sql).
        options = _session_options(f"-c statement_timeout={int(self.statement_timeout * 1000)} "
                                  "-c plan_cache_mode=force_custom_plan", self._dsn_options)
        #: What every connection of the store is made with, the first one's included.
        self._connect_kwargs = {
            "autocommit": True,
            # Prepare every statement on first use: the hot path runs the same few texts.
            "prepare_threshold": 0,
            "connect_timeout": max(1, int(self.connect_timeout)),
            "options": options,
            **self._keepalives,
            **self._application_name,
        }
        self._connections = _Connections(dsn)
        self._pool = ConnectionPool(
            dsn,
            min_size=self.pool_min_size,
            max_size=self.pool_size,
            timeout=self.pool_timeout,
            kwargs=self._connect_kwargs,
            connection_class=self._connections.connection_class,
            open=False,
            name=f"eventcore:{schema}",
            configure=self._warm_up,
            reconnect_timeout=RECONNECT_TIMEOUT,
        )
        # The first connection is made here, not by the pool: a DSN that never worked (wrong host, port,
        # role, database, sslmode...) fails at once with libpq's reason, where the pool would retry it
        # until connect_timeout and then report only that it timed out. The pool's retries are for
        # outages after the store has connected. The migration (or the schema check) runs on it, then
        # the pool takes it over as its first connection: no connection is made twice.
        first = self._connect_first()
        try:
            if migrate:
                self._migrate(first)
            else:
                self._check_schema(first)
        except BaseException:
            first.close()
            raise
        if self.pool_min_size:
            self._connections.hand_over(first)
        else:
            first.close()
        try:
            self._pool.open(wait=True, timeout=self.connect_timeout)
        except PoolTimeout as exc:
            self._pool.close()
            message = f"cannot connect to PostgreSQL at {redact(dsn)}: {self._no_connection_reason(self.connect_timeout)}"
            log.info("%s", message)
            raise StoreUnavailableError(message) from exc
        finally:
            spare = self._connections.take_back()  # not taken: the pool failed before asking for it
            if spare is not None:
                spare.close()
        log.info("opened PostgreSQL store %s schema %r (pool %d..%d, group commit %s)", redact(dsn), schema,
                 self.pool_min_size, self.pool_size, "on" if self._group is not None else "off")

    def _connect_first(self):
        try:
            return self._connections.connection_class.connect(self._dsn, **self._connect_kwargs)
        except psycopg.Error as exc:
            message = f"cannot connect to PostgreSQL at {redact(self._dsn)}: {_one_line(exc, self._dsn)}"
        # Logged below WARNING: the error says it to the caller, and a warning would reach stderr through
        # logging's last-resort handler in a program that configured no logging (the CLI), saying it twice.
        log.info("%s", message)
        # From None: psycopg's own exception would carry libpq's text unredacted into tracebacks.
        raise StoreUnavailableError(message) from None

    def _no_connection_reason(self, waited: float) -> str:
        """Why the pool had no connection to give: the failure of its latest attempt, if it failed."""
        failure = self._connections.failure()
        if failure is not None:
            return f"no connection within {waited}s; the last attempt failed {failure}"
        return f"no connection within {waited}s"

    def _warm_up(self, conn) -> None:
        """Run on every new pool connection before it is handed out: prepare the hot statements and
        have the server compile the append functions and plan their statements (measured: the first
        append_batch on a cold connection took 10-15 ms against 3-4 ms warm; a pool hands its
        connections out in turn, so without this the first commands of a run each paid it). Writes nothing.
        Errors (e.g. a schema not yet migrated) are ignored: the statements are then prepared on
        first use."""
        try:
            conn.execute(self._sql["APPEND_GROUP"], (_EMPTY_GROUP,)).fetchall()
            conn.execute(self._sql["RESERVE"], ([], [], [], 0)).fetchall()  # no events: returns before writing
            conn.execute(self._sql["READ_STREAMS"], ([],)).fetchall()
        except psycopg.Error:
            pass

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self._dsn)!r}, schema={self.schema!r})"

    @property
    def url(self) -> str:
        return redact(self._dsn)

    def _projection_storage(self) -> PostgresProjectionStorage:
        return PostgresProjectionStorage(self)

    def close(self) -> None:
        log.debug("closing PostgreSQL store %s schema %r", redact(self._dsn), self.schema)
        self._watchdog.close()
        self._pool.close()
        super().close()

    # -- schema ----------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply pending migrations (idempotent; concurrent callers serialise on an advisory lock).

        Returns the schema version now in place.
        """
        try:
            with self._pool.connection() as conn:
                return self._migrate(conn)
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"no PostgreSQL connection for the migration: {self._no_connection_reason(self.pool_timeout)}"
            ) from exc

    def _migrate(self, conn) -> int:
        s = self.schema
        try:
            with conn.transaction():
                conn.execute(pg_sql.MIGRATION_LOCK, (f"eventcore.migrate:{s}",), prepare=False)
                # Another application's schema is refused before anything is made. A current schema
                # needs no DDL at all: a role with only the application's rights (no CREATE on the
                # database, which even CREATE SCHEMA IF NOT EXISTS asks for) connects with the default.
                if (self._schema_state(conn) == "store" and conn.execute(
                        pg_sql.q(pg_sql.CURRENT_VERSION, s), prepare=False).fetchone()[0] == pg_sql.SCHEMA_VERSION):
                    return pg_sql.SCHEMA_VERSION
                conn.execute(pg_sql.q(pg_sql.CREATE_SCHEMA, s), prepare=False)
                conn.execute(pg_sql.q(pg_sql.CREATE_MIGRATIONS, s), prepare=False)
                current = conn.execute(pg_sql.q(pg_sql.CURRENT_VERSION, s), prepare=False).fetchone()[0]
                if current > pg_sql.SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"schema {s!r} is at version {current}, newer than this eventcore "
                        f"understands ({pg_sql.SCHEMA_VERSION}); upgrade eventcore", current, pg_sql.SCHEMA_VERSION
                    )
                for version, description, body in pg_sql.MIGRATIONS:
                    if version > current:
                        log.info("schema %r: applying migration %d (%s)", s, version, description)
                        conn.execute(pg_sql.q(body, s), prepare=False)
                        conn.execute(pg_sql.q(pg_sql.RECORD_MIGRATION, s), (version, description), prepare=False)
                if 0 < current < pg_sql.SCHEMA_VERSION:
                    self._regrant(conn)
            return pg_sql.SCHEMA_VERSION
        except EventCoreError:
            raise
        except pg_errors.InsufficientPrivilege as exc:
            raise StoreUnavailableError(
                f"migration of schema {s!r} failed: {_one_line(exc, self._dsn)} (migrations need the rights of the "
                "schema's owner: run `eventcore migrate --dsn URL` as the owner, and connect roles with fewer "
                "rights with migrate=false)") from exc
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"migration of schema {s!r} failed: {exc}") from exc

    def _regrant(self, conn) -> None:
        """After an upgrade: application roles (those, other than the owner, that may INSERT events)
        get least_privilege_grants again, so they can use the new tables (e.g. migration 4's
        command_keys and ingest_progress) without an administrator re-running the grants."""
        events = sql.Identifier(self.schema, "events").as_string(conn)
        roles = [r[0] for r in conn.execute(pg_sql.APPLICATION_ROLES, (events, events), prepare=False)]
        for role in roles:
            log.info("schema %r: granting role %r what the new schema version needs", self.schema, role)
            for statement in pg_sql.least_privilege_grants(self.schema, role):
                conn.execute(statement, prepare=False)

    def _schema_state(self, conn) -> str:
        """"missing" (no such schema), "empty" (a schema without eventcore's tables) or "store"; another
        application's schema (one of eventcore's table names, but not eventcore's schema_migrations)
        raises NotAnEventStoreError."""
        exists, own, columns = conn.execute(
            pg_sql.SCHEMA_STATE, (pg_sql.OWN_RELATIONS, self.schema), prepare=False).fetchone()
        if not exists:
            return "missing"
        if columns == pg_sql.MIGRATIONS_COLUMNS:
            return "store"
        if own:
            raise NotAnEventStoreError(
                f"schema {self.schema!r} holds another application's tables ({', '.join(own)}), not an eventcore "
                "store; eventcore refuses it and changed nothing (choose another schema with ?schema=NAME)")
        return "empty"

    def schema_version(self) -> int:
        """The migration version of this store's schema (0: not created)."""
        try:
            with self._pool.connection() as conn:
                return self._schema_version(conn)
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"cannot read the schema version: {self._no_connection_reason(self.pool_timeout)}") from exc

    def _schema_version(self, conn) -> int:
        try:
            if self._schema_state(conn) != "store":
                return 0
            return conn.execute(pg_sql.q(pg_sql.CURRENT_VERSION, self.schema), prepare=False).fetchone()[0]
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"cannot read the schema version: {exc}") from exc

    def _schema_versions(self):
        return self.schema_version(), pg_sql.SCHEMA_VERSION

    def pool_stats(self) -> dict:
        """The pool now: connections open (`size`), `in_use`, `idle`, requests `waiting`, its bounds, and
        psycopg_pool's cumulative counters (`requests_num`, `requests_wait_ms`, `connections_num`,
        `connections_ms`, ...) since the store opened."""
        stats = self._pool.get_stats()
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        out = {k: v for k, v in stats.items() if k not in ("pool_size", "pool_available", "pool_min", "pool_max",
                                                              "requests_waiting")}
        out.update(size=size, in_use=size - idle, idle=idle, waiting=stats.get("requests_waiting", 0),
                   min=stats.get("pool_min", self.pool_min_size), max=stats.get("pool_max", self.pool_size))
        return out

    def _check_schema(self, conn) -> None:
        """For a store opened with migrate=False: the schema must exist, be eventcore's and be current."""
        try:
            state = self._schema_state(conn)
            if state != "store":
                raise StoreNotFoundError(
                    f"no eventcore store in schema {self.schema!r}: "
                    + ("the schema does not exist" if state == "missing" else "the schema holds none of its tables")
                    + " (nothing was created; `eventcore migrate --dsn URL`, as the schema owner, creates it)")
            version = conn.execute(pg_sql.q(pg_sql.CURRENT_VERSION, self.schema), prepare=False).fetchone()[0]
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"cannot read the schema version: {exc}") from exc
        if version != pg_sql.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema {self.schema!r} is at version {version}, this eventcore needs {pg_sql.SCHEMA_VERSION}: "
                + ("upgrade eventcore" if version > pg_sql.SCHEMA_VERSION
                   else "run `eventcore migrate --dsn URL` as the schema owner"), version, pg_sql.SCHEMA_VERSION)

    # -- helpers ---------------------------------------------------------------------

    def _fetch(self, name_or_sql, params: tuple) -> list:
        query = self._sql.get(name_or_sql, name_or_sql)
        wd = self._watchdog
        try:
            with self._pool.connection() as conn:
                token = wd.watch(conn)
                try:
                    return conn.execute(query, params).fetchall()
                finally:
                    wd.done(token)
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"PostgreSQL read failed: {self._no_connection_reason(self.pool_timeout)}") from exc
        except pg_errors.QueryCanceled as exc:  # before OperationalError: it is one
            raise StoreTimeoutError(
                f"PostgreSQL read cancelled after statement_timeout={self.statement_timeout}s: {exc}") from exc
        except pg_errors.InsufficientPrivilege as exc:
            raise StoreUnavailableError(
                f"PostgreSQL refused the read: {exc} (grant the role eventcore.stores.pg_sql.least_privilege_grants "
                "for this schema)") from exc
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"PostgreSQL read failed: {exc}") from exc

    # -- writing -----------------------------------------------------------------------

    def _append(self, p: PreparedAppend) -> list[RecordedEvent]:
        if self._group is not None:
            return self._group.submit(p)
        result = self._append_group([p])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _append_group(self, group: list) -> list:
        """One transaction, one round trip, for one or several appends on distinct streams.

        Returns, in order, each append's recorded events or its exception: a
        member whose versions conflict gets its ConcurrencyError and the others
        are written. If one member's data fails the whole statement (e.g. a
        \\u0000 that jsonb cannot hold), each is written alone so only it fails.
        """
        doc = _encode_group(group)
        backend = None  # set once the append may have reached the server
        try:
            with self._pool.connection() as conn:
                backend = conn.info.backend_pid
                wd = self._watchdog
                token = wd.watch(conn)
                try:
                    rows = conn.execute(self._sql["APPEND_GROUP"], (doc,)).fetchall()
                finally:
                    wd.done(token)
        except (pg_errors.Error, PoolTimeout) as exc:
            if backend is not None and _connection_lost(exc):
                out = []
                for p in group:  # the backend is ended once, by the first lookup
                    try:
                        out.append(self._resolve_ambiguous(p, exc, backend))
                    except Exception as err:  # noqa: BLE001 - handed to that append's caller
                        out.append(err)
                    backend = None
                return out
            if len(group) > 1 and (
                    isinstance(exc, (psycopg.DataError, pg_errors.QueryCanceled))
                    or getattr(exc, "sqlstate", None) in pg_sql.BAD_CALL_SQLSTATES):
                # One member's bad data, or one member waiting on a lock past statement_timeout, failed
                # the statement for all: write each alone, so only that member fails.
                return self._append_each(group)
            try:
                self._raise_write_error(exc)
            except Exception as err:  # noqa: BLE001
                return [err] * len(group)
        firsts = []  # ordinal of each member's first event in the group (see _encode_group)
        ordinal = 1
        for p in group:
            firsts.append(ordinal)
            ordinal += len(p)
        out: list = [None] * len(group)
        for m, versions_before, base, conflict, at_us in rows:
            p = group[m - 1]
            if conflict is not None:
                d = json.loads(conflict)
                if "duplicate" in d:
                    out[m - 1] = DuplicateCommandError(d["duplicate"])
                else:
                    out[m - 1] = ConcurrencyError(d["stream_id"], d["expected"], d["actual"])
                continue
            versions = _impl.assign_versions(p.stream_ids, dict(zip(sorted(p.expected), versions_before)))
            p.recorded_at_us = at_us
            first = base + firsts[m - 1]
            out[m - 1] = p.recorded(versions, range(first, first + len(p)))
        return out

    def _append_each(self, group: list) -> list:
        out = []
        for p in group:
            try:
                result = self._append_group([p])[0]
            except Exception as exc:  # noqa: BLE001
                result = exc
            out.append(result)
        return out

    def _raise_write_error(self, exc: Exception):
        """Translate a failed write whose outcome is known (nothing was written) into eventcore's errors."""
        if isinstance(exc, PoolTimeout):
            raise StoreUnavailableError(
                f"PostgreSQL write failed, nothing was written: {self._no_connection_reason(self.pool_timeout)}"
            ) from exc
        if exc.sqlstate == pg_sql.CONFLICT_SQLSTATE:
            d = json.loads(exc.diag.message_detail)
            raise ConcurrencyError(d["stream_id"], d["expected"], d["actual"]) from None
        if exc.sqlstate == pg_sql.TOO_MANY_SQLSTATE or exc.sqlstate in pg_sql.BAD_CALL_SQLSTATES:
            raise ValidationError(f"PostgreSQL refused the append: {exc}") from None
        if isinstance(exc, psycopg.DataError):  # e.g. a \u0000 in a payload, which jsonb cannot hold
            raise SerializationError(f"PostgreSQL rejected the events' data; nothing was written: {exc}") from None
        if isinstance(exc, psycopg.IntegrityError):
            raise ValidationError(f"PostgreSQL rejected the append; nothing was written: {exc}") from None
        if isinstance(exc, pg_errors.QueryCanceled):
            raise StoreTimeoutError(f"PostgreSQL write cancelled after statement_timeout={self.statement_timeout}s; "
                                    f"nothing was written: {exc}") from exc
        # Anything else ended the statement, and with it the transaction: nothing was written.
        raise StoreUnavailableError(f"PostgreSQL write failed; nothing was written: {exc}") from exc

    def _find_committed(self, event_ids: list, cause: Exception, backend_pid: int | None) -> list[tuple]:
        """The connection failed after a write was sent: did it commit?

        The server may not have noticed: a backend waiting on a lock carries on
        and could commit later. So first end that backend and wait until it is
        gone; after that its transaction is settled. Event ids are made before
        the write and unique in the table, and one write's events have
        consecutive positions, so the first id tells. Committed -> its rows
        (position, stream_id, version, event_id); not committed ->
        StoreUnavailableError, safe to retry; unknown (server away, backend not
        confirmed gone) -> StoreUnavailableError(maybe_committed=True).
        """
        if not event_ids:  # a check-only call: whatever happened, it wrote nothing
            raise StoreUnavailableError(
                f"PostgreSQL connection lost during a check-only append; nothing was written: {cause}") from cause
        unknown = StoreUnavailableError(
            f"PostgreSQL connection lost during a write; whether it committed is unknown: {cause}",
            maybe_committed=True,
        )
        log.warning("connection lost during a write (backend %s); finding out whether it committed: %s",
                    backend_pid, cause)
        try:
            with self._pool.connection() as conn, self._watched(conn, statements=3):
                if backend_pid is not None:
                    conn.execute(pg_sql.TERMINATE_BACKEND, (backend_pid, BACKEND_GONE_TIMEOUT_MS), prepare=False)
                    if conn.execute(pg_sql.BACKEND_ALIVE, (backend_pid,), prepare=False).fetchone()[0]:
                        raise unknown from cause
                found = conn.execute(self._sql["EVENT_BY_ID"], (uuid.UUID(bytes=event_ids[0]),)).fetchall()
                rows = conn.execute(self._sql["COMMITTED_ROWS"], (found[0][0], len(event_ids))).fetchall() if found else []
        except (psycopg.Error, PoolTimeout):
            raise unknown from cause
        if not found:
            raise StoreUnavailableError(f"PostgreSQL connection lost during a write, which did not commit: {cause}") from cause
        if [bytes(r[3]) for r in rows] != list(event_ids):
            raise StoreUnavailableError(
                "PostgreSQL connection lost during a write; its first event is stored but the rest does not "
                "match what was sent", maybe_committed=True) from cause
        return rows

    @contextmanager
    def _watched(self, conn, statements: int = 1):
        """The block's calls on `conn` are shut down after `statements` x the client-side deadline."""
        wd = self._watchdog
        token = wd.watch(conn, statements)
        try:
            yield
        finally:
            wd.done(token)

    def _resolve_ambiguous(self, p: PreparedAppend, cause: Exception, backend_pid: int | None) -> list[RecordedEvent]:
        rows = self._find_committed(p.event_ids, cause, backend_pid)
        return p.recorded([r[2] for r in rows], [r[0] for r in rows])

    def _reserve_and_copy(self, expected: dict, stream_ids: list, fill, progress=None) -> tuple[int, int, dict]:
        """One transaction: reserve (lock, check, advance heads), then a binary COPY whose rows
        `fill(copy, first_position, heads, recorded_at_us)` writes (returning the event ids), then
        the ingest `progress` if any (see PreparedAppend.progress)."""
        streams = sorted(expected)
        counts: dict = {}
        for sid in stream_ids:
            counts[sid] = counts.get(sid, 0) + 1
        n = len(stream_ids)
        event_ids: list = []
        sent = False
        backend = None
        try:
            with self._pool.connection() as conn, self._watched(conn, statements=3):
                backend = conn.info.backend_pid
                with conn.transaction():
                    before, first, at_us = conn.execute(
                        self._sql["RESERVE"],
                        (streams, [expected[s] for s in streams], [counts.get(s, 0) for s in streams], n),
                    ).fetchone()
                    heads = dict(zip(streams, before))
                    if progress is not None:
                        key = progress.key
                        counted, filled = conn.execute(self._sql["RECORD_PROGRESS"], (
                            key, progress.lane, progress.lanes, progress.items, progress.before,
                            key, progress.filled, key, progress.holes)).fetchone()
                        if counted != 1 or filled != len(progress.filled):
                            raise ingest_overlap(progress)  # leaves the transaction: nothing is written
                    with conn.cursor().copy(self._sql["COPY_EVENTS"]) as copy:
                        event_ids = fill(copy, first, heads, at_us)
                    sent = True  # from here on, a lost connection may have committed
        except (pg_errors.Error, PoolTimeout) as exc:
            if sent and _connection_lost(exc):
                rows = self._find_committed(event_ids, exc, backend)
                return rows[0][0], rows[-1][0], {r[1]: r[2] for r in rows}
            self._raise_write_error(exc)
        if not n:  # a check-only batch wrote nothing: the (0, 0, {}) every backend reports
            return 0, 0, {}
        return first, first + n - 1, {s: heads[s] for s in counts}

    def _append_batch(self, p: PreparedAppend) -> tuple[int, int, dict]:
        """append_batch: rows already encoded by prepare_append, framed by encode_copy_rows."""
        n = len(p)

        def fill(copy, first, heads, at_us):
            versions = _impl.assign_versions(p.stream_ids, heads)
            encode = _impl.encode_copy_rows
            buf = bytearray(_copy.COPY_HEADER)
            for start in range(0, n, COPY_CHUNK_ROWS):
                stop = start + COPY_CHUNK_ROWS
                encode(buf, first + start, p.stream_ids[start:stop], versions[start:stop], p.event_ids[start:stop],
                       p.types[start:stop], p.payloads[start:stop], p.metadatas[start:stop], at_us)
                if len(buf) >= COPY_FLUSH_BYTES:
                    copy.write(buf)
                    buf = bytearray()
            buf += _copy.COPY_TRAILER
            copy.write(buf)
            return p.event_ids

        return self._reserve_and_copy(p.expected, p.stream_ids, fill, p.progress)

    def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                      progress=None) -> tuple[int, int, dict]:
        """ingest: ids, versions, payload encoding and row framing fused in encode_copy_events."""
        if any(type(ev) is RawEvent for ev in events):
            return super()._ingest_batch(stream_ids, events, metadatas, expected, progress)
        n = len(stream_ids)

        def fill(copy, first, heads, at_us):
            encode = _impl.encode_copy_events
            ids: list = []
            buf = bytearray(_copy.COPY_HEADER)
            for start in range(0, n, COPY_CHUNK_ROWS):
                stop = start + COPY_CHUNK_ROWS
                ids += encode(buf, first + start, stream_ids[start:stop], events[start:stop],
                              metadatas[start:stop], heads, at_us)
                if len(buf) >= COPY_FLUSH_BYTES:
                    copy.write(buf)
                    buf = bytearray()
            buf += _copy.COPY_TRAILER
            copy.write(buf)
            return ids

        return self._reserve_and_copy(expected, stream_ids, fill, progress)

    # -- reading -------------------------------------------------------------------------

    def _recorded_command_rows(self, key):
        return self._fetch("RECORDED_COMMAND", (key,))

    def _ingest_progress(self, key):
        return {lane: (lanes, items) for lane, lanes, items in self._fetch("INGEST_PROGRESS", (key,))}

    def _ingest_holes(self, key):
        return {item for (item,) in self._fetch("INGEST_HOLES", (key,))}

    def _resume_keys(self, prefix):
        return [key for (key,) in self._fetch("RESUME_KEYS", (prefix,))]

    def _read_stream(self, stream_id, from_version, limit):
        return _impl.decode_rows(self._fetch("READ_STREAM", (stream_id, from_version, limit)))

    def _read_streams(self, stream_ids):
        rows = self._fetch("READ_STREAMS", (stream_ids,))
        return group_by_stream(stream_ids, _impl.decode_rows(rows))

    def _stream_versions(self, stream_ids):
        out = dict.fromkeys(stream_ids, 0)
        out.update(self._fetch("STREAM_VERSIONS", (stream_ids,)))
        return out

    def _read_all_page(self, after, types, prefix, limit):
        rows = self._fetch(self._read_all_sql[types is not None, prefix is not None],
                           pg_sql.read_all_params(after, types, prefix, limit))
        return _impl.decode_rows(rows)

    def _head_position(self):
        return self._fetch("HEAD", ())[0][0]
