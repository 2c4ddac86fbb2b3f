"""The store contract, run against every backend in conftest.BACKENDS."""
from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid

import pytest

import eventcore as ec
import eventcore.events
from domain import (
    Deposit,
    Deposited,
    Noted,
    Opaque,
    Transfer,
    Withdrawn,
    assert_consecutive,
    assert_decisions_saw_every_prior_event,
    assert_feed_positions,
    assert_gap_free,
    balance,
    feed_positions,
    ordinals,
)

emit = ec.emit


def _snapshot(store):
    """Everything observable about the store's contents."""
    return store.head_position(), [(e.position, e.stream_id, e.version, e.event_id) for e in store.read_all()]


# -- append basics ----------------------------------------------------------------


def test_empty_store(store):
    assert store.head_position() == 0
    assert list(store.read_all()) == []
    assert store.read_stream("nothing") == []
    assert store.stream_version("nothing") == 0
    assert store.stream_versions(["a", "b"]) == {"a": 0, "b": 0}
    assert store.read_streams(["a"]) == {"a": []}


def test_append_returns_recorded_events(store):
    out = store.append([emit("acct-1", Deposited(amount=5)), emit("acct-2", Noted(text="hi"))])
    assert [(e.stream_id, e.version, e.type) for e in out] == [
        ("acct-1", 1, "test.Deposited"),
        ("acct-2", 1, "test.Noted"),
    ]
    assert_consecutive(out)
    assert store.head_position() == out[-1].position
    assert out[0].data == Deposited(amount=5)
    assert out[1].data == Noted(text="hi")
    assert all(isinstance(e, ec.RecordedEvent) for e in out)
    # What append returned is what a reader sees.
    assert list(store.read_all()) == out


def test_gap_free_versions_and_consecutive_positions(store):
    rng = random.Random(7)
    streams = [f"s-{i}" for i in range(5)]
    for _ in range(30):
        batch = [emit(rng.choice(streams), Deposited(amount=1)) for _ in range(rng.randint(1, 4))]
        head = store.head_position()
        before = feed_positions(store)
        out = store.append(batch)
        # One append takes consecutive positions, all above the previous head, and becomes the new head.
        assert len(out) == len(batch)
        assert_consecutive(out)
        assert out[0].position > head
        assert store.head_position() == out[-1].position
        assert feed_positions(store) == before + [e.position for e in out]
    assert_gap_free(store, streams)
    assert len(feed_positions(store)) == sum(store.stream_version(s) for s in streams)


def test_several_events_to_one_stream_in_one_append(store):
    store.append([emit("a", Noted(text="0"))])
    out = store.append([emit("a", Noted(text=str(i))) for i in range(1, 4)], {"a": 1})
    assert [e.version for e in out] == [2, 3, 4]
    assert [e.data.text for e in store.read_stream("a")] == ["0", "1", "2", "3"]


def test_many_streams_in_one_append_and_one_read(store):
    streams = [f"wide-{i}" for i in range(1500)]
    out = store.append([emit(s, Noted(text=s)) for s in streams], {s: ec.NO_STREAM for s in streams})
    assert len(out) == 1500
    assert_consecutive(out)
    assert [e.stream_id for e in out] == streams
    written = store.head_position(), feed_positions(store)
    assert written == (out[-1].position, [e.position for e in out])
    got = store.read_streams(streams + ["wide-none"])
    assert len(got) == 1501 and got["wide-none"] == []
    assert all([e.data.text for e in got[s]] == [s] for s in streams)
    assert store.stream_versions(streams) == dict.fromkeys(streams, 1)
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("wide-x", Noted())], {**dict.fromkeys(streams, 1), "wide-999": 0})
    assert info.value.stream_id == "wide-999"
    assert (store.head_position(), feed_positions(store)) == written


def test_append_of_nothing_writes_nothing(store):
    assert store.append([]) == []
    assert store.head_position() == 0


