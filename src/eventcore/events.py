"""The event model: `Event` (what happened), `Metadata` (who and why), `RecordedEvent` (as stored).

Event classes register themselves under a stable type name — `__event_type__`
when the class sets it, else the class name, never a module path — so stored
events stay readable after code moves. The registry maps names back to classes
on read; an unknown name is a typed error, never a silently dropped event.

Events change shape over the years, so each class also has a type version
(`__event_version__`, stored with every event), names it was stored under before
a rename (`__event_aliases__`), and upcasters (`@upcaster`) that turn a payload of
one version into the next. Contradictions (a name claimed twice, two upcasters for
one step, an upcaster from a version the class has reached) are refused when the
class or upcaster is defined; eventcore.evolution reads old versions through the chain.
"""
from __future__ import annotations

import datetime as _dt
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic
from typing import TypeVar as _TypeVar

import msgspec

from .errors import EventDefinitionError, ValidationError
from .payloads import MAX_PAYLOAD_BYTES, has_nul_escape
from .streams import StreamId, forbidden_character, stream_id as _stream_id
from .utf8 import NESTED_TOO_DEEPLY, invalid_utf8, is_utf8_error

if TYPE_CHECKING:
    from typing_extensions import Self

#: Stored type name (a class's own, or one of its aliases) -> the class that reads it.
_registry: dict[str, type["Event"]] = {}
#: Type name -> {from_version: upcaster}: the function taking a payload (dict) of that version to the next.
_upcasters: dict[str, dict[int, Any]] = {}
#: Bumped by every registration: readers drop the upcaster chains they built (eventcore.evolution).
_generation = [0]
_registry_lock = threading.RLock()

#: An upcaster: a stored payload (dict) of one version in, the payload of the next version out.
UpcasterT = _TypeVar("UpcasterT", bound=Callable[[dict[str, Any]], dict[str, Any]])

#: Type versions are stored as a smallint (PostgreSQL) and an INTEGER (SQLite): 1 .. 32767.
MAX_EVENT_VERSION = 32767


class Event(msgspec.Struct):
    """Base class of domain events (a msgspec Struct).

    The stored type name is the class name, or `__event_type__` when set::

        class Deposited(ec.Event):
            __event_type__ = "bank.Deposited"   # optional: pin the stored name
            amount: int
    """

    __event_type__: ClassVar[str]
    #: The payload's shape version, stored with every event written (1 unless the class says).
    __event_version__: ClassVar[int] = 1
    #: Stored type names that also mean this class (the names it had before a rename).
    __event_aliases__: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Read from the class's own dict: a subclass must not inherit its parent's name, version or aliases.
        own = cls.__dict__
        name = own.get("__event_type__") or cls.__name__
        if not isinstance(name, str) or not name or len(name) > 255:
            raise TypeError(f"{cls.__qualname__}.__event_type__ must be a non-empty str of at most 255 characters")
        bad = forbidden_character(name)
        if bad is not None:
            raise TypeError(f"{cls.__qualname__}.__event_type__ {name!r} contains {bad} (no control characters, "
                            "NUL or lone surrogates)")
        version = own.get("__event_version__", 1)
        if type(version) is not int or not 1 <= version <= MAX_EVENT_VERSION:
            raise EventDefinitionError(f"{cls.__qualname__}.__event_version__ must be an int in 1..{MAX_EVENT_VERSION}, "
                                       f"got {version!r}")
        aliases = own.get("__event_aliases__", ())
        if isinstance(aliases, str) or not isinstance(aliases, (tuple, list)):
            raise EventDefinitionError(f"{cls.__qualname__}.__event_aliases__ must be a tuple of type names, "
                                       f"got {aliases!r}")
        for alias in aliases:
            if not isinstance(alias, str) or not alias or len(alias) > 255 or forbidden_character(alias):
                raise EventDefinitionError(f"{cls.__qualname__}.__event_aliases__ holds {alias!r}: each alias must be "
                                           "a non-empty str of at most 255 characters without control characters")
            if alias == name:
                raise EventDefinitionError(f"{cls.__qualname__}.__event_aliases__ holds its own type name {name!r}")
        if len(set(aliases)) != len(aliases):
            raise EventDefinitionError(f"{cls.__qualname__}.__event_aliases__ names one alias twice: {aliases!r}")
        cls.__event_type__ = name
        cls.__event_version__ = version
        cls.__event_aliases__ = tuple(aliases)
        register_event_type(cls)


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _definition_site(fn) -> tuple:
    """Where a function was defined: its qualified name, file and first line. The same site twice is
    one upcaster defined again (a module reloaded); two lambdas, or two functions of one name in one
    module, are two."""
    code = getattr(fn, "__code__", None)
    return _qualified(fn), getattr(code, "co_filename", None), getattr(code, "co_firstlineno", None), \
        None if code is not None else id(fn)


