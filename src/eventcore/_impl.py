"""The hot path's contract (`HotPath`) and the switch that picks who fulfils it.

Two implementations satisfy `HotPath`, function for function and signature for
signature: the compiled extension `eventcore._speedups` (Cython, built from
ext/) and the pure-Python twins in `eventcore._pure` (the executable spec).
tests/test_hotpath.py checks both against it, and `_speedups.pyi` too.

EVENTCORE_IMPL=c       the compiled extension; ImportError if it cannot load
EVENTCORE_IMPL=python  the pure-Python twins
unset or empty         the best available: compiled if it loads, else Python with one
                       PurePythonWarning at import (a slower build should not go unnoticed)

The chosen functions become attributes of this module (`_impl.decode_rows`).
Modules elsewhere call the hot path through them, never through `_pure` or
`_speedups` directly, so the switch covers every caller.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .events import Event, Metadata, RecordedEvent
    # What the loop at the end of this module binds, as type checkers should see it (either
    # implementation has these signatures: tests/test_hotpath.py checks both).
    from . import _speedups as _typed

    encode_event = _typed.encode_event
    encode_metadata = _typed.encode_metadata
    decode_rows = _typed.decode_rows
    decode_copy = _typed.decode_copy
    copy_from_result = _typed.copy_from_result
    new_event_ids = _typed.new_event_ids
    check_expected_versions = _typed.check_expected_versions
    assign_versions = _typed.assign_versions
    encode_copy_rows = _typed.encode_copy_rows
    encode_copy_events = _typed.encode_copy_events
    encode_column_payloads = _typed.encode_column_payloads
    fill_columns = _typed.fill_columns
    decode_copy_columns = _typed.decode_copy_columns


@runtime_checkable
class HotPath(Protocol):
    """The functions of the hot path. A module satisfies it with plain functions of these signatures."""

    def encode_event(self, event: Event) -> tuple[str, bytes]:
        """(type name, JSON payload) of an event; SerializationError for what JSON or PostgreSQL cannot hold."""
        ...

    def encode_metadata(self, metadata: Metadata | None) -> bytes | None:
        """JSON of the metadata, or None when there is nothing to store."""
        ...

    def decode_rows(self, rows: Iterable[tuple[Any, ...]], raw: bool = False) -> list[RecordedEvent]:
        """Stored rows (layout `formats.ROW_COLUMNS`) as RecordedEvents, in order; a corrupt row is an error.
        Old type versions go through the upcasters (eventcore.evolution); `raw`: payloads as stored dicts."""
        ...

    def decode_copy(self, buffer: bytes | bytearray | memoryview, raw: bool = False) -> list[RecordedEvent]:
        """A whole binary COPY stream of the events table's columns as RecordedEvents, in order; a
        corrupt or truncated stream is an error."""
        ...

    def copy_from_result(self, result: Any) -> bytes:
        """The rows of a binary-format libpq result (psycopg's pq.PGresult) laid out as a binary COPY
        stream of the same columns (for decode_copy)."""
        ...

    def new_event_ids(self, count: int) -> list[bytes]:
        """`count` UUIDv7 ids (16 bytes each), strictly increasing within the process."""
        ...

    def check_expected_versions(self, expected: dict[str, int], current: dict[str, int]) -> None:
        """ConcurrencyError unless each stream's current version meets its expected version."""
        ...

    def assign_versions(self, stream_ids: list[str], heads: dict[str, int]) -> list[int]:
        """The next version of each event's stream, in order; `heads` advanced in place."""
        ...

    def encode_copy_rows(
        self,
        buf: bytearray,
        first_position: int,
        stream_ids: list[str],
        versions: list[int],
        event_ids: list[bytes],
        types: list[str],
        type_versions: list[int],
        payloads: list[bytes],
        metadatas: list[bytes | None],
        recorded_at_us: int,
    ) -> None:
        """One COPY BINARY row per pre-encoded event appended to `buf`; on error `buf` is as it was."""
        ...

    def encode_copy_events(
        self,
        buf: bytearray,
        first_position: int,
        stream_ids: list[str],
        events: list[Event],
        metadatas: list[Metadata | None],
        heads: dict[str, int],
        recorded_at_us: int,
    ) -> list[bytes]:
        """Ids, versions, payloads and COPY framing in one pass; returns the ids. On error `buf` and
        `heads` are as they were."""
        ...

    def encode_column_payloads(
        self,
        cls: type[Event],
        encode_event: Any,
        names: tuple[str, ...],
        kinds: tuple[int, ...],
        nullable: tuple[bool, ...],
        aware: tuple[bool, ...],
        columns: list,
        masks: list,
        rows: Any,
    ) -> list[bytes]:
        """The JSON payload of each row in `rows` from numpy columns (eventcore.columns), the bytes the row
        path writes for the same event; ColumnRowError names the first bad row."""
        ...

    def fill_columns(self, events: list, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...],
                     envelope: tuple, outs: list, masks: list) -> None:
        """Write RecordedEvents into preallocated numpy columns from index `offset` on (envelope, fields,
        masks where a field has no value)."""
        ...

    def decode_copy_columns(self, buffer: Any, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...],
                            envelope: tuple, outs: list, masks: list) -> tuple[int, int]:
        """Decode a binary COPY stream of the events' columns straight into preallocated numpy columns from
        index `offset` on, as fill_columns writes events: (rows written, the last one's position)."""
        ...


#: The hot path's function names, in the order HotPath declares them.
HOT_PATH_NAMES: tuple[str, ...] = tuple(
    name for name, value in vars(HotPath).items() if not name.startswith("_") and callable(value)
)


class PurePythonWarning(RuntimeWarning):
    """eventcore runs its pure-Python twin because the compiled extension cannot be imported.

    A RuntimeWarning, not an ImportWarning: Python ignores ImportWarnings by default, and this
    one is meant to be seen. EVENTCORE_IMPL=python chooses the twin and silences it; so does a filter
    by module set before the import (warnings.filterwarnings("ignore", category=RuntimeWarning,
    module="eventcore")). A filter naming this class cannot work: it exists only once the import that
    warns has run."""


_requested = os.environ.get("EVENTCORE_IMPL", "").strip().lower()
if _requested not in ("", "c", "python"):
    raise ImportError(f"EVENTCORE_IMPL must be 'c', 'python' or empty, not {_requested!r}")


def _load(requested: str) -> tuple[str, HotPath]:
    if requested in ("", "c"):
        try:
            from . import _speedups  # compiled from ext/
        except ImportError as exc:
            if requested == "c":
                raise ImportError(
                    "EVENTCORE_IMPL=c was requested but the compiled extension eventcore._speedups "
                    f"cannot be imported ({exc}). This build of eventcore has no compiled hot path: "
                    "install a wheel or build from source with Cython and a C compiler, or set "
                    "EVENTCORE_IMPL=python (or leave it empty for the best available)."
                ) from exc
            warnings.warn(
                "eventcore is falling back to its slower pure-Python implementation: the compiled extension "
                f"eventcore._speedups cannot be imported ({exc}). Install a wheel or build from source with "
                "a C compiler, or set EVENTCORE_IMPL=python to choose the pure-Python implementation and "
                "silence this warning.",
                PurePythonWarning,
                stacklevel=2,
            )
        else:
            return "c", _speedups
    from . import _pure

    return "python", _pure


IMPL, implementation = _load(_requested)
# Bound here as plain attributes, so a caller's `_impl.decode_rows(...)` costs one lookup.
for _name in HOT_PATH_NAMES:
    globals()[_name] = getattr(implementation, _name)
del _name  # pyright: ignore[reportPossiblyUnboundVariable]