def test_append_batch_positions(store):
    first = store.append([emit("b-0", Noted(text="before"))])
    streams = [f"b-{i}" for i in range(1, 6)]
    batch = [emit(streams[i % 5], Noted(text=str(i))) for i in range(23)]
    result = store.append_batch(batch, {s: ec.NO_STREAM for s in streams})
    assert result.count == 23
    assert result.stream_versions == {s: len(range(i, 23, 5)) for i, s in enumerate(streams)}
    # One call: consecutive positions, in the order given, after every earlier append's.
    assert result.first_position > first[0].position
    assert result.last_position == result.first_position + 22
    feed = list(store.read_all())
    assert [e.position for e in feed] == [first[0].position, *range(result.first_position, result.last_position + 1)]
    assert [e.data.text for e in feed[1:]] == [str(i) for i in range(23)]
    assert [e.stream_id for e in feed[1:]] == [streams[i % 5] for i in range(23)]
    assert store.head_position() == result.last_position
    later = store.append([emit("b-0", Noted(text="after"))])
    assert later[0].position > result.last_position
    assert_feed_positions(store)
    # A conflicting batch writes nothing; an empty one neither.
    before = _snapshot(store)
    with pytest.raises(ec.ConcurrencyError):
        store.append_batch([emit("b-1", Noted())], {"b-1": ec.NO_STREAM})
    assert store.append_batch([]).count == 0
    assert _snapshot(store) == before


# -- atomicity and expected versions --------------------------------------------------


def test_failed_multi_stream_append_writes_nothing(store):
    store.append([emit("a", Deposited(amount=1)), emit("b", Deposited(amount=1))])
    before = _snapshot(store)
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append(
            [emit("a", Withdrawn(amount=1)), emit("b", Deposited(amount=1)), emit("c", Deposited(amount=1))],
            {"a": 1, "b": 5, "c": ec.NO_STREAM},
        )
    err = info.value
    assert (err.stream_id, err.expected, err.actual) == ("b", 5, 1)
    assert _snapshot(store) == before
    assert store.stream_versions(["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}
    # The store still works: the next event is the feed's 3rd, above every earlier position.
    out = store.append([emit("c", Deposited(amount=1))], {"c": ec.NO_STREAM})
    assert out[0].position > before[0]
    assert feed_positions(store) == [p for p, *_ in before[1]] + [out[0].position]
    assert ordinals(store)[out[0].position] == 3
    assert_gap_free(store)


def test_conflict_on_new_stream_writes_nothing(store):
    store.append([emit("exists", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("fresh", Noted()), emit("exists", Noted())], {"fresh": 0, "exists": ec.NO_STREAM})
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("exists", 0, 1)
    assert _snapshot(store) == before
    assert store.read_stream("fresh") == []


def test_conflict_names_first_stream_in_sorted_order(store):
    store.append([emit("z", Noted()), emit("a", Noted())])
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("z", Noted()), emit("a", Noted())], {"z": 7, "a": 9})
    assert info.value.stream_id == "a"


def test_read_only_participant_conflict(store):
    # The writer read "limits" (no events then) and decided to write "acct".
    seen = store.stream_versions(["limits", "acct"])
    assert seen == {"limits": 0, "acct": 0}
    store.append([emit("limits", Noted(text="changed"))])  # someone else changes the read-only stream
    before = _snapshot(store)
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("acct", Deposited(amount=1))], seen)
    err = info.value
    assert err.stream_id == "limits"
    assert err.expected == 0
    assert err.actual == 1
    msg = str(err)
    assert "'limits'" in msg and "0" in msg and "actual version 1" in msg
    assert _snapshot(store) == before
    assert store.read_stream("acct") == []


def test_read_only_participant_exact_version_conflict_message(store):
    store.append([emit("ro", Noted()) for _ in range(3)])
    store.append([emit("ro", Noted())])
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("w", Noted())], {"ro": 3, "w": 0})
    err = info.value
    assert (err.stream_id, err.expected, err.actual) == ("ro", 3, 4)
    assert "'ro'" in str(err) and "version 3" in str(err) and "actual version 4" in str(err)
    assert isinstance(err, ec.EventCoreError)


def test_read_only_participant_unchanged_is_not_written(store):
    ro = store.append([emit("ro", Noted())])
    out = store.append([emit("w", Deposited(amount=1))], {"ro": 1, "w": ec.NO_STREAM})
    assert [(e.stream_id, e.version) for e in out] == [("w", 1)]
    assert store.stream_version("ro") == 1
    assert [(e.stream_id, e.position) for e in store.read_all()] == [("ro", ro[0].position), ("w", out[0].position)]
    assert store.head_position() == out[0].position


def test_check_only_append(store):
    store.append([emit("ro", Noted())])
    before = _snapshot(store)
    assert store.append([], {"ro": 1}) == []
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([], {"ro": 0})
    assert (info.value.stream_id, info.value.actual) == ("ro", 1)
    assert _snapshot(store) == before
    assert len(before[1]) == 1


