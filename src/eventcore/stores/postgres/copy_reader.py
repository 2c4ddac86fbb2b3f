"""The readers' COPY: the whole output of a `COPY (SELECT ...) TO STDOUT (FORMAT BINARY)` as one
buffer, or decoded by the hot path's decode_copy as it arrives (every read of the store and of a
projector's catch-up).
And `read_prepared`: a prepared statement's result in binary (short reads of streams), which
`copy_from_result` lays out as a COPY stream.

psycopg starts the COPY (binding the statement's parameters on the client: COPY takes none on the
server) and, should the block fail, cancels and drains it. The messages in between are taken from
libpq directly, through `conn.pgconn` (psycopg's documented low-level access): PostgreSQL sends one
message per row, and `Copy.read()` costs a trip through psycopg's wait machinery for each. Measured
on pages of 1,000 events: 0.67 µs of client CPU a row through `Copy.read()`, 0.32 µs here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

from ...formats import COPY_HEADER, COPY_TRAILER
from .connections import wait_readable, wait_readable_or_writable

_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_UNDEFINED_STATEMENT = "26000"  # invalid_sql_statement_name: not prepared on this connection (any more)
_DUPLICATE_STATEMENT = "42P05"  # duplicate_prepared_statement: prepared already (our record of it was lost)
_BINARY = 1


#: Rows received, at least, before those received so far are decoded while the COPY goes on (see
#: read_copy_decoded). Each decode of a part costs a call and a copy of its header: 256 rows (~50 KB
#: of events of ~200 bytes) make that ~1 % of decoding them, and leave the server room to go on
#: writing the next rows into the socket's buffer (~200 KB on Linux) meanwhile.
DECODE_AFTER_ROWS = 256


def read_copy(conn: psycopg.Connection[Any], query: bytes | str, params: Sequence[Any]) -> bytearray:
    """Every byte a COPY ... TO STDOUT sends (header, rows, trailer); the server's error, if it
    ends the COPY with one (a cancelled statement: QueryCanceled), is raised as psycopg raises it."""
    return _copy(conn, query, params, None)[0]


def read_copy_decoded(conn: psycopg.Connection[Any], query: bytes | str, params: Sequence[Any],
                      decode: Callable[[bytearray], list]) -> list:
    """The events of a COPY ... TO STDOUT (FORMAT BINARY), decoded while it arrives: `decode` (the hot
    path's decode_copy of a whole stream) takes the rows received so far, once there are
    DECODE_AFTER_ROWS of them and libpq holds no more, while the server produces the next ones. The
    client's decoding and the server's sending then overlap instead of following each other.

    Each part is a whole COPY stream of its own: PostgreSQL sends every row of a COPY out as one
    message (the header comes with the first, the trailer in the last), so the messages received
    so far end on a row's end. The last one received is kept for the next part: it may be the one
    that holds the trailer (CopyDone, which says so, can come later). A part is given the header if
    it is not the first, and the trailer. What
    `decode` raises is raised once the COPY is over (the rest of it is read, not decoded), so the
    connection is left idle, as when read_copy returns, whatever its transaction."""
    return _copy(conn, query, params, decode)[1]


def _copy(conn, query, params, decode):
    out = bytearray()
    events: list = []
    failure: BaseException | None = None
    rows = 0  # messages in `out`
    last = 0  # the size of the last one
    if conn.info.encoding != "utf-8":  # the store's connections are made UTF8; a handler may have SET it
        conn.execute("SET client_encoding TO 'UTF8'")
    with conn.cursor().copy(query, params):
        pgconn = conn.pgconn
        get = pgconn.get_copy_data
        while True:
            size, data = get(1)  # 1: never blocks; 0 when libpq holds no complete message yet
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
                _wait_readable(pgconn)
                pgconn.consume_input()
            else:  # -1: the COPY is over (-2, a failure, is raised by psycopg)
                break
        # The statement's own result: COMMAND_OK, or the error that ended the COPY. All of them are
        # read, leaving the connection idle, as psycopg's Copy expects when its block ends without error.
        _results(conn, pgconn, (_COMMAND_OK,))
    if failure is not None:
        raise failure
    if decode is not None:
        events += decode(out)
    return out, events


def split_part(out: bytearray, last: int) -> tuple[bytearray, bytearray]:
    """(the rows received so far but the last message, as a whole COPY stream; a new buffer holding the
    header and that last message, perhaps the trailer: decoded with what comes after it). `out` is reused."""
    kept = out[-last:]
    del out[-last:]
    out += COPY_TRAILER
    rest = bytearray(COPY_HEADER)
    rest += kept
    return out, rest


def _wait_readable(pgconn) -> None:
    # No timeout: the store's watchdog shuts the socket down at the call's deadline, which makes it
    # readable, and libpq then reports the connection lost.
    wait_readable(pgconn.socket)


def read_prepared(conn: psycopg.Connection[Any], name: bytes, query: str, params: list[bytes | None]) -> pq.abc.PGresult:
    """The result (psycopg's pq.PGresult, values in binary) of `query` (its parameters $1.., given
    as text: bytes, or None for NULL), run as the connection's prepared statement `name` (prepared
    on first use). For copy_from_result and decode_copy.

    Why not COPY: a COPY is parsed, planned and started anew each time, 0.05-0.1 ms more than a
    prepared statement, which a command pays on every read (see queries.sql). Why not psycopg's
    cursor: it loads every value into a Python object first; copy_from_result takes each value's
    binary form as it is."""
    if conn.info.encoding != "utf-8":  # as read_copy
        conn.execute("SET client_encoding TO 'UTF8'")
    prepared = conn.__dict__.setdefault("eventcore_prepared", set())
    pgconn = conn.pgconn
    for attempt in (1, 2):
        if name not in prepared:
            prepare(conn, name, query)
        try:
            return _result(conn, pgconn, pgconn.send_query_prepared, (name, params, None, _BINARY))
        except Exception as exc:
            # Gone from the server (a DEALLOCATE ALL, a pooler's reset): prepared again, once.
            if getattr(exc, "sqlstate", None) != _UNDEFINED_STATEMENT or attempt == 2:
                raise
            prepared.discard(name)
    raise AssertionError("unreachable")


def prepare(conn: psycopg.Connection[Any], name: bytes, query: str) -> None:
    """Prepare `query` as `name` on the connection (read_prepared's statements; the store's pool does
    it for each new connection), and remember it there."""
    pgconn = conn.pgconn
    try:
        _result(conn, pgconn, pgconn.send_prepare, (name, query.encode()))
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != _DUPLICATE_STATEMENT:
            raise
    conn.__dict__.setdefault("eventcore_prepared", set()).add(name)


def _result(conn, pgconn, send, args):
    """Send one statement (`send(*args)`: a libpq send_* call) and wait for its one result; the
    server's error raised as psycopg raises it. Leaves the connection idle."""
    send(*args)
    while pgconn.flush():  # 1: the socket took part of it (a long list of stream ids); libpq keeps the rest
        wait_readable_or_writable(pgconn.socket)
        pgconn.consume_input()
    return _results(conn, pgconn, (_TUPLES_OK, _COMMAND_OK))


def _results(conn, pgconn, ok: tuple):
    """Every result of the statement in flight, read (the connection left idle): the last one whose
    status is in `ok`, or the first error, raised as psycopg raises it."""
    out = error = None
    while True:
        while pgconn.is_busy():
            _wait_readable(pgconn)
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
