"""Reading events whose shape changed: old type versions through upcaster chains, renamed types
through aliases, and any event as its stored JSON (`decode=False`).

Both decoders of stored events (`decode_rows` and `decode_copy`, in `_pure/` and in ext/) ask
this module, once per stored type name in a page, how to decode it (`decoding`): the class's
msgspec decoder, the name the event is delivered under and the version that decoder reads. A
row stored at that version is decoded exactly as before type versions existed: the compiled
path adds one integer comparison. A row at an older version goes through `upcasting`, the slow
path shared by both twins: the stored JSON decoded into a dict, each upcaster of the chain
applied in turn, the result encoded and decoded as the class (so it is checked with the very
rules a stored payload is). Chains are built on first use and checked then (a missing step, a
version newer than the class); a registration drops them (`events._generation`).
"""
from __future__ import annotations

from typing import Any, Callable

import msgspec

from .errors import EventVersionError, SerializationError, UnknownEventTypeError, UpcastError, ValidationError
from .events import (
    MAX_EVENT_VERSION, Event, RawEvent, _generation, _registry, _registry_lock, _upcasters, validate_raw_event,
)
from .payloads import DECODE_ERRORS, ENCODE_ERRORS, dec_hook, enc_hook

_decoders: dict[type, msgspec.json.Decoder] = {}
#: The stored JSON object as a dict: what upcasters take.
_raw_decoder = msgspec.json.Decoder(dict)
raw_decode: Callable[[bytes], dict[str, Any]] = _raw_decoder.decode
#: The stored JSON as it is: what `decode=False` delivers (a dict; a list for an array_like class's events).
stored_decode: Callable[[bytes], Any] = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder(enc_hook=enc_hook).encode
#: (class, stored version) -> its chain, for the registry generation in _chains_generation.
_chains: dict[tuple[type, int], "_Chain"] = {}
_chains_generation = [-1]


def class_decoder(cls: type[Event]) -> msgspec.json.Decoder[Any]:
    """The msgspec JSON decoder of an event class (one per class, kept)."""
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls, dec_hook=dec_hook)
    return dec


def decoding(type_name: str, raw: bool, position: int | None,
             stream_id: str | None) -> tuple[Callable[[bytes], Any], str, int]:
    """How the decoders read events stored under `type_name`: (decode, the type name delivered, the
    stored version `decode` reads as is; -1: any). Raw: the JSON as a dict under the stored name, at
    any version. Else the registered class's decoder, under the class's own name (an alias's events
    too), for the class's version; UnknownEventTypeError when no class is registered."""
    if raw:
        return stored_decode, type_name, -1
    cls = _registry.get(type_name)
    if cls is None:
        raise UnknownEventTypeError(type_name, position, stream_id)
    name = cls.__event_type__
    return class_decoder(cls).decode, (type_name if name == type_name else name), cls.__event_version__


def upcasting(type_name: str, version: int, position: int | None, stream_id: str | None) -> Callable[[bytes], Any]:
    """The decode of events stored under `type_name` at `version`, which is not their class's: the
    upcaster chain to the class's version. EventVersionError (naming the event) when the version is
    newer than the class or a step is missing; a corrupt version is a SerializationError."""
    cls = _registry.get(type_name)
    if cls is None:
        raise UnknownEventTypeError(type_name, position, stream_id)
    if type(version) is not int or not 1 <= version <= MAX_EVENT_VERSION:
        raise SerializationError(f"corrupt type version at position {position} (stream {stream_id!r}, type "
                                 f"{type_name!r}): {version!r:.60}")
    try:
        return chain_for(cls, version).decode
    except EventVersionError as exc:
        raise exc.located(position, stream_id) from None