def test_expected_exact(store):
    store.append([emit("s", Noted()), emit("s", Noted())])
    assert store.append([emit("s", Noted())], {"s": 2})[0].version == 3
    assert store.append([emit("s", Noted())], {"s": ec.ExpectedVersion.exact(3)})[0].version == 4
    for stale in (1, 3, 5):
        with pytest.raises(ec.ConcurrencyError) as info:
            store.append([emit("s", Noted())], {"s": stale})
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", stale, 4)
    assert store.stream_version("s") == 4


def test_expected_no_stream(store):
    assert ec.NO_STREAM == 0
    assert store.append([emit("s", Noted())], {"s": ec.NO_STREAM})[0].version == 1
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("s", Noted())], {"s": ec.NO_STREAM})
    assert (info.value.expected, info.value.actual) == (ec.NO_STREAM, 1)
    assert "no stream" in str(info.value)
    assert store.stream_version("s") == 1


def test_expected_any(store):
    assert store.append([emit("s", Noted())], {"s": ec.ANY})[0].version == 1
    assert store.append([emit("s", Noted())], {"s": ec.ANY})[0].version == 2
    # Unlisted written streams are not checked either.
    assert store.append([emit("s", Noted())])[0].version == 3


def test_expected_stream_exists(store):
    with pytest.raises(ec.ConcurrencyError) as info:
        store.append([emit("s", Noted())], {"s": ec.STREAM_EXISTS})
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", ec.STREAM_EXISTS, 0)
    assert store.head_position() == 0
    store.append([emit("s", Noted())])
    assert store.append([emit("s", Noted())], {"s": ec.STREAM_EXISTS})[0].version == 2
    # As a read-only participant too.
    assert store.append([emit("t", Noted())], {"s": ec.STREAM_EXISTS})[0].version == 1
    before = _snapshot(store)
    with pytest.raises(ec.ConcurrencyError):
        store.append([emit("t", Noted())], {"missing": ec.STREAM_EXISTS})
    assert _snapshot(store) == before
    assert [(sid, v) for _, sid, v, _ in before[1]] == [("s", 1), ("s", 2), ("t", 1)]


def test_expected_version_constants_are_distinct():
    assert len({ec.ANY, ec.NO_STREAM, ec.STREAM_EXISTS}) == 3
    assert ec.ExpectedVersion.ANY == ec.ANY
    assert ec.ExpectedVersion.exact(0) == ec.NO_STREAM
    with pytest.raises(ec.ValidationError):
        ec.ExpectedVersion.exact(-1)
    with pytest.raises(ec.ValidationError):
        ec.ExpectedVersion.exact(1.0)


# -- reading -----------------------------------------------------------------------


def test_read_stream_from_version_and_limit(store):
    store.append([emit("s", Noted(text=str(v))) for v in range(1, 6)])
    store.append([emit("other", Noted())])

    def versions(**kw):
        return [e.version for e in store.read_stream("s", **kw)]

    assert versions() == [1, 2, 3, 4, 5]
    assert versions(from_version=3) == [3, 4, 5]
    assert versions(limit=2) == [1, 2]
    assert versions(from_version=2, limit=2) == [2, 3]
    assert versions(from_version=4, limit=10) == [4, 5]
    assert versions(from_version=5) == [5]
    assert versions(from_version=6) == []
    assert versions(limit=0) == []
    assert [e.data.text for e in store.read_stream("s", from_version=2)] == ["2", "3", "4", "5"]
    for bad in ({"from_version": 0}, {"from_version": -1}, {"from_version": 1.0}, {"limit": -1}, {"limit": "2"}):
        with pytest.raises(ec.ValidationError):
            store.read_stream("s", **bad)


def test_read_streams(store):
    store.append([emit("a", Noted(text="a1")), emit("b", Noted(text="b1")), emit("a", Noted(text="a2"))])
    store.append([emit("x", Noted(text="x1"))])
    got = store.read_streams(["a", "empty", "b", "a"])
    assert list(got) == ["a", "empty", "b"]
    assert [(e.version, e.data.text) for e in got["a"]] == [(1, "a1"), (2, "a2")]
    assert [(e.version, e.data.text) for e in got["b"]] == [(1, "b1")]
    assert got["empty"] == []
    assert got["a"] == store.read_stream("a")
    assert store.read_streams([]) == {}
    assert store.read_streams([ec.StreamId("x")]) == {"x": store.read_stream("x")}


def _feed_fixture(store):
    """8 events over two prefixes and three types; returns them as appended."""
    out = []
    out += store.append([emit("acct-1", Deposited(amount=1)), emit("acct-2", Deposited(amount=2))])
    out += store.append([emit("log-1", Noted(text="n1"))])
    out += store.append([emit("acct-1", Withdrawn(amount=1)), emit("acct-10", Deposited(amount=3))])
    out += store.append([emit("log-1", Noted(text="n2")), emit("acct-2", Withdrawn(amount=2))])
    out += store.append([emit("acc", Deposited(amount=4))])
    return out


