"""JSON Lines ingestion (`eventcore ingest FILE`): one event per line, streamed into a store.

Each line is `{"stream": ..., "type": ..., "data": {...}, "metadata": {...}, "version": 1}`
(metadata optional, its keys those of `ec.Metadata`; version optional: the event type's version
`data` is in, by default the current version of the type's class, or 1 for a type this process
has no class for). The payload is kept as the exact JSON text of the line (msgspec.Raw): it is
validated, never re-encoded. A line of a type this process knows must decode as its class (through
the upcasters from the version it declares), or it is refused with its line number. Files ending in .gz (or starting with gzip's magic bytes) are
decompressed on the fly; memory stays bounded by one batch.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import msgspec

from .errors import ValidationError
from .events import Metadata, RawEvent, ValidatedItem, raw_data_problem, validate_type_name
from .evolution import raw_event_version
from .payloads import has_nul_escape
from .streams import stream_id as _stream_id
from .utf8 import NESTED_TOO_DEEPLY, invalid_utf8, is_utf8_error

if TYPE_CHECKING:
    from typing_extensions import Self


class LineMetadata(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The `metadata` of a line: the keys of `ec.Metadata`, and no others (a misspelt key
    would otherwise be dropped without a word; stored metadata stays lenient)."""

    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None
    custom: dict[str, Any] = {}


class JsonLine(msgspec.Struct, forbid_unknown_fields=True):
    stream: str
    type: str
    data: msgspec.Raw
    metadata: LineMetadata | None = None
    version: int | None = None


_decoder = msgspec.json.Decoder(JsonLine)


