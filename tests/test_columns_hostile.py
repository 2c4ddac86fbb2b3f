"""Hostile tests of columnar bulk I/O (ingest_columns / read_columns / frames)."""
from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pytest

import eventcore as ec


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request) -> str:
    """This file's backends: postgres-single (group commit off) changes nothing columns do, so it is left out
    to keep the suite's time."""
    return request.param


pd = pytest.importorskip("pandas")

_tag = uuid.uuid4().hex[:8]


class HCol(ec.Event):
    __event_type__ = f"hostile.HCol.{_tag}"
    n: int
    x: float
    s: str
    b: bool
    t: dt.datetime


class HOpt(ec.Event):
    __event_type__ = f"hostile.HOpt.{_tag}"
    n: int | None = None
    x: float | None = None
    s: str | None = None
    b: bool | None = None
    t: dt.datetime | None = None


class HOther(ec.Event):
    __event_type__ = f"hostile.HOther.{_tag}"
    n: int
    other: str = "o"


class HVer(ec.Event):
    __event_type__ = f"hostile.HVer.{_tag}"
    __event_version__ = 2
    cents: int
    note: str = "v2"


@ec.upcaster(HVer.__event_type__, from_version=1)
def _hver_v1(data: dict) -> dict:
    return {"cents": int(data["amount"]) * 100, "note": "up"}


T0 = np.datetime64("2024-01-02T03:04:05.123456", "us")


def _full(n=5, prefix="acc-"):
    ids = np.array([f"{prefix}{i % 3}" for i in range(n)], dtype=object)
    data = {
        "n": np.arange(n, dtype=np.int64) * 7 - 3,
        "x": np.linspace(-1.5, 2.5, n),
        "s": np.array([f"s{i}é\u00e9\U0001F600" for i in range(n)], dtype=object),
        "b": np.arange(n) % 2 == 0,
        "t": T0 + np.arange(n).astype("timedelta64[s]"),
    }
    return ids, data


def _strip(cols):
    assert all(np.diff(cols["position"]) > 0)
    return {k: v for k, v in cols.items() if k not in ("recorded_at", "position")}


def _count(s):
    return len(s.read_columns()["position"])


def _pos(s, k):
    """The position after which k events of the store lie (after_position=k in store-relative terms)."""
    return 0 if k == 0 else int(s.read_columns()["position"][k - 1])


def _eq(a, b):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, k
        assert len(x) == len(y), k
        if isinstance(x, np.ma.MaskedArray) or isinstance(y, np.ma.MaskedArray):
            assert isinstance(x, np.ma.MaskedArray) and isinstance(y, np.ma.MaskedArray), k
            assert list(np.ma.getmaskarray(x)) == list(np.ma.getmaskarray(y)), k
            m = ~np.ma.getmaskarray(x)
            assert list(np.asarray(x.data)[m]) == list(np.asarray(y.data)[m]), k
        else:
            assert list(x) == list(y), k


def _row_store_copy(items):
    m = ec.connect("memory://")
    m.ingest(items)
    return m


# ---------------------------------------------------------------- round trip and dtypes

def test_roundtrip_dtypes(store):
    ids, data = _full(7)
    r = store.ingest_columns(ids, HCol, data, batch_size=3)
    assert r.events == 7
    c = store.read_columns(types=[HCol], fields=["n", "x", "s", "b", "t"])
    assert c["position"].dtype == np.int64 and c["version"].dtype == np.int64
    assert c["stream_id"].dtype == object and c["type"].dtype == object
    assert c["recorded_at"].dtype == np.dtype("datetime64[us]")
    assert c["n"].dtype == np.int64 and c["x"].dtype == np.float64 and c["b"].dtype == bool
    assert c["s"].dtype == object and c["t"].dtype == np.dtype("datetime64[us]")
    for f in "nxsbt":
        assert isinstance(c[f], np.ma.MaskedArray)
        assert not np.ma.getmaskarray(c[f]).any()
        assert list(c[f].data) == list(data[f]), f
    assert list(c["stream_id"]) == list(ids)
    assert list(c["version"]) == [1, 1, 1, 2, 2, 2, 3][:7]


def test_same_bytes_as_row_path(store):
    """Payload is exactly the bytes the row path writes: compare raw reads."""
    ids, data = _full(4)
    store.ingest_columns(ids, HCol, data)
    rows = [(ids[i], HCol(n=int(data["n"][i]), x=float(data["x"][i]), s=data["s"][i], b=bool(data["b"][i]),
                          t=data["t"][i].astype(dt.datetime).replace(tzinfo=dt.timezone.utc))) for i in range(4)]
    store.ingest(rows)
    raw = [e.data for e in store.read_all(decode=False)]
    assert raw[:4] == raw[4:]


# ---------------------------------------------------------------- cross-store equality

def _load_mixed(s):
    ids, data = _full(9, prefix="mix-")
    s.ingest_columns(ids, HCol, data, batch_size=4)
    s.ingest_columns(np.array(["oth-1", "mix-9", "oth-2"], dtype=object), HOther,
                     {"n": np.array([10, 11, 12])})
    s.ingest_columns(np.array(["opt-1", "opt-1", "mix-0"], dtype=object), HOpt,
                     {"n": np.ma.array([1, 2, 3], mask=[0, 1, 0]),
                      "x": np.ma.array([1.0, 2.0, 3.0], mask=[1, 0, 0]),
                      "s": np.array([None, "z", "ü"], dtype=object),
                      "b": np.ma.array([True, False, True], mask=[0, 0, 1]),
                      "t": np.array(["NaT", "2030-01-01T00:00:00", "1970-01-01"], dtype="datetime64[s]")})
    s.append([ec.emit("ver-1", ec.RawEvent(HVer.__event_type__, b'{"amount": 3}', version=1))])
    s.append([ec.emit("ver-1", HVer(cents=5))])


@pytest.mark.parametrize("opts", [
    dict(types=[HCol, HOpt, HOther, HVer], fields=["n", "x", "s", "b", "t", "other", "cents", "note"]),
    dict(types=[HCol, HOpt, HOther, HVer], fields=["n", "x", "s", "b", "t"], page_size=1),
    dict(types=[HOpt, HOther], fields=["n", "other"], page_size=2),
    dict(types=[HCol, HOther], fields=["n"], stream_prefix="mix-"),
    dict(types=[HCol, HOther], fields=["n"], after_position=3, limit=4, page_size=2),
    dict(types=[HCol], fields=["s"], limit=0),
    dict(types=[HVer], fields=["cents", "note"]),
    dict(),
    dict(after_position=5, page_size=3),
    dict(stream_prefix="opt-"),
    dict(stream_prefix="nothing-"),
])
def test_same_columns_every_store(store, opts):
    _load_mixed(store)
    ref = ec.connect("memory://")
    _load_mixed(ref)
    oa, ob = dict(opts), dict(opts)
    if "after_position" in opts:
        oa["after_position"] = _pos(store, opts["after_position"])
        ob["after_position"] = _pos(ref, opts["after_position"])
    a = store.read_columns(**oa)
    b = ref.read_columns(**ob)
    _eq(_strip(a), _strip(b))
    assert a["recorded_at"].dtype == np.dtype("datetime64[us]")
    assert len(a["recorded_at"]) == len(a["position"])


def test_upcast_values(store):
    _load_mixed(store)
    c = store.read_columns(types=[HVer], fields=["cents", "note"])
    assert list(c["cents"]) == [300, 5]
    assert list(c["note"]) == ["up", "v2"]
    assert list(c["type"]) == [HVer.__event_type__] * 2