def test_read_all_order_and_paging(store):
    written = _feed_fixture(store)
    feed = list(store.read_all())
    assert len(feed) == 8
    assert feed == written  # the feed is exactly the appended events, in append order
    pos = assert_feed_positions(store)  # strictly increasing; head; after_position at, between and past positions
    for page_size in (1, 2, 3, 7, 8, 9, 1000):
        assert list(store.read_all(page_size=page_size)) == feed
    # after_position = the 3rd event's position: the 4th to 8th events.
    assert list(store.read_all(after_position=pos[2])) == feed[3:]
    assert list(store.read_all(after_position=pos[2], page_size=2)) == feed[3:]
    assert list(store.read_all(after_position=pos[2] + 1)) == [e for e in feed if e.position > pos[2] + 1]
    assert list(store.read_all(after_position=pos[7])) == []
    assert list(store.read_all(after_position=pos[7] + 100)) == []
    assert list(store.read_all(after_position=0)) == feed


def test_read_all_limit(store):
    _feed_fixture(store)
    pos = feed_positions(store)
    assert [e.position for e in store.read_all(limit=3)] == pos[0:3]
    assert [e.position for e in store.read_all(limit=3, page_size=2)] == pos[0:3]
    assert [e.position for e in store.read_all(limit=5, page_size=1, after_position=pos[1])] == pos[2:7]
    assert list(store.read_all(limit=0)) == []
    assert len(list(store.read_all(limit=100, page_size=3))) == 8


def _nth(store):
    """(pos, nth): pos[n - 1] is the n-th event's position; nth(events) -> each event's place in the feed."""
    pos = feed_positions(store)
    ords = ordinals(store)
    return pos, lambda events: [ords[e.position] for e in events]


def test_read_all_type_filter(store):
    _feed_fixture(store)
    pos, nth = _nth(store)
    by_name = [e.position for e in store.read_all(types=["test.Deposited"])]
    assert nth(store.read_all(types=["test.Deposited"])) == [1, 2, 5, 8]
    assert [e.position for e in store.read_all(types=[Deposited])] == by_name
    assert [e.position for e in store.read_all(types=Deposited)] == by_name
    assert [e.position for e in store.read_all(types="test.Deposited")] == by_name
    assert [e.position for e in store.read_all(types=[Deposited], page_size=1)] == by_name
    assert nth(store.read_all(types=[Withdrawn, "test.Noted"])) == [3, 4, 6, 7]
    assert nth(store.read_all(types=[Deposited], after_position=pos[1], limit=1)) == [5]
    assert list(store.read_all(types=["test.NoSuchType"])) == []
    assert list(store.read_all(types=[])) == []
    with pytest.raises(ec.ValidationError):
        store.read_all(types=[42])


def test_read_all_stream_prefix_filter(store):
    _feed_fixture(store)
    pos, nth = _nth(store)
    assert nth(store.read_all(stream_prefix="acct-")) == [1, 2, 4, 5, 7]
    assert nth(store.read_all(stream_prefix="acct-1")) == [1, 4, 5]
    assert nth(store.read_all(stream_prefix="acc")) == [1, 2, 4, 5, 7, 8]
    assert nth(store.read_all(stream_prefix="log-", page_size=1)) == [3, 6]
    assert nth(store.read_all(stream_prefix="acct-", types=[Withdrawn])) == [4, 7]
    assert nth(store.read_all(stream_prefix="acct-", after_position=pos[3], limit=2)) == [5, 7]
    assert list(store.read_all(stream_prefix="zzz")) == []
    # "%" and "_" are ordinary characters in a prefix, not wildcards.
    store.append([emit("a_b", Noted()), emit("a%c", Noted()), emit("axb", Noted())])
    assert [e.stream_id for e in store.read_all(stream_prefix="a_")] == ["a_b"]
    assert [e.stream_id for e in store.read_all(stream_prefix="a%")] == ["a%c"]


def test_read_all_unicode_prefix(store):
    store.append([emit("konto-ä-1", Noted()), emit("konto-a-1", Noted()), emit("konto-🙂-1", Noted())])
    assert [e.stream_id for e in store.read_all(stream_prefix="konto-ä")] == ["konto-ä-1"]
    assert [e.stream_id for e in store.read_all(stream_prefix="konto-🙂")] == ["konto-🙂-1"]