class BadLine(ValidationError):
    """A line of the input that is not a valid event; carries its 1-based `line` number."""

    def __init__(self, line: int, reason: str, text: bytes = b""):
        self.line = line
        self.reason = reason
        self.text = text
        super().__init__(f"line {line}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.line, self.reason, self.text))


_BOM = b"\xef\xbb\xbf"


def line_digest(raw: bytes) -> str:
    """A line's fingerprint in a resume key: 16 hex digits of the SHA-256 of its stripped bytes."""
    import hashlib

    return hashlib.sha256(raw.strip()).hexdigest()[:16]


#: Distinct stream ids and type names a reader remembers as valid before it starts afresh: a file
#: names the same few again and again, and checking one costs more than a dict lookup (a profile
#: of `eventcore ingest` had 12 % of the reading thread in stream id checks). Bounded, so memory
#: stays flat whatever the file.
VALID_NAMES_MEMO = 100_000


def parse_line(number: int, raw: bytes, valid: dict[Any, Any] | None = None,
               against_class: bool = True) -> tuple[Any, ...]:
    """(stream id, RawEvent, metadata) of one line, or BadLine naming what is wrong with it.

    `valid`: a dict the caller keeps between lines, of stream ids and type names found valid
    already (checked once each). `against_class` False: the payload is not checked against its
    registered class (a line an earlier run committed, which a resumed ingest passes over: that run
    checked it against the class of its day, which may have changed since)."""
    if raw.startswith(_BOM):
        raise BadLine(number, "starts with a UTF-8 byte-order mark (BOM): save the file as UTF-8 without BOM", raw)
    try:
        line = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        # Invalid UTF-8 in a str field: named by its offset in the line, however msgspec reports it.
        problem = invalid_utf8(raw) if is_utf8_error(exc) else None
        raise BadLine(number, problem or f"not a valid event line: {exc}", raw) from None
    except RecursionError:
        raise BadLine(number, NESTED_TOO_DEEPLY, raw) from None
    data = bytes(line.data)
    if data[:1] != b"{":
        raise BadLine(number, "`data` must be a JSON object", raw)
    if not data.isascii():
        # msgspec does not look inside the strings of a Raw value; every other field was decoded,
        # so a byte that is not UTF-8 is in `data`: named by its offset in the line.
        problem = invalid_utf8(raw)
        if problem is not None:
            raise BadLine(number, f"`data` is {problem}", raw)
    problem = raw_data_problem(data)
    if problem is not None:
        raise BadLine(number, f"`data` {problem}", raw)
    sid = None if valid is None else valid.get(("s", line.stream))
    if sid is None:
        try:
            sid = _stream_id(line.stream)
        except ValidationError as exc:
            raise BadLine(number, f"bad `stream`: {exc}", raw) from None
        _remember(valid, ("s", line.stream), sid)
    if valid is None or ("t", line.type) not in valid:
        try:
            validate_type_name(line.type, "`type`")
        except ValidationError as exc:
            raise BadLine(number, str(exc), raw) from None
        _remember(valid, ("t", line.type), True)
    try:
        version = raw_event_version(line.type, data, line.version, "line", against_class)
    except ValidationError as exc:
        raise BadLine(number, str(exc), raw) from None
    md = line.metadata
    if md is not None:
        if raw.find(b"\\u0000") >= 0 and has_nul_escape(raw):  # not in data, stream or type: checked above
            raise BadLine(number, "`metadata` holds a NUL character (\\u0000), which PostgreSQL cannot store", raw)
        md = Metadata(md.correlation_id, md.causation_id, md.user_id, md.custom)
    return ValidatedItem((sid, RawEvent(line.type, data, version), md))


def _remember(valid: dict | None, key: tuple, value) -> None:
    if valid is not None:
        if len(valid) >= VALID_NAMES_MEMO:
            valid.clear()
        valid[key] = value


class JsonLinesReader:
    """Iterates over a JSON Lines file, gzip or plain: one item per line, so the item numbered i
    (from 0) is line i + 1, which is what `store.ingest(..., resume_key=...)` counts.

    A line's item is (stream id, RawEvent, metadata), or None for a line passed over: a blank line,
    or a malformed one that `on_bad(BadLine)` accepted. By default a malformed line raises, stopping
    the ingest; `eventcore ingest --skip-invalid` writes it to a rejects file and carries on, and
    a later run (resumed) writes it once it is fixed. `progress()` is the fraction of the
    (compressed) file read so far.
    """

    def __init__(self, path: str, on_bad: Callable[[BadLine], object] | None = None, keep_places: bool = True) -> None:
        self.path = path
        self.on_bad = on_bad
        #: False: a passed-over line yields nothing, so items are numbered among valid lines only (how an
        #: eventcore before schema 3 counted; an ingest it started is resumed in its own coordinates).
        self.keep_places = keep_places
        #: For a resumed ingest: whether the item of an index was committed by an earlier run (see
        #: eventcore.stores.ingest.committed_items); such a line's payload is not checked against its class.
        self.committed: Callable[[int], bool] | None = None
        self.lines: int = 0
        self.rejected: int = 0
        try:
            self._raw: BinaryIO = open(path, "rb")
        except OSError as exc:
            raise ValidationError(f"cannot open {path!r}: {exc.strerror}") from None
        self._size = os.fstat(self._raw.fileno()).st_size
        magic = self._raw.read(2)
        self._raw.seek(0)
        self._stream: BinaryIO = (
            gzip.GzipFile(fileobj=self._raw, mode="rb") if magic == b"\x1f\x8b" else self._raw
        )
        self._buffered = io.BufferedReader(self._stream, buffer_size=1 << 20) if self._stream is not self._raw else self._raw

    def progress(self) -> float:
        try:
            return self._raw.tell() / self._size if self._size else 1.0
        except (OSError, ValueError):
            return 0.0

    def __iter__(self) -> Iterator[tuple[Any, ...] | None]:
        number = 0
        item = -1  # the index of the item this line is (lines passed over included when keep_places)
        lines = iter(self._buffered)
        valid: dict = {}
        committed = self.committed
        while True:
            try:
                raw = next(lines, None)
            except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                # A truncated or corrupt .gz: nothing after this point can be read. Reported as the
                # line it stopped at, like a malformed line (the batch holding it is not written).
                raise BadLine(number + 1, f"cannot read {self.path!r} past line {number}: "
                                          f"{exc or type(exc).__name__}") from None
            if raw is None:
                return
            number += 1
            self.lines = number
            stripped = raw.strip()
            if not stripped:
                if self.keep_places:
                    item += 1
                    yield None
                continue
            try:
                parsed = parse_line(number, stripped, valid, committed is None or not committed(item + 1))
            except BadLine as bad:
                if self.on_bad is None:
                    raise
                self.rejected += 1
                self.on_bad(bad)  # outside the read's error handling: its own errors are its own
                if self.keep_places:
                    item += 1
                    yield None
                continue
            item += 1
            yield parsed

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
