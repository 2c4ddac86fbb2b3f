"""Columnar I/O: store.ingest_columns from numpy arrays and store.read_columns into them, on every backend,
with every guarantee of store.ingest (the bad-input cases of the row path, applied to columns), and the
pandas conveniences ingest_frame and read_frame."""
from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
from typing import Annotated, Any

import msgspec

import pytest

from optional import require

np = require("numpy")

import eventcore as ec  # noqa: E402
from domain import Deposited, Noted, Withdrawn, assert_gap_free, feed_positions  # noqa: E402
from eventcore import _impl  # noqa: E402
from eventcore._pure import codec as pure_codec  # noqa: E402
from eventcore.payloads import MAX_PAYLOAD_BYTES  # noqa: E402

UTC = dt.timezone.utc


class Trade(ec.Event):
    """One field of each column kind, nullable ones included."""

    __event_type__ = "test.columns.Trade"
    qty: int
    price: float
    side: str
    buy: bool
    at: dt.datetime
    note: str | None = None
    fee: float | None = None
    tags: list[str] = []


class Stamp(ec.Event):
    """A naive datetime field: the column's UTC values are stored without a zone."""

    __event_type__ = "test.columns.Stamp"
    at: Annotated[dt.datetime, msgspec.Meta(tz=False)]


def _trades(n: int) -> dict[str, Any]:
    at = np.datetime64("2024-03-01T09:30:00", "us") + np.arange(n) * np.timedelta64(90, "s")
    return {
        "qty": np.arange(n, dtype=np.int64) * 3 - 7,
        "price": np.linspace(0.5, 99.25, n),
        "side": np.array(["buy", "sell", "hold"] * n, dtype=object)[:n],
        "buy": np.arange(n) % 2 == 0,
        "at": at,
        "note": np.array([None if i % 3 else f"n{i}" for i in range(n)], dtype=object),
        "fee": np.ma.MaskedArray(np.arange(n) / 8, mask=np.arange(n) % 4 == 1),
    }


def _ids(n: int, streams: int = 5) -> Any:
    return np.array([f"acct-{i % streams}" for i in range(n)])


def _state(store):
    return store.head_position(), feed_positions(store)


# -- round trips ------------------------------------------------------------------------------------------


def test_columns_round_trip_on_every_backend(store):
    n = 57
    cols = _trades(n)
    result = store.ingest_columns(_ids(n), Trade, cols, batch_size=20)
    assert (result.events, result.batches) == (n, 3)
    feed = list(store.read_all())
    assert [e.data.qty for e in feed] == cols["qty"].tolist()
    assert feed[0].data.at == dt.datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    assert feed[1].data.note is None and feed[0].data.note == "n0"
    assert feed[1].data.fee is None and feed[2].data.fee == 0.25
    assert_gap_free(store)

    out = store.read_columns(types=[Trade], fields=["qty", "price", "side", "buy", "at", "note", "fee", "tags"])
    assert list(out) == ["position", "stream_id", "version", "recorded_at", "type",
                         "qty", "price", "side", "buy", "at", "note", "fee", "tags"]
    assert out["position"].dtype == np.int64 and out["position"].tolist() == [e.position for e in feed]
    assert out["stream_id"].dtype == object and out["stream_id"].tolist() == [e.stream_id for e in feed]
    assert out["version"].dtype == np.int64 and out["version"].tolist() == [e.version for e in feed]
    assert out["recorded_at"].dtype == np.dtype("datetime64[us]")
    assert out["recorded_at"].tolist() == [e.recorded_at.replace(tzinfo=None) for e in feed]
    assert out["type"].tolist() == ["test.columns.Trade"] * n
    for name, dtype in [("qty", "int64"), ("price", "float64"), ("side", "object"), ("buy", "bool"),
                        ("at", "datetime64[us]"), ("note", "object"), ("fee", "float64"), ("tags", "object")]:
        assert isinstance(out[name], np.ma.MaskedArray) and out[name].dtype == np.dtype(dtype), name
        assert len(out[name]) == n
    for name in ("qty", "price", "side", "buy", "at"):
        assert not out[name].mask.any(), name
        assert np.array_equal(np.ma.getdata(out[name]), np.asarray(cols[name])), name
    assert out["note"].mask.tolist() == [bool(i % 3) for i in range(n)]
    assert out["note"].compressed().tolist() == [f"n{i}" for i in range(0, n, 3)]
    assert out["fee"].mask.tolist() == (np.arange(n) % 4 == 1).tolist()
    assert np.array_equal(out["fee"].compressed(), cols["fee"].compressed())
    assert out["tags"].tolist() == [[]] * n