def register_event_type(cls: type[Event]) -> None:
    """Register `cls` under its type name and aliases (done automatically for every `Event` subclass).

    A name (type name or alias) claimed by two different classes is an EventDefinitionError, and so
    is an upcaster already registered from a version the class has reached; redefining the same class
    (same module and qualified name, e.g. on reload) replaces it.
    """
    name = cls.__event_type__
    version = getattr(cls, "__event_version__", 1)
    names = (name, *getattr(cls, "__event_aliases__", ()))
    with _registry_lock:
        for n in names:
            existing = _registry.get(n)
            if existing is not None and existing is not cls and _qualified(existing) != _qualified(cls):
                if n == name and existing.__event_type__ == name:
                    raise EventDefinitionError(
                        f"event type name {name!r} is already used by {_qualified(existing)}; "
                        f"set __event_type__ on {_qualified(cls)} to a unique, stable name"
                    )
                what = "type name" if n == name else "alias"
                theirs = "type name" if existing.__event_type__ == n else "alias"
                raise EventDefinitionError(
                    f"the {what} {n!r} of {_qualified(cls)} is already the {theirs} of {_qualified(existing)}: "
                    "a stored name can mean one class only"
                )
        for alias in names[1:]:
            if _upcasters.get(alias):
                raise EventDefinitionError(
                    f"upcasters are registered under {alias!r}, which {_qualified(cls)} names as an alias: register "
                    f"them under its current type name {name!r} (old events of an alias go through its chain)"
                )
        too_new = sorted(v for v in _upcasters.get(name, {}) if v >= version)
        if too_new:
            raise EventDefinitionError(
                f"{_qualified(cls)} ({name!r}) is at version {version}, but an upcaster from version {too_new[0]} "
                f"to {too_new[0] + 1} is registered: set __event_version__ to at least {too_new[-1] + 1}"
            )
        previous = _registry.get(name)
        if previous is not None and previous is not cls:  # a reload: the old class's aliases go with it
            for n in [k for k, c in _registry.items() if c is previous]:
                del _registry[n]
        for n in names:
            _registry[n] = cls
        _generation[0] += 1


