"""The batch writer's COPY: one fill loop for `append_batch` and `ingest`.

The store reserves the slots (reserve_append: lock, check, advance the heads) and opens
`COPY ... FROM STDIN (FORMAT BINARY)` in the same transaction; `write` fills it. Rows are
framed by the hot path (eventcore._impl) straight into one bytearray, COPY_CHUNK_ROWS at a
time, and handed to psycopg every COPY_FLUSH_BYTES. The callers differ only in where a
chunk's rows come from:

- `EncodedRows` (append_batch, and an ingest of raw events): payloads and metadata encoded
  already by prepare_append; versions assigned from the heads up front (encode_copy_rows).
- `Events` (ingest): event objects; ids, versions, payload encoding and row framing fused in
  one call per chunk (encode_copy_events).
"""
from __future__ import annotations

from typing import Any, Iterator

from ... import _impl
from ...events import Event, Metadata
from ...formats import COPY_HEADER, COPY_TRAILER
from ..prepare import PreparedAppend

#: Rows encoded per call of the COPY encoder (~100 KiB of rows of ~100-byte events).
COPY_CHUNK_ROWS = 1000
#: Bytes buffered before handing them to psycopg. Measured on an ingest of 300k events: flat
#: within noise from 16 KiB up to 1 MiB, slower past it (4 MiB: -15 %). 64 KiB means one write
#: per encoder chunk and flat memory.
COPY_FLUSH_BYTES = 64 * 1024


class EncodedRows:
    """Rows whose payloads and metadata are encoded already (a PreparedAppend)."""

    def __init__(self, p: PreparedAppend) -> None:
        self.stream_ids: list[str] = p.stream_ids
        self.event_ids: list[bytes] = p.event_ids
        self._p = p
        self._versions: list[int] = []

    def start(self, heads: dict[str, int]) -> None:
        self._versions = _impl.assign_versions(self.stream_ids, heads)

    def encode(self, buf: bytearray, position: int, start: int, stop: int, heads: dict[str, int],
               at_us: int) -> None:
        p = self._p
        _impl.encode_copy_rows(buf, position, p.stream_ids[start:stop], self._versions[start:stop],
                               p.event_ids[start:stop], p.types[start:stop], p.type_versions[start:stop],
                               p.payloads[start:stop],
                               p.metadatas[start:stop], at_us)


class Events:
    """Event objects (with their metadata) encoded while the rows are framed; ids made on the way."""

    def __init__(self, stream_ids: list[str], events: list[Event], metadatas: list[Metadata | None]) -> None:
        self.stream_ids: list[str] = stream_ids
        self.event_ids: list[bytes] = []
        self._events = events
        self._metadatas = metadatas

    def start(self, heads: dict[str, int]) -> None:
        self.event_ids = []

    def encode(self, buf: bytearray, position: int, start: int, stop: int, heads: dict[str, int],
               at_us: int) -> None:
        self.event_ids += _impl.encode_copy_events(buf, position, self.stream_ids[start:stop],
                                                   self._events[start:stop], self._metadatas[start:stop],
                                                   heads, at_us)


def write(copy: Any, rows: EncodedRows | Events, first: int, heads: dict[str, int], at_us: int) -> list[bytes]:
    """Write `rows` (EncodedRows or Events) into `copy`, an open binary COPY of the events table:
    positions from `first`, each stream's versions after its head in `heads` (advanced in place),
    recorded at `at_us`. Returns the event ids written, in order."""
    for buf in buffers(rows, first, heads, at_us):
        copy.write(buf)
    return rows.event_ids


def buffers(rows: EncodedRows | Events, first: int, heads: dict[str, int], at_us: int) -> Iterator[bytearray]:
    """What `write` hands to the COPY, buffer by buffer (an asyncio writer awaits each write); once
    exhausted, `rows.event_ids` holds the ids written."""
    rows.start(heads)
    buf = bytearray(COPY_HEADER)
    for start in range(0, len(rows.stream_ids), COPY_CHUNK_ROWS):
        rows.encode(buf, first + start, start, start + COPY_CHUNK_ROWS, heads, at_us)
        if len(buf) >= COPY_FLUSH_BYTES:
            yield buf
            buf = bytearray()
    buf += COPY_TRAILER
    yield buf