class _Chain:
    """The decode of one class's events stored at one older version: upcasters, then the class."""

    __slots__ = ("type_name", "version", "steps", "decoder")

    def __init__(self, type_name: str, version: int, steps: list, decoder: msgspec.json.Decoder) -> None:
        self.type_name = type_name
        self.version = version
        self.steps = steps
        self.decoder = decoder

    def decode(self, data):
        # Corrupt stored JSON raises msgspec's error, which the decoders report as for any payload.
        obj = raw_decode(data)
        for step, fn in self.steps:
            try:
                obj = fn(obj)
            except Exception as exc:  # noqa: BLE001 - any error of user code becomes a typed one
                raise UpcastError(self.type_name, self.version, step, _qualified_error(fn, exc)) from exc
            if type(obj) is not dict:
                raise UpcastError(self.type_name, self.version, step,
                                  f"{_name(fn)} returned {type(obj).__name__}, not a dict")
        try:
            return self.decoder.decode(_encode(obj))
        except (*DECODE_ERRORS, *ENCODE_ERRORS) as exc:
            raise UpcastError(self.type_name, self.version, None,
                              f"{exc} (decoding {_short(obj)} as {self.decoder.type.__name__})") from exc


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _qualified_error(fn, exc: BaseException) -> str:
    return f"{_name(fn)} raised {type(exc).__name__}: {exc}"


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


def chain_for(cls: type[Event], version: int) -> _Chain:
    """The chain taking `cls`'s events stored at `version` (< its version) to its version, built and
    checked on first use; EventVersionError for a version newer than the class or a missing step."""
    if _chains_generation[0] != _generation[0]:
        with _registry_lock:
            _chains.clear()
            _chains_generation[0] = _generation[0]
    chain = _chains.get((cls, version))
    if chain is not None:
        return chain
    name, current = cls.__event_type__, cls.__event_version__
    if version > current:
        raise EventVersionError(name, version, current, class_name=cls.__name__)
    with _registry_lock:
        known = dict(_upcasters.get(name, {}))
    steps = []
    for v in range(version, current):
        fn = known.get(v)
        if fn is None:
            raise EventVersionError(name, version, current, missing=v, class_name=cls.__name__)
        steps.append((v, fn))
    chain = _chains[(cls, version)] = _Chain(name, version, steps, class_decoder(cls))
    return chain


def check_chains(cls: type[Event] | None = None) -> None:
    """EventVersionError unless every registered class (or `cls`) has an upcaster for each step from
    version 1 to its version: call it at start-up (or in a test) to find a missing step before a
    read does."""
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, Event)):
        raise ValidationError(f"check_chains takes an ec.Event subclass or nothing, got {cls!r}")
    with _registry_lock:
        classes = {c for c in _registry.values()} if cls is None else {cls}
    for c in sorted(classes, key=lambda c: c.__event_type__):
        for v in range(1, c.__event_version__):
            chain_for(c, v)


def check_raw_event(event: RawEvent) -> tuple[str, bytes, int]:
    """(type, data, type version to store) of a RawEvent, or ValidationError: its JSON checked as
    `events.validate_raw_event` does, then against its class if one is registered (`raw_event_version`)."""
    t, data = validate_raw_event(event)
    return t, data, raw_event_version(t, data, event.version)


#: How raw_event_version names what it checks: a RawEvent's fields, or a JSON line's.
_RAW_WORDS = {"RawEvent": ("RawEvent", "RawEvent.data", "RawEvent.version"),
              "line": ("the line", "`data`", "`version`")}


def raw_event_version(type_name: str, data: bytes, version: int | None, what: str = "RawEvent",
                      against_class: bool = True) -> int:
    """The type version a RawEvent is stored with, its payload checked against its class.

    `version` None: the registered class's version, or 1 for a type this process does not know.
    For a known type the payload must decode as the class, through the upcasters from `version`:
    otherwise ValidationError saying why, and nothing is written. `against_class` False: the version
    alone (an item a resumed ingest passes over: see jsonl.parse_line)."""
    event_words, data_words, version_words = _RAW_WORDS[what]
    if version is not None and (type(version) is not int or not 1 <= version <= MAX_EVENT_VERSION):
        raise ValidationError(f"{version_words} of type {type_name!r} must be an int in 1..{MAX_EVENT_VERSION} "
                              f"or None, got {version!r}")
    cls = _registry.get(type_name)
    if cls is None:
        return 1 if version is None else version
    current = cls.__event_version__
    if not against_class:
        return current if version is None else version
    if version is None:
        version = current
    try:
        if version == current:
            class_decoder(cls).decode(data)
        else:
            chain_for(cls, version).decode(data)
    except (EventVersionError, UpcastError) as exc:
        raise ValidationError(f"{event_words} of type {type_name!r} version {version}: {exc}") from None
    except DECODE_ERRORS as exc:
        raise ValidationError(f"{data_words} of type {type_name!r} version {version} does not decode as "
                              f"{cls.__name__}: {exc}") from None
    return version