def upcaster(type_name: str, *, from_version: int) -> Callable[[UpcasterT], UpcasterT]:
    """Register the decorated function as the upcaster of `type_name` from `from_version` to the next
    version: it takes the stored payload of that version (a dict, as JSON decodes it) and returns the
    payload of `from_version + 1` (a dict). Reading an event stored at version v of a class at version
    n > v runs the chain v -> v+1 -> ... -> n, then decodes the result as the class::

        @ec.upcaster("bank.Deposited", from_version=1)
        def _deposited_v1(data: dict) -> dict:
            return {"cents": data["amount"] * 100}

    Register under the class's current type name (an alias's old events go through the same chain).
    Two upcasters for one step, or one from a version the registered class has reached, are an
    EventDefinitionError here; a step missing from a chain is one on the first read that needs it
    (an upcaster may be defined after its class)."""
    if not isinstance(type_name, str) or not type_name or len(type_name) > 255 or forbidden_character(type_name):
        raise EventDefinitionError(f"upcaster type name must be a non-empty str of at most 255 characters, "
                                   f"got {type_name!r}")
    if type(from_version) is not int or not 1 <= from_version < MAX_EVENT_VERSION:
        raise EventDefinitionError(f"upcaster from_version of {type_name!r} must be an int in 1..{MAX_EVENT_VERSION - 1}, "
                                   f"got {from_version!r}")

    def register(fn: UpcasterT) -> UpcasterT:
        if not callable(fn):
            raise EventDefinitionError(f"@upcaster({type_name!r}, from_version={from_version}) decorates "
                                       f"{fn!r}, which is not callable")
        with _registry_lock:
            steps = _upcasters.setdefault(type_name, {})
            existing = steps.get(from_version)
            if existing is not None and existing is not fn and _definition_site(existing) != _definition_site(fn):
                raise EventDefinitionError(
                    f"two upcasters for event type {type_name!r} from version {from_version} to {from_version + 1}: "
                    f"{_qualified(existing)} and {_qualified(fn)}"
                )
            cls = _registry.get(type_name)
            if cls is not None and cls.__event_type__ != type_name:
                raise EventDefinitionError(
                    f"@upcaster({type_name!r}, ...) names an alias of {_qualified(cls)}: register upcasters under "
                    f"its current type name {cls.__event_type__!r} (old events of an alias go through its chain)"
                )
            if cls is not None and from_version >= cls.__event_version__:
                raise EventDefinitionError(
                    f"upcaster {_qualified(fn)} takes {type_name!r} from version {from_version} to {from_version + 1}, "
                    f"but {_qualified(cls)} is at version {cls.__event_version__}: raise its __event_version__ first"
                )
            steps[from_version] = fn
            _generation[0] += 1
        return fn

    return register


def upcasters_of(type_name: str) -> dict[int, Any]:
    """from_version -> upcaster registered for a type name (a copy)."""
    with _registry_lock:
        return dict(_upcasters.get(type_name, {}))


def event_class(type_name: str) -> type[Event] | None:
    """The registered `Event` class for a stored type name (its own or an alias), or None."""
    return _registry.get(type_name)


def known_type_names() -> dict[str, type[Event]]:
    """Every stored type name this process can read (type names and aliases) -> its class (a copy)."""
    with _registry_lock:
        return dict(_registry)


class isolated_registry:
    """A context manager for tests: inside it, event classes and upcasters register into a registry of
    their own (starting as a copy of the current one, or empty with `empty=True`); leaving it restores
    the registry as it was. Lets one process define a type's old class and its new one in turn."""

    def __init__(self, *, empty: bool = False) -> None:
        self.empty = empty

    def __enter__(self) -> Self:
        with _registry_lock:
            self._saved = (dict(_registry), {k: dict(v) for k, v in _upcasters.items()})
            if self.empty:
                _registry.clear()
                _upcasters.clear()
            _generation[0] += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with _registry_lock:
            _registry.clear()
            _registry.update(self._saved[0])
            _upcasters.clear()
            _upcasters.update(self._saved[1])
            _generation[0] += 1


