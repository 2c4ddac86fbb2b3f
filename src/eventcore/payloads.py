"""What a JSON payload may carry, and how msgspec is told to encode one: shared by both hot-path implementations.

msgspec writes NaN and +/-infinity as `null` (JSON has no such numbers), so an
event holding one would come back as None, or fail to decode for ever after.
PostgreSQL's jsonb refuses the escape `\\u0000` (NUL), so such an event would be
accepted by SQLite and refused by PostgreSQL. Both are refused before anything
is written, on every backend, as is a payload over `MAX_PAYLOAD_BYTES`.

The checks cost one substring search per payload on the hot path (`bytes.find`: the `in`
operator on bytes first tries its operand as an int and costs ~3x more): `\\u0000` is
looked for in every payload, `null` only in those of classes whose declared
fields can hold a float (see `float_capable`). A hit is then confirmed on the
Python object (slow path, rare), so a legitimate `null` or an escaped backslash
followed by `u0000` is never refused. Fields are trusted to hold what they
declare: msgspec does not check types when a Struct is constructed.

The encoder hook and the exceptions that mean "this object cannot be JSON" live
here too, so both twins encode the same objects to the same bytes and refuse
the same ones with the same message.
"""
from __future__ import annotations

import dataclasses
import math
import threading

from typing import Any

import msgspec
import msgspec.inspect as _mi

from .errors import EventCoreError, SerializationError
from .utf8 import NESTED_TOO_DEEPLY

#: Largest JSON payload (and, separately, metadata) one event may have, in bytes: 16 MiB.
#: PostgreSQL's jsonb holds at most ~255 MB and a COPY field 2 GiB; an event store is
#: not a blob store, and a clear error before anything is sent beats a server error
#: (or a 1 GB row in SQLite) after.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


def enc_hook(obj: object) -> str:
    """msgspec's hook for objects it does not encode natively: str subclasses (StreamId in an event field)."""
    if isinstance(obj, str):
        return str(obj)
    raise TypeError(f"objects of type {type(obj).__name__} are not JSON-serializable")


def dec_hook(type_: Any, obj: object) -> object:
    """msgspec's hook for types it does not decode natively: a str subclass (ec.StreamId in an event
    field) made of the stored str, which it validates (a stored value it refuses cannot be decoded)."""
    # A TypeError or ValueError raised here msgspec reports as a ValidationError naming the field.
    if type_ is object:  # any JSON value, as msgspec decodes `object` without a hook
        return obj
    if isinstance(type_, type) and issubclass(type_, str):
        if not isinstance(obj, str):
            raise TypeError(f"Expected `str`, got `{type(obj).__name__}`")
        try:
            return type_(obj)
        except EventCoreError as exc:
            raise ValueError(str(exc)) from None
    raise TypeError(f"{type_!r} cannot be decoded from JSON")


#: What msgspec raises for an object that has no JSON form. ValueError: a str with a lone surrogate
#: (no UTF-8 form); RecursionError: nested deeper than Python's recursion limit (msgspec counts its
#: depth against it), reported as a typed error like the others.
ENCODE_ERRORS = (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError)
#: What msgspec raises for stored bytes that are not a valid payload. UnicodeError: bytes that are not
#: UTF-8 (as some msgspec versions report them; others raise a DecodeError: see utf8), or text with
#: lone surrogates (a non-UTF-8 SQLite TEXT value).
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError)


def encode_error_text(exc: BaseException) -> str:
    """What was wrong with an object msgspec could not encode (`exc` one of ENCODE_ERRORS)."""
    return NESTED_TOO_DEEPLY if isinstance(exc, RecursionError) else str(exc)


# Declared types that can never hold a float once encoded.
_FLOAT_FREE = (
    _mi.IntType, _mi.StrType, _mi.BoolType, _mi.NoneType, _mi.BytesType, _mi.ByteArrayType, _mi.MemoryViewType,
    _mi.DateTimeType, _mi.DateType, _mi.TimeType, _mi.TimeDeltaType, _mi.UUIDType, _mi.DecimalType,
    _mi.LiteralType, _mi.EnumType, _mi.RawType, _mi.ExtType,
)
#: float_capable's answers, per class: the hot paths read it directly and call float_capable on a miss.
float_capable_cache: dict[type, bool] = {}
_lock = threading.Lock()


