"""The byte formats the hot path writes and reads, defined once for both implementations.

The pure-Python twins in `_pure/` use these names directly; the Cython twin in
ext/ copies them into typed C globals when it is imported (ext/constants.pxi),
so a limit changed here changes both, and a parity test can never pass on two
different copies of the same number.
"""
from __future__ import annotations

import struct

# -- PostgreSQL COPY ... (FORMAT BINARY) ---------------------------------------------------------

#: Signature, flags (int32 0) and header-extension length (int32 0) that open a binary COPY stream.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
#: The field count -1 that ends a binary COPY stream.
COPY_TRAILER = struct.pack(">h", -1)
#: Fields per COPY row: position, stream_id, version, event_id, type, data, metadata, recorded_at.
COPY_FIELDS = 8
#: The field length that stands for NULL.
NULL_LENGTH = -1
#: A COPY field's length is an int32, so no field (jsonb version byte included) may reach 2 GiB.
MAX_FIELD_BYTES = 0x7FFF_FFFF
#: jsonb's binary form: this version byte, then the JSON text (what msgspec writes, framed as is).
JSONB_VERSION = 1
#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC): timestamptz counts from the latter.
PG_EPOCH_OFFSET_US = 946_684_800_000_000

#: Positions, versions and stream heads are int64 in every store (a bigint, an SQLite INTEGER, a C int64_t).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# -- stored rows -----------------------------------------------------------------------------------

#: The row layout every store hands to `decode_rows` (the COPY fields in the same order).
ROW_COLUMNS = ("position", "stream_id", "version", "event_id", "type", "data", "metadata", "recorded_at_us")

# -- event ids: UUIDv7 (RFC 9562) ------------------------------------------------------------------

#: Version nibble (bits 48-51).
UUID_VERSION = 7
#: Variant bits 0b10 (bits 64-65).
UUID_VARIANT = 0b10
#: rand_a (12 bits) holds a per-millisecond counter (RFC 9562, method 1), so ids made by one
#: process in the same millisecond still sort in creation order; past this the next millisecond is borrowed.
UUID_COUNTER_MAX = 0xFFF
