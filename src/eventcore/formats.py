"""The byte formats the hot path writes and reads, defined once for both implementations.

The pure-Python twins in `_pure/` use these names directly; the Cython twin in
ext/ copies them into typed C globals when it is imported (ext/constants.pxi),
so a limit changed here changes both, and a parity test can never pass on two
different copies of the same number.
"""
from __future__ import annotations

import struct

# -- PostgreSQL COPY ... (FORMAT BINARY) ---------------------------------------------------------

#: The 11 bytes every binary COPY stream starts with.
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
#: Signature, flags (int32 0) and header-extension length (int32 0) that open a binary COPY stream.
COPY_HEADER = COPY_SIGNATURE + struct.pack(">ii", 0, 0)
#: Header flag bits a reader must refuse when set (bits 16-31: "critical" format changes, bit 16
#: being OIDs included); bits 0-15 are backward-compatible and ignored, as the format asks.
COPY_CRITICAL_FLAGS = 0xFFFF_0000
#: The field count -1 that ends a binary COPY stream.
COPY_TRAILER = struct.pack(">h", -1)
#: Fields per COPY row: position, stream_id, version, event_id, type, data, metadata, recorded_at,
#: type_version (an int2: the event type's version the payload is in).
COPY_FIELDS = 9
#: Fields per row of read_columns' COPY (queries.sql: column_columns): position, stream_id, version, type,
#: data (NULL when no payload field is read), recorded_at, type_version.
COLUMNS_COPY_FIELDS = 7
#: The bytes of the int2 type version field; a reader takes NULL for 1 (what the store's reads send).
TYPE_VERSION_BYTES = 2
#: The field length that stands for NULL.
NULL_LENGTH = -1
#: A COPY field's length is an int32, so no field (jsonb version byte included) may reach 2 GiB.
MAX_FIELD_BYTES = 0x7FFF_FFFF
#: jsonb's binary form: this version byte, then the JSON text (what msgspec writes, framed as is).
JSONB_VERSION = 1
#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC): timestamptz counts from the latter.
PG_EPOCH_OFFSET_US = 946_684_800_000_000

#: Unix microseconds of datetime.min and datetime.max (UTC): a stored timestamp outside is corrupt
#: for Python (PostgreSQL's own range and its +-infinity are wider).
RECORDED_AT_MIN_US = -62_135_596_800_000_000
RECORDED_AT_MAX_US = 253_402_300_799_999_999

#: Positions, versions and stream heads are int64 in every store (a bigint, an SQLite INTEGER, a C int64_t).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# -- stored rows -----------------------------------------------------------------------------------

#: The row layout every store hands to `decode_rows` (the COPY fields in the same order).
ROW_COLUMNS = ("position", "stream_id", "version", "event_id", "type", "data", "metadata", "recorded_at_us",
               "type_version")

# -- event ids: UUIDv7 (RFC 9562) ------------------------------------------------------------------

#: Version nibble (bits 48-51).
UUID_VERSION = 7
#: Variant bits 0b10 (bits 64-65).
UUID_VARIANT = 0b10
#: rand_a (12 bits) holds a per-millisecond counter (RFC 9562, method 1), so ids made by one
#: process in the same millisecond still sort in creation order; past this the next millisecond is borrowed.
UUID_COUNTER_MAX = 0xFFF


# -- reading binary COPY: what is wrong with a stream, said once for both twins ----------------------
#
# The decoders (decode_copy in _pure/copy.py and ext/copy.pxi) check every length on their fast
# path; at the first check that fails they ask these functions what failed, so both twins raise
# SerializationError with the very same words. Only error paths come here.

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_FIELDS = ("position", "stream id", "version", "event id", "type name", "data", "metadata", "recorded_at",
           "type version")
_COLUMNS_FIELDS = ("position", "stream id", "version", "type name", "data", "recorded_at", "type version")


def copy_header_problem(buffer: bytes | bytearray | memoryview) -> str | None:
    """What makes `buffer` not start a binary COPY stream the readers take, or None if its header is good."""
    view = memoryview(buffer)
    buf = bytes(view[:len(COPY_HEADER)])
    if len(buf) < len(COPY_SIGNATURE) or buf[:len(COPY_SIGNATURE)] != COPY_SIGNATURE:
        return f"not a binary COPY stream: it starts {buf[:len(COPY_SIGNATURE)]!r}, expected {COPY_SIGNATURE!r}"
    if len(buf) < len(COPY_HEADER):
        return f"truncated COPY header: {len(view)} bytes, expected at least {len(COPY_HEADER)}"
    flags = _I32.unpack_from(buf, len(COPY_SIGNATURE))[0] & 0xFFFF_FFFF
    if flags & COPY_CRITICAL_FLAGS:
        return f"COPY header flags {flags:#010x} ask for a format this reader does not know (OIDs, or newer)"
    extension = _I32.unpack_from(buf, len(COPY_SIGNATURE) + 4)[0]
    if extension < 0 or len(COPY_HEADER) + extension > len(view):
        return f"corrupt COPY header: its extension of {extension} bytes does not fit in {len(view)} bytes"
    return None