def test_read_columns_pages_limit_prefix_and_after_position(store):
    n = 45
    store.ingest_columns(np.array([f"{'a' if i % 3 else 'b'}-{i % 4}" for i in range(n)]), Deposited,
                         {"amount": np.arange(n)})
    every = store.read_columns(types=[Deposited], fields=["amount"], page_size=7)
    assert every["amount"].tolist() == list(range(n))
    after = int(every["position"][9])
    some = store.read_columns(after_position=after, types=[Deposited], fields=["amount"], limit=11, page_size=4)
    assert some["amount"].tolist() == list(range(10, 21))
    b = store.read_columns(types=["test.Deposited"], fields=["amount"], stream_prefix="b-", page_size=5)
    assert b["amount"].tolist() == list(range(0, n, 3))
    assert set(b["stream_id"].tolist()) == {"b-0", "b-1", "b-2", "b-3"}
    empty = store.read_columns(after_position=int(every["position"][-1]), types=[Deposited], fields=["amount"])
    assert {k: len(v) for k, v in empty.items()} == dict.fromkeys(empty, 0)
    assert empty["amount"].dtype == np.int64


def test_parallel_lanes_keep_each_streams_order(store):
    n = 300
    result = store.ingest_columns(_ids(n, 7), Deposited, {"amount": np.arange(n)}, batch_size=40, parallel=2)
    assert result.events == n
    out = store.read_columns(types=[Deposited], fields=["amount"])
    for sid in set(out["stream_id"].tolist()):
        mine = out["stream_id"] == sid
        assert out["amount"][mine].tolist() == [i for i in range(n) if f"acct-{i % 7}" == sid]
        assert out["version"][mine].tolist() == list(range(1, mine.sum() + 1))
    assert_gap_free(store)


def test_envelope_only_reads_every_type_as_stored(store):
    store.append([ec.emit("x", ec.RawEvent("test.columns.NoClass", b'{"a": 1}')), ec.emit("x", Noted("n"))])
    out = store.read_columns()
    assert out["type"].tolist() == ["test.columns.NoClass", "test.Noted"]
    assert out["version"].tolist() == [1, 2]


def test_several_types_and_fields_missing_from_some(store):
    n = 12
    kinds = np.array(["test.Deposited", "test.Withdrawn", "test.Noted"] * 4)
    amount = np.ma.MaskedArray(np.arange(n), mask=kinds == "test.Noted")
    text = np.array([f"t{i}" if k == "test.Noted" else None for i, k in enumerate(kinds)], dtype=object)
    store.ingest_columns(_ids(n, 3), kinds, {"amount": amount, "text": text}, batch_size=5)
    feed = list(store.read_all())
    assert [type(e.data) for e in feed] == [Deposited, Withdrawn, Noted] * 4
    assert [e.data.text for e in feed if type(e.data) is Noted] == ["t2", "t5", "t8", "t11"]
    out = store.read_columns(types=[Deposited, Withdrawn, Noted], fields=["amount", "text"])
    assert out["type"].tolist() == kinds.tolist()
    assert out["amount"].mask.tolist() == (kinds == "test.Noted").tolist()
    assert out["amount"].compressed().tolist() == [i for i in range(n) if i % 3 != 2]
    assert out["text"].compressed().tolist() == ["t2", "t5", "t8", "t11"]


def test_structured_arrays_str_dtypes_and_naive_datetimes(store):
    rows = np.array([(1, 2.5), (2, 3.5)], dtype=[("qty", "i4"), ("price", "f4")])
    base = {name: np.asarray(v)[:2] for name, v in _trades(2).items()}
    data = {**base, "qty": rows["qty"], "price": rows["price"], "side": np.array(["buy", "sell"])}
    store.ingest_columns(np.array(["s", "s"]), "test.columns.Trade", data)
    assert [(e.data.qty, e.data.price, e.data.side) for e in store.read_stream("s")] == [(1, 2.5, "buy"), (2, 3.5, "sell")]
    store.ingest_columns(["t"], Deposited, np.array([(7,)], dtype=[("amount", "u2")]))
    assert store.read_stream("t")[0].data.amount == 7
    store.ingest_columns(["u"], Stamp, {"at": np.array(["2024-01-02T03:04:05.000006"], dtype="datetime64[us]")})
    assert store.read_stream("u")[0].data.at == dt.datetime(2024, 1, 2, 3, 4, 5, 6)
    out = store.read_columns(types=[Stamp], fields=["at"])
    assert out["at"].tolist() == [dt.datetime(2024, 1, 2, 3, 4, 5, 6)]


def test_metadata_for_every_row_or_by_columns(store):
    one = ec.Metadata(correlation_id="load-1")
    store.ingest_columns(["a", "a"], Deposited, {"amount": [1, 2]}, metadata=one)
    assert [e.metadata for e in store.read_stream("a")] == [one, one]
    users = np.ma.MaskedArray(np.array(["ann", "bob", "cy"], dtype=object), mask=[False, True, False])
    store.ingest_columns(["b"] * 3, Deposited, {"amount": [1, 2, 3]},
                         metadata={"user_id": users, "correlation_id": ["c1", "c2", "c3"]})
    got = [(e.metadata.user_id, e.metadata.correlation_id) for e in store.read_stream("b")]
    assert got == [("ann", "c1"), (None, "c2"), ("cy", "c3")]


