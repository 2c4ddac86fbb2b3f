"""Persistent snapshots of a command's folded state: long streams folded from a snapshot, not from event 1.

A command class opts in with `__snapshots__ = ec.SnapshotPolicy(every=200)` (or per call,
`execute(..., snapshots=...)`). Its state over its streams is stored with what it covers: for each
stream, the version and the id of the last event folded into it, and the command's `__state_version__`
(bump it when `initial_state()` or `apply()` change). The next execution loads the snapshot, reads only
the events after it (and the last one it covers, to check that the stream's history is the one the
snapshot was made from), and folds those onto the stored state.

A snapshot is never a source of truth: the append checks the version of every stream read as always,
and a snapshot that cannot be decoded, was made under another state version or for another history
(a stream whose event at the covered version is not the one folded) is passed over for a full fold,
counted in `SNAPSHOT_STATS` and logged at debug level, never an error to the caller. A snapshot is
written only of a state that encodes and decodes back to an equal value, so what is loaded is what
was folded.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
from collections import defaultdict
from typing import Any

import msgspec

from .errors import ValidationError
from .streams import StreamId, forbidden_character

log: logging.Logger = logging.getLogger("eventcore.snapshots")


class SnapshotPolicy(msgspec.Struct, frozen=True):
    """When a command's state is stored: once `every` events were folded beyond the last snapshot
    (or from the start, when there is none)."""

    #: 200: a snapshot costs one small write; folding 200 events costs about as much (~0.3-1.5 µs each
    #: to decode and apply, plus their bytes on the wire), so a command never folds more than a few
    #: writes' worth of events, and a store of N commands on a stream writes at most N/200 snapshots.
    every: int = 200

    def __post_init__(self) -> None:
        if type(self.every) is not int or self.every < 1:
            raise ValidationError(f"SnapshotPolicy.every must be an int >= 1, got {self.every!r}")


class _SnapshotsDefault:
    """The default of `execute(snapshots=...)`: the command class's `__snapshots__` (None: none)."""

    def __repr__(self) -> str:
        return "<the command class's __snapshots__>"


#: `execute(snapshots=COMMAND_SNAPSHOTS)`: the command class's own policy.
COMMAND_SNAPSHOTS: Any = _SnapshotsDefault()

#: What became of snapshots in this process: loaded and used, passed over (and why), written, skipped
#: (a state that does not survive encoding). For tests and the curious; not a metric per store.
SNAPSHOT_STATS: dict[str, int] = {"used": 0, "cached": 0, "none": 0, "stale_state_version": 0, "history_mismatch": 0,
                                  "undecodable": 0, "written": 0, "not_encodable": 0, "write_failed": 0}


def snapshot_written(key: str, error: Exception | None) -> None:
    """Count (and log a failed) write of the snapshot under `key`: a failure costs only the snapshot."""
    if error is None:
        SNAPSHOT_STATS["written"] += 1
    else:
        SNAPSHOT_STATS["write_failed"] += 1
        log.debug("snapshot %s not written: %s", key, error)


def policy_of(command: Any, given: Any) -> SnapshotPolicy | None:
    """The snapshot policy of one execution: `given`, else the command class's `__snapshots__`."""
    policy = getattr(type(command), "__snapshots__", None) if given is COMMAND_SNAPSHOTS else given
    if policy is not None and not isinstance(policy, SnapshotPolicy):
        raise ValidationError(f"snapshots must be an ec.SnapshotPolicy or None, got {type(policy).__name__}")
    return policy


def state_version_of(command: Any) -> int:
    version = getattr(type(command), "__state_version__", 1)
    if type(version) is not int or not 1 <= version <= 2**31 - 1:
        raise ValidationError(f"{type(command).__name__}.__state_version__ must be an int in 1..2**31-1, "
                              f"got {version!r}")
    return version


#: Longest snapshot name: names are listed, and keyed with a 33-character suffix (PostgreSQL keys are
#: at most 1,000 characters).
MAX_NAME = 200

def command_name(command: Any) -> str:
    """The name snapshots of a command class are stored under: the class's own `__snapshot_name__`
    (never a parent's: a subclass may fold otherwise), else module.qualname; a class made inside a
    function (whose qualname every class the function makes shares) must name itself. Classes that
    give one name share their snapshots: a class defined again (a reload) finds its own."""
    cls = type(command)
    name = cls.__dict__.get("__snapshot_name__")
    if name is None:
        if "<locals>" in cls.__qualname__:
            raise ValidationError(
                f"{cls.__qualname__} is defined inside a function: every class it makes would share one "
                "snapshot; give each its own __snapshot_name__ (or run it with snapshots=None)")
        name = f"{cls.__module__}.{cls.__qualname__}"
    elif not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or forbidden_character(name):
        raise ValidationError(f"{cls.__name__}.__snapshot_name__ must be a str of 1..{MAX_NAME} characters without "
                              f"control characters, NUL or lone surrogates, got {name!r:.80}")
    return name


