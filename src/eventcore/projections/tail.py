"""The feed as stored, for `eventcore tail`: raw pages, one JSON line per row, and waiting for appends.

Rows are read undecoded (formats.ROW_COLUMNS), so `tail` prints every event, even one this process
has no class for, and says which row is corrupt rather than printing broken JSON.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

import msgspec

from .. import _impl
from ..errors import SerializationError, UnknownEventTypeError
from ..stores.base import EventStore
from ..stores.projection_storage import Waiter, as_bytes
from .status import storage_of

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_raw_json = msgspec.json.Decoder(msgspec.Raw)


def read_rows(store: EventStore, after: int, types: tuple[str, ...] | None = None, prefix: str | None = None,
              limit: int = 1000) -> list[tuple[Any, ...]]:
    """One page of the feed as stored rows (formats.ROW_COLUMNS), whether or not this process can decode them."""
    return storage_of(store).read_rows(after, types, prefix, limit)


def row_json(row: tuple[Any, ...], decode: bool = False) -> bytes:
    """One stored row as a JSON object whose keys are RecordedEvent's fields, in order (for `eventcore tail`):
    the event as `read_all(decode=False)` gives it, its type and type version as stored. `decode`: an
    event of a type this process knows as `read_all()` gives it (its class's current version, through
    the upcasters: type, type_version and data as decoded); one of a type it does not know as stored."""
    if decode:
        try:
            event = _impl.decode_rows([row])[0]
        except UnknownEventTypeError:
            pass
        else:
            return msgspec.json.encode({
                "stream_id": event.stream_id, "version": event.version, "position": event.position,
                "event_id": str(event.event_id), "type": event.type, "data": event.data,
                "metadata": event.metadata, "recorded_at": event.recorded_at.isoformat(),
                "type_version": event.type_version,
            }, enc_hook=str)
    position, sid, version, event_id, type_name, data, metadata, recorded_us, type_version = row
    # Printed as stored, but never as broken JSON: a row corrupted behind the store's back (wrong
    # column types, bytes that are not UTF-8 JSON) is a SerializationError naming it, as on read.
    try:
        if type(position) is not int or type(version) is not int or not isinstance(sid, str) or (
                not isinstance(type_name, str)) or type(type_version) is not int:
            raise TypeError("position, version and type version must be ints, stream id and type strs")
        at = (_EPOCH + _dt.timedelta(microseconds=recorded_us)).isoformat()
        eid = str(uuid.UUID(bytes=bytes(event_id)))
        parts = []
        for part in (data, metadata):
            if part is not None:
                if not isinstance(part, (bytes, bytearray, memoryview, str)):
                    raise TypeError(f"a JSON column holds {type(part).__name__}")
                part = as_bytes(part)
                part.decode("utf-8")
                _raw_json.decode(part)
            parts.append(part)
    except (TypeError, ValueError, OverflowError, msgspec.DecodeError, RecursionError) as exc:
        raise SerializationError(
            f"corrupt stored row at position {position!r} (stream {sid!r}, version {version!r}): "
            f"{'nested too deeply' if isinstance(exc, RecursionError) else exc}"
        ) from None
    return msgspec.json.encode({
        "stream_id": sid,
        "version": version,
        "position": position,
        "event_id": eid,
        "type": type_name,
        "data": msgspec.Raw(parts[0]),
        "metadata": msgspec.Raw(parts[1]) if parts[1] is not None else {},
        "recorded_at": at,
        "type_version": type_version,
    })


def follow_waiter(store: EventStore) -> Waiter:
    """For `eventcore tail --follow`: an object whose `wait(timeout, stop)` returns early when events are
    appended (LISTEN/NOTIFY on PostgreSQL; a plain sleep elsewhere). Close it with `close()`."""
    return storage_of(store).waiter()
