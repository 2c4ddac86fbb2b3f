"""Parity and robustness of the two hot-path implementations (Cython `eventcore._speedups`
and the pure-Python twins in `eventcore._pure`): same bytes, same results, same error types,
and no crash on hostile input (hypothesis-driven fuzzing)."""
from __future__ import annotations

import os
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eventcore as ec
from eventcore import _pure
from eventcore._impl import HOT_PATH_NAMES
from eventcore._pure import codec as P_codec, copy as P_copy, ids as P_ids, versions as P_versions

try:
    from eventcore import _speedups as C
except ImportError as exc:  # the compiled extension is part of every CI build
    if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
        raise
    pytest.skip(f"compiled extension not built: {exc}", allow_module_level=True)

PY = {name: getattr(_pure, name) for name in HOT_PATH_NAMES}
IMPLS = {"python": PY, "c": {name: getattr(C, name) for name in PY}}


class Item(ec.Event):
    __event_type__ = "speedups.Item"
    n: int
    text: str
    tags: list[str] = []


class Blob(ec.Event):
    __event_type__ = "speedups.Blob"
    value: object = None


def test_same_public_names():
    assert set(PY) <= set(dir(C))
    assert ec.__impl__ in ("c", "python")


def test_impl_switch_reports_what_runs():
    from eventcore import _impl

    if os.environ.get("EVENTCORE_IMPL") == "python":
        assert _impl.IMPL == "python" and _impl.encode_copy_rows is P_copy.encode_copy_rows
    else:
        assert _impl.IMPL == "c" and _impl.encode_copy_rows is C.encode_copy_rows


# -- parity on ordinary input -------------------------------------------------------------------

def _columns(n):
    sids = [f"stream-{i % 7}-é" for i in range(n)]
    events = [Item(i, "x" * (i % 50), ["a", "ü"] if i % 2 else []) for i in range(n)]
    mds = [None if i % 3 else ec.Metadata(user_id="u", custom={"i": i}) for i in range(n)]
    return sids, events, mds


def test_encode_copy_rows_parity():
    sids, events, mds = _columns(500)
    types = [e.__event_type__ for e in events]
    payloads = [P_codec.encode_event(e)[1] for e in events]
    md_bytes = [P_codec.encode_metadata(m) for m in mds]
    ids = P_ids.new_event_ids(len(sids))
    versions = P_versions.assign_versions(sids, {})
    out = {}
    for name, impl in IMPLS.items():
        buf = bytearray(b"prefix")
        impl["encode_copy_rows"](buf, 12345 << 20, sids, versions, ids, types, [1 + i % 3 for i in range(len(sids))],
                                 payloads, md_bytes, 1_700_000_000_123_456)
        out[name] = bytes(buf)
    assert out["python"] == out["c"]
    assert out["c"].startswith(b"prefix")


def test_encode_copy_rows_layout_is_postgres_binary_copy():
    buf = bytearray()
    eid = uuid.UUID("01890000-0000-7000-8000-000000000001").bytes
    C.encode_copy_rows(buf, 7, ["s"], [3], [eid], ["T"], [300], [b"{}"], [None], 946_684_800_000_001)
    expected = (
        struct.pack(">h", 9) + struct.pack(">iq", 8, 7) + struct.pack(">i", 1) + b"s" + struct.pack(">iq", 8, 3)
        + struct.pack(">i", 16) + eid + struct.pack(">i", 1) + b"T" + struct.pack(">i", 3) + b"\x01{}"
        + struct.pack(">i", -1) + struct.pack(">iq", 8, 1) + struct.pack(">ih", 2, 300)
    )
    assert bytes(buf) == expected


def test_encode_copy_events_parity_with_ids_masked():
    sids, events, mds = _columns(300)
    results = {}
    for name, impl in IMPLS.items():
        heads = {"stream-1-é": 10}
        buf = bytearray()
        ids = impl["encode_copy_events"](buf, 99, sids, events, mds, heads, 1_700_000_000_000_000)
        assert len(ids) == len(sids) and all(len(i) == 16 and i[6] >> 4 == 7 for i in ids)
        masked = bytes(buf)
        for i in ids:
            masked = masked.replace(i, b"\0" * 16, 1)
        results[name] = (masked, heads)
    assert results["python"] == results["c"]
    assert results["c"][1]["stream-1-é"] == 10 + sum(1 for s in sids if s == "stream-1-é")