def test_read_all_bad_arguments(store):
    for bad in (
        {"after_position": -1},
        {"after_position": 1.5},
        {"page_size": 0},
        {"limit": -2},
        {"stream_prefix": "a\x00"},
        {"stream_prefix": 5},
    ):
        with pytest.raises(ec.ValidationError):
            list(store.read_all(**bad))


def test_read_all_sees_appends_made_between_pages(store):
    store.append([emit("s", Noted(text=str(i))) for i in range(4)])
    it = store.read_all(page_size=2)
    first = [next(it), next(it)]
    late = store.append([emit("s", Noted(text="late"))])
    rest = list(it)
    assert [e.data.text for e in first + rest] == ["0", "1", "2", "3", "late"]
    assert first + rest == list(store.read_all())
    assert rest[-1] == late[0]


def test_versions_and_head(store):
    assert store.head_position() == 0
    first = store.append([emit("a", Noted()), emit("b", Noted()), emit("a", Noted())])
    assert store.stream_version("a") == 2
    assert store.stream_version(ec.StreamId("b")) == 1
    assert store.stream_version("c") == 0
    assert store.stream_versions(["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}
    assert store.stream_versions([]) == {}
    assert store.head_position() == first[-1].position
    assert feed_positions(store) == [e.position for e in first]
    second = store.append([emit("c", Noted())])
    assert second[0].position > first[-1].position
    assert store.head_position() == second[0].position
    assert feed_positions(store) == [e.position for e in first + second]
    assert store.stream_versions(["c"]) == {"c": 1}


# -- metadata, ids, timestamps -----------------------------------------------------


def test_metadata_round_trip(store):
    md = ec.Metadata(
        correlation_id="corr-1",
        causation_id="cause-1",
        user_id="alice",
        custom={"ip": "10.0.0.1", "n": 3, "tags": ["a", "b"], "nested": {"x": None, "f": 1.5}},
    )
    per_event = ec.Metadata(user_id="bob", custom={"why": "override"})
    out = store.append(
        [
            emit("m", Noted(text="call-level")),
            emit("m", Noted(text="per-event"), metadata=per_event),
            emit("other", Noted(text="call-level too")),
        ],
        metadata=md,
    )
    assert [e.metadata for e in out] == [md, per_event, md]
    read = store.read_stream("m")
    assert [e.metadata for e in read] == [md, per_event]
    assert read[0].metadata.custom["nested"] == {"x": None, "f": 1.5}
    assert [e.metadata for e in store.read_all()] == [md, per_event, md]
    assert [e.metadata for e in store.read_streams(["other"])["other"]] == [md]


def test_metadata_defaults_to_empty(store):
    out = store.append([emit("m", Noted()), emit("m", Noted(), metadata=ec.Metadata(user_id="u"))])
    assert out[0].metadata == ec.Metadata()
    read = store.read_stream("m")
    assert read[0].metadata == ec.Metadata()
    assert read[0].metadata.custom == {}
    assert read[1].metadata == ec.Metadata(user_id="u")
    assert read[1].metadata.correlation_id is None


def test_event_ids_are_unique_uuid7(store):
    out = []
    for _ in range(10):
        out += store.append([emit(f"s-{i % 3}", Noted()) for i in range(10)])
    ids = [e.event_id for e in out]
    assert len(set(ids)) == 100
    for eid in ids:
        assert isinstance(eid, uuid.UUID)
        assert eid.version == 7
        assert eid.variant == uuid.RFC_4122
    read = list(store.read_all())
    assert [e.event_id for e in read] == ids
    assert [e.event_id for e in read] == sorted(ids)  # one writer: time order == position order
    assert store.read_stream("s-1")[0].event_id == out[1].event_id


def test_recorded_at_is_tz_aware(store):
    before_us = time.time_ns() // 1000
    out = store.append([emit("t", Noted()), emit("u", Noted())])
    after_us = time.time_ns() // 1000
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    for e in out + list(store.read_all()):
        assert isinstance(e.recorded_at, dt.datetime)
        assert e.recorded_at.tzinfo is not None
        assert e.recorded_at.utcoffset() == dt.timedelta(0)
        us = (e.recorded_at - epoch) // dt.timedelta(microseconds=1)
        assert before_us <= us <= after_us
    assert [e.recorded_at for e in store.read_all()] == [e.recorded_at for e in out]


def test_stream_ids_in_payload_encode_as_strings(store):
    store.append([emit("p", Opaque(value=ec.StreamId("acct-7")))])
    assert store.read_stream("p")[0].data == Opaque(value="acct-7")


# -- unknown event types -------------------------------------------------------------


def test_unknown_event_type_on_read_raises(store):
    class Ghost(ec.Event):
        __event_type__ = "test.conformance.Ghost"
        n: int

    out = store.append([emit("g", Noted()), emit("g", Ghost(n=1)), emit("h", Noted())])
    ghost = out[1].position
    saved = eventcore.events._registry.pop("test.conformance.Ghost")
    try:
        with pytest.raises(ec.UnknownEventTypeError) as info:
            store.read_stream("g")
        err = info.value
        assert isinstance(err, ec.SerializationError)
        assert err.type_name == "test.conformance.Ghost"
        assert err.position == ghost
        assert "test.conformance.Ghost" in str(err) and f"position {ghost}" in str(err)
        with pytest.raises(ec.UnknownEventTypeError) as info:
            list(store.read_all())
        assert info.value.position == ghost
        with pytest.raises(ec.UnknownEventTypeError):
            store.read_streams(["h", "g"])
        with pytest.raises(ec.UnknownEventTypeError):
            list(store.read_all(stream_prefix="g", page_size=1))
        # The event is not silently dropped; reads that do not touch it still work.
        assert [e.position for e in store.read_all(types=["test.Noted"])] == [out[0].position, out[2].position]
        assert len(store.read_stream("h")) == 1
        assert store.read_stream("g", limit=1)[0].position == out[0].position
    finally:
        eventcore.events._registry["test.conformance.Ghost"] = saved
    assert store.read_stream("g")[1].data == Ghost(n=1)
    assert list(store.read_all()) == out


# -- bad input is rejected and writes nothing ---------------------------------------------

BAD_STREAM_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("tab\there", id="tab"),
    pytest.param("\x1b[31m", id="escape"),
    pytest.param("del\x7f", id="del"),
    pytest.param("c1\x85", id="c1-control"),
    pytest.param("\ud800", id="lone-high-surrogate"),
    pytest.param("x\udfff", id="lone-low-surrogate"),
    pytest.param(123, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"bytes", id="bytes"),
]


def _assert_nothing_written(store, before):
    assert _snapshot(store) == before
    # ...and the store is still usable afterwards: the next event lands right after the old feed.
    head, events = before
    out = store.append([emit("after", Noted())])
    assert out[0].position > head
    assert feed_positions(store) == [p for p, *_ in events] + [out[0].position]
    assert store.head_position() == out[0].position


@pytest.mark.parametrize("bad", BAD_STREAM_IDS)
def test_bad_stream_id_in_emit_rejected(store, bad):
    with pytest.raises(ec.ValidationError):
        ec.emit(bad, Noted())
    with pytest.raises(ec.ValidationError):
        ec.StreamId(bad)


@pytest.mark.parametrize("bad", BAD_STREAM_IDS)
def test_bad_stream_id_in_expected_rejected(store, bad):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted())], {bad: ec.ANY})
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted())], {"ok": 1, bad: 0})
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("bad", BAD_STREAM_IDS)
def test_bad_stream_id_on_read_rejected(store, bad):
    with pytest.raises(ec.ValidationError):
        store.read_stream(bad)
    with pytest.raises(ec.ValidationError):
        store.read_streams(["ok", bad])
    with pytest.raises(ec.ValidationError):
        store.stream_version(bad)
    with pytest.raises(ec.ValidationError):
        store.stream_versions([bad])


