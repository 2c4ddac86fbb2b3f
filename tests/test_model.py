"""The core model: stream ids, metadata, event type names, the implementation switch, event ids."""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import uuid

import msgspec
import pytest

import eventcore as ec
import eventcore.events
from eventcore import _impl
from domain import Deposited, Noted

# -- StreamId -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "account-1", "x" * 255, "with space", "Ünïcödé-账户", "emoji-🙂", "a/b:c#d", "0"],
    ids=lambda v: repr(v)[:20],
)
def test_stream_id_accepts(value):
    sid = ec.StreamId(value)
    assert sid == value
    assert isinstance(sid, str)
    assert ec.StreamId(sid) is sid
    assert hash(sid) == hash(value)
    assert {value: 1}[sid] == 1


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 256,
        "x" * 10_000,
        "a\x00b",
        "\x00",
        "line\nbreak",
        "cr\r",
        "\t",
        "\x1f",
        "\x7f",
        "\x80",
        "\x9f",
        "\ud800",
        "ok\udfffok",
        123,
        1.5,
        None,
        b"abc",
        ["a"],
    ],
    ids=lambda v: repr(v)[:20],
)
def test_stream_id_rejects(value):
    with pytest.raises(ec.ValidationError):
        ec.StreamId(value)


def test_stream_id_error_says_why():
    with pytest.raises(ec.ValidationError, match="empty"):
        ec.StreamId("")
    with pytest.raises(ec.ValidationError, match="255"):
        ec.StreamId("y" * 300)
    with pytest.raises(ec.ValidationError, match="index 3"):
        ec.StreamId("abc\x00")
    with pytest.raises(ec.ValidationError, match="int"):
        ec.StreamId(7)


def test_validation_error_is_value_error():
    assert issubclass(ec.ValidationError, ValueError)
    assert issubclass(ec.ValidationError, ec.EventCoreError)


def test_error_hierarchy():
    for cls in (
        ec.BusinessRuleViolation,
        ec.ValidationError,
        ec.ConcurrencyError,
        ec.UndeclaredStreamError,
        ec.SerializationError,
        ec.UnknownEventTypeError,
        ec.StoreUnavailableError,
        ec.CommandTimeoutError,
    ):
        assert issubclass(cls, ec.EventCoreError), cls


def test_errors_pickle_round_trip():
    errs = [
        ec.ConcurrencyError("s", 3, 4),
        ec.UndeclaredStreamError("x", "Cmd", ["a"]),
        ec.UnknownEventTypeError("T", 5, "s"),
    ]
    for err in errs:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
    c = pickle.loads(pickle.dumps(errs[0]))
    assert (c.stream_id, c.expected, c.actual) == ("s", 3, 4)


# -- Metadata ----------------------------------------------------------------------------------


def test_a_version_conflict_names_the_expected_version_in_words():
    words = {ec.ANY: "expected any version,", ec.NO_STREAM: "expected no stream (version 0),",
             ec.STREAM_EXISTS: "expected an existing stream,", 7: "expected version 7,"}
    for expected, text in words.items():
        assert text in str(ec.ConcurrencyError("s", expected, 3)), expected


def test_metadata_defaults():
    md = ec.Metadata()
    assert md.correlation_id is None
    assert md.causation_id is None
    assert md.user_id is None
    assert md.custom == {}
    assert ec.Metadata() == ec.Metadata()
    assert ec.Metadata(user_id="a") != ec.Metadata()
    # The default custom dict is not shared between instances.
    assert ec.Metadata().custom is not ec.Metadata().custom


def test_metadata_is_frozen():
    md = ec.Metadata(user_id="a")
    with pytest.raises(AttributeError):
        md.user_id = "b"


# -- Event type names ----------------------------------------------------------------------------


class PinnedName(ec.Event):
    __event_type__ = "test.model.Pinned"
    x: int = 0


class ModelDefaultNamedEvent(ec.Event):
    y: int = 0


class ChildOfPinned(PinnedName):
    z: int = 0


def test_event_type_pinned_name():
    assert PinnedName.__event_type__ == "test.model.Pinned"
    assert eventcore.events.event_class("test.model.Pinned") is PinnedName
    assert Deposited.__event_type__ == "test.Deposited"


def test_event_type_defaults_to_class_name_not_module_path():
    assert ModelDefaultNamedEvent.__event_type__ == "ModelDefaultNamedEvent"
    assert eventcore.events.event_class("ModelDefaultNamedEvent") is ModelDefaultNamedEvent


def test_subclass_does_not_inherit_parent_type_name():
    assert ChildOfPinned.__event_type__ == "ChildOfPinned"
    assert eventcore.events.event_class("test.model.Pinned") is PinnedName
    assert eventcore.events.event_class("ChildOfPinned") is ChildOfPinned


def test_duplicate_type_name_across_classes_raises():
    with pytest.raises(TypeError, match="test.model.Pinned"):

        class Impostor(ec.Event):
            __event_type__ = "test.model.Pinned"

    assert eventcore.events.event_class("test.model.Pinned") is PinnedName

    with pytest.raises(TypeError):

        class Deposited(ec.Event):  # a different class claiming domain.Deposited's pinned name
            __event_type__ = "test.Deposited"
            amount: int

    assert eventcore.events.event_class("test.Deposited") is not None
    assert eventcore.events.event_class("test.Deposited").__module__ == "domain"


