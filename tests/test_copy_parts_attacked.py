"""COPY reads decoded in parts as they arrive (read_copy_decoded), attacked through a relay.

The server's COPY trailer (int16 -1) comes as a CopyData message of its own, and the COPY's end
(CopyDone, 'c') as the next message. Nothing makes them arrive together: PostgreSQL flushes its 8 KB
send buffer whenever it is full, so when the trailer ends exactly at a buffer's end it is sent
alone and CopyDone follows in the next write (and any TCP/TLS segmentation can cut there too). Then
libpq holds no complete message after the trailer; a part that took the trailer as a row would end
with two ("2 bytes after the COPY trailer"). The last message received waits for the next part.

These tests put a byte-for-byte relay (a Unix socket between libpq and a real server) that forwards
a COPY's CopyData messages (rows, trailer) at once when it has them all, and its CopyDone a moment
later: the arrival order a send buffer that fills up right after the trailer produces. The database and libpq are real; only the timing is chosen.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest

import eventcore as ec
from domain import Noted


def _shut(*sockets) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Relay:
    """Unix-socket relay to the test cluster; server-to-client messages parsed, CopyDone delayed."""

    def __init__(self, dsn: str, delay: float = 0.15):
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        if "host" not in query or not query["host"][0].startswith("/"):
            pytest.skip("the relay needs the throwaway cluster's Unix socket")
        self.port = query.get("port", ["5432"])[0]
        self.target = os.path.join(query["host"][0], f".s.PGSQL.{self.port}")
        self.dir = tempfile.mkdtemp(prefix="rv-relay-")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.dir, f".s.PGSQL.{self.port}"))
        self.listener.listen(64)
        self.delay = delay
        self.delayed = 0
        self.closed = False
        query["host"] = [self.dir]
        self.dsn = urlunsplit(parts._replace(query=urlencode({k: v[0] for k, v in query.items()})))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.target)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._messages, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _messages(self, src, dst):
        buf = bytearray()
        held = bytearray()
        try:
            while data := src.recv(65536):
                buf += data
                out = bytearray()
                while len(buf) >= 5:
                    length = struct.unpack_from(">i", buf, 1)[0]
                    if len(buf) < 1 + length:
                        break
                    message, buf = bytes(buf[:1 + length]), buf[1 + length:]
                    kind = message[:1]
                    if kind == b"d":  # a COPY's rows (and the trailer) are held until its CopyDone
                        held += message
                        continue
                    if kind == b"c":  # CopyDone: the COPY's rows go now, at once; CopyDone a little later
                        dst.sendall(out + held)
                        out, held = bytearray(), bytearray()
                        self.delayed += 1
                        time.sleep(self.delay)
                    out += message
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def close(self):
        self.closed = True
        self.listener.close()


@pytest.fixture
def relayed(pg_dsn, pg_schema):
    relay = _Relay(pg_dsn)
    store = ec.connect(relay.dsn, schema=pg_schema, pool_size=2)
    try:
        yield store, relay
    finally:
        store.close()
        relay.close()


def _fill(store, n, stream="rv-copy"):
    for start in range(0, n, 500):
        store.append([ec.emit(stream, Noted(text=f"{i:05d}")) for i in range(start, min(n, start + 500))])


def test_control_the_relay_itself_changes_nothing_for_a_whole_copy(relayed):
    """Control: a COPY shorter than DECODE_AFTER_ROWS (decoded whole at its end) reads fine
    through the relay, its CopyDone delayed like every other."""
    store, relay = relayed
    _fill(store, 100)
    assert [e.data.text for e in store.read_all()] == [f"{i:05d}" for i in range(100)]
    assert relay.delayed >= 1


@pytest.mark.parametrize("events,after_rows", [(260, None), (1200, 1), (3000, 1)])
def test_a_trailer_received_before_copydone_is_read_exactly(relayed, monkeypatch, events, after_rows):
    """read_all must not raise SerializationError "2 bytes after the COPY trailer"
    when the server's trailer is received alone, at least DECODE_AFTER_ROWS rows after the last
    part, and CopyDone comes a little later. Same events through a direct connection: fine.
    260 events: the default DECODE_AFTER_ROWS (256), one page (libpq takes them in two reads of
    ~16 KB: no part before the trailer's); longer reads with DECODE_AFTER_ROWS=1,
    so that the outcome does not hang on how many rows the last part happens to hold."""
    from eventcore.stores.postgres import copy_reader

    if after_rows is not None:
        monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", after_rows)
    store, relay = relayed
    _fill(store, events)
    got = [e.data.text for e in store.read_all()]
    assert got == [f"{i:05d}" for i in range(events)]


def test_a_long_stream_read_by_copy_is_read_exactly_the_same_way(relayed, monkeypatch):
    """A long stream's read (prepared first rows, then the rest by COPY), through the same split."""
    from eventcore.stores.postgres import copy_reader

    monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", 1)
    store, relay = relayed
    _fill(store, 1500, stream="rv-long")
    assert len(store.read_stream("rv-long")) == 1500
    assert len(store.read_stream("rv-long")) == 1500  # now known long: COPY only


def test_direct_connection_reads_every_part_boundary_exactly(pg_dsn, pg_schema, monkeypatch):
    """Guarantee (no relay): parts decoded at every chance (DECODE_AFTER_ROWS=1) give the events a
    whole decode gives, in order, for reads of every kind; the pool's connections stay idle."""
    from eventcore.stores.postgres import copy_reader

    monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", 1)
    with ec.connect(pg_dsn, schema=pg_schema, pool_size=2) as store:
        _fill(store, 2500, stream="rv-a")
        store.append([ec.emit("rv-b", Noted(text="x" * 20_000))] * 3)  # rows bigger than a send buffer
        texts = [e.data.text for e in store.read_all()]
        assert texts[:2500] == [f"{i:05d}" for i in range(2500)] and len(texts) == 2503
        assert [e.version for e in store.read_stream("rv-a")] == list(range(1, 2501))
        got = store.read_streams(["rv-a", "rv-b"])
        assert [len(v) for v in got.values()] == [2500, 3]
        assert [e.position for e in store.read_all(decode=False)] == [e.position for e in store.read_all()]


def test_projection_catch_up_through_the_same_split_falls_back_and_is_exact(relayed, monkeypatch):
    """Guarantee (passes): a projector's catch-up page that hits the split raises SerializationError
    inside read_copy_decoded, which the projection session answers by reading the page as rows again
    (PostgresProjectionSession.read_events): the events are right, only the COPY's work is lost."""
    from eventcore.stores.postgres import copy_reader

    monkeypatch.setattr(copy_reader, "DECODE_AFTER_ROWS", 1)
    store, relay = relayed
    _fill(store, 300)
    seen = []

    proj = ec.Projector("rv-collect", handler=lambda event, ctx: seen.append(event.data.text))
    ec.run_projection(store, proj, until_caught_up=True, listen=False)
    assert seen == [f"{i:05d}" for i in range(300)]