@pytest.mark.parametrize("bad", BAD_STREAM_IDS)
def test_bad_stream_id_in_direct_event_to_write_rejected(store, bad):
    """ec.EventToWrite is public; building one by hand must not smuggle a bad stream id in."""
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted()), ec.EventToWrite(bad, Noted())])
    _assert_nothing_written(store, before)


NON_EVENTS = [
    pytest.param({"amount": 1}, id="dict"),
    pytest.param("Deposited", id="str"),
    pytest.param(None, id="none"),
    pytest.param(Deposit(account=ec.StreamId("a"), amount=1), id="command"),
]


@pytest.mark.parametrize("payload", NON_EVENTS)
def test_non_event_payload_rejected(store, payload):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        ec.emit("ok", payload)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted()), ec.EventToWrite(ec.StreamId("ok"), payload)])
    _assert_nothing_written(store, before)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(Deposited(amount=1), id="bare-event"),
        pytest.param(("ok", Deposited(amount=1)), id="tuple"),
        pytest.param("ok", id="str"),
        pytest.param({"stream_id": "ok", "event": Deposited(amount=1)}, id="dict"),
        pytest.param(None, id="none"),
    ],
)
def test_non_emit_items_rejected(store, item):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted()), item])
    with pytest.raises(ec.ValidationError):
        store.append([item, emit("ok", Noted())])
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("bad", [-5, -3, -(2**63), "1", 1.0, None, True, [1], 2**63], ids=repr)
def test_bad_expected_version_rejected(store, bad):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted())], {"ok": bad})
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted())], {"other": bad})
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("too_big", [2**63, 2**64, 10**30], ids=repr)
def test_expected_version_past_int64_is_a_validation_error_naming_the_stream_and_the_bound(store, too_big):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    writes = {
        "append, written stream": ("ok", lambda: store.append([emit("ok", Noted())], {"ok": too_big})),
        "append, read-only stream": ("other", lambda: store.append([emit("ok", Noted())], {"other": too_big})),
        "append_batch": ("ok", lambda: store.append_batch([emit("ok", Noted())], {"ok": too_big})),
        "ingest": ("ok", lambda: store.ingest([("ok", Noted())], expected={"ok": too_big})),
    }
    for name, (sid, write) in writes.items():
        with pytest.raises(ec.ValidationError) as info:
            write()
        message = str(info.value)
        assert f"stream {sid!r}" in message and "2**63-1" in message and str(too_big) in message, (name, message)
    with pytest.raises(ec.ValidationError, match=r"0\.\.2\*\*63-1"):
        ec.ExpectedVersion.exact(too_big)
    _assert_nothing_written(store, before)