def test_masks_for_absent_and_none(store):
    _load_mixed(store)
    c = store.read_columns(types=[HOpt, HOther], fields=["n", "x", "s", "b", "t", "other"])
    # HOther rows first (3), then HOpt rows (3)
    assert list(np.ma.getmaskarray(c["n"])) == [False, False, False, False, True, False]
    assert list(np.ma.getmaskarray(c["other"])) == [False, False, False, True, True, True]
    assert list(np.ma.getmaskarray(c["x"])) == [True, True, True, True, False, False]
    assert list(np.ma.getmaskarray(c["s"])) == [True, True, True, True, False, False]
    assert list(np.ma.getmaskarray(c["b"])) == [True, True, True, False, False, True]
    assert list(np.ma.getmaskarray(c["t"])) == [True, True, True, True, False, False]
    # under the mask: 0, NaN, False, None, NaT
    assert c["n"].data[4] == 0 and c["n"].data[0] == 10
    assert np.isnan(c["x"].data[0])
    assert c["b"].data[5] == False  # noqa: E712
    assert c["s"].data[3] is None
    assert np.isnat(c["t"].data[3])
    assert c["t"].data[5] == np.datetime64("1970-01-01T00:00:00", "us")


# ---------------------------------------------------------------- validation at the call

@pytest.mark.parametrize("bad", [
    "mismatch", "2d", "bad_type_name", "float_into_int", "str_into_int", "int_into_bool",
    "ids_len", "bad_dtype_dt", "types_array_len",
])
def test_call_errors_write_nothing(store, bad):
    ids, data = _full(4)
    types = HCol
    if bad == "mismatch":
        data["n"] = data["n"][:3]
    elif bad == "2d":
        data["n"] = data["n"].reshape(2, 2)
    elif bad == "bad_type_name":
        types = "no.such.type." + _tag
    elif bad == "unknown_field":
        data["zzz"] = np.arange(4)
    elif bad == "float_into_int":
        data["n"] = data["n"].astype(float)
    elif bad == "str_into_int":
        data["n"] = data["n"].astype(str)
    elif bad == "int_into_bool":
        data["b"] = data["b"].astype(np.int64)
    elif bad == "missing_required":
        del data["t"]
    elif bad == "ids_len":
        ids = ids[:3]
    elif bad == "bad_dtype_dt":
        data["t"] = np.arange(4, dtype=np.int64)
    elif bad == "types_array_len":
        types = np.array([HCol.__event_type__] * 3, dtype=object)
    with pytest.raises(ec.ValidationError):
        store.ingest_columns(ids, types, data)
    assert _count(store) == 0


def test_bad_stream_id_is_refused(store):
    ids = np.array(["ok", "", "ok2"], dtype=object)
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(ids, HOther, {"n": np.array([1, 2, 3])})
    assert _count(store) == 0


def test_fields_without_types_refused(store):
    store.ingest_columns(np.array(["a"], dtype=object), HOther, {"n": np.array([1])})
    with pytest.raises(ec.ValidationError):
        store.read_columns(fields=["n"])


# ---------------------------------------------------------------- bad rows

@pytest.mark.parametrize("kind", ["nan", "inf", "nul", "surrogate", "surrogate_U", "oversize", "required_masked"])
def test_bad_row_names_item_and_keeps_earlier_batches(store, kind):
    n = 10
    ids = np.array([f"r-{i % 2}" for i in range(n)], dtype=object)
    data = {"n": np.arange(n), "other": np.array(["ok"] * n, dtype=object)}
    bad = 7
    cls = HOther
    if kind in ("nan", "inf"):
        cls = HOpt
        x = np.arange(n, dtype=float)
        x[bad] = np.nan if kind == "nan" else -np.inf
        data = {"n": np.arange(n), "x": x}
    elif kind == "nul":
        data["other"][bad] = "a\x00b"
    elif kind == "surrogate":
        data["other"][bad] = "a\ud800b"
    elif kind == "surrogate_U":
        o = data["other"].copy()
        o[bad] = "a\udc00"
        data["other"] = o.astype("U3")
    elif kind == "oversize":
        data["other"][bad] = "x" * (16 * 1024 * 1024 + 10)
    elif kind == "required_masked":
        data["n"] = np.ma.array(np.arange(n), mask=[i == bad for i in range(n)])
    with pytest.raises((ec.IngestError, ec.ValidationError)) as ei:
        store.ingest_columns(ids, cls, data, batch_size=3)
    err = ei.value
    if isinstance(err, ec.IngestError):
        assert err.committed == 6
        assert err.item == bad or err.item == 6  # docs: naming that row
        assert _count(store) == 6
    else:
        assert _count(store) == 0


def test_bad_row_item_is_the_row(store):
    """README: a bad row stops the ingest with IngestError naming that row (.item)."""
    n = 10
    x = np.arange(n, dtype=float)
    x[7] = np.nan
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(np.array(["s"] * n, dtype=object), HOpt, {"x": x}, batch_size=3)
    assert ei.value.item == 7
    assert ei.value.committed == 6
    assert ei.value.__cause__ is not None
    assert "x" in str(ei.value.__cause__)


# ---------------------------------------------------------------- ints, floats, datetimes

def test_uint64_beyond_int64_exact(store):
    """uint64 above int64's range: written exactly (as the row path writes a Python int), never wrapped."""
    big = np.array([1, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    store.ingest_columns(np.array(["a"] * 3, dtype=object), HOther, {"n": big})
    assert [e.data["n"] for e in store.read_all(decode=False)] == [1, 2**63 + 5, 2**64 - 1]


def test_uint64_in_range_ok(store):
    v = np.array([0, 2**63 - 1], dtype=np.uint64)
    store.ingest_columns(np.array(["a", "a"], dtype=object), HOther, {"n": v})
    c = store.read_columns(types=[HOther], fields=["n"])
    assert list(c["n"]) == [0, 2**63 - 1]


def test_int64_extremes(store):
    v = np.array([-2**63, 2**63 - 1, 0], dtype=np.int64)
    store.ingest_columns(np.array(["a"] * 3, dtype=object), HOther, {"n": v})
    c = store.read_columns(types=[HOther], fields=["n"])
    assert list(c["n"]) == list(v)


def test_huge_python_int_read_back(store):
    """An int field holding a value beyond int64 (written by the row path): read_columns must not wrap."""
    store.ingest([("a", HOther(n=2**70))])
    try:
        c = store.read_columns(types=[HOther], fields=["n"])
    except (ec.EventCoreError, OverflowError, ValueError):
        return  # refused: fine
    assert int(c["n"][0]) == 2**70


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint32])
def test_small_int_dtypes(store, dtype):
    v = np.array([0, 1, np.iinfo(dtype).max, np.iinfo(dtype).min], dtype=dtype)
    store.ingest_columns(np.array(["a"] * 4, dtype=object), HOther, {"n": v})
    c = store.read_columns(types=[HOther], fields=["n"])
    assert list(c["n"]) == [int(i) for i in v]


def test_float_field_from_ints_and_float32(store):
    store.ingest_columns(np.array(["a"] * 3, dtype=object), HOpt, {"x": np.array([1, -2, 2**53], dtype=np.int64)})
    store.ingest_columns(np.array(["a"] * 2, dtype=object), HOpt, {"x": np.array([0.1, 3.5], dtype=np.float32)})
    c = store.read_columns(types=[HOpt], fields=["x"])
    assert list(c["x"][:3]) == [1.0, -2.0, float(2**53)]
    assert c["x"][4] == 3.5
    assert c["x"][3] == float(np.float32(0.1))
    ref = ec.connect("memory://")
    ref.ingest([("a", HOpt(x=v)) for v in (1.0, -2.0, float(2**53), float(np.float32(0.1)), 3.5)])
    assert [e.data for e in store.read_all(decode=False)] == [e.data for e in ref.read_all(decode=False)]


