"""What the store records of each projector: status (checkpoint, lag, pending, state) and dead letters.

Read from the store's projection storage (see eventcore.stores.projection_storage), by any process,
whether or not a projector runs; lag is composed here from the stored checkpoint and the feed's head.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

import msgspec

from ..errors import ValidationError
from ..stores.base import EventStore
from ..stores.projection_storage import PENDING_CAP, ProjectionStorage, as_bytes
from ..streams import forbidden_character
from .projector import Projector

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_json = msgspec.json.Decoder()



class ProjectionStatus(msgspec.Struct, frozen=True):
    """A projector as its store records it. `lag` = head position - stored checkpoint (0: caught
    up); a distance in positions, not a count of events: on PostgreSQL positions are sparse
    (transaction id << 20, plus the event's index in its transaction), so a lag of a few million
    can be a single event. For alerting use `pending`: the events after the checkpoint (any type),
    counted up to PENDING_CAP (10,000; that value means at least that many), so computing it costs
    a bounded index scan. A filtered projector's stored checkpoint moves past events its filters
    leave out only every `idle_checkpoint_interval` (5 s), so both may show those for a few
    seconds. `state`: running (an instance holds the
    lock), stopped, failed (see `error`), idle (never run) or dead (the last instance died
    without stopping)."""

    name: str
    position: int
    head: int
    lag: int
    pending: int
    state: str
    error: str | None
    owner: str | None
    updated_at: _dt.datetime | None
    dead_letters: int


class DeadLetter(msgspec.Struct, frozen=True):
    """An event a projector skipped, as stored, with the error that made it skip.

    `data` and `metadata` are the stored JSON decoded to Python values (dicts, lists, ...), or
    the stored bytes unchanged when they are not JSON (an event nobody can decode); `type` and
    `type_version` are as stored."""

    projector: str
    position: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    type: str
    data: Any
    metadata: Any
    recorded_at: _dt.datetime
    error: str
    attempts: int
    failed_at: _dt.datetime | None
    type_version: int = 1


def storage_of(store: object) -> ProjectionStorage:
    """The projection storage of `store` (ValidationError for anything else than an eventcore store)."""
    if not isinstance(store, EventStore):
        raise ValidationError(f"projections are not supported on {type(store).__name__}")
    return store._projection_storage()


def projection_status(store: EventStore, name: str | None = None) -> list[ProjectionStatus]:
    """Every projector recorded in the store (or just `name`), with checkpoint, lag and state."""
    if isinstance(name, str) and forbidden_character(name):
        return []  # no projector can have that name
    return [ProjectionStatus(r.name, r.position, r.head, max(0, r.head - r.position), r.pending, r.state, r.error,
                             r.owner, r.updated_at, r.dead_letters)
            for r in storage_of(store).checkpoints(name, PENDING_CAP)]


def count_after(store: EventStore, position: int) -> int:
    """Events after `position` (any type), counted up to PENDING_CAP."""
    return storage_of(store).count_after(position, PENDING_CAP)


def dead_letters(store: EventStore, projector: "str | Projector") -> list[DeadLetter]:
    """The events a projector skipped, in position order, each with its error."""
    name = projector.name if isinstance(projector, Projector) else projector
    if isinstance(name, str) and forbidden_character(name):
        return []  # no projector can have that name
    return [
        DeadLetter(name, pos, sid, ver, uuid.UUID(bytes=bytes(eid)), t, _json_value(data), _json_value(md),
                   _EPOCH + _dt.timedelta(microseconds=at), err, att, failed, tv)
        for pos, sid, ver, eid, t, data, md, at, tv, err, att, failed in storage_of(store).dead_letters(name)
    ]


def _json_value(value):
    """A dead letter's stored JSON as Python values; its stored bytes as they are when they are not
    JSON (not UTF-8, truncated, nested past the recursion limit): often why it is a dead letter."""
    if value is None:
        return None
    raw = as_bytes(value)
    try:
        return _json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return raw
