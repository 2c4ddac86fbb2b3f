"""The client-side deadline of every call: a watchdog thread that shuts down the socket of a
connection whose call has run past statement_timeout plus a margin.

The server cancels a statement at statement_timeout by itself; this covers what it cannot: a
server that is alive but frozen (SIGSTOP, a hung VM) keeps its sockets open and answers TCP
keepalives, so only the client can end the wait.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import weakref

import psycopg

log: logging.Logger = logging.getLogger("eventcore.store.postgres")

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