def test_encode_copy_events_equals_encode_copy_rows_of_the_same_rows():
    sids, events, mds = _columns(50)
    for impl in IMPLS.values():
        buf = bytearray()
        heads: dict = {}
        ids = impl["encode_copy_events"](buf, 1, sids, events, mds, heads, 5)
        again = bytearray()
        impl["encode_copy_rows"](
            again, 1, sids, P_versions.assign_versions(sids, {}), ids, [e.__event_type__ for e in events],
            [e.__event_version__ for e in events], [P_codec.encode_event(e)[1] for e in events],
            [P_codec.encode_metadata(m) for m in mds], 5,
        )
        assert bytes(buf) == bytes(again)


def test_decode_rows_and_codec_parity():
    sids, events, mds = _columns(200)
    ids = P_ids.new_event_ids(len(sids))
    rows = [
        (i + 1, sids[i], i + 1, ids[i], events[i].__event_type__, P_codec.encode_event(events[i])[1],
         P_codec.encode_metadata(mds[i]), 1_700_000_000_000_000 + i, events[i].__event_version__)
        for i in range(len(sids))
    ]
    py, c = PY["decode_rows"](rows), IMPLS["c"]["decode_rows"](rows)
    assert py == c
    assert c[5].data == events[5] and c[3].metadata == mds[3] and c[0].event_id == uuid.UUID(bytes=ids[0])
    for e in events[:20]:
        assert PY["encode_event"](e) == C.encode_event(e)
    for m in mds[:20]:
        assert PY["encode_metadata"](m) == C.encode_metadata(m)


def test_version_work_parity():
    for impl in IMPLS.values():
        heads = {"a": 2}
        assert impl["assign_versions"](["a", "b", "a", "c", "b"], heads) == [3, 1, 4, 1, 2]
        assert heads == {"a": 4, "b": 2, "c": 1}
        impl["check_expected_versions"]({"a": 4, "b": ec.ANY, "c": ec.STREAM_EXISTS, "z": ec.NO_STREAM}, heads)
        with pytest.raises(ec.ConcurrencyError) as info:
            impl["check_expected_versions"]({"z": 1, "a": 3}, heads)
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("a", 3, 4)
        with pytest.raises(ec.ConcurrencyError):
            impl["check_expected_versions"]({"nope": ec.STREAM_EXISTS}, heads)


def test_event_ids_are_uuid7_and_increasing():
    for impl in IMPLS.values():
        ids = impl["new_event_ids"](5000) + impl["new_event_ids"](3)
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        u = uuid.UUID(bytes=ids[0])
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert impl["new_event_ids"](0) == []


# -- bad input: typed errors, buffer untouched, same behaviour in both ----------------------------

