"""An event field annotated `ec.StreamId` (a link to another stream) is written as its str and read back as a
StreamId, on every backend and through every reader; a stored value that is no valid stream id is a typed
error, never a str passed off as a StreamId."""
from __future__ import annotations

import pytest

import eventcore as ec


class Linked(ec.Event):
    __event_type__ = "streamidfields.Linked"
    other: ec.StreamId
    maybe: ec.StreamId | None = None


def test_a_stream_id_field_reads_back_as_a_stream_id(store):
    store.append([ec.emit("a", Linked(other=ec.StreamId("b"))),
                  ec.emit("a", Linked(other=ec.StreamId("c"), maybe=ec.StreamId("d")))])
    for events in (list(store.read_all()), store.read_stream("a"), store.read_streams(["a"])["a"]):
        assert [(type(e.data.other), e.data.other, e.data.maybe) for e in events] == [
            (ec.StreamId, "b", None), (ec.StreamId, "c", "d")]
        assert type(events[1].data.maybe) is ec.StreamId


@pytest.mark.parametrize("stored", [b'{"other": ""}', b'{"other": "x\\u0007y"}', b'{"other": 5}'])
def test_a_stored_value_that_is_no_stream_id_is_refused(store, stored):
    with pytest.raises((ec.ValidationError, ec.SerializationError)):
        store.append([ec.emit("a", ec.RawEvent("streamidfields.Linked", stored))])
        list(store.read_all())
