"""Validation and encoding every write goes through before a backend sees it.

`prepare_append` checks and encodes an append (events, metadata, expected versions) into parallel
columns a backend can pass as arrays; nothing here takes a lock or opens a transaction, so bad input
is rejected with nothing written. The limits on one call live here too.
"""
from __future__ import annotations

import datetime as _dt
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

from .. import _impl
from ..errors import ValidationError
from ..events import EMPTY_METADATA, Event, EventToWrite, Metadata, RawEvent, RecordedEvent, validate_type_name
from ..evolution import check_raw_event
from ..expected import ANY, validate_expected
from ..streams import StreamId, stream_id as _stream_id

#: Most events accepted by one `append`. A single append is one transaction
#: holding the write lock; past ~100k rows a batch belongs in the batch writer.
MAX_EVENTS_PER_APPEND = 100_000

#: Most events accepted by one `append_batch`: one transaction; a PostgreSQL
#: transaction can number at most 1,048,575 events (see stores/postgres/sql: POSITION_SHIFT).
MAX_EVENTS_PER_BATCH = 1_000_000

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class PreparedAppend:
    """An append validated and encoded, ready for a backend to check versions and write.

    Columns are parallel lists (one entry per event) so a backend can pass
    them as arrays in one statement; `expected` covers every participant
    stream, written or read-only.
    """

    __slots__ = ("stream_ids", "types", "type_versions", "payloads", "metadatas", "event_ids", "events",
                 "metadata_objs", "expected", "recorded_at_us", "key", "progress")

    def __init__(self, stream_ids: list[str], types: list[str], type_versions: list[int], payloads: list[bytes],
                 metadatas: list[bytes | None], event_ids: list[bytes], events: list[Event | RawEvent],
                 metadata_objs: list[Metadata | None], expected: dict[str, int]) -> None:
        self.stream_ids: list[str] = stream_ids
        self.types: list[str] = types
        #: Each event's type version, stored with it (the class's __event_version__, or a RawEvent's).
        self.type_versions: list[int] = type_versions
        self.payloads: list[bytes] = payloads
        self.metadatas: list[bytes | None] = metadatas
        self.event_ids: list[bytes] = event_ids
        #: The events as given (what `recorded` hands back as each RecordedEvent's data).
        self.events: list[Event | RawEvent] = events
        self.metadata_objs: list[Metadata | None] = metadata_objs
        self.expected: dict[str, int] = expected
        self.recorded_at_us: int = time.time_ns() // 1000
        #: The append's idempotency key (str) or None: recorded in the append's transaction;
        #: a key already recorded makes the backend raise DuplicateCommandError, writing nothing.
        self.key: str | None = None
        #: Ingest progress to record in the same transaction, or None: an IngestProgress.
        self.progress: Any = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def recorded(self, versions: Sequence[int], positions: Sequence[int]) -> list[RecordedEvent]:
        """The `RecordedEvent`s of this append once the backend assigned versions and positions."""
        at = _EPOCH + _dt.timedelta(microseconds=self.recorded_at_us)
        return [
            RecordedEvent(sid, v, p, uuid.UUID(bytes=eid), t, ev, md if md is not None else EMPTY_METADATA, at, tv)
            for sid, v, p, eid, t, ev, md, tv in zip(
                self.stream_ids, versions, positions, self.event_ids, self.types, self.events, self.metadata_objs,
                self.type_versions,
            )
        ]


def prepare_append(
    events: Iterable[EventToWrite],
    expected: Mapping[str, int] | None,
    metadata: Metadata | None,
    limit: int = MAX_EVENTS_PER_APPEND,
) -> PreparedAppend:
    """Validate and encode an append. Raises ValidationError / SerializationError; writes nothing."""
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    exp: dict[str, int] = {}
    if expected:
        for sid, want in expected.items():
            sid = _stream_id(sid)
            exp[sid] = validate_expected(sid, want)
    stream_ids, types, type_versions, payloads, metadatas, objs, mds = [], [], [], [], [], [], []
    encode_event = _impl.encode_event
    encode_metadata = _impl.encode_metadata
    default_md_bytes = encode_metadata(metadata)
    for item in events:
        if type(item) is not EventToWrite:
            raise ValidationError(
                f"append() takes ec.emit(stream, event) items, got {type(item).__name__}: {item!r}"
            )
        ev = item.event
        sid = item.stream_id
        if type(sid) is not StreamId:  # an EventToWrite built by hand, not by emit()
            sid = _stream_id(sid)
        if isinstance(ev, Event):
            type_name, payload = encode_event(ev)
            type_version = type(ev).__event_version__
        elif type(ev) is RawEvent:
            type_name, payload, type_version = check_raw_event(ev)
        else:
            raise ValidationError(f"not an ec.Event: {type(ev).__name__}")
        md = item.metadata
        if md is None:
            md, md_bytes = metadata, default_md_bytes
        elif type(md) is not Metadata:  # an EventToWrite built by hand, not by emit()
            raise ValidationError(f"event metadata must be an ec.Metadata, got {type(md).__name__}: {md!r}")
        else:
            md_bytes = encode_metadata(md)
        stream_ids.append(sid)
        types.append(type_name)
        type_versions.append(type_version)
        payloads.append(payload)
        metadatas.append(md_bytes)
        objs.append(ev)
        mds.append(md)
        if sid not in exp:
            exp[sid] = ANY
    if len(stream_ids) > limit:
        raise ValidationError(
            f"at most {limit:,} events per call, got {len(stream_ids):,}"
            + ("; use store.append_batch() for bulk writes" if limit == MAX_EVENTS_PER_APPEND else "")
        )
    event_ids = _impl.new_event_ids(len(stream_ids))
    return PreparedAppend(stream_ids, types, type_versions, payloads, metadatas, event_ids, objs, mds, exp)


#: Longest idempotency key accepted (as a stream id: one B-tree entry on every backend).
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def validate_idempotency_key(value: object, what: str = "idempotency key") -> str:
    """Validate an idempotency key (or, as `what` says, an ingest resume key): a non-empty str of at
    most 255 characters without control characters (the stream id rules), or a uuid.UUID (stored as
    its canonical text)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str or uuid.UUID, got {type(value).__name__}: {value!r}")
    try:
        return str(_stream_id(value))
    except ValidationError as exc:
        raise ValidationError(str(exc).replace("stream id", what, 1)) from None


def type_names(types: Iterable[str | type] | None) -> tuple[str, ...] | None:
    """A `types` filter (event type names or Event classes) as a tuple of validated names; None: no filter.
    A class stands for its type name and its aliases; a name for that stored name only."""
    if types is None:
        return None
    if isinstance(types, (str, type)):
        types = (types,)
    names = []
    for t in types:
        if isinstance(t, type) and issubclass(t, Event):
            names.append(t.__event_type__)
            names.extend(t.__event_aliases__)  # its events stored before a rename are its events too
        elif isinstance(t, str):
            names.append(validate_type_name(t, "a types filter name"))  # no NUL/surrogate reaches SQL
        else:
            raise ValidationError(f"types filter takes event type names or ec.Event classes, got {t!r}")
    return tuple(names)