def _type_may_hold_float(info, seen: set) -> bool:
    if isinstance(info, _FLOAT_FREE):
        return False
    if id(info) in seen:  # a recursive type: already being looked at
        return False
    seen.add(id(info))
    if isinstance(info, (_mi.StructType, _mi.DataclassType, _mi.TypedDictType, _mi.NamedTupleType)):
        return any(_type_may_hold_float(f.type, seen) for f in info.fields)
    if isinstance(info, _mi.UnionType):
        return any(_type_may_hold_float(t, seen) for t in info.types)
    if isinstance(info, (_mi.ListType, _mi.SetType, _mi.FrozenSetType, _mi.VarTupleType)):
        return _type_may_hold_float(info.item_type, seen)
    if isinstance(info, _mi.TupleType):
        return any(_type_may_hold_float(t, seen) for t in info.item_types)
    if isinstance(info, _mi.DictType):
        return _type_may_hold_float(info.value_type, seen)
    return True  # float, Any, object, custom types, anything new: check


def float_capable(cls: type) -> bool:
    """Whether a declared field of `cls` (at any depth) can hold a float. Cached per class."""
    found = float_capable_cache.get(cls)
    if found is None:
        try:
            found = _type_may_hold_float(_mi.type_info(cls), set())
        except Exception:  # noqa: BLE001 - a type msgspec cannot describe: check its payloads
            found = True
        with _lock:
            float_capable_cache[cls] = found
    return found


def _children(obj, path: str):
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            yield getattr(obj, name), f"{path}.{name}" if path else name
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield value, f"{path}[{key!r}]"
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield value, f"{path}[{i}]"
    elif isinstance(obj, (set, frozenset)):
        for value in obj:
            yield value, f"{path}[...]"
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield getattr(obj, f.name), f"{path}.{f.name}" if path else f.name


def non_finite_float(obj: object) -> tuple[str, float] | None:
    """(path, value) of the first NaN or infinite float in `obj` (walked without recursion), or None."""
    stack = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return path or "(the value itself)", value
        elif not isinstance(value, (str, int, bytes, type(None))):
            children = list(_children(value, path))
            children.reverse()  # depth first, in field order
            stack.extend(children)
    return None


def has_nul_escape(data: bytes) -> bool:
    """Whether JSON text `data` has a `\\u0000` escape (a NUL in a string), not an escaped backslash + `u0000`."""
    start = 0
    while True:
        i = data.find(b"\\u0000", start)
        if i < 0:
            return False
        run = 1  # backslashes ending at i: an odd run means the one at i starts an escape
        while i - run >= 0 and data[i - run] == 0x5C:
            run += 1
        if run % 2 == 1:
            return True
        start = i + 1


def _nul_path(obj) -> str | None:
    stack = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path or "(the value itself)"
        elif not isinstance(value, (int, float, bytes, type(None))):
            if isinstance(value, dict):
                for key in value:
                    if isinstance(key, str) and "\x00" in key:
                        return f"{path}[{key!r}] (a key)"
            children = list(_children(value, path))
            children.reverse()
            stack.extend(children)
    return None


def check_encoded(obj: object, data: bytes, what: str, may_hold_float: bool) -> None:
    """Raise SerializationError if encoded `data` of `obj` is too large, holds NaN/infinity
    (as the `null` msgspec wrote for it) or a NUL. `what` names the object in the message.
    `data` is bytes or any buffer over the encoded JSON (e.g. a memoryview of a COPY buffer)."""
    size = len(data)
    if size > MAX_PAYLOAD_BYTES:
        raise SerializationError(
            f"{what} is {size:,} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES:,} bytes (16 MiB) per event: "
            "store large blobs elsewhere and put a reference in the event"
        )
    raw = bytes(data)
    if may_hold_float and raw.find(b"null") >= 0:
        found = non_finite_float(obj)
        if found is not None:
            path, value = found
            raise SerializationError(
                f"{what} holds {value!r} at {path}: JSON has no NaN or infinity (it would be stored as null); "
                "use None or a string"
            )
    if has_nul_escape(raw):
        path = _nul_path(obj)
        raise SerializationError(
            f"{what} holds a NUL character (\\u0000){f' at {path}' if path else ''}: PostgreSQL cannot store "
            "it in JSON, so no backend accepts it"
        )