def test_float_ints_on_row_path_read_as_float(store):
    """A float field stored as JSON int (row path / RawEvent) reads as float64."""
    store.append([ec.emit("a", ec.RawEvent(HOpt.__event_type__, b'{"x": 3}'))])
    c = store.read_columns(types=[HOpt], fields=["x"])
    assert c["x"].dtype == np.float64 and c["x"][0] == 3.0


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns", "D", "m"])
def test_datetime_units(store, unit):
    t = np.array(["2024-02-29T12:34:56.789012345", "NaT", "1970-01-01"], dtype="datetime64[ns]").astype(
        f"datetime64[{unit}]")
    store.ingest_columns(np.array(["a"] * 3, dtype=object), HOpt, {"t": t})
    c = store.read_columns(types=[HOpt], fields=["t"])
    assert list(np.ma.getmaskarray(c["t"])) == [False, True, False]
    assert c["t"].data[0] == t[0].astype("datetime64[us]")
    assert c["t"].data[2] == np.datetime64("1970-01-01", "us")


def test_datetime_far_range(store):
    t = np.array(["0001-01-01T00:00:00", "9999-12-31T23:59:59.999999", "1969-12-31T23:59:59.999999"],
                 dtype="datetime64[us]")
    store.ingest_columns(np.array(["a"] * 3, dtype=object), HOpt, {"t": t})
    c = store.read_columns(types=[HOpt], fields=["t"])
    assert list(c["t"]) == list(t)


def test_datetime_out_of_python_range_refused(store):
    t = np.array(["10000-01-01T00:00:00", "2020-01-01"], dtype="datetime64[s]")
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["a"] * 2, dtype=object), HOpt, {"t": t[::-1]})
    assert _count(store) == 0


def test_datetime_required_nat_is_bad_row(store):
    ids, data = _full(4)
    data["t"] = data["t"].copy()
    data["t"][2] = np.datetime64("NaT")
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(ids, HCol, data, batch_size=2)
    assert ei.value.item == 2 and ei.value.committed == 2


def test_aware_datetimes_from_row_path_read_utc(store):
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    store.ingest([("a", HOpt(t=dt.datetime(2024, 1, 1, 12, 0, tzinfo=tz))),
                  ("a", HOpt(t=dt.datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=dt.timezone.utc)))])
    c = store.read_columns(types=[HOpt], fields=["t"])
    assert c["t"].data[0] == np.datetime64("2024-01-01T06:30:00", "us")
    assert c["t"].data[1] == np.datetime64("2024-01-01T12:00:00.000001", "us")


def test_naive_datetime_row_path_read(store):
    """A naive datetime stored by the row path: read_columns must give something consistent across stores."""
    store.ingest([("a", HOpt(t=dt.datetime(2024, 1, 1, 12, 0)))])
    ref = ec.connect("memory://")
    ref.ingest([("a", HOpt(t=dt.datetime(2024, 1, 1, 12, 0)))])
    try:
        a = store.read_columns(types=[HOpt], fields=["t"])
    except ec.EventCoreError:
        with pytest.raises(ec.EventCoreError):
            ref.read_columns(types=[HOpt], fields=["t"])
        return
    b = ref.read_columns(types=[HOpt], fields=["t"])
    assert a["t"].data[0] == b["t"].data[0]


# ---------------------------------------------------------------- strings

@pytest.mark.parametrize("kind", ["U", "object", "StringDType"])
def test_string_inputs(store, kind):
    vals = ["", "ascii", "é\u20ac\U0001F600", "quote\"back\\slash\n\t\x01", "\u2028\u2029", "\x7f"]
    if kind == "U":
        arr = np.array(vals, dtype="U")
    elif kind == "object":
        arr = np.array(vals, dtype=object)
    else:
        if not hasattr(np.dtypes, "StringDType"):
            pytest.skip("no StringDType")
        arr = np.array(vals, dtype=np.dtypes.StringDType())
    ids = np.array([f"ü-ß-{i}" for i in range(len(vals))], dtype=arr.dtype if kind != "U" else "U")
    store.ingest_columns(ids, HOther, {"n": np.arange(len(vals)), "other": arr})
    c = store.read_columns(types=[HOther], fields=["other"])
    assert list(c["other"]) == vals
    assert list(c["stream_id"]) == [f"ü-ß-{i}" for i in range(len(vals))]
    ref = ec.connect("memory://")
    ref.ingest([(f"ü-ß-{i}", HOther(n=i, other=v)) for i, v in enumerate(vals)])
    assert [e.data for e in store.read_all(decode=False)] == [e.data for e in ref.read_all(decode=False)]


def test_stringdtype_na_is_no_value(store):
    if not hasattr(np.dtypes, "StringDType"):
        pytest.skip("no StringDType")
    arr = np.array(["a", None, "c"], dtype=np.dtypes.StringDType(na_object=None))
    store.ingest_columns(np.array(["s"] * 3, dtype=object), HOpt, {"s": arr})
    c = store.read_columns(types=[HOpt], fields=["s"])
    assert list(np.ma.getmaskarray(c["s"])) == [False, True, False]


def test_fixed_width_trailing_nul_vs_value(store):
    """`U` arrays strip trailing NULs (numpy semantics); an embedded NUL must be refused."""
    arr = np.array(["ab", "c\x00d"], dtype="U4")
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(np.array(["s", "s"], dtype=object), HOpt, {"s": arr})
    assert ei.value.item == 1
    assert _count(store) == 0


def test_surrogate_stream_id_refused(store):
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["ok", "bad\ud800"], dtype=object), HOpt, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_nul_stream_id_refused(store):
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["ok", "b\x00d"], dtype=object), HOpt, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_non_str_stream_id_refused(store):
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["ok", 5], dtype=object), HOpt, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_int_stream_ids_array_refused(store):
    with pytest.raises(ec.ValidationError):
        store.ingest_columns(np.array([1, 2]), HOpt, {"n": np.array([1, 2])})
    assert _count(store) == 0


# ---------------------------------------------------------------- bools, masks

def test_bool_masks(store):
    b = np.ma.array([True, False, True, False], mask=[0, 1, 1, 0])
    store.ingest_columns(np.array(["s"] * 4, dtype=object), HOpt, {"b": b})
    c = store.read_columns(types=[HOpt], fields=["b"])
    assert list(np.ma.getmaskarray(c["b"])) == [False, True, True, False]
    assert list(c["b"].data) == [True, False, False, False]


def test_masked_default_applied(store):
    """A masked entry for a non-nullable field with a default: the class default."""
    o = np.ma.array(np.array(["x", "y"], dtype=object), mask=[0, 1])
    store.ingest_columns(np.array(["s", "s"], dtype=object), HOther, {"n": np.array([1, 2]), "other": o})
    c = store.read_columns(types=[HOther], fields=["other"])
    assert list(c["other"]) == ["x", "o"]


def test_object_column_none_no_value(store):
    store.ingest_columns(np.array(["s", "s"], dtype=object), HOpt,
                         {"n": np.array([1, None], dtype=object)})
    c = store.read_columns(types=[HOpt], fields=["n"])
    assert list(np.ma.getmaskarray(c["n"])) == [False, True]


def test_masked_nan_is_no_value(store):
    x = np.ma.array([np.nan, 1.0], mask=[1, 0])
    store.ingest_columns(np.array(["s", "s"], dtype=object), HOpt, {"x": x})
    c = store.read_columns(types=[HOpt], fields=["x"])
    assert list(np.ma.getmaskarray(c["x"])) == [True, False]