def test_duplicate_default_name_raises():
    # A second class named like an existing default-named class, in another scope.
    with pytest.raises(TypeError):
        type("ModelDefaultNamedEvent", (ec.Event,), {"__module__": "elsewhere"})
    assert eventcore.events.event_class("ModelDefaultNamedEvent") is ModelDefaultNamedEvent


@pytest.mark.parametrize("bad", ["x" * 256, 5])
def test_bad_event_type_name_raises(bad):
    with pytest.raises(TypeError):
        type("BadNameEvent", (ec.Event,), {"__event_type__": bad})


def test_events_are_msgspec_structs():
    assert issubclass(ec.Event, msgspec.Struct)
    assert issubclass(ec.Command, msgspec.Struct)
    assert msgspec.json.decode(msgspec.json.encode(Deposited(amount=3)), type=Deposited) == Deposited(amount=3)


def test_emit_binds_stream():
    item = ec.emit("s", Noted(text="x"))
    assert isinstance(item, ec.EventToWrite)
    assert item.stream_id == "s" and type(item.stream_id) is ec.StreamId
    assert item.event == Noted(text="x")
    assert item.metadata is None


# -- the implementation switch ------------------------------------------------------------------

_HAS_EXTENSION = importlib.util.find_spec("eventcore._speedups") is not None


def _import_in_subprocess(impl: str | None):
    env = dict(os.environ)
    env.pop("EVENTCORE_IMPL", None)
    if impl is not None:
        env["EVENTCORE_IMPL"] = impl
    return subprocess.run(
        [sys.executable, "-c", "import eventcore; print(eventcore.__impl__)"],
        env=env,
        capture_output=True,
        text=True,
    )


def test_impl_is_reported():
    assert ec.__impl__ in ("python", "c")
    assert ec.__impl__ == _impl.IMPL
    requested = os.environ.get("EVENTCORE_IMPL", "").strip().lower()
    if requested:
        assert ec.__impl__ == requested
    if not _HAS_EXTENSION:
        assert ec.__impl__ == "python"


def test_impl_python_is_selectable():
    proc = _import_in_subprocess("python")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python"


_HIDE_EXTENSION = (
    "import sys\n"
    "class _Hide:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'eventcore._speedups':\n"
    "            raise ImportError('hidden by the test: no compiled extension')\n"
    "sys.meta_path.insert(0, _Hide())\n"
)


def _import_without_extension(impl):
    env = dict(os.environ)
    env.pop("EVENTCORE_IMPL", None)
    if impl is not None:
        env["EVENTCORE_IMPL"] = impl
    return subprocess.run(
        [sys.executable, "-c", _HIDE_EXTENSION + "import eventcore; print(eventcore.__impl__)"],
        env=env, capture_output=True, text=True,
    )


def test_impl_c_without_extension_is_an_import_error():
    proc = _import_without_extension("c")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "EVENTCORE_IMPL=c" in proc.stderr
    assert "_speedups" in proc.stderr
    # Empty means best available: Python when the extension cannot load.
    proc = _import_without_extension("")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python"


def test_impl_c_with_extension_loads_it():
    proc = _import_in_subprocess("c")
    if not _HAS_EXTENSION:
        assert proc.returncode != 0 and "ImportError" in proc.stderr
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI builds the compiled extension; it is missing", pytrace=False)
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "c"
    proc = _import_in_subprocess("")
    assert proc.stdout.strip() == "c"


def test_impl_bogus_is_an_import_error():
    proc = _import_in_subprocess("bogus")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "bogus" in proc.stderr


# -- event ids -----------------------------------------------------------------------------


def _as_uuids(raw):
    return [uuid.UUID(bytes=b) for b in raw]


def test_new_event_ids_are_uuid7_and_strictly_increasing():
    ids = []
    for n in (1, 5, 100, 1, 3):
        batch = _impl.new_event_ids(n)
        assert len(batch) == n
        assert all(isinstance(b, bytes) and len(b) == 16 for b in batch)
        ids += batch
    assert all(a < b for a, b in zip(ids, ids[1:]))  # within and across calls (bytes order == uuid order)
    for u in _as_uuids(ids):
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
    assert _impl.new_event_ids(0) == []


def test_new_event_ids_stay_increasing_past_the_per_millisecond_counter():
    # More ids than the 12-bit counter holds in one millisecond.
    ids = _impl.new_event_ids(10_000) + _impl.new_event_ids(5_000) + _impl.new_event_ids(1)
    assert len(set(ids)) == len(ids)
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert {u.version for u in _as_uuids(ids)} == {7}


def test_new_event_ids_carry_a_plausible_timestamp():
    import time

    before = time.time_ns() // 1_000_000
    (raw,) = _impl.new_event_ids(1)
    ms = int.from_bytes(raw[:6], "big")
    # The id's timestamp is never before the moment it was asked for.
    assert ms >= before
