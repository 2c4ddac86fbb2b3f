"""COPY BINARY encoding of event rows: the batch writer's hot path (pure-Python twin).

Rows follow the events table's column order (`COPY_COLUMNS`): position int8,
stream_id text, version int8, event_id uuid, type text, data jsonb, metadata
jsonb (NULL when empty), recorded_at timestamptz. jsonb's binary form is a
version byte (1) followed by the JSON text, which is exactly what msgspec
produced, so payloads are framed, never re-encoded.
"""
from __future__ import annotations

import struct

COPY_COLUMNS = ("position", "stream_id", "version", "event_id", "type", "data", "metadata", "recorded_at")
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)

#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

# field count, position (len + int8)
_ROW_START = struct.Struct(">hiq")
# version (len + int8), then event id length
_INT8 = struct.Struct(">iq")
_LEN = struct.Struct(">i")
_UUID_FIELD = _LEN.pack(16)
_NULL = _LEN.pack(-1)
_JSONB_VERSION = b"\x01"
_TIMESTAMP = struct.Struct(">iq")


def encode_copy_rows(
    buf: bytearray,
    first_position: int,
    stream_ids: list,
    versions: list,
    event_ids: list,
    types: list,
    payloads: list,
    metadatas: list,
    recorded_at_us: int,
) -> None:
    """Append one COPY BINARY row per event to `buf` (no header or trailer).

    `event_ids` are 16-byte UUIDs, `payloads` and `metadatas` msgspec JSON bytes
    (metadata may be None), `recorded_at_us` microseconds since the Unix epoch.
    """
    n = len(stream_ids)
    if not (len(versions) == len(event_ids) == len(types) == len(payloads) == len(metadatas) == n):
        raise ValueError("encode_copy_rows: column lists differ in length")
    ts = _TIMESTAMP.pack(8, recorded_at_us - PG_EPOCH_OFFSET_US)
    row_start = _ROW_START.pack
    int8 = _INT8.pack
    length = _LEN.pack
    position = first_position
    for i in range(n):
        sid = stream_ids[i].encode()
        typ = types[i].encode()
        eid = event_ids[i]
        if len(eid) != 16:
            raise ValueError(f"event id {i} is {len(eid)} bytes, not 16")
        data = payloads[i]
        md = metadatas[i]
        buf += row_start(8, 8, position)  # 8 columns; position: length 8, int8
        buf += length(len(sid))
        buf += sid
        buf += int8(8, versions[i])
        buf += _UUID_FIELD
        buf += eid
        buf += length(len(typ))
        buf += typ
        buf += length(len(data) + 1)
        buf += _JSONB_VERSION
        buf += data
        if md is None:
            buf += _NULL
        else:
            buf += length(len(md) + 1)
            buf += _JSONB_VERSION
            buf += md
        buf += ts
        position += 1