BAD_ROWS = [
    ("stream not str", dict(stream_ids=[b"s"])),
    ("lone surrogate", dict(stream_ids=["\ud800"])),
    ("version too big", dict(versions=[1 << 64])),
    ("version not int", dict(versions=["1"])),
    ("short id", dict(event_ids=[b"123"])),
    ("id not bytes", dict(event_ids=["x" * 16])),
    ("type not str", dict(types=[None])),
    ("payload not bytes", dict(payloads=["{}"])),
    ("metadata not bytes", dict(metadatas=[{}])),
    ("ragged", dict(types=["T", "T"])),
    ("type version 0", dict(type_versions=[0])),
    ("type version too big", dict(type_versions=[32768])),
    ("type version not int", dict(type_versions=[True])),
    ("type versions ragged", dict(type_versions=[1, 1])),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("label, override", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_encode_copy_rows_rejects_bad_input(impl, label, override):
    cols = dict(stream_ids=["s"], versions=[1], event_ids=[b"0" * 16], types=["T"], type_versions=[1],
                payloads=[b"{}"], metadatas=[None])
    cols.update(override)
    buf = bytearray(b"keep")
    with pytest.raises(ec.SerializationError):
        IMPLS[impl]["encode_copy_rows"](buf, 1, cols["stream_ids"], cols["versions"], cols["event_ids"],
                                        cols["types"], cols["type_versions"], cols["payloads"], cols["metadatas"], 0)
    assert buf == bytearray(b"keep")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_encode_copy_events_rejects_bad_input_and_leaves_state(impl):
    f = IMPLS[impl]["encode_copy_events"]
    cases = [
        (["s", "s"], [Item(1, "a"), object()], [None, None]),
        (["s", "s"], [Item(1, "a"), Blob(value=object())], [None, None]),
        (["s", "s"], [Item(1, "a"), Blob(value=float("nan"))], [None, ec.Metadata(custom={"x": object()})]),
        (["s", "\udfff"], [Item(1, "a"), Item(2, "b")], [None, None]),
        (["s"], [Item(1, "a")], ["not metadata"]),
        (["s"], [Item(1, "a"), Item(2, "b")], [None]),
    ]
    for sids, events, mds in cases:
        buf, heads = bytearray(b"keep"), {"s": 4}
        with pytest.raises(ec.SerializationError):
            f(buf, 1, sids, events, mds, heads, 0)
        assert buf == bytearray(b"keep") and heads == {"s": 4}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_rows_rejects_corrupt_rows(impl):
    f = IMPLS[impl]["decode_rows"]
    good = (1, "s", 1, b"0" * 16, "speedups.Item", b'{"n":1,"text":"a"}', None, 0, 1)
    assert f([good])[0].data == Item(1, "a")
    corrupt = [
        good[:8],
        good[:8] + (None,),                                  # no type version
        good[:8] + (0,),                                     # a type version below 1
        good[:8] + (2,),                                     # newer than the class
        good[:5] + (b'{"n":"x","text":"a"}',) + good[6:],   # wrong type for the event class
        good[:5] + (b'{"n":1,"text":"\xff"}',) + good[6:],  # invalid UTF-8
        good[:5] + (b'{"n":1,',) + good[6:],                # truncated
        good[:5] + (None,) + good[6:],
        good[:3] + (b"short",) + good[4:],
        good[:6] + (b"[1,2]",) + good[7:],                   # metadata of the wrong shape
        good[:7] + (10**30, 1),                              # recorded_at out of range
        good[:4] + (None,) + good[5:],
    ]
    for row in corrupt:
        with pytest.raises(ec.SerializationError):
            f([row])
    with pytest.raises(ec.UnknownEventTypeError):
        f([good[:4] + ("speedups.NoSuchType",) + good[5:]])


@pytest.mark.parametrize("data, metadata, problem", [
    (b'{"n":1,"text":"\xff"}', None, "payload is not valid UTF-8 (byte 15: b'\\xff')"),
    (b'{"n":1,"text":"ok \xe2\x82"}', None, "payload is not valid UTF-8 (byte 18: b'\\xe2')"),
    (b'{"n":1,"text":"\xed\xa0\x80"}', None, "payload is not valid UTF-8 (byte 15: b'\\xed')"),  # a surrogate
    (b'{"n":1,"text":"a"}', b'{"user_id":"u\x80"}', "metadata is not valid UTF-8 (byte 13: b'\\x80')"),
    (b'{"n":1,"text":"a"}', b'{"custom":{"k\xc3":1}}', "metadata is not valid UTF-8 (byte 13: b'\\xc3')"),
])
def test_decode_rows_names_the_first_byte_that_is_not_utf8_identically(data, metadata, problem):
    row = (7, "s", 2, b"0" * 16, "speedups.Item", data, metadata, 0, 1)
    messages = []
    for impl in IMPLS.values():
        with pytest.raises(ec.SerializationError) as info:
            impl["decode_rows"]([row])
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0] == f"cannot decode event of type 'speedups.Item' at position 7 (stream 's', version 2): {problem}"


# -- fuzzing: arbitrary values in every column never crash, and both implementations agree ---------

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=20), st.binary(max_size=40), st.floats(), st.lists(st.integers(), max_size=3),
)