def test_the_largest_int64_expected_version_is_a_conflict_like_any_other(store):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    assert ec.ExpectedVersion.exact(2**63 - 1) == 2**63 - 1
    for sid in ("ok", "other"):
        with pytest.raises(ec.ConcurrencyError) as info:
            store.append([emit("ok", Noted())], {sid: 2**63 - 1})
        assert (info.value.stream_id, info.value.expected, info.value.actual) == (sid, 2**63 - 1, 1 if sid == "ok" else 0)
    _assert_nothing_written(store, before)


def test_unencodable_payload_rejected(store):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.SerializationError):
        store.append([emit("ok", Noted()), emit("ok", Opaque(value=object()))])
    with pytest.raises(ec.SerializationError):
        store.append([emit("ok", Opaque(value={"k": {1, 2}, "bad": object()}))])
    _assert_nothing_written(store, before)


def test_unencodable_metadata_rejected(store):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.SerializationError):
        store.append([emit("ok", Noted())], metadata=ec.Metadata(custom={"x": object()}))
    with pytest.raises(ec.SerializationError):
        store.append([emit("ok", Noted()), emit("ok", Noted(), metadata=ec.Metadata(custom={"x": object()}))])
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("bad", [{"user_id": "x"}, "alice", 5], ids=repr)
def test_bad_metadata_type_rejected(store, bad):
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([emit("ok", Noted())], metadata=bad)
    with pytest.raises(ec.ValidationError):
        ec.emit("ok", Noted(), metadata=bad)
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("bad", [{"user_id": "x"}, "alice", 5], ids=repr)
def test_bad_metadata_in_direct_event_to_write_rejected(store, bad):
    """A hand-built ec.EventToWrite with a non-Metadata metadata is bad input: rejected, nothing written."""
    store.append([emit("ok", Noted())])
    before = _snapshot(store)
    with pytest.raises(ec.ValidationError):
        store.append([ec.EventToWrite(ec.StreamId("ok"), Noted(), bad)])
    _assert_nothing_written(store, before)


@pytest.mark.parametrize("bad", [{"user_id": "x"}, "alice", 5], ids=repr)
def test_bad_metadata_in_direct_event_to_write_never_poisons_reads(store, bad):
    """Whatever append does with it, every event in the store must stay readable."""
    store.append([emit("ok", Noted())])
    try:
        store.append([ec.EventToWrite(ec.StreamId("ok"), Noted(), bad)])
    except ec.EventCoreError:
        pass
    for e in store.read_all():
        assert isinstance(e.metadata, ec.Metadata)
    for e in store.read_stream("ok"):
        assert isinstance(e.metadata, ec.Metadata)


def test_bad_input_never_half_writes_across_streams(store):
    store.append([emit("a", Noted()), emit("b", Noted())])
    before = _snapshot(store)
    bad_batches = [
        [emit("a", Noted()), ec.EventToWrite(ec.StreamId("b"), "not an event")],
        [emit("a", Noted()), emit("b", Noted()), "junk"],
    ]
    for batch in bad_batches:
        with pytest.raises(ec.ValidationError):
            store.append(batch, {"a": 1, "b": 1})
    with pytest.raises(ec.ValidationError):
        store.append([emit("a", Noted()), emit("b", Noted())], {"a": 1, "b": 1, "c": "0"})
    _assert_nothing_written(store, before)


