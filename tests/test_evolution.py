"""Events that change shape: type versions stored with every event, upcaster chains, renamed types
(aliases), and reading events no class describes (`decode=False`), on every backend and under both
implementations of the hot path (the suite runs under each).

Old data is written by an earlier class definition: for SQLite and PostgreSQL by a child process
running an earlier release of the application (tests/evolution_worker.py), read by another child
running a later one; the memory store lives in one process, so there each release's classes are
defined in a registry scope of their own (`isolated_registry`) over the same store.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eventcore as ec
from eventcore import _impl
from eventcore.events import isolated_registry
from eventcore.formats import COPY_HEADER, COPY_TRAILER

TESTS = Path(__file__).parent
PY = sys.executable


def _worker(release: int, *argv) -> tuple[int, list]:
    proc = subprocess.run([PY, "evolution_worker.py", str(release), *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=TESTS)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    """A store URL child processes can share: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'evo.db'}"
    dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


# -- old data written by earlier releases, read by later ones (child processes) ---------------------


def test_three_releases_rename_a_type_and_a_field_and_every_old_event_stays_readable(url):
    for release in (1, 2, 3):
        assert _worker(release, "write", url, f"acct-{release}", 2)[0] == 0
    rc, events = _worker(3, "read", url)
    assert rc == 0, events
    assert [(e["stream"], e["type"], e["type_version"], e["class"], e["data"]) for e in events] == [
        ("acct-1", "evo.Deposited", 3, "Deposited", {"amount_cents": 100, "currency": "EUR"}),
        ("acct-1", "evo.Deposited", 3, "Deposited", {"amount_cents": 200, "currency": "EUR"}),
        ("acct-2", "evo.Deposited", 3, "Deposited", {"amount_cents": 101, "currency": "EUR"}),
        ("acct-2", "evo.Deposited", 3, "Deposited", {"amount_cents": 201, "currency": "EUR"}),
        ("acct-3", "evo.Deposited", 3, "Deposited", {"amount_cents": 102, "currency": "USD"}),
        ("acct-3", "evo.Deposited", 3, "Deposited", {"amount_cents": 202, "currency": "USD"}),
    ]
    # Release 2 reads releases 1 and 2 (the alias and its upcaster), and says it is too old for release 3's.
    rc, out = _worker(2, "read", url)
    assert rc == 1 and out[0]["error"] == "EventVersionError"
    assert "'evo.Deposited' version 3 at position" in out[0]["message"] and "acct-3" in out[0]["message"]
    assert "which is at version 2" in out[0]["message"]
    # Release 1 knows no "evo.Deposited" at all; read raw, every event is there as stored.
    rc, out = _worker(1, "read", url)
    assert rc == 1 and out[0]["error"] == "UnknownEventTypeError"
    rc, raw = _worker(1, "raw", url)
    assert rc == 0
    assert [(e["type"], e["type_version"], e["class"], e["data"]) for e in raw] == [
        ("Deposited", 1, "dict", {"amount": 1}), ("Deposited", 1, "dict", {"amount": 2}),
        ("evo.Deposited", 2, "dict", {"cents": 101}), ("evo.Deposited", 2, "dict", {"cents": 201}),
        ("evo.Deposited", 3, "dict", {"amount_cents": 102, "currency": "USD"}),
        ("evo.Deposited", 3, "dict", {"amount_cents": 202, "currency": "USD"}),
    ]