def copy_row_problem(buffer: bytes | bytearray | memoryview, offset: int, layout: str = "events") -> str:
    """What is wrong with the COPY row (or trailer) starting at byte `offset` of `buffer`: the first
    of its fields that is truncated, NULL where a value is due, of the wrong length, not UTF-8, a
    jsonb of an unknown version or a timestamp out of Python's range; the row is named by its
    position and stream once they are read. A row without a problem is described as such.
    `layout`: "events" (the events' columns, COPY_FIELDS), or read_columns' (COLUMNS_COPY_FIELDS):
    "columns" (the payload due) or "envelope" (the payload NULL or not)."""
    fields: tuple[str, ...]
    nullable: tuple[str, ...]
    if layout == "events":
        fields, expected, nullable = _FIELDS, COPY_FIELDS, ("metadata", "type version")
    else:
        fields, expected = _COLUMNS_FIELDS, COLUMNS_COPY_FIELDS
        nullable = ("data", "type version") if layout == "envelope" else ("type version",)
    buf = bytes(buffer)
    end = len(buf)
    if offset + 2 > end:
        return f"COPY data ends at byte {end} without its trailer"
    count = _I16.unpack_from(buf, offset)[0]
    if count == -1:
        if offset + 2 != end:
            return f"{end - offset - 2} bytes after the COPY trailer at byte {offset}"
        return f"no problem found in the COPY trailer at byte {offset}"
    if count != expected:
        return f"the COPY row at byte {offset} has {count} fields, expected {expected}"
    where = f"in the COPY row at byte {offset}"
    o = offset + 2
    values: list = []
    for i, name in enumerate(fields):
        if o + 4 > end:
            return f"truncated {name} {where}: the data ends at byte {end}"
        size = _I32.unpack_from(buf, o)[0]
        o += 4
        if size == NULL_LENGTH and name in nullable:
            values.append(None)
            continue
        if size < 0:
            return f"corrupt {name} {where}: NULL (length {size})"
        if o + size > end:
            return f"truncated {name} {where}: {size} bytes from byte {o}, the data ends at byte {end}"
        raw = buf[o:o + size]
        o += size
        if name in ("position", "version", "recorded_at") and size != 8:
            return f"corrupt {name} {where}: {size} bytes, expected 8"
        if name == "type version" and size != TYPE_VERSION_BYTES:
            return f"corrupt {name} {where}: {size} bytes, expected {TYPE_VERSION_BYTES}"
        if name == "event id" and size != 16:
            return f"corrupt {name} {where}: {size} bytes, expected 16"
        if name in ("stream id", "type name"):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"corrupt {name} {where}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"
        if name in ("data", "metadata") and (size < 1 or raw[0] != JSONB_VERSION):
            found = f"version byte {raw[0]}" if size else "no version byte"
            return f"corrupt {name} {where}: a jsonb with {found}, expected {JSONB_VERSION}"
        if name == "recorded_at":
            unix_us = _I64.unpack_from(raw)[0] + PG_EPOCH_OFFSET_US
            if not RECORDED_AT_MIN_US <= unix_us <= RECORDED_AT_MAX_US:
                return f"corrupt {name} {where}: {unix_us} microseconds since 1970 is outside Python's datetime range"
        values.append(raw)
        if i == 1:  # from here on the row has a name
            position = _I64.unpack_from(values[0])[0]
            where = f"at position {position} (stream {values[1].decode('utf-8')!r})"
    return f"no problem found in the COPY row at byte {offset}"


# -- columns (store.ingest_columns, store.read_columns: eventcore.columns) ---------------------------------

#: How a field's values are held in its column, as the column codec (encode_column_payloads and
#: fill_columns) takes and fills them; eventcore.columns maps a field's annotation to one of these.
KIND_INT = 0  # int64
KIND_FLOAT = 1  # float64
KIND_BOOL = 2  # bool
KIND_STR = 3  # object array of str
KIND_DATETIME = 4  # datetime64[us] in UTC, handed to the codec as its int64 view: microseconds since the epoch
KIND_OBJECT = 5  # object array of any value the field's type takes
#: What a datetime column holds for no value (NaT, as its int64 view).
COLUMN_NAT = -(2 ** 63)