def test_expected_versions_and_resume_keys_hold(store):
    store.ingest_columns(["e-1"] * 3, Deposited, {"amount": [1, 2, 3]}, expected={"e-1": ec.NO_STREAM})
    before = _state(store)
    with pytest.raises(ec.IngestError) as info:
        store.ingest_columns(["e-2", "e-1"], Deposited, {"amount": [1, 2]}, expected={"e-1": ec.NO_STREAM})
    cause = info.value.__cause__
    assert isinstance(cause, ec.ConcurrencyError) and (cause.stream_id, cause.expected, cause.actual) == ("e-1", 0, 3)
    assert _state(store) == before

    n = 30
    amounts = np.arange(n, dtype=float)
    amounts[25] = math.nan
    with pytest.raises(ec.IngestError) as info:
        store.ingest_columns(_ids(n), "test.columns.Trade", {**_trades(n), "price": amounts}, batch_size=10,
                             resume_key="load-7")
    assert (info.value.item, info.value.committed) == (25, 20)
    amounts[25] = 25.0
    result = store.ingest_columns(_ids(n), "test.columns.Trade", {**_trades(n), "price": amounts}, batch_size=10,
                                  resume_key="load-7")
    assert (result.events, result.skipped) == (10, 20)
    out = store.read_columns(types=[Trade], fields=["price"])
    assert out["price"].tolist() == list(map(float, range(n)))
    again = store.ingest_columns(_ids(n), Trade, {**_trades(n), "price": amounts}, resume_key="load-7")
    assert (again.events, again.skipped) == (0, n)


# -- bad input: what the row path refuses, refused the same way from columns -------------------------------


def _bad_row(store, n, bad, stream_ids=None, types=Trade, cols=None, error=ec.SerializationError, fragments=()):
    """Columns of `n` rows whose row `bad` is bad: IngestError naming it, the batches before it committed,
    nothing of its own batch (batches of 10 rows)."""
    before = len(feed_positions(store))
    with pytest.raises(ec.IngestError) as info:
        store.ingest_columns(_ids(n) if stream_ids is None else stream_ids, types,
                             _trades(n) if cols is None else cols, batch_size=10)
    assert info.value.item == bad
    assert info.value.committed == bad // 10 * 10
    assert isinstance(info.value.__cause__, error), info.value.__cause__
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert len(feed_positions(store)) == before + bad // 10 * 10
    assert_gap_free(store)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_naming_the_row(store, value):
    cols = _trades(24)
    cols["price"][23] = value
    _bad_row(store, 24, 23, cols=cols, fragments=("item 23", "NaN or infinity", "price"))


def test_masked_float_is_no_value_but_a_nan_under_no_mask_is_refused(store):
    cols = _trades(14)
    cols["fee"] = np.ma.MaskedArray(np.full(14, math.nan), mask=np.arange(14) != 13)
    _bad_row(store, 14, 13, cols=cols, fragments=("NaN or infinity",))


@pytest.mark.parametrize("text, fragment", [("a\x00b", "NUL"), ("\ud800", "surrogate")], ids=["nul", "surrogate"])
def test_nul_and_lone_surrogates_in_str_columns_are_refused(store, text, fragment):
    cols = _trades(12)
    cols["side"][11] = text
    _bad_row(store, 12, 11, cols=cols, fragments=(fragment,))


def test_oversized_payload_is_refused(store):
    cols = _trades(3)
    cols["note"][2] = "x" * (MAX_PAYLOAD_BYTES + 1)
    _bad_row(store, 3, 2, cols=cols, fragments=("16 MiB",))


@pytest.mark.parametrize("sid", ["", "x" * 256, "a\x00b", "a\nb", "\x1b[0m", "c1\x9f", "\ud800", 7, None], ids=repr)
def test_bad_stream_ids_are_refused_naming_the_row(store, sid):
    ids = np.array(_ids(16).tolist(), dtype=object)
    ids[15] = sid
    _bad_row(store, 16, 15, stream_ids=ids, error=ec.ValidationError)


def test_masked_stream_id_is_refused(store):
    ids = np.ma.MaskedArray(_ids(4), mask=[False, False, True, False])
    _bad_row(store, 4, 2, stream_ids=ids, error=ec.ValidationError)


def test_a_required_field_without_a_value_is_refused_naming_the_row(store):
    cols = _trades(18)
    cols["qty"] = np.ma.MaskedArray(cols["qty"], mask=np.arange(18) == 17)
    _bad_row(store, 18, 17, cols=cols, error=ec.ValidationError, fragments=("qty",))


