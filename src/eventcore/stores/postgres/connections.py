"""Connections: what every connection of the store is made with, and what a failed one means.

libpq's `options` (eventcore's session settings, then the DSN's own), TCP keepalives, the pool's
connection class (which remembers why the latest attempt failed, and hands the store's first
connection over to the pool), and how a failure is classified (lost: the write may have
committed) and shown (one line, without the DSN's secrets).
"""
from __future__ import annotations

import select
import threading
import time

import psycopg

from ...errors import ValidationError
from ..dsn import check_url, redact
from ..dsn import without_secrets as _without_secrets

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


def _conninfo(dsn: str) -> dict:
    """The parameters the DSN sets, decoded; ValidationError if libpq cannot parse it, or could misread
    where the password of a URL ends (before the pool tries to connect: psycopg_pool would log libpq's
    message, which may quote the password, at every attempt)."""
    check_url(dsn)
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValidationError(f"invalid PostgreSQL DSN {redact(dsn)}: {_one_line(exc, dsn)}") from None


def _session_options(ours: str, dsn_options: str, pinned: str = "") -> str:
    """libpq's `options` for a connection: eventcore's `-c` settings, then the DSN's own, then `pinned`.
    A connection keyword replaces the DSN's parameter of that name, so without this the DSN's would be
    lost; after ours, its settings win where both set one (the server applies them in order), except
    the `pinned` ones, which come last: settings the store's correctness needs."""
    return " ".join(part for part in (ours, dsn_options.strip(), pinned) if part)


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


_poll = getattr(select, "poll", None)  # Windows has none; its select takes any socket


def wait_readable(fd: int, timeout: float | None = None) -> bool:
    """Whether `fd` became readable within `timeout` seconds (None: wait as long as it takes).
    poll, not select: select refuses a descriptor numbered past FD_SETSIZE (1024), which a busy
    process's connections can have."""
    if _poll is None:
        return bool(select.select([fd], [], [], timeout)[0])
    poller = _poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def wait_readable_or_writable(fd: int) -> None:
    """Wait until `fd` can be read or written (libpq's rule while a non-blocking send is unflushed:
    write-ready, flush again; read-ready, consume input, then flush again)."""
    if _poll is None:
        select.select([fd], [fd], [])
        return
    poller = _poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    poller.poll()