# -- concurrency ---------------------------------------------------------------------------

THREADS = 8


def _run_threads(target, n):
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_racing_on_one_stream_lose_no_update(store):
    per_thread = 25
    policy = ec.RetryPolicy(max_retries=100_000, base_delay=0.0002, max_delay=0.01)
    succeeded = []
    attempts = []
    account = ec.StreamId("hot-account")

    def work(i):
        for _ in range(per_thread):
            result = ec.execute(store, Deposit(account=account, amount=1), retry=policy, timeout=None)
            assert len(result.events) == 1
            succeeded.append(result.events[0].version)
            attempts.append(result.attempts)

    _run_threads(work, THREADS)
    total = THREADS * per_thread
    events = store.read_stream(account)
    assert [e.version for e in events] == list(range(1, total + 1))
    assert sorted(succeeded) == list(range(1, total + 1))  # every version handed out exactly once
    assert sum(e.data.amount for e in events) == len(succeeded) == total
    assert store.stream_version(account) == total
    # No lost update: every decision was made on a state that included every earlier deposit.
    assert [e.data.balance for e in events] == list(range(1, total + 1))
    assert_gap_free(store)


def test_threads_appending_with_stale_versions_never_duplicate(store):
    """Raw appends with expected versions: exactly one writer wins each version."""
    rounds = 20
    wins = []

    def work(i):
        for _ in range(rounds):
            v = store.stream_version("race")
            try:
                out = store.append([emit("race", Noted(text=f"{i}:{v}"))], {"race": v})
            except ec.ConcurrencyError as exc:
                assert exc.stream_id == "race"
                assert exc.expected == v and exc.actual > v
            else:
                assert out[0].version == v + 1  # a win lands exactly on the version expected
                wins.append(out[0].version)

    _run_threads(work, THREADS)
    events = store.read_stream("race")
    assert sorted(wins) == [e.version for e in events] == list(range(1, len(events) + 1))
    # Each stored event was written by a writer that saw exactly the version before it.
    assert [int(e.data.text.split(":")[1]) for e in events] == list(range(len(events)))


def test_random_transfers_conserve_money(store):
    accounts = [ec.StreamId(f"acct-{i}") for i in range(10)]
    opening = 100
    store.append([emit(a, Deposited(amount=opening)) for a in accounts])
    policy = ec.RetryPolicy(max_retries=100_000, base_delay=0.0002, max_delay=0.01)
    outcomes = {"ok": 0, "refused": 0}
    lock = threading.Lock()
    workers, per_worker = 4, 40

    def work(i):
        rng = random.Random(1000 + i)
        for _ in range(per_worker):
            src, dst = rng.sample(accounts, 2)
            amount = rng.randint(1, 80)
            try:
                result = ec.execute(store, Transfer(source=src, target=dst, amount=amount), retry=policy, timeout=None)
            except ec.BusinessRuleViolation as exc:
                assert "insufficient funds" in str(exc)
                key = "refused"
            else:
                assert [e.stream_id for e in result.events] == [src, dst]
                key = "ok"
            with lock:
                outcomes[key] += 1

    _run_threads(work, workers)
    assert outcomes["ok"] + outcomes["refused"] == workers * per_worker
    assert outcomes["ok"] > 0
    balances = {a: balance(store, a) for a in accounts}
    assert sum(balances.values()) == opening * len(accounts)
    assert all(b >= 0 for b in balances.values()), balances  # no write skew past the business rule
    feed = feed_positions(store)
    assert len(feed) == len(accounts) + 2 * outcomes["ok"]
    assert store.head_position() == feed[-1]
    withdrawn = [e for e in store.read_all(types=[Withdrawn])]
    # Deposits after the opening ones (the first len(accounts) events of the feed).
    deposited = [e for e in store.read_all(types=[Deposited], after_position=feed[len(accounts) - 1])]
    assert len(withdrawn) == len(deposited) == outcomes["ok"]
    for a in accounts:
        assert_decisions_saw_every_prior_event(store, a)
    # Each transfer's two events are adjacent in the feed (one atomic append).
    for w in withdrawn:
        d = list(store.read_all(after_position=w.position, limit=1))[0]
        assert isinstance(d.data, Deposited) and d.data.amount == w.data.amount
        assert d.position == w.position + 1  # one append: consecutive positions
    assert_gap_free(store, accounts)