def test_object_values_of_another_type_and_datetimes_no_datetime_holds_are_refused_naming_the_row(store):
    cols = _trades(12)
    cols["qty"] = np.array(cols["qty"].tolist(), dtype=object)
    cols["qty"][11] = "11"
    _bad_row(store, 12, 11, cols=cols, error=ec.ValidationError, fragments=("'qty' is int", "'11'"))
    cols = _trades(13)
    cols["at"][12] = np.datetime64("20000-01-01", "us")
    _bad_row(store, 13, 12, cols=cols, error=ec.ValidationError, fragments=("'at'", "years 1-9999"))


class Tagged(ec.Event):
    """Fields an object column carries: each value converted to the field's type, or the row refused."""

    __event_type__ = "test.columns.Tagged"
    tags: list[int]
    counts: dict[str, int] = {}
    when: dt.datetime | None = None


def test_object_columns_take_values_of_their_fields_type_and_refuse_others(store):
    tags = np.empty(12, dtype=object)
    tags[:] = [[i, i + 1] for i in range(12)]
    counts = np.empty(12, dtype=object)
    counts[:] = [{"n": i} for i in range(12)]
    when = np.array([None, "2024-01-02T03:04:05Z"] * 6, dtype=object)
    store.ingest_columns(_ids(12), Tagged, {"tags": tags, "counts": counts, "when": when})
    out = store.read_columns(types=[Tagged], fields=["tags", "counts", "when"])
    assert out["tags"].tolist() == [[i, i + 1] for i in range(12)]
    assert out["counts"].tolist() == counts.tolist()
    assert out["when"].mask.tolist() == [True, False] * 6
    assert out["when"].compressed().tolist() == [dt.datetime(2024, 1, 2, 3, 4, 5)] * 6
    tags[11] = ["x"]
    _bad_row(store, 12, 11, types=Tagged, cols={"tags": tags, "counts": counts}, error=ec.ValidationError,
             fragments=("'tags'", "['x']"))
    tags[11] = [1]
    counts[10] = {"n": 1.5}
    _bad_row(store, 12, 10, types=Tagged, cols={"tags": tags, "counts": counts}, error=ec.ValidationError,
             fragments=("'counts'",))
    when[9] = "not a time"
    _bad_row(store, 12, 9, types=Tagged, cols={"tags": tags, "when": when}, error=ec.ValidationError,
             fragments=("'when'",))


def test_a_value_for_a_field_the_rows_type_lacks_is_refused(store):
    kinds = np.array(["test.Deposited"] * 5 + ["test.Noted"] * 7)
    amount = np.ma.MaskedArray(np.arange(12), mask=np.arange(12) >= 5)
    amount.mask[11] = False
    _bad_row(store, 12, 11, types=kinds, cols={"amount": amount}, error=ec.ValidationError,
             fragments=("no field 'amount'",))