def _outcome(f, *args):
    buf = bytearray(b"x")
    try:
        result = f(buf, *args)
    except ec.SerializationError:
        return ("error", bytes(buf))
    return ("ok", bytes(buf), result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sid=st.one_of(st.text(max_size=30), anything), version=anything, eid=st.one_of(st.binary(min_size=14, max_size=18), anything),
    typ=st.one_of(st.text(max_size=10), anything), data=st.one_of(st.binary(max_size=64), anything),
    md=st.one_of(st.none(), st.binary(max_size=16), anything), position=st.integers(min_value=-(2**63), max_value=2**63 - 2),
    tv=st.one_of(st.integers(min_value=-2, max_value=40000), anything),
)
def test_fuzz_encode_copy_rows(sid, version, eid, typ, data, md, position, tv):
    args = (position, [sid], [version], [eid], [typ], [tv], [data], [md], 0)
    py = _outcome(PY["encode_copy_rows"], *args)
    c = _outcome(IMPLS["c"]["encode_copy_rows"], *args)
    assert py == c


@settings(max_examples=300, deadline=None)
@given(
    position=anything, sid=anything, version=anything, eid=st.one_of(st.binary(max_size=20), anything),
    type_name=st.one_of(st.sampled_from(["speedups.Item", "speedups.Blob"]), anything),
    data=st.one_of(st.binary(max_size=80), st.sampled_from([b'{"n":1,"text":"a"}', b'{"value":[1,{}]}']), anything),
    md=st.one_of(st.none(), st.binary(max_size=30), st.just(b'{"user_id":"u"}'), anything),
    at=st.one_of(st.integers(min_value=-(2**64), max_value=2**64), anything),
    tv=st.one_of(st.integers(min_value=-1, max_value=3), anything),
)
def test_fuzz_decode_rows(position, sid, version, eid, type_name, data, md, at, tv):
    row = (position, sid, version, eid, type_name, data, md, at, tv)
    outcomes = []
    for impl in IMPLS.values():
        try:
            outcomes.append(("ok", impl["decode_rows"]([row])))
        except ec.SerializationError as exc:
            outcomes.append(("error", type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def _check_outcome(f, expected, current):
    try:
        f(dict(expected), dict(current))
    except ec.ConcurrencyError as exc:
        return ("conflict", exc.stream_id, repr(exc.expected), repr(exc.actual), str(exc))
    except Exception as exc:  # noqa: BLE001 - any other error is a difference to report
        return ("error", type(exc).__name__, str(exc))
    return ("ok",)


@pytest.mark.parametrize("want, have", [
    (2**63, 0), (2**63, 2**63), (2**64, 5), (-(2**63) - 1, 0), (2**63 - 1, 2**63 - 1), (2**63 - 1, 2**63),
    (5, 2**63), (-1, 2**70), (-2, 2**70), (-2, 0), (3.0, 3), (True, 1), (None, 0), ("1", 1), (float("nan"), 0),
], ids=repr)
def test_check_expected_versions_twins_agree_on_values_out_of_int64_and_not_ints(want, have):
    outcomes = [_check_outcome(impl["check_expected_versions"], {"a": 1, "s": want}, {"a": 1, "s": have})
                for impl in IMPLS.values()]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] in ("ok", "conflict")


versions_or_anything = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([-2, -1, 0, 1]),
                                 anything)


@settings(max_examples=300, deadline=None)
@given(expected=st.dictionaries(st.sampled_from("abc"), versions_or_anything, max_size=3),
       current=st.dictionaries(st.sampled_from("abc"), versions_or_anything, max_size=3))
def test_fuzz_check_expected_versions(expected, current):
    outcomes = [_check_outcome(impl["check_expected_versions"], expected, current) for impl in IMPLS.values()]
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_int_versions_and_heads_at_the_limit_are_rejected(impl):
    rows = IMPLS[impl]["encode_copy_rows"]
    with pytest.raises(ec.SerializationError):
        rows(bytearray(), 1, ["s"], [2.7], [b"0" * 16], ["T"], [1], [b"{}"], [None], 0)
    events = IMPLS[impl]["encode_copy_events"]
    for head in (1.9, "3", 2**63 - 1, 2**64):
        buf, heads = bytearray(), {"s": head}
        with pytest.raises(ec.SerializationError):
            events(buf, 1, ["s"], [Item(1, "a")], [None], heads, 0)
        assert buf == bytearray() and heads == {"s": head}