def test_field_of_other_type_in_types_array_refused(store):
    """A row may not give a value for a field its type does not have."""
    types = np.array([HOther.__event_type__, HOpt.__event_type__], dtype=object)
    with pytest.raises((ec.IngestError, ec.ValidationError)):
        store.ingest_columns(np.array(["s", "s"], dtype=object), types,
                             {"n": np.array([1, 2]), "other": np.array(["a", "b"], dtype=object)})
    assert _count(store) == 0


def test_types_array_masks_other_fields(store):
    types = np.array([HOther.__event_type__, HOpt.__event_type__], dtype=object)
    store.ingest_columns(np.array(["s", "s"], dtype=object), types,
                         {"n": np.array([1, 2]),
                          "other": np.ma.array(np.array(["a", "b"], dtype=object), mask=[0, 1])})
    c = store.read_columns(types=[HOther, HOpt], fields=["n", "other"])
    assert list(c["type"]) == [HOther.__event_type__, HOpt.__event_type__]
    assert list(c["other"].filled("-")) == ["a", "-"]


def test_empty_arrays(store):
    r = store.ingest_columns(np.array([], dtype=object), HOther, {"n": np.array([], dtype=np.int64)})
    assert r.events == 0
    c = store.read_columns(types=[HOther], fields=["n"])
    assert len(c["n"]) == 0 and c["n"].dtype == np.int64 and c["position"].dtype == np.int64
    assert c["recorded_at"].dtype == np.dtype("datetime64[us]")


def test_structured_array(store):
    sa = np.zeros(3, dtype=[("n", np.int64), ("other", "U5")])
    sa["n"] = [5, 6, 7]
    sa["other"] = ["a", "bé", "c"]
    store.ingest_columns(np.array(["s"] * 3, dtype=object), HOther, sa)
    c = store.read_columns(types=[HOther], fields=["n", "other"])
    assert list(c["n"]) == [5, 6, 7] and list(c["other"]) == ["a", "bé", "c"]


def test_structured_array_unknown_field_refused(store):
    sa = np.zeros(2, dtype=[("n", np.int64), ("zz", np.int64)])
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["s"] * 2, dtype=object), HOther, sa)
    assert _count(store) == 0


def test_metadata_columns(store):
    md = {"correlation_id": np.array(["c1", "c2"], dtype=object)}
    try:
        store.ingest_columns(np.array(["s"] * 2, dtype=object), HOther, {"n": np.array([1, 2])}, metadata=md)
    except ec.ValidationError:
        pytest.skip("correlation_id not a metadata column here")
    evs = list(store.read_all())
    assert [e.metadata.correlation_id for e in evs] == ["c1", "c2"]


def test_metadata_unknown_column_refused(store):
    with pytest.raises(ec.ValidationError):
        store.ingest_columns(np.array(["s"] * 2, dtype=object), HOther, {"n": np.array([1, 2])},
                             metadata={"no_such_meta": np.array(["a", "b"], dtype=object)})
    assert _count(store) == 0


# ---------------------------------------------------------------- expected and resume

def test_expected_conflict_mid_ingest(store):
    store.ingest_columns(np.array(["e-2"], dtype=object), HOther, {"n": np.array([0])})
    ids = np.array(["e-1", "e-1", "e-1", "e-2", "e-2"], dtype=object)
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(ids, HOther, {"n": np.arange(5)}, batch_size=3,
                             expected={"e-1": ec.NO_STREAM, "e-2": ec.NO_STREAM})
    assert ei.value.committed == 3
    assert ei.value.item == 3
    assert _count(store) == 4


def test_expected_ok(store):
    ids = np.array(["e-1", "e-1"], dtype=object)
    store.ingest_columns(ids, HOther, {"n": np.arange(2)}, expected={"e-1": ec.NO_STREAM})
    c = store.read_columns()
    assert list(c["version"]) == [1, 2]


def test_resume_after_failure(store):
    if store.scheme == "memory" if hasattr(store, "scheme") else False:
        pass
    n = 10
    x = np.arange(n, dtype=float)
    x[7] = np.nan
    ids = np.array([f"rs-{i % 3}" for i in range(n)], dtype=object)
    try:
        with pytest.raises(ec.IngestError):
            store.ingest_columns(ids, HOpt, {"x": x}, batch_size=3, resume_key="hostile-k")
    except ec.ValidationError:
        pytest.skip("store cannot resume")
    assert _count(store) == 6
    x[7] = 7.0
    r = store.ingest_columns(ids, HOpt, {"x": x}, batch_size=3, resume_key="hostile-k")
    assert r.skipped == 6 and r.events == 4
    r = store.ingest_columns(ids, HOpt, {"x": x}, batch_size=3, resume_key="hostile-k")
    assert r.events == 0
    c = store.read_columns(types=[HOpt], fields=["x"])
    assert sorted(c["x"].tolist()) == list(range(n))
    per = {}
    for s, v in zip(c["stream_id"], c["version"]):
        per.setdefault(s, []).append(v)
    assert all(vs == list(range(1, len(vs) + 1)) for vs in per.values())


def test_resume_grown_input(store):
    ids = np.array(["g"] * 5, dtype=object)
    try:
        store.ingest_columns(ids[:3], HOther, {"n": np.arange(3)}, resume_key="grow", batch_size=2)
    except ec.ValidationError:
        pytest.skip("store cannot resume")
    r = store.ingest_columns(ids, HOther, {"n": np.arange(5)}, resume_key="grow", batch_size=2)
    assert r.events == 2 and r.skipped == 3
    assert list(store.read_columns(types=[HOther], fields=["n"])["n"]) == [0, 1, 2, 3, 4]


def test_parallel(store):
    n = 50
    ids = np.array([f"p-{i % 7}" for i in range(n)], dtype=object)
    store.ingest_columns(ids, HOther, {"n": np.arange(n)}, parallel=2, batch_size=4)
    c = store.read_columns(types=[HOther], fields=["n"])
    assert sorted(c["n"].tolist()) == list(range(n))
    for s in set(ids):
        m = c["stream_id"] == s
        assert list(c["n"][m]) == sorted(c["n"][m].tolist())
        assert list(c["version"][m]) == list(range(1, m.sum() + 1))


# ---------------------------------------------------------------- types filter edge cases

def test_types_by_name_and_alias(store):
    class HAl(ec.Event):
        __event_type__ = f"hostile.HAl.new.{_tag}"
        __event_aliases__ = (f"hostile.HAl.old.{_tag}",)
        k: int

    store.append([ec.emit("al", ec.RawEvent(f"hostile.HAl.old.{_tag}", b'{"k": 1}'))])
    store.ingest_columns(np.array(["al"], dtype=object), HAl, {"k": np.array([2])})
    c = store.read_columns(types=[HAl], fields=["k"])
    assert list(c["k"]) == [1, 2]
    assert list(c["type"]) == [HAl.__event_type__] * 2
    c2 = store.read_columns(types=[HAl.__event_type__], fields=["k"])
    assert list(c2["k"]) == [2]


def test_limit_and_after_position(store):
    store.ingest_columns(np.array(["l"] * 10, dtype=object), HOther, {"n": np.arange(10)})
    c = store.read_columns(types=[HOther], fields=["n"], after_position=_pos(store, 2), limit=3, page_size=1)
    assert len(c["position"]) == 3 and list(c["n"]) == [2, 3, 4]
    c = store.read_columns(types=[HOther], fields=["n"], limit=0)
    assert len(c["n"]) == 0 and c["n"].dtype == np.int64