def snapshot_key(name: str, streams: list) -> str:
    """The key of a command's snapshot over these streams (any order: the fold is by position)."""
    return _snapshot_key(name, tuple(streams))


#: Keys of the commands a process runs most, remembered (a command computes its key at every execution).
@functools.lru_cache(maxsize=4096)
def _snapshot_key(name: str, streams: tuple) -> str:
    joined = "\x1f".join(sorted(map(str, streams)))
    return f"{name}:{hashlib.sha256(joined.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def _as_plain(value: Any) -> Any:
    """A value msgpack has no form for, as one it has: a str subclass (ec.StreamId) as its str."""
    if isinstance(value, str):
        return str(value)
    raise NotImplementedError(f"{type(value).__name__} cannot be stored in a snapshot")


_encoder = msgspec.msgpack.Encoder(enc_hook=_as_plain)


def from_versions(stored: Any, state_version: int, stream_ids: list) -> dict:
    """Where a read after a snapshot starts in each stream: its covered version (the last event folded
    into it, read again to check it is the one folded), 1 for a stream it does not cover or when there
    is no snapshot of this state version. What `_read_after_snapshot` reads; PostgreSQL computes the
    same on the server from the snapshot's arrays."""
    out = dict.fromkeys(stream_ids, 1)
    if stored is None or stored[0] != state_version:
        return out
    try:
        covers = msgspec.json.decode(stored[1])
    except msgspec.DecodeError:
        return out
    if not isinstance(covers, dict):
        return out
    for sid in stream_ids:
        entry = covers.get(sid)
        if isinstance(entry, list) and entry and type(entry[0]) is int:
            out[sid] = max(1, entry[0])
    return out


def encode_state(command: Any, state: Any) -> bytes | None:
    """The state as stored (msgpack), or None when it would not decode back to an equal value."""
    try:
        blob = _encoder.encode(state)
        again = decode_state(command, blob)
    except Exception:  # noqa: BLE001 - a state msgpack cannot hold: no snapshot, never an error
        SNAPSHOT_STATS["not_encodable"] += 1
        log.debug("%s: state of type %s cannot be stored as a snapshot", type(command).__name__, type(state).__name__)
        return None
    if not same(again, state):
        SNAPSHOT_STATS["not_encodable"] += 1
        log.debug("%s: state does not survive encoding (declare __state_type__): no snapshot", type(command).__name__)
        return None
    return blob


def same(a: Any, b: Any) -> bool:
    """Whether `a` (a decoded state) is `b` (the folded one) in every way a command can tell: equal, and
    of the same type all the way down (an int is not a float, a str Enum member not a str, a
    defaultdict not a dict, a datetime keeps its UTC offset), dicts in the same key order. A stream
    id (ec.StreamId) and its str are the same."""
    a_: Any = a  # of b's type once the first check passed
    ta, tb = type(a), type(b)
    if ta is not tb and not (isinstance(a, str) and isinstance(b, str) and ta in _STR_ALIKE and tb in _STR_ALIKE):
        return False
    if isinstance(b, dict):
        if len(a) != len(b) or (isinstance(b, defaultdict) and a_.default_factory is not b.default_factory):
            return False
        return all(same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a_.items(), b.items()))
    if isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(b, (set, frozenset)):
        return {(type(x), x) for x in a} == {(type(x), x) for x in b}
    if isinstance(b, msgspec.Struct):
        return all(same(getattr(a, f), getattr(b, f)) for f in b.__struct_fields__)
    if isinstance(b, (_dt.datetime, _dt.time)):
        return a == b and a_.utcoffset() == b.utcoffset() and (a_.tzinfo is None) == (b.tzinfo is None)
    return a == b


#: Types a decoded str may have where the folded state had another of them.
_STR_ALIKE = frozenset({str, StreamId})


def decode_state(command: Any, blob: bytes) -> Any:
    """A stored state, decoded as the command's `__state_type__` (default: the type of its initial state)."""
    cls = type(command)
    state_type = getattr(cls, "__state_type__", None)
    if state_type is None:
        state_type = type(command.initial_state())
        if state_type is type(None):
            state_type = Any
    return msgspec.msgpack.decode(blob, type=state_type)