def test_the_first_bad_row_is_named_whatever_its_type(store):
    kinds = np.array(["test.Deposited", "test.Noted"] * 8)
    text = np.array([None, "ok"] * 8, dtype=object)
    text[13] = "bad\x00"
    amount = np.ma.MaskedArray(np.arange(16), mask=kinds == "test.Noted")
    ids = np.array(_ids(16).tolist(), dtype=object)
    ids[14] = ""
    _bad_row(store, 16, 13, types=kinds, cols={"amount": amount, "text": text}, stream_ids=ids)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.ingest_columns(["a", "b"], Deposited, {"amount": [1]}), "has 1 entries, stream_ids has 2"),
    (lambda s: s.ingest_columns(["a"], Deposited, {"amount": [1.5]}), "needs an integer"),
    (lambda s: s.ingest_columns(["a"], Trade, {"price": ["x"]}), "needs a float or integer"),
    (lambda s: s.ingest_columns(["a"], Trade, {"buy": [1]}), "needs a bool"),
    (lambda s: s.ingest_columns(["a"], Trade, {"side": [1]}), "needs a str"),
    (lambda s: s.ingest_columns(["a"], Trade, {"at": [1]}), "needs a datetime64"),
    (lambda s: s.ingest_columns(["a"], Deposited, {"amount": [[1, 2]]}), "1-D"),
    (lambda s: s.ingest_columns(["a"], "test.columns.Unknown", {}), "no ec.Event class is registered"),
    (lambda s: s.ingest_columns(["a"], ["x\x00"], {}), "type name"),
    (lambda s: s.ingest_columns(["a"], 5, {}), "types takes"),
    (lambda s: s.ingest_columns(["a", "b"], np.ma.MaskedArray(["test.Noted"] * 2, mask=[False, True]), {}),
     "types has no value at row 1"),
    (lambda s: s.ingest_columns("a", Deposited, {"amount": [1]}), "single str"),
    (lambda s: s.ingest_columns([1], Deposited, {"amount": [1]}), "must hold str"),
    (lambda s: s.ingest_columns(["a"], Deposited, [1]), "mapping of field name"),
    (lambda s: s.ingest_columns(["a"], Deposited, {"amount": [1]}, metadata={"who": ["x"]}), "not an ec.Metadata"),
    (lambda s: s.ingest_columns(["a"], Deposited, {"amount": [1]}, batch_size=0), "batch_size"),
    (lambda s: s.read_columns(fields=["amount"]), "needs `types`"),
    (lambda s: s.read_columns(types=[Deposited], fields=["nope"]), "none of Deposited"),
    (lambda s: s.read_columns(types=[Deposited], fields=["position"]), "other than"),
    (lambda s: s.read_columns(types=[Deposited, Trade], fields=["amount", "amount"]), "twice"),
    (lambda s: s.read_columns(types=[Deposited], after_position=-1), "after_position"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_columns_and_options_are_refused_at_the_call(store, call, message):
    store.append([ec.emit("a", Noted("first"))])
    before = _state(store)
    with pytest.raises(ec.ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(store)
    assert _state(store) == before


def test_one_field_typed_two_ways_cannot_share_a_column(store):
    class Other(ec.Event):
        __event_type__ = "test.columns.OtherQty"
        qty: str

    with pytest.raises(ec.ValidationError, match="int and str"):
        store.read_columns(types=[Trade, Other], fields=["qty"])


# -- the column encoder is the row path's encoder -------------------------------------------------------


def _payloads(encode_event, cls, columns, rows):
    from eventcore.columns import _Plan

    plan = _Plan(np, cls, columns)
    return _impl.encode_column_payloads(cls, encode_event, *plan.args, np.asarray(rows, dtype=np.intp))


@pytest.mark.parametrize("encoder", ["pure", "active"])
def test_payloads_are_the_bytes_the_row_path_writes(encoder):
    encode_event = pure_codec.encode_event if encoder == "pure" else _impl.encode_event
    n = 20
    cols = _trades(n)
    got = _payloads(encode_event, Trade, cols, range(n))
    feed_events = [Trade(qty=int(cols["qty"][i]), price=float(cols["price"][i]), side=cols["side"][i],
                         buy=bool(cols["buy"][i]), at=cols["at"][i].item().replace(tzinfo=UTC),
                         note=cols["note"][i], fee=None if cols["fee"].mask[i] else float(cols["fee"][i]))
                   for i in range(n)]
    assert got == [pure_codec.encode_event(e)[1] for e in feed_events]
    assert got == [_impl.encode_event(e)[1] for e in feed_events]


def test_without_numpy_importing_works_and_the_methods_say_what_to_install(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['numpy'] = None\n"
        "import eventcore as ec\n"
        "assert 'numpy' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "s = ec.connect('memory://')\n"
        "for call in (lambda: s.ingest_columns(['a'], 'x', {}), lambda: s.read_columns()):\n"
        "    try:\n"
        "        call()\n"
        "    except ec.MissingDependencyError as exc:\n"
        "        assert isinstance(exc, ImportError) and \"pip install 'pyeventcore[numpy]'\" in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ}, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- pandas -----------------------------------------------------------------------------------------------


def test_frames_round_trip(store):
    pd = require("pandas")
    df = pd.DataFrame({
        "account": ["a-1", "a-2", "a-1", "a-3"],
        "kind": ["test.Deposited", "test.Deposited", "test.Withdrawn", "test.Deposited"],
        "amount": [10, 20, 5, 7],
        "balance": pd.array([10, None, 5, None], dtype="Int64"),
    })
    result = store.ingest_frame(df, stream="account", type="kind", batch_size=3)
    assert result.events == 4
    assert [(e.stream_id, type(e.data).__name__, e.data.amount, e.data.balance) for e in store.read_all()] == [
        ("a-1", "Deposited", 10, 10), ("a-2", "Deposited", 20, None), ("a-1", "Withdrawn", 5, 5),
        ("a-3", "Deposited", 7, None)]
    back = store.read_frame(types=[Deposited, Withdrawn], fields=["amount", "balance"])
    assert back["stream_id"].tolist() == df["account"].tolist()
    assert back["amount"].tolist() == [10, 20, 5, 7]
    assert str(back["balance"].dtype) == "Int64" and back["balance"].isna().tolist() == [False, True, False, True]
    assert str(back["recorded_at"].dtype).startswith("datetime64")
    one = store.ingest_frame(pd.DataFrame({"s": ["n"], "text": ["hi"]}), stream="s", type=Noted)
    assert one.events == 1 and store.read_stream("n")[0].data.text == "hi"
    with pytest.raises(ec.ValidationError, match="no column 'acct'"):
        store.ingest_frame(df, stream="acct", type="kind")


# -- properties -------------------------------------------------------------------------------------------


def test_round_trips_any_values():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    rows = st.lists(st.tuples(
        st.sampled_from(["a", "b", "ç-ü", "x" * 40]),
        st.integers(-(2 ** 63), 2 ** 63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
        st.booleans(),
        st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
        st.none() | st.text(max_size=5, alphabet="abc"),
    ), max_size=30)

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @hypothesis.given(rows)
    def check(rows):
        store = ec.connect("memory://")
        n = len(rows)
        sid, qty, price, side, buy, at, note = (list(c) for c in zip(*rows)) if rows else ([],) * 7
        cols = {"qty": np.array(qty, dtype=np.int64), "price": np.array(price, dtype=np.float64),
                "side": np.array(side, dtype=object), "buy": np.array(buy, dtype=bool),
                "at": np.array(at, dtype="datetime64[us]"), "note": np.array(note, dtype=object)}
        store.ingest_columns(np.array(sid, dtype=object), Trade, cols, batch_size=7)
        out = store.read_columns(types=[Trade], fields=list(cols))
        assert out["stream_id"].tolist() == sid
        for name in ("qty", "price", "side", "buy"):
            assert np.ma.getdata(out[name]).tolist() == cols[name].tolist()
        assert np.ma.getdata(out["at"]).tolist() == at
        assert [None if m else v for v, m in zip(np.ma.getdata(out["note"]).tolist(), out["note"].mask)] == note
        assert len(out["position"]) == n
        store.close()

    check()


# -- the asyncio stores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [
    test_columns_round_trip_on_every_backend,
    test_read_columns_pages_limit_prefix_and_after_position,
    test_several_types_and_fields_missing_from_some,
    test_expected_versions_and_resume_keys_hold,
    test_the_first_bad_row_is_named_whatever_its_type,
    test_frames_round_trip,
    lambda s: test_nan_and_infinity_are_refused_naming_the_row(s, math.inf),
    lambda s: test_bad_stream_ids_are_refused_naming_the_row(s, "a\x00b"),
], ids=["round_trip", "pages", "several_types", "expected_and_resume", "first_bad_row", "frames", "inf", "stream_id"])
def test_the_asyncio_stores_do_the_same(aio_store, check):
    check(aio_store)


# -- the example -------------------------------------------------------------------------------------------


def test_the_csv_example_loads_once_and_totals_each_account_by_day(tmp_path):
    import csv
    from collections import defaultdict
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "columns_csv.py"

    def run():
        proc = subprocess.run([sys.executable, str(script), "--rows", "3000"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    first = run()
    assert first[0].startswith("loaded 3,000 events from transactions.csv (0 committed before)")
    expected: dict = defaultdict(lambda: defaultdict(int))
    with (tmp_path / "transactions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            sign = -1 if row["kind"] == "withdrawal" else 1
            expected[row["account"]][row["time"][:10]] += sign * int(row["amount_cents"])
    days = first[1].split(",")[1:]
    assert days == sorted({d for by_day in expected.values() for d in by_day})
    table = {line.split(",")[0]: [round(float(v) * 100) for v in line.split(",")[1:]] for line in first[2:]}
    assert table == {account: [by_day.get(d, 0) for d in days] for account, by_day in expected.items()}
    again = run()
    assert again[0].startswith("loaded 0 events from transactions.csv (3,000 committed before)")
    assert again[1:] == first[1:]


# -- the compiled twin: the same bytes and the same errors as the pure one ---------------------------------


def _speedups():
    try:
        from eventcore import _speedups
    except ImportError as exc:  # the compiled extension is part of every CI build
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
            raise
        pytest.skip(f"compiled extension not built: {exc}")
    return _speedups


class Plain(ec.Event):
    """Fields the compiled twin writes itself, and defaults it writes from the class."""

    __event_type__ = "test.columns.Plain"
    n: int
    x: float
    s: str
    b: bool
    t: dt.datetime
    maybe: int | None = None
    label: str = "none"
    extra: list[int] = []


class Renamed(ec.Event, rename="camel"):
    __event_type__ = "test.columns.Renamed"
    first_value: int
    other_text: str = "x"


class Defaults(ec.Event, omit_defaults=True):
    __event_type__ = "test.columns.Defaults"
    n: int
    s: str = "d"


def _both(cls, columns, rows=None):
    """(pure outcome, compiled outcome): the payloads, or (row, error type, message) of ColumnRowError."""
    from eventcore._pure import columns as pure_columns
    from eventcore.columns import _Plan
    from eventcore.errors import ColumnRowError

    n = len(next(iter(columns.values()))) if columns else 0
    plan = _Plan(np, cls, columns)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp)
    outcomes = []
    for encode in (pure_columns.encode_column_payloads, _speedups().encode_column_payloads):
        try:
            outcomes.append(encode(cls, pure_codec.encode_event, *plan.args, rows))
        except ColumnRowError as exc:
            outcomes.append((exc.row, type(exc.cause), str(exc.cause)))
    return outcomes


def test_the_compiled_twin_writes_plain_columns_itself(monkeypatch):
    from eventcore._pure import columns as pure_columns

    calls = []
    pure = pure_columns.encode_column_payloads
    monkeypatch.setattr(pure_columns, "encode_column_payloads", lambda *a: calls.append(a) or pure(*a))
    n = 50
    cols = {"n": np.arange(n) - 25, "x": np.linspace(-1e300, 1e-300, n), "s": np.array([f'q"\\\n\t{i}é\x01' for i in range(n)]),
            "b": np.arange(n) % 3 == 0, "t": np.datetime64("1999-12-31T23:59:59.999999") + np.arange(n) * np.timedelta64(7, "s"),
            "maybe": np.ma.MaskedArray(np.arange(n), mask=np.arange(n) % 2 == 0)}
    got = _speedups().encode_column_payloads(Plain, pure_codec.encode_event, *_plan_args(Plain, cols), np.arange(n))
    assert calls == []
    assert got == pure(Plain, pure_codec.encode_event, *_plan_args(Plain, cols), np.arange(n))
    assert got[0] == pure_codec.encode_event(Plain(n=-25, x=-1e300, s='q"\\\n\t0é\x01', b=True,
                                                   t=dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)))[1]
    renamed = {"first_value": np.arange(3)}
    got = _speedups().encode_column_payloads(Renamed, pure_codec.encode_event, *_plan_args(Renamed, renamed),
                                             np.arange(3))
    assert calls == []
    assert got == pure(Renamed, pure_codec.encode_event, *_plan_args(Renamed, renamed), np.arange(3))
    assert got[0] == b'{"firstValue":0,"otherText":"x"}'


def _plan_args(cls, columns):
    from eventcore.columns import _Plan

    return _Plan(np, cls, columns).args


@pytest.mark.parametrize("cls, columns", [
    (Plain, {"n": [1, 2], "x": [math.nan, 1.0], "s": ["a", "b"], "b": [True, False], "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, math.inf], "s": ["a", "b"], "b": [True, False], "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": ["a\x00", "b"], "b": [True, False], "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": np.array(["a", "\ud800"], dtype=object), "b": [True, False],
             "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": np.ma.MaskedArray([1, 2], mask=[False, True]), "x": [1.0, 2.0], "s": ["a", "b"], "b": [True, False],
             "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": np.array([1, "2"], dtype=object), "x": [1.0, 2.0], "s": ["a", "b"], "b": [True, False],
             "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": np.array([1, True], dtype=object), "x": np.array([1, 2.5], dtype=object), "s": ["a", "b"],
             "b": np.array([True, 0], dtype=object), "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": ["a", "b"], "b": [True, False],
             "t": np.array(["2000-01-01", "99999-01-01"], dtype="datetime64[D]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": ["a", "b"], "b": [True, False],
             "t": np.array(["2000-01-01", "NaT"], dtype="datetime64[D]")}),
    (Plain, {"n": [1, 2], "s": ["a", "b"], "b": [True, False], "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": ["a", "x" * (MAX_PAYLOAD_BYTES + 1)], "b": [True, False],
             "t": np.zeros(2, "datetime64[s]")}),
    (Plain, {"n": [1, 2], "x": [1.0, 2.0], "s": ["a", "b"], "b": [True, False], "t": np.zeros(2, "datetime64[s]"),
             "extra": np.array([[1], [2, 3]], dtype=object)}),
    (Defaults, {"n": [1, 2], "s": ["d", "e"]}),
    (Renamed, {"first_value": [1, 2], "other_text": ["a", "b"]}),
    (Stamp, {"at": np.array(["2024-01-01T00:00:00.5"], dtype="datetime64[ms]")}),
], ids=["nan", "inf", "nul", "surrogate", "masked-required", "str-in-int", "object-columns", "year-99999", "nat",
        "required-missing", "oversized", "object-field", "omit-defaults", "renamed", "naive-datetime"])
def test_the_twins_agree_on_what_they_write_and_what_they_refuse(cls, columns):
    columns = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in columns.items()}
    pure, compiled = _both(cls, columns)
    assert pure == compiled


def test_the_twins_agree_on_any_columns():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    text = st.text(max_size=12)
    rows = st.lists(st.tuples(
        st.integers(-(2 ** 63), 2 ** 63 - 1),
        st.floats(width=64) | st.sampled_from([0.0, -0.0, 1e16, 1e-7, 5e-324]),
        text,
        st.booleans(),
        st.integers(-(2 ** 62), 2 ** 62) | st.just(-(2 ** 63)),
        st.booleans(),
        st.none() | text,
    ), max_size=25)

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @hypothesis.given(rows, st.data())
    def check(rows, data):
        n = len(rows)
        cols = list(zip(*rows)) if rows else [()] * 7
        columns = {
            "n": np.array(cols[0], dtype=np.int64),
            "x": np.array(cols[1], dtype=np.float64),
            "s": np.array(cols[2], dtype=object),
            "b": np.array(cols[3], dtype=bool),
            "t": np.array(cols[4], dtype=np.int64).view("datetime64[us]"),
            "maybe": np.ma.MaskedArray(np.arange(n), mask=np.array(cols[5], dtype=bool)),
            "label": np.array(cols[6], dtype=object),
        }
        subset = data.draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True, max_size=n).map(sorted)) if n else []
        for rows_given in (None, subset):
            pure, compiled = _both(Plain, columns, rows_given)
            assert pure == compiled

    check()


def _filled(fill, plan, events, offset=3):
    """The arrays `fill` writes for `events` at `offset` into fresh columns (envelope, fields, masks)."""
    envelope, outs, masks = plan.allocate(np, len(events) + offset + 2)
    for arr in (*envelope, *outs):
        arr[...] = 0 if arr.dtype != object else None
    fill(events, offset, plan.fields, plan.kinds, envelope, outs, masks)
    return [*envelope, *outs, *masks]


def _same_arrays(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True)
        else:
            assert x.tolist() == y.tolist()


class Times(ec.Event):
    __event_type__ = "test.columns.Times"
    at: dt.datetime
    naive: Annotated[dt.datetime, msgspec.Meta(tz=False)] | None = None
    n: int | None = None
    x: float | None = None
    ok: bool | None = None
    text: str | None = None
    extra: Any = None


def _recorded(data, position, at):
    import uuid

    return ec.RecordedEvent(f"s-{position % 3}", position, position, uuid.UUID(int=position), type(data).__event_type__,
                            data, ec.Metadata(), at, 1)


def test_the_twins_fill_the_same_columns_from_the_same_events():
    from eventcore._pure import columns as pure_columns
    from eventcore.columns import read_plan

    tz = [UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(-dt.timedelta(hours=9, minutes=30))]
    events = [
        _recorded(Times(at=dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=tz[i % 3]),
                        naive=None if i % 4 == 0 else dt.datetime(1 + i * 400, 3, 1, 12),
                        n=None if i % 5 == 1 else -(2 ** 63) + i, x=None if i % 2 else i / 3,
                        ok=None if i % 3 == 2 else bool(i % 2), text=None if i == 3 else f"t{i}",
                        extra={"i": [i]} if i % 2 else None),
                  i + 1, dt.datetime(1969, 12, 31, 23, 59, 59, i, tzinfo=UTC) + dt.timedelta(days=i * 1000))
        for i in range(20)
    ] + [_recorded(Deposited(amount=5), 21, dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
         _recorded(Noted("n"), 22, dt.datetime(1, 1, 1, tzinfo=UTC))]
    plan = read_plan([Times, Deposited, Noted], ["at", "naive", "n", "x", "ok", "text", "extra", "amount"])
    pure = _filled(pure_columns.fill_columns, plan, events)
    _same_arrays(pure, _filled(_speedups().fill_columns, plan, events))
    assert pure[3][3:-2].tolist() == [(e.recorded_at - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)
                                      for e in events]


def test_the_twins_fill_the_same_datetimes_for_any_instant():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from eventcore._pure import columns as pure_columns
    from eventcore.columns import read_plan

    zones = st.sampled_from([None, UTC] + [dt.timezone(dt.timedelta(minutes=m)) for m in (-719, -60, 1, 330, 840)])

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.lists(st.tuples(st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31)),
                                         zones), min_size=1, max_size=10))
    def check(values):
        events = [_recorded(Times(at=v.replace(tzinfo=z)), i + 1, v.replace(tzinfo=UTC))
                  for i, (v, z) in enumerate(values)]
        plan = read_plan([Times], ["at"])
        _same_arrays(_filled(pure_columns.fill_columns, plan, events),
                     _filled(_speedups().fill_columns, plan, events))

    check()


def test_neither_twin_writes_past_its_arrays():
    from eventcore._pure import columns as pure_columns
    from eventcore.columns import read_plan

    plan = read_plan([Deposited], ["amount"])
    events = [_recorded(Deposited(amount=i), i + 1, dt.datetime(2024, 1, 1, tzinfo=UTC)) for i in range(4)]
    for fill in (pure_columns.fill_columns, _speedups().fill_columns):
        for size, offset in ((3, 0), (4, 1), (10, -1)):
            envelope, outs, masks = plan.allocate(np, size)
            with pytest.raises(ValueError, match="do not fit"):
                fill(events, offset, plan.fields, plan.kinds, envelope, outs, masks)