def test_unknown_field_in_read_refused(store):
    store.ingest_columns(np.array(["l"], dtype=object), HOther, {"n": np.arange(1)})
    with pytest.raises(ec.ValidationError):
        store.read_columns(types=[HOther], fields=["nope"])


def test_conflicting_field_types_across_classes(store):
    class HStrN(ec.Event):
        __event_type__ = f"hostile.HStrN.{_tag}"
        n: str

    store.ingest_columns(np.array(["l"], dtype=object), HOther, {"n": np.arange(1)})
    store.ingest([("l", HStrN(n="x"))])
    try:
        c = store.read_columns(types=[HOther, HStrN], fields=["n"])
    except ec.ValidationError:
        return
    assert list(c["n"]) == [0, "x"]


# ---------------------------------------------------------------- pandas

def test_frame_round_trip(store):
    df = pd.DataFrame({
        "sid": ["f-1", "f-2", "f-1"],
        "n": pd.array([1, None, 3], dtype="Int64"),
        "x": [1.5, np.nan, 2.0],
        "s": ["a", None, "ü"],
        "b": pd.array([True, None, False], dtype="boolean"),
        "t": pd.to_datetime(["2024-01-01", None, "2024-06-01T12:00:00"], format="ISO8601"),
    })
    store.ingest_frame(df, stream="sid", type=HOpt)
    out = store.read_frame(types=[HOpt], fields=["n", "x", "s", "b", "t"])
    assert str(out["n"].dtype) == "Int64" and str(out["b"].dtype) == "boolean"
    assert out["n"].isna().tolist() == [False, True, False]
    assert out["b"].isna().tolist() == [False, True, False]
    assert out["x"].isna().tolist() == [False, True, False]
    assert out["s"].isna().tolist() == [False, True, False]
    assert out["t"].isna().tolist() == [False, True, False]
    assert out["n"].tolist()[0] == 1 and out["s"].tolist()[2] == "ü"
    assert list(out["stream_id"]) == ["f-1", "f-2", "f-1"]


def test_frame_string_pyarrow(store):
    try:
        s = pd.array(["a", None, "c"], dtype="string[pyarrow]")
    except Exception:
        pytest.skip("no pyarrow")
    df = pd.DataFrame({"sid": ["a", "b", "c"], "s": s})
    store.ingest_frame(df, stream="sid", type=HOpt)
    out = store.read_frame(types=[HOpt], fields=["s"])
    assert out["s"].isna().tolist() == [False, True, False]


def test_frame_string_python(store):
    df = pd.DataFrame({"sid": pd.array(["a", "b", "c"], dtype="string"),
                       "s": pd.array(["a", pd.NA, "c"], dtype="string")})
    store.ingest_frame(df, stream="sid", type=HOpt)
    out = store.read_frame(types=[HOpt], fields=["s"])
    assert out["s"].isna().tolist() == [False, True, False]
    assert out["s"].tolist()[2] == "c"


def test_frame_naive_datetime_taken_as_utc(store):
    df = pd.DataFrame({"sid": ["a"], "t": pd.to_datetime(["2024-01-01T05:00:00"])})
    store.ingest_frame(df, stream="sid", type=HOpt)
    c = store.read_columns(types=[HOpt], fields=["t"])
    assert c["t"].data[0] == np.datetime64("2024-01-01T05:00:00", "us")


def test_frame_type_column(store):
    df = pd.DataFrame({"sid": ["a", "b"], "kind": [HOther.__event_type__, HOpt.__event_type__],
                       "n": [1, 2]})
    store.ingest_frame(df, stream="sid", type="kind")
    out = store.read_frame(types=[HOther, HOpt], fields=["n", "other"])
    assert out["type"].tolist() == [HOther.__event_type__, HOpt.__event_type__]
    assert out["n"].tolist() == [1, 2]
    assert out["other"].tolist() == ["o", None]


def test_frame_nan_in_int_column_is_no_value(store):
    df = pd.DataFrame({"sid": ["a", "b"], "n": [1.0, np.nan]})
    try:
        store.ingest_frame(df, stream="sid", type=HOpt)
    except ec.ValidationError:
        assert _count(store) == 0
        return
    out = store.read_frame(types=[HOpt], fields=["n"])
    assert out["n"].isna().tolist() == [False, True]


def test_frame_index_not_default(store):
    df = pd.DataFrame({"sid": ["a", "b", "c"], "n": [1, 2, 3]}, index=[10, 5, 7])
    store.ingest_frame(df, stream="sid", type=HOther)
    out = store.read_frame(types=[HOther], fields=["n"])
    assert out["n"].tolist() == [1, 2, 3]
    assert out["stream_id"].tolist() == ["a", "b", "c"]


# ---------------------------------------------------------------- asyncio

@pytest.mark.parametrize("url", ["memory://", "sqlite"])
def test_aio_same_as_sync(tmp_path, url):
    import asyncio
    aio = pytest.importorskip("eventcore.aio")
    u = url if url == "memory://" else f"sqlite:///{tmp_path / 'a.db'}"

    async def run():
        s = await aio.connect(u)
        try:
            ids, data = _full(6)
            await s.ingest_columns(ids, HCol, data, batch_size=4)
            x = np.arange(4, dtype=float)
            x[2] = np.nan
            try:
                await s.ingest_columns(np.array(["z"] * 4, dtype=object), HOpt, {"x": x}, batch_size=2)
            except ec.IngestError as e:
                assert e.item == 2 and e.committed == 2
            else:
                raise AssertionError("NaN accepted")
            c = await s.read_columns(types=[HCol, HOpt], fields=["n", "x"])
            f = await s.read_frame(types=[HCol], fields=["n"])
            return c, f
        finally:
            await s.aclose()

    c, f = asyncio.run(run())
    ref = ec.connect("memory://")
    ids, data = _full(6)
    ref.ingest_columns(ids, HCol, data, batch_size=4)
    ref.ingest_columns(np.array(["z"] * 2, dtype=object), HOpt, {"x": np.arange(2, dtype=float)})
    _eq(_strip(c), _strip(ref.read_columns(types=[HCol, HOpt], fields=["n", "x"])))
    assert f["n"].tolist() == list(data["n"])


def test_aio_postgres(pg_dsn, pg_schema):
    import asyncio
    aio = pytest.importorskip("eventcore.aio")

    async def run():
        s = await aio.connect(pg_dsn, schema=pg_schema)
        try:
            _ids, _data = _full(6)
            await s.ingest_columns(_ids, HCol, _data, batch_size=4)
            return await s.read_columns(types=[HCol], fields=["n", "x", "s", "b", "t"], page_size=2)
        finally:
            await s.aclose()

    c = asyncio.run(run())
    ref = ec.connect("memory://")
    ids, data = _full(6)
    ref.ingest_columns(ids, HCol, data, batch_size=4)
    _eq(_strip(c), _strip(ref.read_columns(types=[HCol], fields=["n", "x", "s", "b", "t"], page_size=2)))