class Metadata(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who and why: stored with every event and returned on read."""

    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None
    custom: dict[str, Any] = {}


EMPTY_METADATA = Metadata()

_ID_FIELDS = ("correlation_id", "causation_id", "user_id")


def check_metadata(md: Metadata) -> None:
    """ValidationError unless every field has the type Metadata declares: the ids a str or None, `custom`
    a dict with str keys. msgspec does not check a Struct's fields when it is built, and metadata of
    another type would be stored and then fail to decode on every read of its stream, for good.
    (Both implementations' encoders call this one function.)"""
    for name in _ID_FIELDS:
        value = getattr(md, name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"Metadata.{name} must be a str or None, got {type(value).__name__}: {value!r:.80}")
    custom = md.custom
    if type(custom) is not dict:
        raise ValidationError(f"Metadata.custom must be a dict, got {type(custom).__name__}: {custom!r:.80}")
    for key in custom:
        if not isinstance(key, str):
            raise ValidationError(
                f"Metadata.custom keys must be str (JSON object keys), got {type(key).__name__}: {key!r:.80}")


if TYPE_CHECKING:
    # The default (PEP 696) is for type checkers only, so typing_extensions need not be installed at run time
    # (type checkers ship their own copy); Python 3.10-3.12's TypeVar takes no default.
    from typing_extensions import TypeVar

    #: The type of `RecordedEvent.data`: `RecordedEvent[Deposited]`; a bare `RecordedEvent` is `RecordedEvent[Any]`.
    DataT = TypeVar("DataT", covariant=True, default=Any)
else:
    from typing import TypeVar

    DataT = TypeVar("DataT", covariant=True)


class RecordedEvent(msgspec.Struct, Generic[DataT], frozen=True, gc=False):
    """An event as stored: its envelope and its decoded payload.

    Generic in the type of `data` for type checkers: `RecordedEvent[Deposited]` is an event whose
    `data` is a `Deposited`. What a read returns is `RecordedEvent[Any]` unless its arguments say
    more (`read_all(types=[Deposited])` gives `RecordedEvent[Deposited]`, `decode=False` gives
    `RecordedEvent[dict[str, Any]]`); nothing is checked at run time.

    `version` is 1-based and gap-free within the stream; `position` is the
    global position in the store's feed (strictly increasing; a reader never finds a
    new event below a position it has seen); `event_id` is a UUIDv7.

    `type` and `type_version` describe `data`. Decoded (the default), `data` is an instance of the
    class registered for the stored name, brought to its current version by the upcasters: `type`
    is the class's `__event_type__` (also for an event stored under an alias) and `type_version`
    its `__event_version__`. Read with `decode=False`, `data` is the stored JSON object as a dict,
    and `type` and `type_version` are the name and version stored with it.

    Not tracked by the cyclic garbage collector (`gc=False`): reads make these by the
    hundred thousand, and the collector scanning them as they were built cost more than
    decoding them (0.78 against 0.66 µs an event for a page of 1,000). A recorded event
    cannot be in a reference cycle unless its payload is changed to refer back to it,
    which would keep both alive (a leak, never a wrong value).
    """

    stream_id: str
    version: int
    position: int
    event_id: uuid.UUID
    type: str
    data: DataT
    metadata: Metadata
    recorded_at: _dt.datetime
    type_version: int = 1


class RawEvent(msgspec.Struct, frozen=True):
    """An event given as its stored form: a type name, a JSON object (bytes) and the type version the
    JSON is in, written as-is.

    For copying events between stores and for bulk ingestion of JSON Lines (`eventcore ingest`).
    `version` None means the current version of the class registered for `type`, or 1 when this
    process has none. When a class is registered for `type` (or an alias), the payload must decode
    as that class after the upcasters from `version` (ValidationError otherwise, nothing written);
    a type this process does not know is stored unchecked and read back with `decode=False`.
    """

    type: str
    data: bytes
    version: int | None = None


_any_json = msgspec.json.Decoder()


class ValidatedItem(tuple):
    """An ingest item (stream id, RawEvent, metadata or None) whose parts were validated by whoever made
    it (the JSON Lines reader, which validates every line it yields): `store.ingest` takes it as it is
    instead of validating the event's JSON a second time."""

    __slots__ = ()


class RowBlock:
    """Consecutive ingest items given as columns (what `store.ingest_columns` hands `store.ingest`): one
    per row of `stream_ids`, numbered as that many items, each validated already (stream id checked,
    payload and metadata encoded by the row path's rules). Parallel lists, one entry per row:
    `store.ingest` moves them into its batches a slice at a time, without an object per row."""

    __slots__ = ("stream_ids", "types", "type_versions", "payloads", "metadatas")

    def __init__(self, stream_ids: list[StreamId], types: list[str], type_versions: list[int], payloads: list[bytes],
                 metadatas: list[bytes | None]) -> None:
        self.stream_ids: list[StreamId] = stream_ids
        self.types: list[str] = types
        self.type_versions: list[int] = type_versions
        self.payloads: list[bytes] = payloads  # each the JSON object
        #: Each row's ec.Metadata as encode_metadata writes it, or None: none (then the ingest's own applies).
        self.metadatas: list[bytes | None] = metadatas

    def __len__(self) -> int:
        return len(self.stream_ids)


class RejectedItem:
    """An ingest item that is an error (a bad row of `store.ingest_columns`, found while its columns
    were encoded): `store.ingest` stops at it as at any bad item, naming its index, with nothing of
    its batch written."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error: Exception = error


def raw_data_problem(data: bytes, decoded: bool = False) -> str | None:
    """What is wrong with RawEvent data that parses as JSON, or None: too large, not UTF-8
    (msgspec does not check the bytes inside strings it skips), or a NUL (`\\u0000`), which
    PostgreSQL's jsonb refuses (see eventcore.payloads)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        return f"is {len(data):,} bytes; the limit is {MAX_PAYLOAD_BYTES:,} bytes (16 MiB) per event"
    if not data.isascii():
        problem = invalid_utf8(data)
        if problem is not None:
            return f"is {problem}"
    if data.find(b"\\u0000") >= 0 and has_nul_escape(data):
        return "holds a NUL character (\\u0000), which PostgreSQL cannot store in JSON, so no backend accepts it"
    if decoded:  # the caller decoded it in full already
        return None
    # Every number must be one a JSON reader can hold: 1e400 is infinity to msgspec (and to most
    # readers), so stored as given it could never be read back. A full decode finds them, and costs
    # less than a regular-expression scan for exponents (~0.3 vs ~0.85 us for a 110-byte object).
    try:
        _any_json.decode(data)
    except msgspec.ValidationError as exc:
        return _out_of_range(exc)
    except msgspec.DecodeError:
        pass  # malformed JSON is the caller's to report, with its own wording
    except RecursionError:
        return NESTED_TOO_DEEPLY
    return None


def _out_of_range(exc: Exception) -> str:
    return f"holds a number out of the range JSON readers can hold (infinity to them): {exc}"


def validate_type_name(t: object, what: str = "RawEvent.type") -> str:
    """An event type name as stored: a non-empty str of at most 255 characters, no control characters."""
    if type(t) is not str or not t or len(t) > 255:
        raise ValidationError(f"{what} must be a non-empty str of at most 255 characters, got {t!r}")
    bad = forbidden_character(t)
    if bad is not None:
        raise ValidationError(f"{what} {t!r} contains {bad} (no control characters, NUL or lone surrogates)")
    return t


def validate_raw_event(event: RawEvent) -> tuple[str, bytes]:
    """(type, data) of a RawEvent, or ValidationError: type non-empty, data one JSON object (UTF-8,
    no NUL, at most MAX_PAYLOAD_BYTES, nested less deeply than the recursion limit). Whether it
    decodes as its class is evolution.check_raw_event's to say."""
    t, data = event.type, event.data
    validate_type_name(t)
    if type(data) is not bytes:
        raise ValidationError(f"RawEvent.data must be JSON bytes, got {type(data).__name__}")
    try:
        _any_json.decode(data)  # one full decode: syntax, UTF-8, nesting and numbers out of range
    except msgspec.ValidationError as exc:
        raise ValidationError(f"RawEvent.data of type {t!r} {_out_of_range(exc)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        problem = invalid_utf8(data) if is_utf8_error(exc) else None
        if problem is not None:
            raise ValidationError(f"RawEvent.data of type {t!r} is {problem}") from None
        raise ValidationError(f"RawEvent.data of type {t!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError(f"RawEvent.data of type {t!r} is {NESTED_TOO_DEEPLY}") from None
    if not data.lstrip()[:1] == b"{":
        raise ValidationError(f"RawEvent.data of type {t!r} must be a JSON object")
    problem = raw_data_problem(data, decoded=True)
    if problem is not None:
        raise ValidationError(f"RawEvent.data of type {t!r} {problem}")
    return t, data


class EventToWrite(msgspec.Struct, frozen=True):
    """An event bound to the stream it goes to; made by `emit(...)`."""

    stream_id: StreamId
    event: Event | RawEvent
    metadata: Metadata | None = None


def emit(stream: str, event: Event | RawEvent, metadata: Metadata | None = None) -> EventToWrite:
    """Name the stream an event goes to: `return [ec.emit(self.account, Deposited(amount=1))]`."""
    if not isinstance(event, (Event, RawEvent)):
        raise ValidationError(
            f"emit() takes an ec.Event instance, got {type(event).__name__}: {event!r}"
        )
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    return EventToWrite(_stream_id(stream), event, metadata)
