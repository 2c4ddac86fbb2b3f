"""The PostgreSQL store (`postgresql://...`): the production backend.

One round trip per append whatever the number of streams (the server function
`append_one`, or `append_group` for a group commit of several appends, locks every
participant in one global order, checks every expected version before writing
anything, advances the heads and inserts the events),
one round trip for `read_streams`, statements rendered once and prepared on
first use (`prepare_threshold=0`), a psycopg_pool of autocommit connections,
group commit (group_commit.py), batch writes by binary COPY (copy_writer.py),
a client-side deadline on every call (watchdog.py), and a global feed that
never skips (the fence in sql/queries.sql).

Options (keyword arguments or URL query parameters; keywords win):
schema (default "eventcore"), pool_size (10), pool_min_size (1),
connect_timeout (seconds, 10), statement_timeout (seconds, 30; 0 = none),
pool_timeout (seconds to wait for a free connection, 30), migrate (true),
group_commit (true).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, NoReturn
from contextlib import contextmanager
from urllib.parse import parse_qsl

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pgsql
from psycopg_pool import ConnectionPool, PoolTimeout

from ... import _impl
from ...errors import (
    ConcurrencyError,
    DuplicateCommandError,
    SerializationError,
    StoreTimeoutError,
    StoreUnavailableError,
    ValidationError,
)
from ...events import RawEvent, RecordedEvent
from ...options import boolean, count, seconds
from ..base import EventStore, group_by_stream
from ..ingest import ingest_lanes_differ, ingest_overlap
from ..prepare import PreparedAppend
from .projections import PostgresProjectionStorage
from ..dsn import DEFAULT_SCHEMA, check_url, redact, split_query
from . import copy_writer, migrations
from .copy_reader import prepare, read_copy_decoded, read_prepared
from .connections import KEEPALIVES, RECONNECT_TIMEOUT, _Connections, _connection_lost, _conninfo, _one_line, \
    _session_options
from .group_commit import GROUPS_IN_FLIGHT, _EMPTY_GROUP, _LONE_EMPTY_MEMBER, _encode_group, _GroupCommitter
from .sql import BAD_CALL_SQLSTATES, CONFLICT_SQLSTATE, FIRST_ROWS, QUERIES, SCHEMA_VERSION, TOO_MANY_SQLSTATE, \
    copy_read_all_sql, copy_read_columns_sql, q, read_all_params
from .watchdog import CLIENT_DEADLINE_MARGIN, _Watchdog

log: logging.Logger = logging.getLogger("eventcore.store.postgres")

#: Pool size: 10 connections keep two cores (shared by client and server) busy, with room for
#: writers blocked on a lock.
DEFAULT_POOL_SIZE = 10
#: How long to wait for a lost connection's backend to end before declaring the outcome unknown.
BACKEND_GONE_TIMEOUT_MS = 5000
_OPTIONS = {"schema", "pool_size", "pool_min_size", "connect_timeout", "statement_timeout", "pool_timeout", "migrate",
            "group_commit"}
#: Longest statement_timeout PostgreSQL takes: the setting is an int32 of milliseconds.
MAX_STATEMENT_TIMEOUT = 2_147_483.647
#: The statements the store runs, rendered once per store (psycopg would otherwise compose each
#: statement's bytes on every call).
_STATEMENTS = ("append_group", "append_one", "reserve", "copy_events", "read_stream_first", "read_streams_prepared", "read_stream",
               "read_streams", "stream_versions", "head", "event_by_id", "committed_rows", "recorded_command",
               "type_counts", "ingest_progress", "ingest_holes", "resume_keys", "record_progress", "ingest_key_lock",
               "read_streams_from", "load_snapshot", "read_after_snapshot", "save_snapshot", "snapshot_rows", "drop_snapshots")


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



#: The reads run as prepared statements (see copy_reader.read_prepared), prepared on each new connection.
_PREPARED_READS = ("read_stream_first", "read_streams_prepared")


def _prepared_name(name: str) -> bytes:
    return b"eventcore_" + name.encode()


#: How many stream ids PostgresStore._long_streams holds before it starts again (~100 bytes each).
LONG_STREAMS_KEPT = 10_000


def _remember_long(long: set, stream_ids) -> None:
    """Note streams whose reads go straight to COPY (see _read_stream): a hint that chooses how a
    stream is read, never what is read, so forgetting them all when the set is full costs only the
    prepared page their next reads try first."""
    if len(long) >= LONG_STREAMS_KEPT:
        long.clear()
    long.update(stream_ids)


def remember_longest(long: set, out: dict) -> None:
    """After a read of several streams by prepared statement (`out`: stream -> events): if it was long,
    its longest streams, until the others fit, are read by COPY next time."""
    left = sum(map(len, out.values()))
    if left > FIRST_ROWS:
        longest = []
        for s in sorted(out, key=lambda s: len(out[s]), reverse=True):
            if left <= FIRST_ROWS:
                break
            longest.append(s)
            left -= len(out[s])
        _remember_long(long, longest)


def _text_array(items) -> bytes:
    """A text[] literal of `items` (stream ids: no NUL, checked by StreamId), for a text-format parameter."""
    return ("{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}").encode()


#: An ingest that grows the events table by more than this share of the rows its statistics count
#: (pg_class.reltuples; autovacuum analyzes at the same 10 %, but only once its naptime, a minute, has
#: passed) analyzes the table at once. Until then a read's plan is made for the small table the
#: statistics describe: every page of read_all sorted the whole feed (measured: 1 s a page of 10,000
#: events, 1M events just ingested; 0.02 s after ANALYZE).
ANALYZE_GROWTH = 0.1
#: Smaller ingests leave it to autovacuum: a plan for a few thousand rows more costs little.
ANALYZE_MIN_EVENTS = 10_000
#: The events table's statistics after an ingest: its rows' estimate (pg_class.reltuples), and the
#: ANALYZE of the columns the reads filter and order on. Not the payloads (data, metadata: jsonb), which
#: no statement filters on.
EVENTS_ROW_ESTIMATE = pgsql.SQL("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = %s AND c.relname = 'events'")
ANALYZE_EVENTS = "ANALYZE {s}.events (position, stream_id, version, event_id, type, recorded_at, type_version)"
#: The statistics target of that ANALYZE (SET LOCAL: its transaction only): 30 samples 9,000 rows, enough
#: for a row count within a fraction of a percent and the types' and streams' commonest values. Measured on
#: 1M events: 0.04 s, against 0.14 s at the default 100 and 0.19-0.23 s with the payloads sampled too, a
#: share of a 10 s load the ingest paid after its last batch. Autovacuum analyzes at the server's target
#: once the table has grown by another tenth.
ANALYZE_TARGET_SQL = pgsql.SQL("SET LOCAL default_statistics_target = 30")


def needs_analyze(events: int, row_estimate: Any) -> bool:
    """Whether an ingest of `events` events into a table whose statistics count `row_estimate` rows
    (a pg_class row, or None) should analyze it at once (see ANALYZE_GROWTH)."""
    return events >= ANALYZE_MIN_EVENTS and row_estimate is not None \
        and events > ANALYZE_GROWTH * max(row_estimate[0] or 0, 0)


def after_snapshot(rows: list, state_version: int, stream_ids: list) -> tuple:
    """What `read_after_snapshot` returned, as `_read_after_snapshot` gives it: (the snapshot or None,
    stream -> events, the versions each stream was read from, as the statement computed them, the
    feed's fence or None when nothing was read)."""
    stored = None
    froms = dict.fromkeys(stream_ids, 1)
    fence = rows[0][13] if rows else None
    if rows and rows[-1][0] is None:
        covers, state, streams, versions = rows.pop()[9:13]
        stored = (state_version, covers, bytes(state))
        for sid in stream_ids:  # array_position: the first match; an index past the array is NULL
            if sid in streams:
                i = streams.index(sid)
                v = versions[i] if i < len(versions) else None
                froms[sid] = max(1, 1 if v is None else v)
    events = _impl.decode_rows([row[:9] for row in rows])
    return stored, group_by_stream(list(stream_ids), events), froms, fence


def save_snapshot_params(key: str, command: str, state_version: int, covers: str, state: bytes, events: int) -> tuple:
    """The parameters of `save_snapshot`: the covers also as the arrays the reads compute from."""
    parsed = msgspec.json.decode(covers)
    streams = list(parsed)
    return key, command, state_version, covers, streams, [parsed[s][0] for s in streams], state, events


def _fetch_all(conn, query, params) -> list:
    return conn.execute(query, params).fetchall()


def split_url(url: str, options: dict) -> tuple[str, dict]:
    """(the DSN libpq is given, eventcore's options) of a postgresql:// URL or a libpq key=value string
    and keyword `options` (see PostgresStore.from_url), checked."""
    if "://" not in url:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValidationError(f"unknown postgresql option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        return url, options  # the store checks the string with libpq's parser, as below
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
    return dsn, merged


def no_connection_reason(connections: _Connections, waited: float) -> str:
    """Why the pool had no connection to give: the failure of its latest attempt, if it failed."""
    failure = connections.failure()
    if failure is not None:
        return f"no connection within {waited}s; the last attempt failed {failure}"
    return f"no connection within {waited}s"


def raise_write_error(store, exc: Exception) -> NoReturn:
    """Translate a failed write of `store` whose outcome is known (nothing was written) into eventcore's errors."""
    if isinstance(exc, PoolTimeout):
        raise StoreUnavailableError(
            f"PostgreSQL write failed, nothing was written: {store._no_connection_reason(store.pool_timeout)}"
        ) from exc
    if exc.sqlstate == CONFLICT_SQLSTATE:
        d = json.loads(exc.diag.message_detail)
        raise ConcurrencyError(d["stream_id"], d["expected"], d["actual"]) from None
    if exc.sqlstate == TOO_MANY_SQLSTATE or exc.sqlstate in BAD_CALL_SQLSTATES:
        raise ValidationError(f"PostgreSQL refused the append: {exc}") from None
    if isinstance(exc, psycopg.DataError):  # e.g. a \u0000 in a payload, which jsonb cannot hold
        raise SerializationError(f"PostgreSQL rejected the events' data; nothing was written: {exc}") from None
    if isinstance(exc, psycopg.IntegrityError):
        raise ValidationError(f"PostgreSQL rejected the append; nothing was written: {exc}") from None
    if isinstance(exc, pg_errors.QueryCanceled):
        raise StoreTimeoutError(f"PostgreSQL write cancelled after statement_timeout={store.statement_timeout}s; "
                                f"nothing was written: {exc}") from exc
    # Anything else ended the statement, and with it the transaction: nothing was written.
    raise StoreUnavailableError(f"PostgreSQL write failed; nothing was written: {exc}") from exc


def lost_check_only(cause: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"PostgreSQL connection lost during a check-only append; nothing was written: {cause}")


def outcome_unknown(cause: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"PostgreSQL connection lost during a write; whether it committed is unknown: {cause}",
        maybe_committed=True,
    )


def committed_rows(event_ids: list, found: list, rows: list, cause: Exception) -> list:
    """What a lost write's lookup found (see _find_committed): its rows, or the error saying it did not commit
    (or cannot be told)."""
    if not found:
        raise StoreUnavailableError(f"PostgreSQL connection lost during a write, which did not commit: {cause}") from cause
    if [bytes(r[3]) for r in rows] != list(event_ids):
        raise StoreUnavailableError(
            "PostgreSQL connection lost during a write; its first event is stored but the rest does not "
            "match what was sent", maybe_committed=True) from cause
    return rows


def reserve_params(expected: dict, stream_ids: list) -> tuple[list, tuple, dict]:
    """(participants sorted, the `reserve` statement's parameters, events per written stream) of a batch."""
    streams = sorted(expected)
    counts: dict = {}
    for sid in stream_ids:
        counts[sid] = counts.get(sid, 0) + 1
    return streams, (streams, [expected[s] for s in streams], [counts.get(s, 0) for s in streams],
                     len(stream_ids)), counts


def progress_params(progress) -> tuple:
    """The `record_progress` statement's parameters for an ingest batch's IngestProgress."""
    key = progress.key
    return (key, progress.lane, progress.lanes, progress.items, key, progress.lanes,
            progress.before, key, progress.filled, key, progress.lane, progress.holes,
            progress.lane, key, progress.lanes)


def check_progress(progress, row: Any) -> None:
    """`record_progress`'s answer: raises if another run recorded the key with another lane count, or
    moved this lane's count or filled one of its holes."""
    counted, filled, differ = row
    if differ:
        raise ingest_lanes_differ(progress)
    if counted != 1 or filled != len(progress.filled):
        raise ingest_overlap(progress)


def read_error(store, exc: Exception) -> StoreUnavailableError:
    """A failed read of `store` (a PoolTimeout or a psycopg error) as eventcore's error."""
    if isinstance(exc, PoolTimeout):
        return StoreUnavailableError(
            f"PostgreSQL read failed: {store._no_connection_reason(store.pool_timeout)}")
    if isinstance(exc, pg_errors.QueryCanceled):  # before OperationalError: it is one
        return StoreTimeoutError(
            f"PostgreSQL read cancelled after statement_timeout={store.statement_timeout}s: {exc}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return StoreUnavailableError(
            f"PostgreSQL refused the read: {exc} (grant the role eventcore.stores.postgres.least_privilege_grants "
            "for this schema)")
    return StoreUnavailableError(f"PostgreSQL read failed: {exc}")


def pool_stats_of(store) -> dict[str, Any]:
    """`store.pool_stats()` from its pool's (psycopg_pool's) statistics."""
    stats = store._pool.get_stats()
    size = stats.get("pool_size", 0)
    idle = stats.get("pool_available", 0)
    out = {k: v for k, v in stats.items() if k not in ("pool_size", "pool_available", "pool_min", "pool_max",
                                                          "requests_waiting")}
    out.update(size=size, in_use=size - idle, idle=idle, waiting=stats.get("requests_waiting", 0),
               min=stats.get("pool_min", store.pool_min_size), max=stats.get("pool_max", store.pool_size))
    return out


def group_outcomes(group: list, rows: list) -> list:
    """Each member's recorded events or exception, from the rows of append_one / append_group."""
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


def write_each_alone(group: list, exc: Exception) -> bool:
    """Whether a group's failed statement is written again member by member: one member's bad data, or
    one member waiting on a lock past statement_timeout, failed it for all."""
    return len(group) > 1 and (
        isinstance(exc, (psycopg.DataError, pg_errors.QueryCanceled))
        or getattr(exc, "sqlstate", None) in BAD_CALL_SQLSTATES)


def configure(store, dsn: str, schema, pool_size, pool_min_size, connect_timeout, statement_timeout, pool_timeout,
              migrate, group_commit) -> tuple[bool, bool]:
    """The store's options checked and set on `store` (a PostgresStore, or eventcore.aio's), with what
    follows from them: statements rendered for its schema, the keyword arguments of its connections.
    Returns (group_commit, migrate)."""
    store.schema = _schema_name(schema)
    store.pool_size = count("pool_size", pool_size, 1, text=True)
    store.pool_min_size = min(count("pool_min_size", pool_min_size, 0, text=True), store.pool_size)
    store.connect_timeout = seconds("connect_timeout", connect_timeout, text=True)
    store.statement_timeout = seconds("statement_timeout", statement_timeout, allow_zero=True, text=True,
                                      maximum=MAX_STATEMENT_TIMEOUT)
    store.pool_timeout = seconds("pool_timeout", pool_timeout, text=True)
    store._dsn = dsn
    given = _conninfo(dsn)
    #: The DSN's `options` (server settings for the session), else PGOPTIONS, as libpq would take them;
    #: every connection the store makes passes them after its own (see _session_options).
    store._dsn_options = given["options"] if "options" in given else os.environ.get("PGOPTIONS", "")
    store._keepalives = {k: v for k, v in KEEPALIVES.items() if k not in given}
    # Names the store's sessions in pg_stat_activity (an operator can tell them apart; unless the URL names them).
    store._application_name = {} if "application_name" in given else {"application_name": f"eventcore:{schema}"[:63]}
    #: Streams known, from an earlier read, to hold more than FIRST_ROWS events: read by COPY at once.
    store._long_streams = set()
    group_commit = boolean("group_commit", group_commit)
    migrate = boolean("migrate", migrate)
    # Rendered once: psycopg would otherwise compose each statement's bytes on every call.
    store._sql = {name: q(QUERIES[name], schema).as_string(None) for name in _STATEMENTS}
    store._read_all_sql = {
        (t, p): q(copy_read_all_sql(t, p), schema).as_string(None) for t in (False, True) for p in (False, True)
    }
    # read_columns' pages: read_all's statements with fewer columns (queries.sql: column_columns).
    store._read_columns_sql = {
        (t, p, d): q(copy_read_columns_sql(t, p, d), schema).as_string(None)
        for t in (False, True) for p in (False, True) for d in (False, True)
    }
    # plan_cache_mode: the prepared statements of these connections are planned for each call's
    # values. A plan cached while the tables were small (a new store, before autovacuum's
    # ANALYZE) stays a sequential scan as they grow: a read of one stream went from 0.3 ms to
    # 7 ms after 40,000 more streams, until ANALYZE. Planning anew costs ~0.03-0.06 ms; parsing is
    # still saved. The append functions keep their cached plans (they set it back; see sql/functions/).
    # default_transaction_isolation, pinned after the DSN's options (which also override ALTER ROLE or
    # DATABASE ... SET): the append functions read the stream heads in a statement after their locks,
    # which sees what committed meanwhile only in READ COMMITTED; in REPEATABLE READ a read-only stream
    # moved while the append waited would pass its check. The functions refuse any other level.
    options = _session_options(f"-c statement_timeout={int(store.statement_timeout * 1000)} "
                              "-c plan_cache_mode=force_custom_plan", store._dsn_options,
                              pinned="-c default_transaction_isolation=read\\ committed")
    #: What every connection of the store is made with, the first one's included.
    store._connect_kwargs = {
        "autocommit": True,
        # Prepare every statement on first use: the hot path runs the same few texts.
        "prepare_threshold": 0,
        "connect_timeout": max(1, int(store.connect_timeout)),
        "options": options,
        # Binary COPY carries text in the client's encoding, and the COPY reader and writer speak
        # UTF-8: a LATIN1 database, PGCLIENTENCODING or the URL's own client_encoding would
        # otherwise turn 'é' into two wrong characters or a refused row. (A keyword wins over both.)
        "client_encoding": "UTF8",
        **store._keepalives,
        **store._application_name,
    }
    return group_commit, migrate


class PostgresStore(EventStore):
    """The PostgreSQL store (`ec.connect("postgresql://...")`): psycopg 3 with a connection pool, one
    schema of tables and functions; see this module's docstring for what each option does."""

    scheme = "postgresql"
    #: A COPY is bound by one server backend: two lanes (connections) load a file 1.3-1.5x faster than
    #: one on a 2-core server (1,000,000 lines: 130k against 98k events/s, 2026-12-07), as two raw COPY
    #: streams do (1.44-1.54x). More only pays with more server cores: --parallel N.
    default_ingest_lanes = 2
    # Set by configure():
    schema: str
    pool_size: int
    pool_min_size: int
    connect_timeout: float
    statement_timeout: float
    pool_timeout: float
    _dsn: str
    #: The DSN's `options` (server settings for the session), else PGOPTIONS, as libpq would take them;
    #: every connection the store makes passes them after its own (see _session_options).
    _dsn_options: str
    _keepalives: dict[str, Any]
    _application_name: dict[str, str]
    #: Streams known, from an earlier read, to hold more than FIRST_ROWS events: read by COPY at once.
    _long_streams: set[str]
    _sql: dict[str, str]
    _read_all_sql: dict[tuple[bool, bool], str]
    _read_columns_sql: dict[tuple[bool, bool, bool], str]
    #: What every connection of the store is made with, the first one's included.
    _connect_kwargs: dict[str, Any]

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """The store a postgresql:// URL names: eventcore's own options taken from its query (and `options`,
        which win), the rest of the URL passed to libpq as written. libpq's key=value form takes eventcore's
        options as keyword arguments only (libpq refuses keys it does not know)."""
        dsn, options = split_url(url, options)
        return cls(dsn, **options)

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
        group_commit, migrate = configure(self, dsn, schema, pool_size, pool_min_size, connect_timeout,
                                          statement_timeout, pool_timeout, migrate, group_commit)
        st = self.statement_timeout
        self._watchdog = _Watchdog(None if st == 0 else st + max(CLIENT_DEADLINE_MARGIN, st / 4))
        self._group = _GroupCommitter(self, GROUPS_IN_FLIGHT) if group_commit else None
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
                migrations.migrate(first, self.schema, self._dsn)
            else:
                migrations.check_schema(first, self.schema)
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
        return no_connection_reason(self._connections, waited)

    def _warm_up(self, conn) -> None:
        """Run on every new pool connection before it is handed out: prepare the hot statements and
        have the server compile the append functions and plan their statements (measured: the first
        append_batch on a cold connection took 10-15 ms against 3-4 ms warm; a pool hands its
        connections out in turn, so without this the first commands of a run each paid it). Writes nothing.
        Errors (e.g. a schema not yet migrated) are ignored: the statements are then prepared on
        first use."""
        try:
            conn.execute(self._sql["append_group"], (_EMPTY_GROUP,)).fetchall()
            conn.execute(self._sql["append_one"], (_LONE_EMPTY_MEMBER,)).fetchall()
            conn.execute(self._sql["reserve"], ([], [], [], 0)).fetchall()  # no events: returns before writing
            for name in _PREPARED_READS:
                prepare(conn, _prepared_name(name), self._sql[name])
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

    def migrate(self, *, reapply_functions: bool = False) -> int:
        """Apply pending migrations (idempotent; concurrent callers serialise on an advisory lock), and
        the functions when they may differ from this eventcore's, or always with `reapply_functions`
        (`eventcore migrate`). Needs the schema owner's rights unless the schema is current.

        Returns the schema version now in place.
        """
        try:
            with self._pool.connection() as conn:
                return migrations.migrate(conn, self.schema, self._dsn, reapply_functions=reapply_functions)
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"no PostgreSQL connection for the migration: {self._no_connection_reason(self.pool_timeout)}"
            ) from exc

    def schema_version(self) -> int:
        """The migration version of this store's schema (0: not created)."""
        try:
            with self._pool.connection() as conn:
                return migrations.schema_version(conn, self.schema)
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"cannot read the schema version: {self._no_connection_reason(self.pool_timeout)}") from exc

    def _schema_versions(self):
        return self.schema_version(), SCHEMA_VERSION

    def pool_stats(self) -> dict[str, Any]:
        """The pool now: connections open (`size`), `in_use`, `idle`, requests `waiting`, its bounds, and
        psycopg_pool's cumulative counters (`requests_num`, `requests_wait_ms`, `connections_num`,
        `connections_ms`, ...) since the store opened."""
        return pool_stats_of(self)

    # -- helpers ---------------------------------------------------------------------

    def _fetch(self, name_or_sql, params: tuple) -> list:
        """The rows of a statement (by name, or its text)."""
        return self._read(_fetch_all, name_or_sql, params)

    def _copy_events(self, name_or_sql, params: tuple, raw: bool) -> list[RecordedEvent]:
        """The events of a `COPY ... TO STDOUT (FORMAT BINARY)` of the events' columns (its parameters
        bound by psycopg on the client), decoded as they arrive (see read_copy_decoded), under the
        same deadline and errors as `_fetch`."""
        return self._read(lambda conn, query, values: read_copy_decoded(
            conn, query, values, lambda buffer: _impl.decode_copy(buffer, raw)), name_or_sql, params)

    def _read(self, run, name_or_sql, params: tuple):
        """`run(conn, query, params)` on a pooled connection, under the client-side deadline, its
        failures as eventcore's errors."""
        query = self._sql.get(name_or_sql, name_or_sql)
        wd = self._watchdog
        with self._reading():
            with self._pool.connection() as conn:
                token = wd.watch(conn)
                try:
                    return run(conn, query, params)
                finally:
                    wd.done(token)

    @contextmanager
    def _reading(self):
        """A read's failures as eventcore's errors."""
        try:
            yield
        except (PoolTimeout, psycopg.Error) as exc:
            raise read_error(self, exc) from exc

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
                    # A lone append (a group of one) runs the function made for it (functions/append_one.sql).
                    statement = self._sql["append_one" if len(group) == 1 else "append_group"]
                    rows = conn.execute(statement, (doc,)).fetchall()
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
            if write_each_alone(group, exc):
                # One member's bad data, or one member waiting on a lock past statement_timeout, failed
                # the statement for all: write each alone, so only that member fails.
                return self._append_each(group)
            try:
                self._raise_write_error(exc)
            except Exception as err:  # noqa: BLE001
                return [err] * len(group)
        return group_outcomes(group, rows)

    def _append_each(self, group: list) -> list:
        out = []
        for p in group:
            try:
                result = self._append_group([p])[0]
            except Exception as exc:  # noqa: BLE001
                result = exc
            out.append(result)
        return out

    def _raise_write_error(self, exc: Exception) -> NoReturn:
        raise_write_error(self, exc)

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
            raise lost_check_only(cause) from cause
        unknown = outcome_unknown(cause)
        log.warning("connection lost during a write (backend %s); finding out whether it committed: %s",
                    backend_pid, cause)
        try:
            with self._pool.connection() as conn, self._watched(conn, statements=3):
                if backend_pid is not None:
                    conn.execute(QUERIES["terminate_backend"], (backend_pid, BACKEND_GONE_TIMEOUT_MS), prepare=False)
                    if conn.execute(QUERIES["backend_alive"], (backend_pid,), prepare=False).fetchone()[0]:
                        raise unknown from cause
                found = conn.execute(self._sql["event_by_id"], (uuid.UUID(bytes=event_ids[0]),)).fetchall()
                rows = conn.execute(self._sql["committed_rows"], (found[0][0], len(event_ids))).fetchall() if found else []
        except (psycopg.Error, PoolTimeout):
            raise unknown from cause
        return committed_rows(event_ids, found, rows, cause)

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

    def _reserve_and_copy(self, expected: dict, rows, progress=None) -> tuple[int, int, dict]:
        """One transaction: reserve (lock, check, advance heads), the ingest `progress` if any (see
        PreparedAppend.progress), then a binary COPY of `rows` (see copy_writer)."""
        streams, reserve, counts = reserve_params(expected, rows.stream_ids)
        n = len(rows.stream_ids)
        event_ids: list = []
        sent = False
        backend = None
        try:
            with self._pool.connection() as conn, self._watched(conn, statements=3):
                backend = conn.info.backend_pid
                with conn.transaction():
                    if progress is not None and progress.first:
                        conn.execute(self._sql["ingest_key_lock"], (progress.key,))
                    before, first, at_us = conn.execute(self._sql["reserve"], reserve).fetchone()
                    heads = dict(zip(streams, before or ()))  # no events: reserve returns no heads
                    if progress is not None:
                        # Raises (leaving the transaction: nothing is written) if another run moved the key.
                        check_progress(progress, conn.execute(self._sql["record_progress"],
                                                              progress_params(progress)).fetchone())
                    with conn.cursor().copy(self._sql["copy_events"]) as copy:
                        event_ids = copy_writer.write(copy, rows, first, heads, at_us)
                    sent = True  # from here on, a lost connection may have committed
        except (pg_errors.Error, PoolTimeout) as exc:
            if sent and _connection_lost(exc):
                found = self._find_committed(event_ids, exc, backend)
                return found[0][0], found[-1][0], {r[1]: r[2] for r in found}
            self._raise_write_error(exc)
        if not n:  # a check-only batch wrote nothing: the (0, 0, {}) every backend reports
            return 0, 0, {}
        return first, first + n - 1, {s: heads[s] for s in counts}

    def _append_batch(self, p: PreparedAppend) -> tuple[int, int, dict]:
        """append_batch: rows already encoded by prepare_append."""
        return self._reserve_and_copy(p.expected, copy_writer.EncodedRows(p), p.progress)

    def _ingest_batch(self, stream_ids: list, events: list, metadatas: list, expected: dict,
                      progress=None) -> tuple[int, int, dict]:
        """ingest: events encoded while their rows are framed (raw events: encoded first, as append_batch)."""
        if any(type(ev) is RawEvent for ev in events):
            return super()._ingest_batch(stream_ids, events, metadatas, expected, progress)
        return self._reserve_and_copy(expected, copy_writer.Events(stream_ids, events, metadatas), progress)

    # -- reading -------------------------------------------------------------------------

    def _recorded_command_rows(self, key):
        return self._fetch("recorded_command", (key,))

    def _ingest_progress(self, key):
        return {lane: (lanes, items) for lane, lanes, items in self._fetch("ingest_progress", (key,))}

    def _ingest_holes(self, key):
        return {(lane, item) for lane, item in self._fetch("ingest_holes", (key,))}

    def _resume_keys(self, prefix):
        return [key for (key,) in self._fetch("resume_keys", (prefix,))]

    def _prepared_read(self, name: str, params: list, raw: bool) -> list[RecordedEvent]:
        """The events of one of _PREPARED_READS (see queries.sql): prepared, fetched in binary."""
        statement = _prepared_name(name)
        result = self._read(lambda conn, query, values: read_prepared(conn, statement, query, values), name, params)
        return _impl.decode_copy(_impl.copy_from_result(result), raw)

    def _read_stream(self, stream_id, from_version, limit, raw=False):
        long = self._long_streams
        if stream_id in long and (limit is None or limit > FIRST_ROWS):
            return self._copy_events("read_stream", (stream_id, from_version, limit), raw)
        # FIRST_ROWS events by prepared statement; the rest, if there may be more, by COPY from the next
        # version. A stream's versions never change, so the two reads join without a gap or a repeat,
        # and together they are the stream as the second one saw it: one point in time still.
        first = FIRST_ROWS if limit is None else min(limit, FIRST_ROWS)
        events = self._prepared_read("read_stream_first", [stream_id.encode(), b"%d" % from_version, b"%d" % first], raw)
        if len(events) == FIRST_ROWS and limit != FIRST_ROWS:
            events += self._copy_events(
                "read_stream", (stream_id, events[-1].version + 1, None if limit is None else limit - FIRST_ROWS), raw)
            _remember_long(long, (stream_id,))
        return events

    def _read_streams(self, stream_ids, raw=False):
        if len(stream_ids) == 1:
            return {stream_ids[0]: self._read_stream(stream_ids[0], 1, None, raw)}
        # One statement, so the streams are read at one point in time (the executor counts on it, see
        # _attempts): prepared, unless one of them is known to be long (then COPY, cheaper per event).
        long = self._long_streams
        if any(s in long for s in stream_ids):
            return group_by_stream(stream_ids, self._copy_events("read_streams", (stream_ids,), raw))
        out = group_by_stream(stream_ids, self._prepared_read("read_streams_prepared", [_text_array(stream_ids)], raw))
        remember_longest(long, out)
        return out

    supports_snapshots = True

    def _read_streams_from(self, from_versions, raw=False):
        ids = list(from_versions)
        rows = self._fetch("read_streams_from", (ids, [max(v, 1) for v in from_versions.values()]))
        return group_by_stream(ids, _impl.decode_rows(rows, raw))

    def _load_snapshot(self, key):
        rows = self._fetch("load_snapshot", (key,))
        return (rows[0][0], rows[0][1], bytes(rows[0][2])) if rows else None

    def _read_after_snapshot(self, key, state_version, stream_ids):
        return after_snapshot(self._fetch("read_after_snapshot", (key, state_version, list(stream_ids))),
                              state_version, stream_ids)

    def _save_snapshot(self, key, command, state_version, covers, state, events):
        self._read(lambda conn, query, params: conn.execute(query, params), "save_snapshot",
                   save_snapshot_params(key, command, state_version, covers, state, events))

    def _snapshot_rows(self):
        return self._fetch("snapshot_rows", ())

    def _drop_snapshots(self, command, before=None):
        return self._fetch("drop_snapshots", (command, command, before, before))[0][0]

    def _stream_versions(self, stream_ids):
        out = dict.fromkeys(stream_ids, 0)
        out.update(self._fetch("stream_versions", (stream_ids,)))
        return out

    def _read_all_page(self, after, types, prefix, limit, raw=False):
        return self._copy_events(self._read_all_sql[types is not None, prefix is not None],
                                 read_all_params(after, types, prefix, limit), raw)

    def _after_ingest(self, events: int) -> None:
        """Analyze the events table after an ingest that grew it by more than ANALYZE_GROWTH of the rows
        the planner's statistics count; a failure (a role that does not own the table) is only logged."""
        if events < ANALYZE_MIN_EVENTS:
            return
        try:
            with self._pool.connection() as conn, self._watched(conn, statements=2):
                if needs_analyze(events, conn.execute(EVENTS_ROW_ESTIMATE, (self.schema,), prepare=False).fetchone()):
                    with conn.transaction():
                        conn.execute(ANALYZE_TARGET_SQL, prepare=False)
                        conn.execute(q(ANALYZE_EVENTS, self.schema), prepare=False)
        except (psycopg.Error, PoolTimeout) as exc:
            log.debug("events table not analyzed after an ingest of %s events: %s", events, exc)

    def _read_columns_page(self, after, types, prefix, limit, filler):
        """One page of read_all (the same statement: filters, fence, order) decoded by COPY straight into
        `filler`'s columns (eventcore.columns, read_columns): (rows read, the last one's position)."""
        decode = filler._page_decoder(limit)
        self._read(lambda conn, query, values: read_copy_decoded(conn, query, values, decode),
                   self._read_columns_sql[types is not None, prefix is not None, bool(filler.plan.fields)],
                   read_all_params(after, types, prefix, limit))
        return decode.done()

    def _type_counts(self):
        return self._fetch("type_counts", ())

    def _head_position(self):
        return self._fetch("head", ())[0][0]