def test_frame_read_then_ingest_round_trip(store):
    """pandas round trips: what read_frame gives, ingest_frame takes back, equal when read again."""
    ids, data = _full(5)
    store.ingest_columns(ids, HCol, data)
    store.ingest_columns(np.array(["o1", "o2"], dtype=object), HOpt,
                         {"n": np.ma.array([1, 2], mask=[0, 1]), "b": np.ma.array([True, False], mask=[1, 0]),
                          "t": np.array(["NaT", "2020-01-01"], dtype="datetime64[us]")})
    f1 = store.read_frame(types=[HOpt], fields=["n", "x", "s", "b", "t"])
    other = ec.connect("memory://")
    other.ingest_frame(f1[["stream_id", "n", "x", "s", "b", "t"]], stream="stream_id", type=HOpt)
    f2 = other.read_frame(types=[HOpt], fields=["n", "x", "s", "b", "t"])
    for col in ["stream_id", "n", "x", "s", "b", "t", "version"]:
        assert f1[col].isna().tolist() == f2[col].isna().tolist(), col
        assert f1[col].dropna().tolist() == f2[col].dropna().tolist(), col
    f3 = store.read_frame(types=[HCol], fields=["n", "x", "s", "b", "t"])
    other.ingest_frame(f3[["stream_id", "n", "x", "s", "b", "t"]], stream="stream_id", type=HCol)
    f4 = other.read_frame(types=[HCol], fields=["n", "x", "s", "b", "t"])
    for col in ["n", "x", "s", "b", "t"]:
        assert f3[col].tolist() == f4[col].tolist(), col


def test_envelope_type_of_alias_same_everywhere(store):
    """read_columns' `type` must be the same on every store (here: an event stored under an alias)."""
    class HAl2(ec.Event):
        __event_type__ = f"hostile.HAl2.new.{_tag}"
        __event_aliases__ = (f"hostile.HAl2.old.{_tag}",)
        k: int

    ref = ec.connect("memory://")
    for s in (store, ref):
        s.append([ec.emit("al", ec.RawEvent(f"hostile.HAl2.old.{_tag}", b'{"k": 1}'))])
    assert list(store.read_columns(types=[HAl2], fields=["k"])["type"]) == \
        list(ref.read_columns(types=[HAl2], fields=["k"])["type"])
    assert list(store.read_columns()["type"]) == list(ref.read_columns()["type"])


_CROSS_SCRIPT = r'''
import sys, json, datetime as dt, numpy as np, eventcore as ec
sys.path.insert(0, sys.argv[1])
import test_columns_hostile as h
s = ec.connect("memory://")
h._tricky_load(s)
out = {"impl": ec.__impl__, "raw": [e.data for e in s.read_all(decode=False)]}
c = s.read_columns(types=[h.HCol, h.HOpt, h.HOther], fields=["n", "x", "s", "b", "t", "other"])
out["cols"] = {k: [repr(v) for v in (np.ma.getdata(a).tolist())] for k, a in c.items() if k not in ("recorded_at", "type")}
out["masks"] = {k: np.ma.getmaskarray(a).tolist() for k, a in c.items() if isinstance(a, np.ma.MaskedArray)}
print(json.dumps(out))
'''


def _tricky_load(s):
    n = 12
    ids = np.array([f"tr-ü{i % 4}" for i in range(n)], dtype=object)
    s.ingest_columns(ids, HCol, {
        "n": np.array([0, -1, 2**62, -2**63, 5, 6, 7, 8, 9, 10, 11, 2**63 - 1], dtype=np.int64),
        "x": np.array([0.0, -0.0, 1e-310, 1e308, 0.1, 1 / 3, 2.5e-5, 1e16, 123456789.125, -7.0, 5e-324, 1.5]),
        "s": np.array(["", "\"", "\\", "\x1f", "\u2028", "é", "\U0001F600", "</script>", "\t\n\r", "a" * 300,
                       "\x7f\x80", "\ufeff"], dtype="U300"),
        "b": np.array([True, False] * 6),
        "t": np.array(["1970-01-01", "1969-12-31T23:59:59.999999", "2000-02-29T12:00:00.5", "0001-01-01",
                       "9999-12-31T23:59:59.999999", "2024-01-01T00:00:00.000001", "2024-01-01", "2024-01-01",
                       "2024-01-01", "2024-01-01", "2024-01-01", "2024-01-01"], dtype="datetime64[us]"),
    }, batch_size=5)
    s.ingest_columns(np.array(["o"] * 4, dtype=object), HOpt, {
        "n": np.ma.array([1, 2, 3, 4], mask=[1, 0, 1, 0]),
        "x": np.ma.array([np.nan, 2, 3, 4], mask=[1, 0, 0, 1]),
        "s": np.array([None, "x", None, "y"], dtype=object),
        "b": np.ma.array([True, True, False, False], mask=[0, 1, 0, 1]),
        "t": np.array(["NaT", "2020-01-01T00:00:00.123", "NaT", "2021-01-01"], dtype="datetime64[ms]"),
    })


