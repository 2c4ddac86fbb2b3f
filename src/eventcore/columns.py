"""Columnar bulk I/O: `store.ingest_columns` from numpy arrays, `store.read_columns` into them.

numpy is an optional extra (`pip install 'pyeventcore[numpy]'`): this module imports it only when one
of its functions is called, and MissingDependencyError says how to install it otherwise; `import
eventcore` never imports numpy.

Ingest goes through `store.ingest` (stores/ingest.py) and so keeps every guarantee of the row path:
stream ids checked, one transaction per batch, versions and `expected`, resume keys, IngestError
naming the first bad row (its index in the columns) with nothing of its batch written. Each row's
payload is the one the row path writes for the same event (`_impl.encode_column_payloads`), so NaN,
infinity, NUL, lone surrogates and oversized payloads are refused alike.

Reads go through `store.read_all`, page by page, each page written into preallocated arrays
(`_impl.fill_columns`); memory is the result's arrays plus one page of events.

Types: a field's column follows its annotation in the Event class: int -> int64, float -> float64,
bool -> bool, str -> object (of str), datetime -> datetime64[us] (UTC), `X | None` as X, anything else
-> object. Missing values: read back, every field column is a numpy.ma.MaskedArray whose mask is set
where the event has no such field or holds None; on ingest a masked entry (or None in an object
column) means "no value": None for a nullable field, else the field's default.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterable, Iterator, Mapping

import msgspec

from . import _impl
from .errors import ColumnRowError, EventCoreError, MissingDependencyError, ValidationError
from .formats import KIND_BOOL, KIND_DATETIME, KIND_FLOAT, KIND_INT, KIND_OBJECT, KIND_STR
from .events import Event, Metadata, RejectedItem, RowBlock, event_class, validate_type_name
from .streams import stream_id as _stream_id

#: Rows encoded per call of the column encoder: bounds the Python lists a chunk makes (the pure twin)
#: while keeping the per-call cost small.
ENCODE_CHUNK_ROWS = 4096
#: Events read per page by read_columns (store.read_all's page_size).
READ_PAGE_EVENTS = 10_000
#: Most distinct stream ids remembered as validated during one ingest_columns (then the memo restarts).
_VALID_ID_MEMO = 100_000

INSTALL_NUMPY = "pip install 'pyeventcore[numpy]'"
INSTALL_PANDAS = "pip install pandas"

#: The envelope columns every read_columns result holds, in order.
ENVELOPE = ("position", "stream_id", "version", "recorded_at", "type")


def numpy() -> Any:
    """The numpy module, or MissingDependencyError saying how to install it."""
    try:
        import numpy as np
    except ImportError as exc:
        raise MissingDependencyError(
            f"columnar I/O (ingest_columns, read_columns) needs numpy: {INSTALL_NUMPY}") from exc
    return np


def pandas() -> Any:
    """The pandas module, or MissingDependencyError saying how to install it."""
    try:
        pd = importlib.import_module("pandas")  # by name: pandas ships no type stubs
    except ImportError as exc:
        raise MissingDependencyError(f"ingest_frame and read_frame need pandas: {INSTALL_PANDAS}") from exc
    return pd


# -- field kinds, from the Event classes ------------------------------------------------------------

_SCALAR_KINDS: dict[type, int] = {
    msgspec.inspect.IntType: KIND_INT,
    msgspec.inspect.FloatType: KIND_FLOAT,
    msgspec.inspect.BoolType: KIND_BOOL,
    msgspec.inspect.StrType: KIND_STR,
    msgspec.inspect.DateTimeType: KIND_DATETIME,
}
_KIND_NAMES = {KIND_INT: "int", KIND_FLOAT: "float", KIND_BOOL: "bool", KIND_STR: "str",
               KIND_DATETIME: "datetime", KIND_OBJECT: "object"}


class _Field(msgspec.Struct, frozen=True):
    name: str
    kind: int
    nullable: bool
    aware: bool  # datetimes: the class takes aware ones (tz=None or True), else naive UTC


def _field_of(info: Any) -> _Field:
    t = info.type
    nullable = False
    if isinstance(t, msgspec.inspect.UnionType):
        others = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        nullable = len(others) < len(t.types)
        t = others[0] if len(others) == 1 else None
    kind = KIND_OBJECT if t is None else _SCALAR_KINDS.get(type(t), KIND_OBJECT)
    aware = not (kind == KIND_DATETIME and getattr(t, "tz", None) is False)
    return _Field(info.name, kind, nullable, aware)


def fields_of(cls: type) -> dict[str, _Field]:
    """Field name -> its column kind, for an Event class."""
    info: Any = msgspec.inspect.type_info(cls)
    return {f.name: _field_of(f) for f in info.fields}


def _event_class(t: Any) -> type[Event]:
    if isinstance(t, type) and issubclass(t, Event):
        return t
    if isinstance(t, str):
        cls = event_class(validate_type_name(t, "an event type name"))
        if cls is None:
            raise ValidationError(f"no ec.Event class is registered for the type name {t!r}: columns are typed "
                                  "by the class (import the module that defines it)")
        return cls
    raise ValidationError(f"types takes event type names or ec.Event classes, got {t!r:.80}")


# -- ingest -----------------------------------------------------------------------------------------


def _as_array(np: Any, values: Any, what: str, n: int | None) -> Any:
    """A 1-D array (a masked array stays masked) of `n` entries (when given)."""
    if isinstance(values, np.ma.MaskedArray):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"{what} must be a 1-D array: {exc}") from None
    if arr.ndim != 1:
        raise ValidationError(f"{what} must be a 1-D array, got {arr.ndim} dimensions")
    if n is not None and len(arr) != n:
        raise ValidationError(f"{what} has {len(arr):,} entries, stream_ids has {n:,}: every column needs one per row")
    return arr


def _split_mask(np: Any, arr: Any) -> tuple[Any, Any]:
    """(data, mask or None) of an array; a masked array's mask is None when nothing is masked."""
    if isinstance(arr, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(arr)
        return np.ma.getdata(arr), (mask if mask.any() else None)
    return arr, None


def _normalize(np: Any, arr: Any, field: _Field, what: str) -> tuple[Any, Any]:
    """(column, mask) of one input column for a field: the column as the codec takes the field's
    kind (see eventcore._pure.columns), or ValidationError naming the field and the dtype."""
    data, mask = _split_mask(np, arr)
    k = data.dtype.kind
    kind = field.kind
    if k == "O":  # any values: the class and the encoder judge each one
        if kind == KIND_DATETIME:
            kind = KIND_OBJECT
        return data, mask
    bad = None
    if kind == KIND_INT:
        if k in "iu":
            return data, mask
        bad = "an integer"
    elif kind == KIND_FLOAT:
        if k in "fiu":
            return data.astype(np.float64, copy=False), mask
        bad = "a float or integer"
    elif kind == KIND_BOOL:
        if k == "b":
            return data, mask
        bad = "a bool"
    elif kind == KIND_STR:
        if k in "UT":  # fixed-width unicode, or numpy 2's StringDType
            return data.astype(object), mask
        bad = "a str"
    elif kind == KIND_DATETIME:
        if k == "M":
            us = data.astype("datetime64[us]")
            nat = np.isnat(us)
            if nat.any():
                mask = nat if mask is None else (mask | nat)
            return us.view(np.int64), mask
        bad = "a datetime64"
    else:
        return data.astype(object), mask
    raise ValidationError(f"{what}: the field is {_KIND_NAMES[field.kind]} in its class, so it needs {bad} (or "
                          f"object) column, got dtype {data.dtype}")


def _columns_of(np: Any, data: Any, n: int, what: str) -> dict[str, Any]:
    """name -> 1-D array, from a mapping of columns or a structured array."""
    if data is None:
        return {}
    if isinstance(data, np.ndarray) and data.dtype.names:
        if data.ndim != 1 or len(data) != n:
            raise ValidationError(f"{what} must be a 1-D structured array of {n:,} rows")
        return {name: data[name] for name in data.dtype.names}
    if not isinstance(data, Mapping):
        raise ValidationError(f"{what} must be a mapping of field name -> 1-D array, or a structured array, "
                              f"got {type(data).__name__}")
    out = {}
    for name, values in data.items():
        if not isinstance(name, str):
            raise ValidationError(f"{what}: column names must be field names (str), got {name!r:.80}")
        out[name] = _as_array(np, values, f"{what}[{name!r}]", n)
    return out


class _Plan:
    """One event class's share of an ingest: its fields' columns, normalised."""

    def __init__(self, np: Any, cls: type[Event], columns: dict[str, Any]) -> None:
        known = fields_of(cls)
        unknown = sorted(set(columns) - set(known))
        self.cls = cls
        self.type = cls.__event_type__
        self.version = cls.__event_version__
        self.unknown = unknown  # columns this class has no field for: every row of it must leave them empty
        names, kinds, nullable, aware, cols, masks = [], [], [], [], [], []
        for name, arr in columns.items():
            if name in unknown:
                continue
            field = known[name]
            col, mask = _normalize(np, arr, field, f"data[{name!r}] for {cls.__name__}")
            kind = KIND_OBJECT if col.dtype.kind == "O" and field.kind == KIND_DATETIME else field.kind
            names.append(name)
            kinds.append(kind)
            nullable.append(field.nullable)
            aware.append(field.aware)
            cols.append(col)
            masks.append(mask)
        self.args = (tuple(names), tuple(kinds), tuple(nullable), tuple(aware), cols, masks)

    def encode(self, rows: Any) -> list[bytes]:
        return _impl.encode_column_payloads(self.cls, _impl.encode_event, *self.args, rows)


def _metadata_rows(np: Any, metadata: Any, n: int) -> tuple[Metadata | None, Any]:
    """(one Metadata for every row or None, or a function row -> Metadata) of ingest_columns' metadata."""
    if metadata is None or isinstance(metadata, Metadata):
        return metadata, None
    columns = _columns_of(np, metadata, n, "metadata")
    known = {f.name for f in msgspec.structs.fields(Metadata)}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise ValidationError(f"metadata: {', '.join(map(repr, unknown))} not an ec.Metadata field "
                              f"({', '.join(sorted(known))})")
    names = list(columns)
    lists = []
    for name in names:
        data, mask = _split_mask(np, columns[name])
        if data.dtype.kind in "UT":
            data = data.astype(object)
        lists.append((data, mask))

    def row(i: int) -> Metadata:
        kwargs = {}
        for name, (data, mask) in zip(names, lists):
            if mask is not None and mask[i]:
                continue
            v = data[i]
            if v is not None:
                kwargs[name] = v.item() if hasattr(v, "item") else v
        try:
            return Metadata(**kwargs)
        except TypeError as exc:
            raise ValidationError(f"metadata: {exc}") from None

    return None, row


def _checked_ids(given: list, valid: dict) -> tuple[list, tuple[int, EventCoreError] | None]:
    """(the stream ids of a chunk validated, up to the first bad one; (its offset, the error) or None).
    `valid` remembers the str ids checked already (bounded): each distinct id is validated once."""
    # Only a str itself is looked up: a subclass or another object may hash and compare equal to an id it
    # is not (or raise doing so); each is validated as the row path validates it.
    ids = [valid.get(sid) if type(sid) is str else None for sid in given]
    if None not in ids:
        return ids, None
    for offset, known in enumerate(ids):
        if known is not None:
            continue
        sid = given[offset]
        try:
            known = _stream_id(sid)
        except EventCoreError as exc:
            return ids[:offset], (offset, exc)
        if type(sid) is str:
            if len(valid) >= _VALID_ID_MEMO:
                valid.clear()
            valid[sid] = known
        ids[offset] = known
    return ids, None


def column_items(stream_ids: Any, types: Any, data: Any, metadata: Any = None,
                 committed: tuple[int, set[int]] | None = None) -> tuple[int, Iterator[Any]]:
    """(row count, the rows as `store.ingest` items), lazily: RowBlocks of validated rows, a chunk of
    rows each (stream ids checked, payloads encoded from the columns), then a RejectedItem at the first
    bad row if there is one. Column shapes, dtypes and type names are checked here, at the call
    (ValidationError). `committed`: (below, holes) of a resumed ingest (see committed_resume): the rows
    below `below` but those in `holes` were committed by an earlier run, and store.ingest passes them
    over; their payloads are neither encoded nor checked (a resumed ingest must be able to finish, as
    a resumed JSON Lines ingest does, whatever such a row holds now)."""
    np = numpy()
    if isinstance(stream_ids, (str, bytes)):
        raise ValidationError("stream_ids must be a 1-D array of stream ids (one per row), got a single str")
    sids, sid_mask = _split_mask(np, _as_array(np, stream_ids, "stream_ids", None))
    n = len(sids)
    if sids.dtype.kind in "UT":
        sids = sids.astype(object)
    elif sids.dtype.kind != "O":
        raise ValidationError(f"stream_ids must hold str (object, str_ or StringDType array), got dtype {sids.dtype}")
    columns = _columns_of(np, data, n, "data")
    if isinstance(types, (str, type)):
        plans = [_Plan(np, _event_class(types), columns)]
        codes = None
    elif np.ndim(types) == 0:
        raise ValidationError(f"types takes one type name or ec.Event class, or an array of type names (one per "
                              f"row), got {types!r:.80}")
    else:
        names, names_mask = _split_mask(np, _as_array(np, types, "types", n))
        if names_mask is not None:
            raise ValidationError(f"types has no value at row {int(np.argmax(names_mask))}: every row needs its type")
        if names.dtype.kind in "UT":
            names = names.astype(object)
        uniques, codes = np.unique(names.astype(object), return_inverse=True) if n else (names, names)
        plans = [_Plan(np, _event_class(t), columns) for t in uniques.tolist()]
        codes = codes.reshape(-1).astype(np.intp)
    md_all, md_row = _metadata_rows(np, metadata, n)
    # One ec.Metadata for every row: encoded (and a value it refuses refused) once, at the call.
    md_all_json = _impl.encode_metadata(md_all)
    present = {name: ~np.ma.getmaskarray(arr) if isinstance(arr, np.ma.MaskedArray)
               else (np.ones(n, bool) if arr.dtype.kind != "O" else np.array([v is not None for v in arr.tolist()], bool))
               for name, arr in columns.items()} if any(p.unknown for p in plans) else {}

    below, holes = committed if committed is not None else (0, set())
    hole_rows = np.array(sorted(holes), dtype=np.intp)

    def items() -> Iterator[Any]:
        valid: dict = {}
        for start in range(0, n, ENCODE_CHUNK_ROWS):
            stop = min(n, start + ENCODE_CHUNK_ROWS)
            first_bad: tuple[int, EventCoreError] | None = None
            passed_over = start < below  # rows of the chunk an earlier run committed: not encoded
            if codes is None and not plans[0].unknown and not passed_over:  # one class: the chunk's rows in order
                plan = plans[0]
                try:
                    payloads = plan.encode(np.arange(start, stop))
                except ColumnRowError as exc:
                    first_bad = (exc.row, exc.cause)
                    payloads = plan.encode(np.arange(start, exc.row))
                types = [plan.type] * len(payloads)
                versions = [plan.version] * len(payloads)
            else:  # per row of the chunk: its payload and its class's type and version
                # A row passed over keeps a placeholder (store.ingest does not write it).
                placeholder: tuple[Any, Any, Any] = (b"{}", plans[0].type, plans[0].version) if passed_over \
                    else (None, None, None)
                payloads = [placeholder[0]] * (stop - start)
                types = [placeholder[1]] * (stop - start)
                versions = [placeholder[2]] * (stop - start)
                for k, plan in enumerate(plans):
                    if codes is None:
                        rows = np.arange(start, stop)
                    else:
                        rows = np.nonzero(codes[start:stop] == k)[0] + start
                    if passed_over:
                        rows = rows[(rows >= below) | np.isin(rows, hole_rows)]
                    if not len(rows):
                        continue
                    for name in plan.unknown:
                        given = rows[present[name][rows]]
                        if len(given):
                            row = int(given[0])
                            if first_bad is None or row < first_bad[0]:
                                first_bad = (row, ValidationError(
                                    f"{plan.cls.__name__} ({plan.type!r}) has no field {name!r}: leave it empty "
                                    "(masked, or None in an object column) in that type's rows"))
                            rows = rows[rows < row]
                    try:
                        encoded = plan.encode(rows)
                    except ColumnRowError as exc:
                        if first_bad is None or exc.row < first_bad[0]:
                            first_bad = (exc.row, exc.cause)
                        rows = rows[rows < exc.row]
                        encoded = plan.encode(rows)
                    for row, payload in zip((rows - start).tolist(), encoded):
                        payloads[row] = payload
                        types[row] = plan.type
                        versions[row] = plan.version
            good = (stop if first_bad is None else first_bad[0]) - start
            chunk_sids = sids[start:start + good].tolist()
            if sid_mask is not None:
                chunk_sids = [None if m else sid for sid, m in zip(chunk_sids, sid_mask[start:start + good].tolist())]
            ids, bad_id = _checked_ids(chunk_sids, valid)
            if bad_id is not None:
                good, first_bad = bad_id[0], (start + bad_id[0], bad_id[1])
            mds: list[bytes | None]
            if md_row is None:
                mds = [md_all_json] * good
            else:
                mds = []
                for offset in range(good):
                    try:  # encoded here: a value it refuses is this row's error
                        mds.append(_impl.encode_metadata(md_row(start + offset)))
                    except EventCoreError as exc:
                        good, first_bad = offset, (start + offset, exc)
                        break
            if good:
                yield RowBlock(ids[:good], types[:good], versions[:good], payloads[:good], mds[:good])
            if first_bad is not None:
                yield RejectedItem(first_bad[1])
                return

    return n, items()


def committed_resume(options: dict[str, Any], progress: Any, holes: Any) -> tuple[int, set[int]] | None:
    """column_items' `committed` for an ingest with these options, from the store's records of its resume
    key: `progress(key)` and `holes(key)` (the store's _ingest_progress and _ingest_holes); None when no
    resume key is given or nothing of it is committed. A key or lane count store.ingest will refuse,
    or a store that cannot resume, gives None: store.ingest then says why."""
    from .stores.ingest import MAX_INGEST_LANES, committed_below
    from .stores.prepare import validate_idempotency_key

    key, parallel = options.get("resume_key"), options.get("parallel", 1)
    if key is None or type(parallel) is not int or not 1 <= parallel <= MAX_INGEST_LANES:
        return None
    try:
        key = validate_idempotency_key(key, "resume key")  # as store.ingest takes it (a UUID: its text)
        below = committed_below(progress(key), parallel)
        return (below, {item for _, item in holes(key)}) if below else None
    except EventCoreError:
        return None


def ingest_columns(store: Any, stream_ids: Any, types: Any, data: Any, metadata: Any = None, **options: Any) -> Any:
    """`EventStore.ingest_columns` (see there) for `store`."""
    committed = committed_resume(options, store._ingest_progress, store._ingest_holes) \
        if options.get("resume_key") is not None else None
    _, items = column_items(stream_ids, types, data, metadata, committed)
    return store.ingest(items, **options)


# -- read -----------------------------------------------------------------------------------------


class ReadPlan:
    """What read_columns fills: the envelope and each requested field's column, by kind."""

    def __init__(self, types: Any, fields: Iterable[str]) -> None:
        if isinstance(fields, str):
            fields = (fields,)
        fields = tuple(fields)
        classes: list[type[Event]] = []
        if types is not None and fields:  # the envelope alone needs no class: any type name, as read_all takes it
            for t in ((types,) if isinstance(types, (str, type)) else types):
                classes.append(_event_class(t))
        if fields and not classes:
            raise ValidationError("read_columns needs `types` (ec.Event classes or registered type names) to "
                                  "type the columns of `fields`")
        by_class = [fields_of(cls) for cls in classes]
        kinds = []
        for name in fields:
            if not isinstance(name, str) or name in ENVELOPE:
                raise ValidationError(f"fields takes field names other than {', '.join(ENVELOPE)}, got {name!r:.80}")
            found = {f[name].kind for f in by_class if name in f}
            if not found:
                raise ValidationError(f"{name!r} is a field of none of {', '.join(c.__name__ for c in classes)}")
            if len(found) > 1:
                kinds_text = " and ".join(sorted(_KIND_NAMES[k] for k in found))
                raise ValidationError(f"field {name!r} is {kinds_text} in different classes: one column cannot "
                                      "hold both; read them separately")
            kinds.append(found.pop())
        if len(set(fields)) != len(fields):
            raise ValidationError(f"fields names a field twice: {fields!r}")
        self.classes: list[type[Event]] = classes
        self.fields: tuple[str, ...] = fields
        self.kinds: tuple[int, ...] = tuple(kinds)

    def allocate(self, np: Any, n: int) -> tuple[tuple[Any, ...], list[Any], list[Any]]:
        envelope = (np.empty(n, np.int64), np.empty(n, object), np.empty(n, np.int64), np.empty(n, np.int64),
                    np.empty(n, object))
        outs = [np.empty(n, _DTYPES[k]) for k in self.kinds]
        masks = [np.zeros(n, bool) for _ in self.kinds]
        return envelope, outs, masks

    def result(self, np: Any, chunks: list[list[Any]], n: int) -> dict[str, Any]:
        """The result's arrays: the chunks joined (the only chunk taken as it is)."""
        if len(chunks) == 1 and len(chunks[0][0][0]) == n:
            envelope, outs, masks = chunks[0][:3]
        else:
            envelope, outs, masks = self.allocate(np, n)
            at = 0
            for env, o, m, used in ((c[0], c[1], c[2], c[3]) for c in chunks):
                for dst, src in zip(envelope, env):
                    dst[at:at + used] = src[:used]
                for dst, src in zip(outs, o):
                    dst[at:at + used] = src[:used]
                for dst, src in zip(masks, m):
                    dst[at:at + used] = src[:used]
                at += used
        out: dict[str, Any] = dict(zip(ENVELOPE, envelope))
        out["recorded_at"] = out["recorded_at"].view("datetime64[us]")
        for name, kind, values, mask in zip(self.fields, self.kinds, outs, masks):
            if kind == KIND_DATETIME:
                values = values.view("datetime64[us]")
            out[name] = np.ma.MaskedArray(values, mask=mask)
        return out


_DTYPES = {KIND_INT: "int64", KIND_FLOAT: "float64", KIND_BOOL: "bool", KIND_STR: "object",
           KIND_DATETIME: "int64", KIND_OBJECT: "object"}


def read_plan(types: Any, fields: Iterable[str]) -> ReadPlan:
    """read_columns' `types` and `fields` checked: what to fill (ValidationError at the call)."""
    return ReadPlan(types, fields)


class ColumnFiller:
    """Pages of events written into preallocated chunks of columns; `result()` joins them. Shared by the
    sync and the asyncio stores (each feeds it the pages of its own read_all)."""

    def __init__(self, plan: ReadPlan, limit: int | None, page_size: int) -> None:
        self.np: Any = numpy()
        self.plan: ReadPlan = plan
        # Preallocated per chunk: exactly `limit` when it is small, else pages' worth at a time.
        self.chunk_rows: int = min(limit, 16 * page_size) if limit is not None else 16 * page_size
        #: [envelope arrays, field arrays, mask arrays, rows filled] per chunk, in feed order.
        self.chunks: list[list[Any]] = []
        self.n: int = 0

    def reserve(self, n: int) -> tuple[tuple[Any, ...], list[Any], list[Any], int]:
        """Room for `n` more rows, which a decoder writes straight into: (envelope, fields' columns, masks,
        the index of the first free row); `commit` then counts those it wrote."""
        if not self.chunks or len(self.chunks[-1][0][0]) - self.chunks[-1][3] < n:
            envelope, outs, masks = self.plan.allocate(self.np, max(self.chunk_rows, n, 1))
            self.chunks.append([envelope, outs, masks, 0])
        chunk = self.chunks[-1]
        return chunk[0], chunk[1], chunk[2], chunk[3]

    def commit(self, n: int) -> None:
        self.chunks[-1][3] += n
        self.n += n

    def _page_decoder(self, limit: int) -> "_PageDecoder":
        """The decode callback of one COPY page of at most `limit` rows read straight into the columns."""
        return _PageDecoder(self, limit)

    def add(self, events: list) -> None:
        plan, np = self.plan, self.np
        while events:
            if not self.chunks or self.chunks[-1][3] == len(self.chunks[-1][0][0]):
                envelope, outs, masks = plan.allocate(np, max(self.chunk_rows, 1))
                self.chunks.append([envelope, outs, masks, 0])
            chunk = self.chunks[-1]
            room = len(chunk[0][0]) - chunk[3]
            part, events = events[:room], events[room:]
            _impl.fill_columns(part, chunk[3], plan.fields, plan.kinds, chunk[0], chunk[1], chunk[2])
            chunk[3] += len(part)
            self.n += len(part)

    def result(self) -> dict[str, Any]:
        return self.plan.result(self.np, self.chunks, self.n)


class _PageDecoder:
    """A COPY page decoded straight into a ColumnFiller's columns (`_impl.decode_copy_columns`), part by part
    as the PostgreSQL stores' COPY readers hand them over (sync and asyncio): call it with each part, then
    `done()` counts the rows in and gives (rows read, the last one's position)."""

    def __init__(self, filler: ColumnFiller, limit: int) -> None:
        self.filler, self.plan = filler, filler.plan
        self.envelope, self.outs, self.masks, self.offset = filler.reserve(limit)
        self.at, self.last = self.offset, 0

    def __call__(self, buffer: bytearray) -> list:
        plan = self.plan
        got, last = _impl.decode_copy_columns(buffer, self.at, plan.fields, plan.kinds, self.envelope, self.outs,
                                              self.masks)
        if got:
            self.at += got
            self.last = last
        return []  # nothing for the reader to collect: the rows are in the columns

    def done(self) -> tuple[int, int]:
        n = self.at - self.offset
        self.filler.commit(n)
        return n, self.last


def read_columns(store: Any, after_position: int = 0, types: Any = None, fields: Iterable[str] = (),
                 stream_prefix: str | None = None, limit: int | None = None,
                 page_size: int = READ_PAGE_EVENTS, checked: tuple | None = None) -> dict[str, Any]:
    """`EventStore.read_columns` (see there) for `store`; `checked`: read_all's arguments as
    stores.base.read_all_args checks them, for a store that decodes pages straight into columns."""
    plan = read_plan(types, fields)
    filler = ColumnFiller(plan, limit, page_size)
    direct = getattr(store, "_read_columns_page", None)
    if direct is not None and checked is not None:  # PostgreSQL: each page's COPY decoded into the columns
        after, names, prefix, limit, page_size, _ = checked
        remaining = limit
        while remaining is None or remaining > 0:
            n = page_size if remaining is None else min(page_size, remaining)
            got, last = direct(after, names, prefix, n, filler)
            if got < n:
                break
            after = last
            if remaining is not None:
                remaining -= got
        return filler.result()
    page: list = []
    # Fields need the classes (decoded events); the envelope alone reads events as stored, any type.
    for event in store.read_all(after_position=after_position, types=types, stream_prefix=stream_prefix,
                                limit=limit, page_size=page_size, decode=bool(plan.fields)):
        page.append(event)
        if len(page) == page_size:
            filler.add(page)
            page = []
    filler.add(page)
    return filler.result()


# -- pandas -----------------------------------------------------------------------------------------


def frame_columns(df: Any, stream: str, type: Any, fields: Iterable[str] | None) -> tuple[Any, Any, dict[str, Any]]:
    """(stream ids, types, data) of ingest_columns from a DataFrame: `stream` names the column of
    stream ids, `type` is one type (name or class) or the name of a column of type names; the other
    columns (or `fields`) are the event fields. Missing values (None, NaN, NaT, pandas.NA) are no value."""
    pd = pandas()
    np = numpy()
    if not isinstance(df, pd.DataFrame):
        raise ValidationError(f"ingest_frame takes a pandas DataFrame, got {df.__class__.__name__}")
    if stream not in df.columns:
        raise ValidationError(f"no column {stream!r} (the stream ids) in the frame: {list(df.columns)!r:.200}")
    types: Any = type
    used = {stream}
    if isinstance(type, str) and type in df.columns:
        types = df[type].to_numpy(dtype=object)
        used.add(type)
    names = [c for c in df.columns if c not in used] if fields is None else list(fields)
    data = {}
    for name in names:
        s = df[name]
        missing = s.isna().to_numpy()
        if s.dtype.kind in "iufbM" and not missing.any():
            values = s.to_numpy()
        elif s.dtype.kind == "M":
            values = np.ma.MaskedArray(s.to_numpy(), mask=missing)
        elif str(s.dtype) in ("Int64", "Int32", "Int16", "Int8", "UInt64", "UInt32", "UInt16", "UInt8"):
            values = np.ma.MaskedArray(s.to_numpy(dtype="int64", na_value=0), mask=missing)
        elif str(s.dtype) in ("Float64", "Float32") or s.dtype.kind == "f":
            values = np.ma.MaskedArray(s.to_numpy(dtype="float64", na_value=np.nan), mask=missing)
        elif str(s.dtype) == "boolean":
            values = np.ma.MaskedArray(s.to_numpy(dtype=bool, na_value=False), mask=missing)
        else:
            values = np.ma.MaskedArray(s.to_numpy(dtype=object), mask=missing)
        data[str(name)] = values
    return df[stream].to_numpy(dtype=object), types, data


def to_frame(columns: dict[str, Any]) -> Any:
    """A DataFrame of a read_columns result: masked ints and bools as pandas' nullable Int64 and
    boolean, masked floats as NaN, masked datetimes as NaT, masked objects as None."""
    pd = pandas()
    np = numpy()
    out = {}
    for name, values in columns.items():
        if isinstance(values, np.ma.MaskedArray):
            mask = np.ma.getmaskarray(values)
            data = np.ma.getdata(values)
            if data.dtype.kind == "i":
                values = pd.arrays.IntegerArray(data, mask)
            elif data.dtype.kind == "b":
                values = pd.arrays.BooleanArray(data, mask)
            elif data.dtype.kind == "f":
                values = np.where(mask, np.nan, data)
            elif data.dtype.kind == "M":
                values = np.where(mask, np.datetime64("NaT", "us"), data)
            else:
                values = data.copy()
                values[mask] = None
        if getattr(values, "dtype", None) == object:
            # As object, None kept: pandas 3 would infer its str dtype, and None would become NaN.
            values = pd.Series(values, dtype=object, copy=False)
        out[name] = values
    return pd.DataFrame(out)

