"""Type stubs of the compiled hot path (ext/_speedups.pyx and the parts it includes).

The signatures are those of eventcore._impl.HotPath, which the pure-Python twins in
eventcore._pure satisfy too; tests/test_hotpath.py keeps this file and the Protocol equal."""
from typing import Any, Iterable

from .events import Event, Metadata, RecordedEvent

def encode_event(event: Event) -> tuple[str, bytes]: ...
def encode_metadata(metadata: Metadata | None) -> bytes | None: ...
def decode_rows(rows: Iterable[tuple[Any, ...]], raw: bool = False) -> list[RecordedEvent]: ...
def decode_copy(buffer: bytes | bytearray | memoryview, raw: bool = False) -> list[RecordedEvent]: ...
def copy_from_result(result: Any) -> bytes: ...
def new_event_ids(count: int) -> list[bytes]: ...
def check_expected_versions(expected: dict[str, int], current: dict[str, int]) -> None: ...
def assign_versions(stream_ids: list[str], heads: dict[str, int]) -> list[int]: ...
def encode_copy_rows(
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
) -> None: ...
def encode_copy_events(
    buf: bytearray,
    first_position: int,
    stream_ids: list[str],
    events: list[Event],
    metadatas: list[Metadata | None],
    heads: dict[str, int],
    recorded_at_us: int,
) -> list[bytes]: ...
def encode_column_payloads(
    cls: type[Event],
    encode_event: Any,
    names: tuple[str, ...],
    kinds: tuple[int, ...],
    nullable: tuple[bool, ...],
    aware: tuple[bool, ...],
    columns: list,
    masks: list,
    rows: Any,
) -> list[bytes]: ...
def fill_columns(events: list, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...], envelope: tuple,
                 outs: list, masks: list) -> None: ...
def decode_copy_columns(buffer: Any, offset: int, fields: tuple[str, ...], kinds: tuple[int, ...], envelope: tuple,
                        outs: list, masks: list) -> tuple[int, int]: ...