def test_types_command_lists_names_versions_counts_and_what_this_process_knows(url):
    for release in (1, 2):
        _worker(release, "write", url, f"acct-{release}", 3 if release == 1 else 1)
    proc = subprocess.run([PY, "-m", "eventcore", "types", "--dsn", url, "--json"], capture_output=True, text=True,
                          timeout=120, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"type": "Deposited", "events": 3, "versions": [{"version": 1, "events": 3}], "known": False},
        {"type": "evo.Deposited", "events": 1, "versions": [{"version": 2, "events": 1}], "known": False},
    ]
    # The module of release 3 (its classes and upcasters): everything readable, the old name an alias.
    proc = subprocess.run([PY, "-m", "eventcore", "types", "--dsn", url, "--import", "evolution_worker"],
                          capture_output=True, text=True, timeout=120, cwd=TESTS, env={**os.environ, "EVO_RELEASE": "3"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["Deposited", "v1", "3"] and "alias of 'evo.Deposited'" in lines[0]
    assert "upcast" in lines[0] and lines[1].split()[:3] == ["evo.Deposited", "v2", "1"]
    # tail: as stored without the classes; with them, as release 3 reads them.
    for imports, expected in (([], [("Deposited", 1, {"amount": 1}), ("evo.Deposited", 2, {"cents": 101})]),
                              (["--import", "evolution_worker"],
                               [("evo.Deposited", 3, {"amount_cents": 100, "currency": "EUR"}),
                                ("evo.Deposited", 3, {"amount_cents": 101, "currency": "EUR"})])):
        proc = subprocess.run([PY, "-m", "eventcore", "tail", "--dsn", url, *imports], capture_output=True, text=True,
                              timeout=120, cwd=TESTS, env={**os.environ, "EVO_RELEASE": "3"})
        assert proc.returncode == 0, proc.stderr
        printed = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [(o["type"], o["type_version"], o["data"]) for o in printed][::3] == expected, printed


# -- the same on the memory store, in one process ---------------------------------------------------


def _release_1():
    class Deposited(ec.Event):
        amount: int
    return Deposited


def _release_2():
    class Deposited(ec.Event):
        __event_type__ = "evo.Deposited"
        __event_version__ = 2
        __event_aliases__ = ("Deposited",)
        cents: int

    @ec.upcaster("evo.Deposited", from_version=1)
    def _v1(data):
        return {"cents": data["amount"] * 100}
    return Deposited


def test_memory_store_old_classes_in_their_own_registry_scope(store, backend):
    """Memory (and every backend, in one process): release 1's class defined in one registry scope
    writes; release 2's, defined in another, reads the same store."""
    with isolated_registry(empty=True):
        v1 = _release_1()
        store.append([ec.emit("a", v1(amount=7))])
    with isolated_registry(empty=True):
        v2 = _release_2()
        store.append([ec.emit("a", v2(cents=5))])
        events = list(store.read_all())
        assert [(e.type, e.type_version, e.data) for e in events] == [
            ("evo.Deposited", 2, v2(cents=700)), ("evo.Deposited", 2, v2(cents=5))]
        assert [e.data for e in store.read_stream("a")] == [v2(cents=700), v2(cents=5)]
        assert [e.data for e in store.read_streams(["a"])["a"]] == [v2(cents=700), v2(cents=5)]
        # A class as a filter stands for its name and its aliases.
        assert len(list(store.read_all(types=[v2]))) == 2
        assert len(list(store.read_all(types=["Deposited"]))) == 1
    raw = list(store.read_all(decode=False))
    assert [(e.type, e.type_version, e.data) for e in raw] == [
        ("Deposited", 1, {"amount": 7}), ("evo.Deposited", 2, {"cents": 5})]
    assert [e.data for e in store.read_stream("a", decode=False)] == [{"amount": 7}, {"cents": 5}]
    assert store.type_counts() == [("Deposited", 1, 1), ("evo.Deposited", 2, 1)]


def test_commands_fold_upcast_events(store):
    with isolated_registry(empty=True):
        v1 = _release_1()
        store.append([ec.emit("acct", v1(amount=3)), ec.emit("acct", v1(amount=4))])
    with isolated_registry(empty=True):
        v2 = _release_2()

        class Deposit(ec.Command):
            account: ec.StreamId
            cents: int

            def initial_state(self):
                return 0

            def apply(self, state, event):
                return state + event.data.cents

            def handle(self, state):
                ec.require(state >= 700, f"balance {state}")
                return [ec.emit(self.account, v2(cents=self.cents))]

        result = ec.execute(store, Deposit(account=ec.StreamId("acct"), cents=1))
        assert [e.version for e in result.events] == [3] and result.events[0].type_version == 2


# -- chains, aliases and the errors, with their messages --------------------------------------------


def test_chain_of_three_versions_on_every_backend(store):
    with isolated_registry():
        class Item(ec.Event):
            __event_type__ = "evo.chain.Item"
            label: str
        store.append([ec.emit("c", Item(label="x"))])
    with isolated_registry():
        class Item(ec.Event):  # noqa: F811 - the same type, a later release
            __event_type__ = "evo.chain.Item"
            __event_version__ = 3
            name: str
            size: int = 0
            tags: list[str] = []

        @ec.upcaster("evo.chain.Item", from_version=2)
        def _v2(data):
            return {**data, "tags": ["from-v2"]}

        @ec.upcaster("evo.chain.Item", from_version=1)
        def _v1(data):
            return {"name": data["label"], "size": 1}

        store.append([ec.emit("c", ec.RawEvent("evo.chain.Item", b'{"name": "y", "size": 2}', version=2))])
        store.append([ec.emit("c", Item(name="z"))])
        assert [e.data for e in store.read_stream("c")] == [
            Item(name="x", size=1, tags=["from-v2"]), Item(name="y", size=2, tags=["from-v2"]), Item(name="z")]
        assert [e.type_version for e in store.read_stream("c", decode=False)] == [1, 2, 3]


def test_alias_reads_events_stored_under_the_old_name_with_no_version_change(store):
    with isolated_registry():
        class Old(ec.Event):
            __event_type__ = "evo.alias.Old"
            n: int
        store.append([ec.emit("s", Old(n=1))])
    with isolated_registry():
        class New(ec.Event):
            __event_type__ = "evo.alias.New"
            __event_aliases__ = ("evo.alias.Old", "evo.alias.Older")
            n: int
        store.append([ec.emit("s", New(n=2))])
        events = store.read_stream("s")
        assert [(e.type, e.data) for e in events] == [("evo.alias.New", New(n=1)), ("evo.alias.New", New(n=2))]
        assert [e.type for e in store.read_stream("s", decode=False)] == ["evo.alias.Old", "evo.alias.New"]


def test_definition_errors_name_the_type_and_versions():
    with isolated_registry():
        class A(ec.Event):
            __event_type__ = "evo.err.A"
            __event_version__ = 2
            x: int

        @ec.upcaster("evo.err.A", from_version=1)
        def _one(data):
            return data

        with pytest.raises(ec.EventDefinitionError, match=r"two upcasters for event type 'evo.err.A' from version 1 to 2"):
            @ec.upcaster("evo.err.A", from_version=1)
            def _another(data):
                return data

        with pytest.raises(ec.EventDefinitionError, match=r"from version 2 to 3, but .*A is at version 2"):
            @ec.upcaster("evo.err.A", from_version=2)
            def _too_new(data):
                return data

        with pytest.raises(ec.EventDefinitionError, match=r"the alias 'evo.err.Shared' of .*C is already the alias of .*B"):
            class B(ec.Event):
                __event_type__ = "evo.err.B"
                __event_aliases__ = ("evo.err.Shared",)

            class C(ec.Event):
                __event_type__ = "evo.err.C"
                __event_aliases__ = ("evo.err.Shared",)

        with pytest.raises(ec.EventDefinitionError, match=r"the alias 'evo.err.A' of .*D is already the type name of .*A"):
            class D(ec.Event):
                __event_type__ = "evo.err.D"
                __event_aliases__ = ("evo.err.A",)

        with pytest.raises(ec.EventDefinitionError, match=r"names an alias of .*B: register upcasters under its current"):
            ec.upcaster("evo.err.Shared", from_version=1)(lambda d: d)

        @ec.upcaster("evo.err.E", from_version=3)
        def _before_class(data):
            return data

        with pytest.raises(ec.EventDefinitionError, match=r"'evo.err.E'\) is at version 2, but an upcaster from version 3"):
            class E(ec.Event):
                __event_type__ = "evo.err.E"
                __event_version__ = 2

        for bad in (0, -1, 40000, "2", True):
            with pytest.raises(ec.EventDefinitionError, match="__event_version__ must be an int"):
                class F(ec.Event):
                    __event_type__ = "evo.err.F"
                    __event_version__ = bad
        with pytest.raises(ec.EventDefinitionError, match="__event_aliases__ must be a tuple"):
            class G(ec.Event):
                __event_aliases__ = "evo.err.G.old"
        with pytest.raises(ec.EventDefinitionError, match="from_version of 'evo.err.H' must be an int"):
            ec.upcaster("evo.err.H", from_version=0)
        assert issubclass(ec.EventDefinitionError, TypeError)

        # Two lambdas (one name, one module) for one step are two upcasters, not one defined again.
        class J(ec.Event):
            __event_type__ = "evo.err.J"
            __event_version__ = 2
            x: int

        ec.upcaster("evo.err.J", from_version=1)(lambda d: d)
        with pytest.raises(ec.EventDefinitionError, match=r"two upcasters for event type 'evo.err.J' from version 1"):
            ec.upcaster("evo.err.J", from_version=1)(lambda d: {"x": 1})

        # Upcasters registered under a name that a class then takes as an alias: refused with the class.
        ec.upcaster("evo.err.K.old", from_version=1)(lambda d: d)
        with pytest.raises(ec.EventDefinitionError, match=r"registered under 'evo.err.K.old', which .*K names as an alias"):
            class K(ec.Event):
                __event_type__ = "evo.err.K"
                __event_version__ = 2
                __event_aliases__ = ("evo.err.K.old",)


def test_read_errors_name_position_stream_type_and_versions(store):
    with isolated_registry():
        class Thing(ec.Event):
            __event_type__ = "evo.read.Thing"
            a: int
        store.append([ec.emit("s", Thing(a=1))])
    with isolated_registry():
        class Thing(ec.Event):  # noqa: F811
            __event_type__ = "evo.read.Thing"
            __event_version__ = 3
            b: int
        store.append([ec.emit("t", Thing(b=1))])
        # A missing link: no upcaster at all, then 1 -> 2 but no 2 -> 3.
        with pytest.raises(ec.EventVersionError, match=r"'evo.read.Thing' \(Thing\) is at version 3 but no upcaster takes "
                                                       r"version 1 to 2, so the stored version 1 at position \d+ \(stream 's'\)") as info:
            list(store.read_all())
        assert (info.value.type_name, info.value.version, info.value.class_version, info.value.missing,
                info.value.stream_id) == ("evo.read.Thing", 1, 3, 1, "s")

        @ec.upcaster("evo.read.Thing", from_version=1)
        def _v1(data):
            if data["a"] == 1:
                raise KeyError("no b here")
            return {"x": data["a"]}

        with pytest.raises(ec.EventVersionError, match="no upcaster takes version 2 to 3"):
            store.read_stream("s")
        with pytest.raises(ec.EventVersionError, match="no upcaster takes version 2 to 3"):
            ec.check_chains(Thing)
        assert [e.data for e in store.read_stream("t")] == [Thing(b=1)]  # current events are unaffected

        @ec.upcaster("evo.read.Thing", from_version=2)
        def _v2(data):
            return data

        # An upcaster that raises: typed, with position, stream, type, version and the step.
        with pytest.raises(ec.UpcastError, match=r"cannot upcast event type 'evo.read.Thing' version 1 at position \d+ "
                                                 r"\(stream 's'\): the upcaster from version 1 to 2 failed: "
                                                 r".*_v1 raised KeyError: 'no b here'") as info:
            store.read_stream("s")
        assert (info.value.type_name, info.value.version, info.value.step, info.value.stream_id) == (
            "evo.read.Thing", 1, 1, "s")
        assert isinstance(info.value.__cause__, KeyError)
        assert isinstance(info.value, ec.SerializationError)
    with isolated_registry():
        class Thing(ec.Event):  # noqa: F811
            __event_type__ = "evo.read.Thing"
            __event_version__ = 2
            b: int

        @ec.upcaster("evo.read.Thing", from_version=1)
        def _wrong(data):
            return {"c": 1}

        with pytest.raises(ec.UpcastError, match=r"version 1 at position \d+ \(stream 's'\): the upcasters' result does "
                                                 r"not decode as its class: Object missing required field `b`"):
            store.read_stream("s")
    with isolated_registry():
        class Thing(ec.Event):  # noqa: F811
            __event_type__ = "evo.read.Thing"
            __event_version__ = 2
            b: int

        @ec.upcaster("evo.read.Thing", from_version=1)
        def _not_a_dict(data):
            return [data]

        with pytest.raises(ec.UpcastError, match=r"the upcaster from version 1 to 2 failed: .*_not_a_dict returned "
                                                 r"list, not a dict"):
            list(store.read_all())
    with isolated_registry():
        class Thing(ec.Event):  # noqa: F811
            __event_type__ = "evo.read.Thing"
            __event_version__ = 2
            b: int
        # Version 3 events under a class at version 2: the code is older than the data.
        with pytest.raises(ec.EventVersionError, match=r"'evo.read.Thing' version 3 at position \d+ \(stream 't'\) is "
                                                       r"newer than its class \(Thing\), which is at version 2"):
            store.read_stream("t")
    # Raw reads never need a class.
    assert [e.data for e in store.read_stream("s", decode=False)] == [{"a": 1}]


def test_errors_pickle_with_their_fields():
    import pickle

    for exc in (ec.EventVersionError("T", 3, 2, None, 5, "s", "C"), ec.UpcastError("T", 1, 1, "boom", 5, "s")):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc) and again.position == 5


def test_decode_false_never_raises_for_an_unknown_type(store):
    store.append([ec.emit("u", ec.RawEvent("evo.nobody.Knows", b'{"k": [1, {"x": null}]}')),
                  ec.emit("u", ec.RawEvent("evo.nobody.Knows", b'{"k": 2}', version=7))])
    with pytest.raises(ec.UnknownEventTypeError):
        list(store.read_all())
    events = store.read_stream("u", decode=False)
    assert [(e.type, e.type_version, e.data) for e in events] == [
        ("evo.nobody.Knows", 1, {"k": [1, {"x": None}]}), ("evo.nobody.Knows", 7, {"k": 2})]
    assert [e.data for e in store.read_all(decode=False, types=["evo.nobody.Knows"])] == [e.data for e in events]
    with pytest.raises(ec.ValidationError, match="decode must be True or False"):
        store.read_all(decode=None)


# -- write side: versions stored, RawEvents checked against their class -----------------------------


def test_raw_events_of_a_known_type_are_validated_at_the_version_they_declare(store):
    with isolated_registry():
        class Priced(ec.Event):
            __event_type__ = "evo.raw.Priced"
            __event_version__ = 2
            cents: int

        @ec.upcaster("evo.raw.Priced", from_version=1)
        def _v1(data):
            return {"cents": round(data["price"] * 100)}

        store.append([ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"price": 1.5}', version=1)),
                      ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"cents": 3}'))])  # None: the class's version
        with pytest.raises(ec.ValidationError, match=r"RawEvent.data of type 'evo.raw.Priced' version 2 does not decode "
                                                     r"as Priced: Object missing required field `cents`"):
            store.append([ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"price": 1.5}'))])
        with pytest.raises(ec.ValidationError, match=r"RawEvent of type 'evo.raw.Priced' version 1: cannot upcast .*"
                                                     r"_v1 raised KeyError"):
            store.append([ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"cents": 3}', version=1))])
        with pytest.raises(ec.ValidationError, match=r"version 3 is newer than its class"):
            store.append([ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"cents": 3}', version=3))])
        with pytest.raises(ec.ValidationError, match=r"RawEvent.version of type 'evo.raw.Priced' must be an int"):
            store.append([ec.emit("p", ec.RawEvent("evo.raw.Priced", b'{"cents": 3}', version=0))])
        with pytest.raises(ec.IngestError) as info:
            store.ingest([("p", ec.RawEvent("evo.raw.Priced", b'{"cents": "x"}'))])
        assert isinstance(info.value.__cause__, ec.ValidationError) and "does not decode" in str(info.value.__cause__)
        assert store.stream_version("p") == 2  # nothing else was written
        assert [(e.type_version, e.data) for e in store.read_stream("p")] == [(2, Priced(cents=150)), (2, Priced(cents=3))]
        assert [e.type_version for e in store.read_stream("p", decode=False)] == [1, 2]


def test_every_write_path_stores_the_class_version(store):
    with isolated_registry():
        class Vx(ec.Event):
            __event_type__ = "evo.write.Vx"
            __event_version__ = 5
            n: int

        recorded = store.append([ec.emit("w", Vx(n=1))])
        assert recorded[0].type_version == 5
        store.append_batch([ec.emit("w", Vx(n=2)), ec.emit("w", Vx(n=3))])
        store.ingest([("w", Vx(n=4)), ("w", ec.RawEvent("evo.write.Vx", b'{"n": 5}'))], batch_size=1)

        class EmitVx(ec.Command):
            stream: ec.StreamId

            def initial_state(self):
                return 0

            def apply(self, state, event):
                return state + event.data.n

            def handle(self, state):
                return [ec.emit(self.stream, Vx(n=state - 9))]

        ec.execute(store, EmitVx(stream=ec.StreamId("w")))
        raw = store.read_stream("w", decode=False)
        assert [(e.data["n"], e.type_version) for e in raw] == [(n, 5) for n in range(1, 7)]


def test_json_lines_declare_a_version_and_bad_payloads_are_refused_with_the_line_number(tmp_path):
    from eventcore.jsonl import BadLine, JsonLinesReader

    with isolated_registry():
        class Priced(ec.Event):
            __event_type__ = "evo.jsonl.Priced"
            __event_version__ = 2
            cents: int

        @ec.upcaster("evo.jsonl.Priced", from_version=1)
        def _v1(data):
            return {"cents": data["price"] * 100}

        path = tmp_path / "in.jsonl"
        path.write_text("\n".join([
            json.dumps({"stream": "p", "type": "evo.jsonl.Priced", "data": {"price": 2}, "version": 1}),
            json.dumps({"stream": "p", "type": "evo.jsonl.Priced", "data": {"cents": 3}}),
            json.dumps({"stream": "p", "type": "evo.jsonl.Other", "data": {"any": 1}, "version": 4}),
            json.dumps({"stream": "p", "type": "evo.jsonl.Priced", "data": {"price": 2}}),
        ]) + "\n")
        store = ec.connect("memory://")
        with JsonLinesReader(str(path)) as reader, pytest.raises(BadLine) as info:
            store.ingest(reader, batch_size=10)
        assert str(info.value) == ("line 4: `data` of type 'evo.jsonl.Priced' version 2 does not decode as Priced: "
                                   "Object missing required field `cents`")
        assert store.head_position() == 0  # the batch holding the bad line is not written
        rejected = []
        with JsonLinesReader(str(path), on_bad=rejected.append) as reader:
            store.ingest(reader, batch_size=10)
        assert [b.line for b in rejected] == [4]
        assert [(e.type, e.type_version, e.data) for e in store.read_all(decode=False)] == [
            ("evo.jsonl.Priced", 1, {"price": 2}), ("evo.jsonl.Priced", 2, {"cents": 3}),
            ("evo.jsonl.Other", 4, {"any": 1})]


# -- projections rebuilt across a version change -----------------------------------------------------


def test_projection_rebuilt_across_a_version_change(store, backend):
    if backend == "postgres-single":
        pytest.skip("the same storage as postgres")
    totals: dict = {}
    with isolated_registry(empty=True):
        v1 = _release_1()
        store.append([ec.emit("a", v1(amount=2)), ec.emit("b", v1(amount=3))])

        def count_v1(event, ctx):
            totals[event.stream_id] = totals.get(event.stream_id, 0) + event.data.amount * 100

        ec.run_projection(store, ec.Projector("balances", handler=count_v1), until_caught_up=True)
    assert totals == {"a": 200, "b": 300}
    with isolated_registry(empty=True):
        v2 = _release_2()
        store.append([ec.emit("a", v2(cents=5))])
        totals.clear()

        def count_v2(event, ctx):
            totals[event.stream_id] = totals.get(event.stream_id, 0) + event.data.cents

        ec.run_projection(store, ec.Projector("balances", handler=count_v2), until_caught_up=True, rebuild=True)
        assert totals == {"a": 205, "b": 300}
        # A type this process does not know: raw for a projector that asks for it, fatal otherwise.
        store.append([ec.emit("a", ec.RawEvent("evo.proj.Unknown", b'{"z": 1}'))])
        seen = []
        ec.run_projection(store, ec.Projector("seen", handler=lambda e, ctx: seen.append((e.type, e.data)),
                                              unknown_types="raw"), until_caught_up=True)
        assert seen[-1] == ("evo.proj.Unknown", {"z": 1}) and seen[0] == ("evo.Deposited", v2(cents=200))
        raw = []
        ec.run_projection(store, ec.Projector("raw", handler=lambda e, ctx: raw.append(e.data), decode=False),
                          until_caught_up=True)
        assert raw == [{"amount": 2}, {"amount": 3}, {"cents": 5}, {"z": 1}]
        with pytest.raises(ec.ProjectionError, match="unknown event type 'evo.proj.Unknown'"):
            ec.run_projection(store, ec.Projector("strict", handler=lambda e, ctx: None), until_caught_up=True)


# -- the hot path: parity, the fast path untouched, raw decoding ------------------------------------


def _copy_and_rows(items):
    """COPY bytes and stored rows of (stream, type, type_version, payload) items."""
    n = len(items)
    ids = _impl.new_event_ids(n)
    buf = bytearray(COPY_HEADER)
    _impl.encode_copy_rows(buf, 1, [i[0] for i in items], list(range(1, n + 1)), ids, [i[1] for i in items],
                           [i[2] for i in items], [i[3] for i in items], [None] * n, 1_700_000_000_000_000)
    rows = [(k + 1, s, k + 1, ids[k], t, d, None, 1_700_000_000_000_000, tv) for k, (s, t, tv, d) in enumerate(items)]
    return bytes(buf + COPY_TRAILER), rows


@pytest.mark.parametrize("impl", ["python", "c"])
def test_both_twins_agree_on_upcast_current_alias_and_raw_rows(impl):
    from eventcore import _pure

    try:
        from eventcore import _speedups
    except ImportError:  # the compiled extension is part of every CI build
        if impl == "c":
            if os.environ.get("CI", "").lower() == "true":
                raise
            pytest.skip("compiled extension not built")
    twin = _pure if impl == "python" else _speedups
    with isolated_registry():
        class P(ec.Event):
            __event_type__ = "evo.twin.P"
            __event_version__ = 2
            __event_aliases__ = ("evo.twin.OldP",)
            v: int

        @ec.upcaster("evo.twin.P", from_version=1)
        def _v1(data):
            return {"v": data["old"] + 1}

        items = [("s", "evo.twin.P", 2, b'{"v": 1}'), ("s", "evo.twin.P", 1, b'{"old": 1}'),
                 ("s", "evo.twin.OldP", 1, b'{"old": 5}'), ("s", "evo.twin.OldP", 2, b'{"v": 9}'),
                 ("s", "evo.twin.P", 2, b'{"v": 3}')]
        buf, rows = _copy_and_rows(items)
        for decoded in (twin.decode_copy(buf), twin.decode_rows(rows)):
            assert [(e.type, e.type_version, e.data) for e in decoded] == [
                ("evo.twin.P", 2, P(v=1)), ("evo.twin.P", 2, P(v=2)), ("evo.twin.P", 2, P(v=6)),
                ("evo.twin.P", 2, P(v=9)), ("evo.twin.P", 2, P(v=3))]
        for decoded in (twin.decode_copy(buf, True), twin.decode_rows(rows, True)):
            assert [(e.type, e.type_version, e.data) for e in decoded] == [
                (t, tv, json.loads(d)) for _, t, tv, d in items]
        assert _pure.decode_copy(buf) == twin.decode_copy(buf)
        assert _pure.decode_rows(rows, True) == twin.decode_rows(rows, True)


def test_a_current_version_is_decoded_by_the_class_decoder_itself():
    """The fast path: for events at their class's version the decoders get msgspec's own decode,
    nothing wrapped around it (what tests/test_speedups and bench/test_evolution measure)."""
    from eventcore.evolution import class_decoder, decoding

    with isolated_registry():
        class Q(ec.Event):
            __event_type__ = "evo.fast.Q"
            __event_version__ = 4
            q: int
        decode, name, reads = decoding("evo.fast.Q", False, 1, "s")
        assert decode == class_decoder(Q).decode and name == "evo.fast.Q" and reads == 4


def test_corrupt_type_version_in_a_copy_stream_is_named_and_null_is_version_1():
    import struct

    from eventcore import _pure

    try:
        from eventcore import _speedups
    except ImportError:
        _speedups = None
    with isolated_registry():
        class R(ec.Event):
            __event_type__ = "evo.corrupt.R"
            r: int
        buf, _ = _copy_and_rows([("s", "evo.corrupt.R", 1, b'{"r": 1}')])
        assert buf[-8:] == struct.pack(">ih", 2, 1) + COPY_TRAILER
        cases = {"3 bytes, expected 2": buf[:-8] + struct.pack(">i", 3) + buf[-4:],
                 "NULL (length -5)": buf[:-8] + struct.pack(">i", -5) + buf[-4:],
                 "truncated type version": buf[:-8]}
        null = buf[:-8] + struct.pack(">i", -1) + COPY_TRAILER  # what the store's reads send for version 1
        for twin in filter(None, (_pure, _speedups)):
            assert [(e.type_version, e.data) for e in twin.decode_copy(null)] == [(1, R(r=1))]
        for message, broken in cases.items():
            for twin in filter(None, (_pure, _speedups)):
                with pytest.raises(ec.SerializationError, match=f"type version.*|{message}") as info:
                    twin.decode_copy(broken)
                assert message in str(info.value) and "type version" in str(info.value), (twin, str(info.value))


# -- hypothesis: any chain of field renames and defaults round-trips --------------------------------

_names = st.text(alphabet="abcdefghij", min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_chain_of_field_renames_and_defaults_round_trips(data):
    """Fields renamed and fields added with a default, version after version: an event written at any
    version reads back, at the last version, with its values under their new names and the defaults."""
    nfields = data.draw(st.integers(1, 4), label="fields")
    names = [f"f{i}" for i in range(nfields)]
    steps = data.draw(st.integers(1, 5), label="steps")
    history = [list(names)]  # the field names at each version
    renames, added = [], []
    for _ in range(steps):
        current = list(history[-1])
        old = data.draw(st.sampled_from(current))
        new = f"{old}_{len(history)}{data.draw(_names)}"  # the step's number: never a name in use
        current[current.index(old)] = new
        extra = data.draw(st.one_of(st.none(), _names.map(lambda s: "d_" + s).filter(lambda s: s not in current)))
        if extra is not None:
            current.append(extra)
        renames.append((old, new))
        added.append(extra)
        history.append(current)
    values = data.draw(st.lists(st.integers(-10**9, 10**9), min_size=nfields, max_size=nfields))
    written_at = data.draw(st.integers(1, steps + 1), label="written at version")
    store = ec.connect("memory://")
    with isolated_registry():
        last = len(history)
        fields = [(n, int, msgspec.field(default=-1)) if n.startswith("d_") else (n, int) for n in history[-1]]
        msgspec.defstruct("Shaped", fields, bases=(ec.Event,), namespace={
            "__event_type__": "evo.hypo.Shaped", "__event_version__": last})
        for version, ((old, new), extra) in enumerate(zip(renames, added), start=1):
            def step(d, old=old, new=new, extra=extra):
                d = dict(d)
                d[new] = d.pop(old)
                if extra is not None:
                    d[extra] = -1
                return d
            ec.upcaster("evo.hypo.Shaped", from_version=version)(step)
        # The event as the release at `written_at` wrote it: the original values under that version's names.
        mapping = dict(zip(names, values))
        for (old, new), extra in list(zip(renames, added))[:written_at - 1]:
            mapping[new] = mapping.pop(old)
            if extra is not None:
                mapping[extra] = -1
        payload = msgspec.json.encode(mapping)
        store.append([ec.emit("h", ec.RawEvent("evo.hypo.Shaped", payload, version=written_at))])
        [event] = store.read_stream("h")
        assert event.type_version == last
        final = dict(zip(names, values))
        for (old, new), extra in zip(renames, added):
            final[new] = final.pop(old)
            if extra is not None:
                final.setdefault(extra, -1)
        assert msgspec.structs.asdict(event.data) == final
        assert store.read_stream("h", decode=False)[0].data == mapping


# -- stores written before type versions: the migrations ---------------------------------------------


def test_sqlite_store_of_schema_3_gains_type_versions_and_its_events_are_version_1(tmp_path):
    import sqlite3

    from eventcore.stores import sqlite as sqlite_store

    path = tmp_path / "old.db"
    with isolated_registry():
        class Amount(ec.Event):
            __event_type__ = "evo.migrate.Amount"
            amount: int
        with ec.connect(f"sqlite:///{path}") as store:
            store.append([ec.emit("s", Amount(amount=4))])
    conn = sqlite3.connect(path, isolation_level=None)  # the tables as schema 3 made them
    conn.execute("ALTER TABLE events DROP COLUMN type_version")
    conn.execute("ALTER TABLE projection_dead_letters DROP COLUMN type_version")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with isolated_registry():
        class Amount(ec.Event):  # noqa: F811
            __event_type__ = "evo.migrate.Amount"
            __event_version__ = 2
            cents: int

        @ec.upcaster("evo.migrate.Amount", from_version=1)
        def _v1(data):
            return {"cents": data["amount"] * 100}

        with pytest.raises(ec.SchemaVersionError):
            ec.connect(f"sqlite:///{path}", migrate=False)
        with ec.connect(f"sqlite:///{path}") as store:  # upgraded in place
            store.append([ec.emit("s", Amount(cents=1))])
            assert [e.data for e in store.read_stream("s")] == [Amount(cents=400), Amount(cents=1)]
            assert [e.type_version for e in store.read_stream("s", decode=False)] == [1, 2]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    conn.close()


def test_postgres_schema_of_version_5_gains_type_versions_and_its_events_are_version_1(pg_dsn, pg_schema):
    import pg_legacy
    import psycopg
    from psycopg import sql

    from eventcore.stores.postgres import sql as pg_sql

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        pg_legacy.make(admin, pg_schema, 5)
        s = sql.Identifier(pg_schema)
        with admin.transaction():  # an event as eventcore 5 stored it: no type version
            admin.execute(sql.SQL("INSERT INTO {}.streams (stream_id, version) VALUES ('s', 1)").format(s))
            admin.execute(sql.SQL("INSERT INTO {}.events (position, stream_id, version, event_id, type, data) "
                                  "VALUES (1, 's', 1, gen_random_uuid(), 'evo.migrate.Amount', "
                                  "'{{\"amount\": 3}}')").format(s))
    with isolated_registry():
        class Amount(ec.Event):
            __event_type__ = "evo.migrate.Amount"
            __event_version__ = 2
            cents: int

        @ec.upcaster("evo.migrate.Amount", from_version=1)
        def _v1(data):
            return {"cents": data["amount"] * 100}

        with ec.connect(pg_dsn, schema=pg_schema) as store:  # migrates to the current version
            store.append([ec.emit("s", Amount(cents=2))])
            assert [e.data for e in store.read_stream("s")] == [Amount(cents=300), Amount(cents=2)]
            assert [(e.type, e.type_version) for e in store.read_all(decode=False)] == [
                ("evo.migrate.Amount", 1), ("evo.migrate.Amount", 2)]
            assert store.type_counts() == [("evo.migrate.Amount", 1, 1), ("evo.migrate.Amount", 2, 1)]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        version = admin.execute(sql.SQL("SELECT max(version) FROM {}.schema_migrations").format(s)).fetchone()[0]
        assert version == pg_sql.SCHEMA_VERSION
        # The check on type_version was added without reading the events already there (NOT VALID: no
        # scan under the migration's exclusive lock); it still refuses a bad row written since.
        validated = admin.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'events_type_version_check' "
            "AND conrelid = %s::regclass", (f'"{pg_schema}".events',)).fetchone()[0]
        assert validated is False
        with pytest.raises(psycopg.errors.CheckViolation):
            admin.execute(sql.SQL("INSERT INTO {}.events (position, stream_id, version, event_id, type, data, "
                                  "type_version) VALUES (2, 't', 1, gen_random_uuid(), 'x', '{{}}', 0)").format(s))