def test_c_and_python_give_identical_results(tmp_path):
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    outs = {}
    for impl in ("c", "python"):
        env = dict(os.environ, EVENTCORE_IMPL=impl, PYTHONPATH=here)
        r = subprocess.run([sys.executable, "-W", "ignore", "-c", _CROSS_SCRIPT, here], env=env,
                           capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        outs[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["c"]["impl"] != outs["python"]["impl"]
    assert outs["c"]["raw"] == outs["python"]["raw"]
    assert outs["c"]["cols"] == outs["python"]["cols"]
    assert outs["c"]["masks"] == outs["python"]["masks"]


def test_tricky_same_on_every_store(store):
    _tricky_load(store)
    ref = ec.connect("memory://")
    _tricky_load(ref)
    opts = dict(types=[HCol, HOpt, HOther], fields=["n", "x", "s", "b", "t", "other"], page_size=3)
    _eq(_strip(store.read_columns(**opts)), _strip(ref.read_columns(**opts)))
    assert [e.data for e in store.read_all(decode=False)] == [e.data for e in ref.read_all(decode=False)] or \
        store.scheme.startswith("postgres")


def test_types_array_unknown_name_refused_at_call(store):
    types = np.array([HOther.__event_type__, "no.such." + _tag], dtype=object)
    with pytest.raises(ec.ValidationError):
        store.ingest_columns(np.array(["s", "s"], dtype=object), types, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_single_metadata(store):
    md = ec.Metadata(correlation_id="corr-1") if "correlation_id" in getattr(ec.Metadata, "__struct_fields__", ()) \
        else pytest.skip("no correlation_id")
    store.ingest_columns(np.array(["s", "t"], dtype=object), HOther, {"n": np.array([1, 2])}, metadata=md)
    assert [e.metadata.correlation_id for e in store.read_all()] == ["corr-1", "corr-1"]


def test_masked_stream_id_refused(store):
    ids = np.ma.array(np.array(["a", "b"], dtype=object), mask=[0, 1])
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(ids, HOther, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_read_columns_fields_subset_of_types(store):
    """A field only one of the `types` has: masked for the others, and a type not in `types` is excluded."""
    store.ingest_columns(np.array(["a", "b"], dtype=object), HOther, {"n": np.array([1, 2])})
    ids, data = _full(2)
    store.ingest_columns(ids, HCol, data)
    c = store.read_columns(types=[HCol], fields=["x"])
    assert len(c["x"]) == 2 and list(c["type"]) == [HCol.__event_type__] * 2


class HArr(ec.Event, array_like=True):
    __event_type__ = f"hostile.HArr.{_tag}"
    a: int
    b: str | None = None
    c: float = 1.5


class HOmit(ec.Event, omit_defaults=True):
    __event_type__ = f"hostile.HOmit.{_tag}"
    a: int = 0
    b: str = "d"
    t: dt.datetime | None = None


class HNest(ec.Event):
    __event_type__ = f"hostile.HNest.{_tag}"
    tags: list[str] = []
    d: dict[str, int] = {}


class HEnv(ec.Event):
    __event_type__ = f"hostile.HEnv.{_tag}"
    version: int = 0
    stream_id: str = ""


def _load_odd(s):
    s.ingest_columns(np.array(["arr"] * 3, dtype=object), HArr,
                     {"a": np.array([1, 2, 3]), "b": np.array(["x", None, "z"], dtype=object),
                      "c": np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0])}, batch_size=2)
    s.ingest_columns(np.array(["om"] * 3, dtype=object), HOmit,
                     {"a": np.ma.array([0, 5, 0], mask=[1, 0, 0]), "b": np.array(["d", "e", None], dtype=object),
                      "t": np.array(["NaT", "2024-05-05T05:05:05", "NaT"], dtype="datetime64[s]")})
    s.ingest_columns(np.array(["ne"] * 2, dtype=object), HNest,
                     {"tags": np.array([["a", "é"], None], dtype=object),
                      "d": np.array([{"k": 1}, {}], dtype=object)})
    s.append([ec.emit("raw", ec.RawEvent(HOpt.__event_type__, b'{"t": "2024-01-01T05:00:00+02:00"}')),
              ec.emit("raw", ec.RawEvent(HOpt.__event_type__, b'{"t": "2024-01-01T05:00:00.123456789Z", "x": 1e2}')),
              ec.emit("raw", ec.RawEvent(HOpt.__event_type__, b'{"t": null, "n": null, "s": "\\u0000"}'))
              if False else
              ec.emit("raw", ec.RawEvent(HOpt.__event_type__, b'{"t": null, "n": null, "s": "\\u00e9\\ud83d\\ude00"}'))])


@pytest.mark.parametrize("which", ["arr", "omit", "nest", "raw"])
def test_odd_classes_same_on_every_store(store, which):
    _load_odd(store)
    ref = ec.connect("memory://")
    _load_odd(ref)
    types, fields = {"arr": ([HArr], ["a", "b", "c"]), "omit": ([HOmit], ["a", "b", "t"]),
                     "nest": ([HNest], ["tags", "d"]), "raw": ([HOpt], ["n", "x", "s", "b", "t"])}[which]
    a = store.read_columns(types=types, fields=fields, page_size=2)
    b = ref.read_columns(types=types, fields=fields, page_size=2)
    _eq(_strip(a), _strip(b))
    if which == "arr":
        assert list(a["a"]) == [1, 2, 3] and list(np.ma.getmaskarray(a["b"])) == [False, True, False]
        assert list(a["c"]) == [1.0, 1.5, 3.0]
    if which == "omit":
        assert list(a["a"]) == [0, 5, 0] and list(a["b"]) == ["d", "e", "d"]
    if which == "nest":
        assert a["tags"][0] == ["a", "é"] and a["d"][0] == {"k": 1}
    if which == "raw":
        assert a["t"].data[0] == np.datetime64("2024-01-01T03:00:00", "us")
        assert a["x"][1] == 100.0
        assert a["s"][2] == "é\U0001F600"


def test_field_named_like_envelope(store):
    store.ingest_columns(np.array(["env"], dtype=object), HEnv,
                         {"version": np.array([42]), "stream_id": np.array(["inner"], dtype=object)})
    try:
        c = store.read_columns(types=[HEnv], fields=["version", "stream_id"])
    except ec.ValidationError:
        return  # refused: fine
    # the envelope columns must not be silently replaced (or vice versa) differently per store
    ref = ec.connect("memory://")
    ref.ingest_columns(np.array(["env"], dtype=object), HEnv,
                       {"version": np.array([42]), "stream_id": np.array(["inner"], dtype=object)})
    _eq(_strip(c), _strip(ref.read_columns(types=[HEnv], fields=["version", "stream_id"])))


def test_parallel_resume_after_failure(store):
    n = 30
    x = np.arange(n, dtype=float)
    x[20] = np.inf
    ids = np.array([f"pr-{i % 5}" for i in range(n)], dtype=object)
    try:
        with pytest.raises(ec.IngestError):
            store.ingest_columns(ids, HOpt, {"x": x}, batch_size=3, parallel=2, resume_key="hostile-par")
    except ec.ValidationError:
        pytest.skip("store cannot resume")
    first = _count(store)
    x[20] = 20.0
    r = store.ingest_columns(ids, HOpt, {"x": x}, batch_size=3, parallel=2, resume_key="hostile-par")
    assert r.skipped == first and r.events == n - first
    c = store.read_columns(types=[HOpt], fields=["x"])
    assert sorted(c["x"].tolist()) == list(range(n))
    for s in set(ids):
        m = c["stream_id"] == s
        assert sorted(c["x"][m].tolist()) == c["x"][m].tolist()
        assert list(c["version"][m]) == list(range(1, m.sum() + 1))


def test_types_array_as_U_and_stringdtype(store):
    t = np.array([HOther.__event_type__, HOpt.__event_type__], dtype="U")
    store.ingest_columns(np.array(["s", "s"], dtype="U"), t, {"n": np.array([1, 2])})
    if hasattr(np.dtypes, "StringDType"):
        store.ingest_columns(np.array(["s", "s"], dtype=np.dtypes.StringDType()),
                             t.astype(np.dtypes.StringDType()), {"n": np.array([3, 4])})
    c = store.read_columns(types=[HOther, HOpt], fields=["n"])
    assert c["n"].tolist()[:2] == [1, 2]
    assert list(c["type"][:2]) == [HOther.__event_type__, HOpt.__event_type__]


def test_non_native_and_strided_arrays(store):
    """Big-endian, strided and read-only inputs must give the same values as native contiguous ones."""
    n = 6
    base = np.arange(2 * n, dtype=np.int64) * 1000003 - 7
    x = (np.arange(2 * n) / 7.0)
    t = T0 + np.arange(2 * n).astype("timedelta64[ms]")
    s = np.array([f"v{i}é" for i in range(2 * n)], dtype="U5")
    b = np.arange(2 * n) % 3 == 0
    data = {"n": base.astype(">i8")[::2], "x": x.astype(">f8")[::2], "t": t.astype(">M8[ms]")[::2],
            "s": s[::2], "b": b[::2]}
    for v in data.values():
        v.flags.writeable = False
    ids = np.array([f"st-{i}" for i in range(2 * n)], dtype=object)[::2]
    store.ingest_columns(ids, HCol, data)
    c = store.read_columns(types=[HCol], fields=["n", "x", "s", "b", "t"])
    assert c["n"].tolist() == base[::2].tolist()
    assert c["x"].tolist() == x[::2].tolist()
    assert c["s"].tolist() == s[::2].tolist()
    assert c["b"].tolist() == b[::2].tolist()
    assert c["t"].data.tolist() == t[::2].astype("datetime64[ms]").astype("datetime64[us]").tolist()
    assert c["stream_id"].tolist() == ids.tolist()


def test_big_payload_and_many_rows_same_everywhere(store):
    n = 3000
    ids = np.array([f"big-{i % 17}" for i in range(n)], dtype=object)
    s = np.array(["é" * (i % 50) for i in range(n)], dtype=object)
    s[5] = "x" * 2_000_000
    s[2999] = "\U0001F600" * 300_000
    data = {"n": np.arange(n), "other": s}
    store.ingest_columns(ids, HOther, data, batch_size=700)
    ref = ec.connect("memory://")
    ref.ingest_columns(ids, HOther, data, batch_size=700)
    for ps in (1000, 7, 10_000):
        _eq(_strip(store.read_columns(types=[HOther], fields=["n", "other"], page_size=ps)),
            _strip(ref.read_columns(types=[HOther], fields=["n", "other"], page_size=ps)))


def test_limit_beyond_and_after_head(store):
    store.ingest_columns(np.array(["l"] * 3, dtype=object), HOther, {"n": np.arange(3)})
    c = store.read_columns(types=[HOther], fields=["n"], limit=100, page_size=2)
    assert c["n"].tolist() == [0, 1, 2]
    head = store.head_position()
    c = store.read_columns(types=[HOther], fields=["n"], after_position=head)
    assert len(c["n"]) == 0 and c["n"].dtype == np.int64 and isinstance(c["n"], np.ma.MaskedArray)


@pytest.mark.parametrize("bad", [dict(limit=-1), dict(page_size=0), dict(after_position=-1)])
def test_bad_read_options_refused(store, bad):
    with pytest.raises(ec.ValidationError):
        store.read_columns(**bad)


def test_type_without_events_all_masked(store):
    store.ingest_columns(np.array(["l"] * 2, dtype=object), HOther, {"n": np.arange(2)})
    c = store.read_columns(types=[HOther, HCol], fields=["n", "x", "t", "b"])
    assert np.ma.getmaskarray(c["x"]).all() and np.ma.getmaskarray(c["t"]).all()
    assert c["t"].dtype == np.dtype("datetime64[us]") and c["b"].dtype == bool


def test_on_batch_called(store):
    seen = []
    store.ingest_columns(np.array(["ob"] * 7, dtype=object), HOther, {"n": np.arange(7)}, batch_size=3,
                         on_batch=seen.append)
    assert seen == [3, 6, 7]


def test_types_without_fields_alias(store):
    class HAl3(ec.Event):
        __event_type__ = f"hostile.HAl3.new.{_tag}"
        __event_aliases__ = (f"hostile.HAl3.old.{_tag}",)
        k: int

    ref = ec.connect("memory://")
    for s in (store, ref):
        s.append([ec.emit("al", ec.RawEvent(f"hostile.HAl3.old.{_tag}", b'{"k": 1}'))])
    assert list(store.read_columns(types=[HAl3])["type"]) == list(ref.read_columns(types=[HAl3])["type"])


def test_concurrent_writer_stops_ingest(store):
    """expected streams are checked in every later batch against the version this ingest left them at."""
    def meddle(count):
        if count == 2:
            store.append([ec.emit("cw-1", HOther(n=-1))])
    ids = np.array(["cw-1"] * 6, dtype=object)
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(ids, HOther, {"n": np.arange(6)}, batch_size=2, expected={"cw-1": ec.NO_STREAM},
                             on_batch=meddle)
    assert ei.value.committed == 2
    c = store.read_columns(types=[HOther], fields=["n"])
    assert c["n"].tolist() == [0, 1, -1]


def test_expected_int_version(store):
    store.ingest_columns(np.array(["ev"] * 2, dtype=object), HOther, {"n": np.arange(2)})
    with pytest.raises(ec.IngestError):
        store.ingest_columns(np.array(["ev"], dtype=object), HOther, {"n": np.arange(1)}, expected={"ev": 1})
    store.ingest_columns(np.array(["ev"], dtype=object), HOther, {"n": np.arange(1)}, expected={"ev": 2})
    assert store.read_columns()["version"].tolist() == [1, 2, 3]


def test_parallel_bad_row_item(store):
    n = 40
    x = np.arange(n, dtype=float)
    x[33] = np.nan
    ids = np.array([f"pb-{i % 4}" for i in range(n)], dtype=object)
    with pytest.raises(ec.IngestError) as ei:
        store.ingest_columns(ids, HOpt, {"x": x}, batch_size=4, parallel=2)
    assert ei.value.item == 33
    assert ei.value.committed == _count(store)
    assert 33.0 not in store.read_columns(types=[HOpt], fields=["x"])["x"].tolist()


def test_masked_type_name_refused(store):
    t = np.ma.array(np.array([HOther.__event_type__] * 2, dtype=object), mask=[0, 1])
    with pytest.raises((ec.ValidationError, ec.IngestError)):
        store.ingest_columns(np.array(["s", "s"], dtype=object), t, {"n": np.array([1, 2])})
    assert _count(store) == 0


def test_float_from_huge_uint_same_as_row_path(store):
    v = np.array([2**63 + 5, 2**53 + 1], dtype=np.uint64)
    store.ingest_columns(np.array(["s", "s"], dtype=object), HOpt, {"x": v})
    store.ingest([("r", HOpt(x=float(i))) for i in v.tolist()])
    raw = [e.data for e in store.read_all(decode=False)]
    assert raw[:2] == raw[2:]
    assert store.read_columns(types=[HOpt], fields=["x"])["x"].tolist() == [float(2**63 + 5), float(2**53 + 1)] * 2


def _raise_for_all(store, exc, **opts):
    with pytest.raises(exc) as ei:
        store.read_columns(**opts)
    return ei.value


def test_bad_stored_payload_refused_everywhere(store):
    name = f"hostile.Late.{uuid.uuid4().hex[:8]}"
    store.append([ec.emit("late", ec.RawEvent(name, b'{"n": 1}')),
                  ec.emit("late", ec.RawEvent(name, b'{"n": "abc"}'))])

    class Late(ec.Event):
        __event_type__ = name
        n: int

    _raise_for_all(store, ec.SerializationError, types=[Late], fields=["n"])
    _raise_for_all(store, ec.SerializationError, types=[Late], fields=["n"], page_size=1)


def test_newer_stored_version_refused_everywhere(store):
    name = f"hostile.Newer.{uuid.uuid4().hex[:8]}"
    store.append([ec.emit("nv", ec.RawEvent(name, b'{"n": 1}', version=3))])

    class Newer(ec.Event):
        __event_type__ = name
        __event_version__ = 2
        n: int

    @ec.upcaster(name, from_version=1)
    def _up(d):
        return d

    _raise_for_all(store, ec.EventVersionError, types=[Newer], fields=["n"])


def test_upcaster_raising_refused_everywhere(store):
    name = f"hostile.UpBad.{uuid.uuid4().hex[:8]}"

    class UpBad(ec.Event):
        __event_type__ = name
        __event_version__ = 2
        n: int

    @ec.upcaster(name, from_version=1)
    def _up(d):
        if d["n"] == 2:
            raise RuntimeError("boom")
        return d

    store.append([ec.emit("ub", ec.RawEvent(name, b'{"n": 1}', version=1)),
                  ec.emit("ub", ec.RawEvent(name, b'{"n": 3}', version=2))])
    c = store.read_columns(types=[UpBad], fields=["n"])
    assert c["n"].tolist() == [1, 3]
    store.append([ec.emit("ub", ec.RawEvent(name, b'{"n": 3}', version=2))])
    # stored via RawEvent at v1 would be refused at write if the chain fails; write one through a sibling type
    err = None
    try:
        store.append([ec.emit("ub", ec.RawEvent(name, b'{"n": 2}', version=1))])
    except ec.ValidationError as e:
        err = e
    if err is None:
        _raise_for_all(store, ec.UpcastError, types=[UpBad], fields=["n"])


def test_unregistered_type_name_with_fields_refused(store):
    store.append([ec.emit("u", ec.RawEvent("hostile.nobody." + _tag, b'{"n": 1}'))])
    with pytest.raises(ec.ValidationError):
        store.read_columns(types=["hostile.nobody." + _tag], fields=["n"])


def test_envelope_filter_by_unregistered_name(store):
    """Without fields: the envelope of every event as stored, any type (read_all(types=[name], decode=False)
    selects it; read_columns is documented as the feed as read_all selects it)."""
    store.append([ec.emit("u", ec.RawEvent("hostile.nobody." + _tag, b'{"n": 1}'))])
    assert len(list(store.read_all(types=["hostile.nobody." + _tag], decode=False))) == 1
    c = store.read_columns(types=["hostile.nobody." + _tag])
    assert c["type"].tolist() == ["hostile.nobody." + _tag]
