"""Hostile tests of "Changing events" (README): type versions, upcasters, aliases, raw reads,
`eventcore types`, JSON lines that declare a "version".

Written from the README and the public API only (by a hostile tester: the tests that found defects keep
their names, with the defect fixed). Each test states what the README promises; a test
that fails is a defect (see the report). Type names carry a per-test suffix because the event registry
is process-wide. Old data is written by a child process that has no class for the type (a RawEvent of
a type a process does not know is stored unchecked, at the version it declares), or by one release of a
small application (`_release`), so every "release" is its own process.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import eventcore as ec

PY = sys.executable
EVENTCORE = str(Path(PY).parent / "eventcore")


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _event(name: str, version: int = 1, aliases=(), **fields):
    """An Event class built at run time: `fields` maps field name -> type (or (type, default))."""
    # A str is passed as it is: the class must refuse it (a tuple of its characters would be refused only
    # when two of them happen to repeat).
    ann, ns = {}, {"__event_type__": name, "__event_version__": version,
                   "__event_aliases__": aliases if isinstance(aliases, str) else tuple(aliases)}
    for k, v in fields.items():
        if isinstance(v, tuple):
            ann[k], ns[k] = v
        else:
            ann[k] = v
    ns["__annotations__"] = ann
    return type(name.replace(".", "_").replace("-", "_"), (ec.Event,), ns)


def _write_raw(url: str, rows) -> None:
    """Write [(stream, type, json, version)] from a process that knows none of the types."""
    code = textwrap.dedent("""
        import json, sys, eventcore as ec
        s = ec.connect(sys.argv[1])
        s.append([ec.emit(st, ec.RawEvent(t, d.encode(), version=v)) for st, t, d, v in json.loads(sys.argv[2])])
        s.close()
    """)
    subprocess.run([PY, "-c", code, url, json.dumps(rows)], check=True, timeout=120)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    """A store URL that child processes can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hostile.db'}"
    dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request, tmp_path):
    if request.param == "memory":
        s = ec.connect("memory://")
    elif request.param == "sqlite":
        s = ec.connect(f"sqlite:///{tmp_path / 'any.db'}")
    else:
        s = ec.connect(request.getfixturevalue("pg_dsn"), schema=request.getfixturevalue("pg_schema"))
    yield s
    s.close()


# ================================================================================================
# Definition time: "Mistakes are refused, never read wrong ... When a class or upcaster is defined
# (ec.EventDefinitionError, a TypeError): two upcasters for one step, an upcaster from a version its
# class has reached, a type name or alias claimed by two classes, an upcaster registered under an alias."
# ================================================================================================


@pytest.mark.parametrize("version", [0, -1, 32768, 2**63, True, False, 1.0, "2", None])
def test_bad_event_versions_are_refused_at_definition(version):
    with pytest.raises(ec.EventDefinitionError) as err:
        _event(f"h.bad{_uid()}", version, x=int)
    assert isinstance(err.value, TypeError) and "__event_version__" in str(err.value)


@pytest.mark.parametrize("from_version", [0, -1, True, "1", 1.0, 10**20, 32767])
def test_bad_upcaster_versions_are_refused(from_version):
    with pytest.raises(ec.EventDefinitionError):
        ec.upcaster(f"h.up{_uid()}", from_version=from_version)(lambda d: d)


def test_alias_conflicts_are_refused():
    u = _uid()
    _event(f"h.A{u}", x=int)
    _event(f"h.B{u}", aliases=(f"h.old{u}",), x=int)
    with pytest.raises(ec.EventDefinitionError):          # alias == another class's type name
        _event(f"h.C{u}", aliases=(f"h.A{u}",), x=int)
    with pytest.raises(ec.EventDefinitionError):          # alias claimed twice
        _event(f"h.D{u}", aliases=(f"h.old{u}",), x=int)
    with pytest.raises(ec.EventDefinitionError):          # type name == another class's alias
        _event(f"h.old{u}", x=int)
    with pytest.raises(ec.EventDefinitionError):          # own name as alias
        _event(f"h.E{u}", aliases=(f"h.E{u}",), x=int)
    with pytest.raises(ec.EventDefinitionError):          # a str, not a tuple
        _event(f"h.F{u}", aliases=f"h.f{u}", x=int)
    with pytest.raises(ec.EventDefinitionError):          # upcaster under an alias, alias known first
        ec.upcaster(f"h.old{u}", from_version=1)(lambda d: d)


def test_upcaster_from_a_version_the_class_reached_is_refused_in_either_order():
    u = _uid()
    _event(f"h.R{u}", 2, x=int)
    with pytest.raises(ec.EventDefinitionError):
        ec.upcaster(f"h.R{u}", from_version=2)(lambda d: d)
    ec.upcaster(f"h.S{u}", from_version=1)(lambda d: d)   # upcaster first, class second
    with pytest.raises(ec.EventDefinitionError):
        _event(f"h.S{u}", 1, x=int)


def test_two_upcasters_for_one_step_with_distinct_names_are_refused():
    u = _uid()
    _event(f"h.T{u}", 2, x=int)

    def first(d):
        return {"x": 1}

    def second(d):
        return {"x": 2}

    ec.upcaster(f"h.T{u}", from_version=1)(first)
    with pytest.raises(ec.EventDefinitionError):
        ec.upcaster(f"h.T{u}", from_version=1)(second)


def test_two_upcasters_for_one_step_are_refused_even_when_their_names_coincide():
    """README: "two upcasters for one step" is an EventDefinitionError when defined. Two lambdas (or two
    functions with one name, a copy-paste slip) in one module are taken as a *reload* of one upcaster:
    the second silently replaces the first, and events read differently by import order."""
    u = _uid()
    T = _event(f"h.L{u}", 2, x=int)
    ec.upcaster(f"h.L{u}", from_version=1)(lambda d: {"x": 1})
    with pytest.raises(ec.EventDefinitionError):
        ec.upcaster(f"h.L{u}", from_version=1)(lambda d: {"x": 2})
    # if it was accepted, which one runs?
    s = ec.connect("memory://")
    s.append([ec.emit("s", ec.RawEvent(f"h.L{u}", b"{}", version=1))])
    assert [e.data for e in s.read_all()] == [T(x=1)]


def test_upcaster_registered_under_a_name_that_becomes_an_alias_is_refused():
    """README: "an upcaster registered under an alias" is refused when defined. It is only when the alias
    is known first; defined before the class that claims the name as an alias, it is accepted, and never
    runs (the alias's old events go through the class's own chain)."""
    u = _uid()
    calls = []

    def old_name_upcaster(d):
        calls.append(d)
        return {"cents": 0}

    ec.upcaster(f"h.old{u}", from_version=1)(old_name_upcaster)
    with pytest.raises(ec.EventDefinitionError):
        _event(f"h.New{u}", 2, aliases=(f"h.old{u}",), cents=int)


def test_a_subclass_does_not_inherit_name_version_or_aliases():
    u = _uid()
    Base = _event(f"h.Base{u}", 3, aliases=(f"h.oldbase{u}",), x=int)
    Sub = type(f"Sub{u}", (Base,), {"__event_type__": f"h.Sub{u}", "__annotations__": {"y": int}, "y": 0})
    assert Sub.__event_version__ == 1 and Sub.__event_aliases__ == ()


def test_check_chains_with_a_non_event_argument_raises_a_typed_error():
    """Errors are "all under ec.EventCoreError" (or a TypeError for definitions); check_chains(int)
    raises a bare AttributeError."""
    for bad in (int, "bank.Deposited", 5):
        with pytest.raises((ec.EventCoreError, TypeError)):
            ec.check_chains(bad)


# ================================================================================================
# Reads of old versions: upcaster failures are typed and name position, stream, type, versions, step.
# ================================================================================================


def test_upcaster_failures_are_typed_and_located(url):
    u = _uid()
    names = {k: f"h.{k}{u}" for k in ("raises", "none", "shape", "newer", "missing")}
    _write_raw(url, [[f"s-{k}", n, '{"x": 5}', 9 if k == "newer" else 1] for k, n in names.items()])
    for k, n in names.items():
        _event(n, 3 if k == "missing" else 2, x=int)
    ec.upcaster(names["raises"], from_version=1)(lambda d: 1 / 0)
    ec.upcaster(names["none"], from_version=1)(lambda d: None)
    ec.upcaster(names["shape"], from_version=1)(lambda d: {"y": 1})
    ec.upcaster(names["missing"], from_version=2)(lambda d: d)
    s = ec.connect(url)
    try:
        for k in ("raises", "none", "shape"):
            with pytest.raises(ec.UpcastError) as err:
                list(s.read_stream(f"s-{k}"))
            e = err.value
            assert isinstance(e, ec.SerializationError)
            assert (e.type_name, e.version, e.stream_id) == (names[k], 1, f"s-{k}") and e.position
            assert names[k] in str(e) and f"s-{k}" in str(e) and str(e.position) in str(e)
            if k == "raises":
                assert isinstance(e.__cause__, ZeroDivisionError) and e.step == 1
        with pytest.raises(ec.EventVersionError) as err:
            list(s.read_stream("s-newer"))
        assert (err.value.version, err.value.class_version, err.value.missing) == (9, 2, None)
        with pytest.raises(ec.EventVersionError) as err:
            list(s.read_stream("s-missing"))
        assert (err.value.version, err.value.class_version, err.value.missing) == (1, 3, 1)
        # nothing is skipped, and the same events read raw, as stored
        raw = list(s.read_all(decode=False))
        assert [(e.type, e.type_version, e.data) for e in raw] == [
            (n, 9 if k == "newer" else 1, {"x": 5}) for k, n in names.items()]
    finally:
        s.close()
    with pytest.raises(ec.EventVersionError):
        ec.check_chains()  # the missing step is found at start-up too


def test_upcaster_defined_after_a_failed_read_is_used_on_the_next_read(url):
    u = _uid()
    _write_raw(url, [["a", f"h.late{u}", '{"amount": 1}', 1]])
    s = ec.connect(url)
    try:
        T = _event(f"h.late{u}", 2, cents=int)
        with pytest.raises(ec.EventVersionError):
            list(s.read_all())
        ec.upcaster(f"h.late{u}", from_version=1)(lambda d: {"cents": d["amount"] * 100})
        assert [e.data for e in s.read_all()] == [T(cents=100)]
    finally:
        s.close()


def test_alias_filters_on_every_backend(url):
    u = _uid()
    new, old1, old2 = f"h.Dep{u}", f"h.Dep_old{u}", f"h.Dep_older{u}"
    _write_raw(url, [["acct-1", old1, '{"amount": 1}', 1], ["acct-1", new, '{"cents": 200}', 2],
                     ["acct-2", old2, '{"amount": 3}', 1], ["acct-1", f"h.unrelated{u}", "{}", 1]])
    Dep = _event(new, 3, aliases=(old1, old2), amount_cents=int, currency=(str, "EUR"))
    ec.upcaster(new, from_version=1)(lambda d: {"cents": d["amount"] * 100})
    ec.upcaster(new, from_version=2)(lambda d: {"amount_cents": d["cents"]})
    s = ec.connect(url)
    try:
        s.append([ec.emit("acct-2", Dep(amount_cents=7))])
        got = [(e.type, e.type_version, e.data.amount_cents) for e in s.read_all(types=[Dep], page_size=1)]
        assert got == [(new, 3, 100), (new, 3, 200), (new, 3, 300), (new, 3, 7)]
        assert [e.data.amount_cents for e in s.read_all(types=[old1])] == [100]      # the stored name only
        assert [e.data.amount_cents for e in s.read_all(types=[new])] == [200, 7]
        assert [(e.type, e.type_version) for e in s.read_all(types=[Dep], decode=False)] == [
            (old1, 1), (new, 2), (old2, 1), (new, 3)]
        assert [e.data.amount_cents for e in s.read_all(types=[Dep], stream_prefix="acct-2")] == [300, 7]
        with pytest.raises(ec.UnknownEventTypeError):
            list(s.read_all())
        for bad in ("no", 0, None):
            with pytest.raises(ec.ValidationError):
                list(s.read_all(decode=bad))
    finally:
        s.close()


# ================================================================================================
# Three releases, each its own process: the README's example, plus commands and idempotency.
# ================================================================================================

_RELEASE = textwrap.dedent('''
    import json, os, sys, eventcore as ec
    REL, ACTION, URL = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    T = os.environ["HOSTILE_T"]
    if REL == 1:
        class Deposited(ec.Event):
            __event_type__ = T
            amount: int
        def make(n): return Deposited(amount=n)
        def cents(d): return d.amount * 100
    elif REL == 2:
        class Deposited(ec.Event):
            __event_type__ = "bank." + T; __event_version__ = 2; __event_aliases__ = (T,)
            cents: int
        @ec.upcaster("bank." + T, from_version=1)
        def _1(d): return {"cents": d["amount"] * 100}
        def make(n): return Deposited(cents=n * 100)
        def cents(d): return d.cents
    else:
        class Deposited(ec.Event):
            __event_type__ = "bank." + T; __event_version__ = 3; __event_aliases__ = (T,)
            amount_cents: int
            currency: str = "EUR"
        @ec.upcaster("bank." + T, from_version=1)
        def _1(d): return {"cents": d["amount"] * 100}
        @ec.upcaster("bank." + T, from_version=2)
        def _2(d): return {"amount_cents": d["cents"], "currency": "EUR"}
        def make(n): return Deposited(amount_cents=n * 100)
        def cents(d): return d.amount_cents

    class Deposit(ec.Command):
        account: ec.StreamId
        n: int
        def initial_state(self): return 0
        def apply(self, total, e): return total + cents(e.data)
        def handle(self, total):
            ec.require(total < 10**9, "too much")
            return [ec.emit(self.account, make(self.n))]

    s = ec.connect(URL)
    out = {}
    try:
        if ACTION == "exec":
            r = ec.execute(s, Deposit(account="acct", n=REL), idempotency_key=f"k{REL}")
            out["events"] = [[e.type, e.type_version] for e in r.events]
        elif ACTION == "replay":
            r = ec.execute(s, Deposit(account="acct", n=99), idempotency_key=sys.argv[4])
            out["replayed"] = r.replayed
            out["events"] = [[e.type, e.type_version, cents(e.data)] for e in r.events]
        elif ACTION == "read":
            out["events"] = [[e.type, e.type_version, cents(e.data)] for e in s.read_stream("acct")]
    except Exception as e:
        out["error"] = type(e).__name__
        out["message"] = str(e)
    print(json.dumps(out))
''')


def _release(tmp_path, rel: int, *args) -> dict:
    script = tmp_path / "release_app.py"
    script.write_text(_RELEASE)
    proc = subprocess.run([PY, str(script), str(rel), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOSTILE_T": _release.type_name})
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_commands_fold_streams_written_by_three_releases(url, tmp_path):
    _release.type_name = f"Dep{_uid()}"
    T = _release.type_name
    for rel in (1, 2, 3):
        out = _release(tmp_path, rel, "exec", url)
        assert "error" not in out, out
    assert _release(tmp_path, 3, "read", url)["events"] == [
        [f"bank.{T}", 3, 100], [f"bank.{T}", 3, 200], [f"bank.{T}", 3, 300]]
    # release 3 replays release 1's command: the original event, upcast to release 3's class
    out = _release(tmp_path, 3, "replay", url, "k1")
    assert out == {"replayed": True, "events": [[f"bank.{T}", 3, 100]]}
    # release 2 is older than release 3's data: a typed error naming the versions, nothing skipped
    out = _release(tmp_path, 2, "read", url)
    assert out["error"] == "EventVersionError" and "version 3" in out["message"] and "acct" in out["message"]


def test_replay_by_idempotency_key_during_a_rolling_deploy(url, tmp_path):
    """README: "Run the command again with the same key and, if it had committed, nothing new is
    written and execute returns the original result ... even when the command would now be refused".
    During a rolling deploy, release 2 retries its own command (key k2, committed) after release 3
    wrote to the stream: execute folds the stream first and raises EventVersionError instead of
    replaying the events of k2, which release 2 can read."""
    _release.type_name = f"Dep{_uid()}"
    for rel in (1, 2, 3):
        assert "error" not in _release(tmp_path, rel, "exec", url)
    out = _release(tmp_path, 2, "replay", url, "k2")
    assert out.get("replayed") is True, out


# ================================================================================================
# StateCache across an upcast: "a cached command answers as an uncached one would".
# ================================================================================================


def test_state_cache_folds_events_written_as_RawEvent_like_an_uncached_read(any_store):
    """A command that emits a RawEvent (the README's way of "Writing old shapes") through a StateCache:
    the cache keeps the append's RecordedEvents, whose data is the RawEvent itself (stored type name,
    stored version, undecoded bytes). The next cached command folds those, not the upcast class."""
    u = _uid()
    D = _event(f"h.D{u}", 2, aliases=(f"h.Dold{u}",), cents=int)
    ec.upcaster(f"h.D{u}", from_version=1)(lambda d: {"cents": d["amount"] * 100})
    seen = []

    class Import(ec.Command):
        a: ec.StreamId
        raw: bytes
        typ: str
        version: int | None = None

        def initial_state(self):
            return None

        def apply(self, state, e):
            # (folding e.data.cents here crashes the *second* Import through the cache with
            # AttributeError: 'RawEvent' object has no attribute 'cents'; uncached it works)
            return state

        def handle(self, state):
            return [ec.emit(self.a, ec.RawEvent(self.typ, self.raw, version=self.version))]

    class Balance(ec.Command):
        a: ec.StreamId

        def initial_state(self):
            return []

        def apply(self, st, e):
            return st + [(e.type, e.type_version, e.data)]

        def handle(self, st):
            seen.append(st)
            return []

    cache = ec.StateCache()
    ec.execute(any_store, Import(a="acct", raw=b'{"amount": 3}', typ=f"h.Dold{u}", version=1), cache=cache)
    ec.execute(any_store, Import(a="acct", raw=b'{"cents": 7}', typ=f"h.D{u}"), cache=cache)
    ec.execute(any_store, Balance(a="acct"), cache=cache)
    ec.execute(any_store, Balance(a="acct"))
    assert seen[1] == [(f"h.D{u}", 2, D(cents=300)), (f"h.D{u}", 2, D(cents=7))]   # uncached
    assert seen[0] == seen[1]                                                       # cached


# ================================================================================================
# Idempotency keys with events of a type this process does not know (RawEvent, stored unchecked).
# ================================================================================================


def test_duplicate_key_of_raw_events_of_an_unknown_type(any_store):
    """README: "store.append(..., idempotency_key=k) raises ec.DuplicateCommandError carrying the original
    events"; RawEvents of a type the process does not know are stored unchecked and read back with
    decode=False. The process that wrote them gets UnknownEventTypeError instead of the duplicate (a
    caller that treats DuplicateCommandError as "already done" crashes), and execute() cannot replay."""
    t = f"h.nobody{_uid()}"
    any_store.append([ec.emit("a", ec.RawEvent(t, b'{"x": 1}'))], idempotency_key="k1")
    with pytest.raises(ec.DuplicateCommandError):
        any_store.append([ec.emit("a", ec.RawEvent(t, b'{"x": 1}'))], idempotency_key="k1")


def test_execute_replay_of_raw_events_of_an_unknown_type(any_store):
    t = f"h.nobody{_uid()}"

    class Emit(ec.Command):
        a: ec.StreamId

        def initial_state(self):
            return None

        def apply(self, s, e):
            return s

        def handle(self, s):
            return [ec.emit(self.a, ec.RawEvent(t, b'{"x": 1}'))]

    first = ec.execute(any_store, Emit(a="b"), idempotency_key="k2")
    again = ec.execute(any_store, Emit(a="c"), idempotency_key="k2")
    assert again.replayed and [e.event_id for e in again.events] == [e.event_id for e in first.events]


# ================================================================================================
# Raw reads: "never need a class and never raise for an unknown type".
# ================================================================================================


def test_raw_reads_agree_across_backends_for_odd_payloads(any_store):
    t = f"h.raw{_uid()}"
    for i, data in enumerate([b'{"a":1,"a":2}', b' {"a": 1} ', b"{}", b'{"s": "\\u00e9\\ud83d\\ude00"}',
                              b'{"n": {"d": [1, [2, {"e": null}]]}}']):
        any_store.append([ec.emit(f"s{i}", ec.RawEvent(t, data, version=1 + i))],
                         metadata=ec.Metadata(user_id="u", custom={"k": i}))
    got = [(e.type, e.type_version, e.data, e.metadata.custom) for e in any_store.read_all(decode=False)]
    assert got == [(t, 1, {"a": 2}, {"k": 0}), (t, 2, {"a": 1}, {"k": 1}), (t, 3, {}, {"k": 2}),
                   (t, 4, {"s": "é😀"}, {"k": 3}), (t, 5, {"n": {"d": [1, [2, {"e": None}]]}}, {"k": 4})]
    for bad in (b"[1]", b"5", b"null", b"{", b'{"a":1} x', b"\xef\xbb\xbf{}", b'{"a":"\\u0000"}', b'{"a":1e400}',
                b'{"a":"\xff"}', b""):
        with pytest.raises(ec.ValidationError):
            any_store.append([ec.emit("bad", ec.RawEvent(t, bad))])
    for v in (0, -1, True, 32768, "1", 1.0):
        with pytest.raises(ec.ValidationError):
            any_store.append([ec.emit("bad", ec.RawEvent(t, b"{}", version=v))])
    assert any_store.stream_version("bad") == 0


def test_an_array_like_event_can_be_read_raw(any_store):
    """An Event subclass declared array_like=True is accepted and stored (as a JSON array); raw reads
    (`read_all(decode=False)`, a projector with decode=False) then raise SerializationError on it, and
    stop there, while `eventcore types` advises to "read it with decode=False". Either the class should
    be refused when defined, or raw reads should hand over what is stored."""
    u = _uid()
    Arr = type(f"Arr{u}", (ec.Event,), {"__event_type__": f"h.arr{u}", "__annotations__": {"a": int}},
               array_like=True)
    any_store.append([ec.emit("arr", Arr(a=1))])
    assert [e.data for e in any_store.read_stream("arr")] == [Arr(a=1)]
    assert [e.type for e in any_store.read_stream("arr", decode=False)] == [f"h.arr{u}"]


def test_raw_reads_of_corrupt_sqlite_rows_raise_located_serialization_errors(tmp_path):
    """Rows an application inserted behind eventcore's back: each read (raw or decoded, both
    implementations) is a SerializationError naming the position, never a crash, never skipped."""
    path = tmp_path / "corrupt.db"
    ec.connect(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    rows = [("arr", b"[1]", 1), ("garbage", b"not json", 1), ("badutf8", b'{"a":"\xff"}', 1),
            ("realver", b"{}", 2.5), ("intdata", 7, 1)]
    for name, data, ver in rows:
        conn.execute("insert into events (stream_id, version, event_id, type, data, recorded_at, type_version) "
                     "values (?,?,?,?,?,?,?)", (name, 1, uuid.uuid4().bytes, "h.corrupt", data,
                                                int(time.time() * 1e6), ver))
    conn.commit()
    conn.close()
    code = textwrap.dedent("""
        import sys, eventcore as ec
        s = ec.connect(sys.argv[1])
        for name in sys.argv[2:]:
            for dec in (False, True):
                try:
                    list(s.read_stream(name, decode=dec)); print(name, dec, "read")
                except ec.SerializationError as e:
                    print(name, dec, "SerializationError", "position" in str(e))
    """)
    outs = []
    for impl in ("c", "python"):
        proc = subprocess.run([PY, "-c", code, f"sqlite:///{path}", *(r[0] for r in rows)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "EVENTCORE_IMPL": impl})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
    lines = outs[0].splitlines()
    # A JSON array is what an array_like class stores: read raw as a list; decoded, a located error.
    assert lines[:2] == ["arr False read", "arr True SerializationError True"], lines
    assert all(line.endswith("SerializationError True") for line in lines[2:]), outs[0]


def test_an_upcaster_sees_numbers_as_the_backend_stores_them(url):
    """README (Changing events): an upcaster takes the stored JSON, and PostgreSQL's jsonb stores numbers
    in its own form. The same bytes `{"amount": 1e2}` give PostgreSQL {'amount': 100} (an int) and SQLite
    {'amount': 100.0} (as written): an upcaster that needs an int converts (found by the hostile tester:
    `d["amount"] * 100` into an int field read on PostgreSQL and failed on SQLite)."""
    u = _uid()
    _write_raw(url, [["n", f"h.num{u}", '{"amount": 1e2}', 1]])
    T = _event(f"h.num{u}", 2, cents=int)
    seen = []

    @ec.upcaster(f"h.num{u}", from_version=1)
    def _v1(d):
        seen.append(d["amount"])
        return {"cents": int(d["amount"] * 100)}

    s = ec.connect(url)
    try:
        assert [e.data for e in s.read_all()] == [T(cents=10000)]
    finally:
        s.close()
    want = 100.0 if url.startswith("sqlite") else 100
    assert seen == [want] and type(seen[0]) is type(want)


# ================================================================================================
# Every write path stores the type version; RawEvent of a known type is checked at its version.
# ================================================================================================


def test_every_write_path_stores_the_type_version(any_store):
    u = _uid()
    V5 = _event(f"h.V5{u}", 5, aliases=(f"h.V5old{u}",), x=int)
    for i in range(1, 5):
        ec.upcaster(f"h.V5{u}", from_version=i)(lambda d: d)

    def items(tag):
        return [ec.emit(f"{tag}-a", V5(x=1)),
                ec.emit(f"{tag}-b", ec.RawEvent(f"h.V5{u}", b'{"x":3}', version=2)),
                ec.emit(f"{tag}-b", ec.RawEvent(f"h.V5old{u}", b'{"x":4}', version=1)),
                ec.emit(f"{tag}-b", ec.RawEvent(f"h.V5old{u}", b'{"x":5}')),
                ec.emit(f"{tag}-c", ec.RawEvent(f"h.unknown{u}", b'{"x":7}', version=300)),
                ec.emit(f"{tag}-c", ec.RawEvent(f"h.unknown{u}", b'{"x":8}'))]

    any_store.append(items("ap"))
    any_store.append_batch(items("ab"))
    any_store.ingest(items("in"), batch_size=2)
    any_store.ingest(items("ip"), batch_size=2, parallel=2)
    by = {}
    for e in any_store.read_all(decode=False):
        tag, stream = e.stream_id.split("-")
        by.setdefault(tag, []).append((stream, e.type, e.type_version, e.data["x"]))
    expected = [("a", f"h.V5{u}", 5, 1), ("b", f"h.V5{u}", 2, 3), ("b", f"h.V5old{u}", 1, 4),
                ("b", f"h.V5old{u}", 5, 5), ("c", f"h.unknown{u}", 300, 7), ("c", f"h.unknown{u}", 1, 8)]
    assert by == {"ap": expected, "ab": expected, "in": expected, "ip": expected}
    # checked at the version they declare, nothing written when one fails
    before = any_store.head_position()
    for bad in (ec.RawEvent(f"h.V5{u}", b'{"x":1}', version=6), ec.RawEvent(f"h.V5{u}", b'{"y":1}', version=2)):
        with pytest.raises(ec.ValidationError):
            any_store.append([ec.emit("ok", V5(x=1)), ec.emit("bad", bad)])
        with pytest.raises(ec.IngestError):
            any_store.ingest([("ok", V5(x=1)), ("bad", bad)])
    assert any_store.head_position() == before


# ================================================================================================
# Projections over unknown types, failed upcasts and raw delivery.
# ================================================================================================


def test_projectors_raw_unknown_and_dead_letters(url):
    u = _uid()
    D = f"h.PDep{u}"
    _write_raw(url, [["acct-1", f"h.PDepold{u}", '{"amount": 1}', 1], ["acct-1", f"h.unrel{u}", '{"u": 1}', 1],
                     ["acct-1", D, '{"cents": 9}', 7], ["acct-1", D, '{"cents": "bad"}', 2],
                     ["acct-1", D, '{"amount_cents": 5}', 3]])
    Dep = _event(D, 3, aliases=(f"h.PDepold{u}",), amount_cents=int)
    ec.upcaster(D, from_version=1)(lambda d: {"cents": d["amount"] * 100})
    ec.upcaster(D, from_version=2)(lambda d: {"amount_cents": d["cents"]})
    s = ec.connect(url)
    try:
        def run(name, **kw):
            got = []
            p = ec.Projector(name, handler=lambda e, ctx: got.append((e.type, e.type_version, e.data)), **kw)
            ec.run_projection(s, p, until_caught_up=True)
            return got, [(d.type, d.type_version, d.error.split(":")[0]) for d in ec.dead_letters(s, name)]

        got, dead = run("raw", on_error="skip", unknown_types="raw")
        assert got == [(D, 3, Dep(amount_cents=100)), (f"h.unrel{u}", 1, {"u": 1}), (D, 3, Dep(amount_cents=5))]
        assert dead == [(D, 7, "EventVersionError"), (D, 2, "UpcastError")]
        got, dead = run("all_raw", decode=False)
        assert [(t, v) for t, v, _ in got] == [(f"h.PDepold{u}", 1), (f"h.unrel{u}", 1), (D, 7), (D, 2), (D, 3)]
        got, dead = run("typed", types=[Dep], on_error=ec.Retry(attempts=3, backoff=0.01, then="skip"))
        assert [d for _, _, d in got] == [Dep(amount_cents=100), Dep(amount_cents=5)] and len(dead) == 2
        with pytest.raises(ec.ProjectionError):
            run("fatal")
        for kw in ({"unknown_types": "skip"}, {"unknown_types": True}, {"decode": "no"}):
            with pytest.raises(ec.ValidationError):
                ec.Projector("x", handler=lambda e, c: None, **kw)
    finally:
        s.close()


# ================================================================================================
# The command line: `eventcore ingest` with "version", `eventcore types`, `eventcore tail`.
# ================================================================================================


def _cli(*args, cwd):
    return subprocess.run([EVENTCORE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _app_module(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


_EVOMOD = """
    import eventcore as ec
    class Deposited(ec.Event):
        __event_type__ = "bank.Deposited"; __event_version__ = 3; __event_aliases__ = ("Deposited",)
        amount_cents: int
        currency: str = "EUR"
    @ec.upcaster("bank.Deposited", from_version=1)
    def _1(d): return {"cents": d["amount"] * 100}
    @ec.upcaster("bank.Deposited", from_version=2)
    def _2(d): return {"amount_cents": d["cents"]}
"""

_GOOD = '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":1}}'


@pytest.mark.parametrize("line", [
    '{"stream":"a","type":"bank.Deposited","data":{"amount":2},"version":2}',       # upcaster fails
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":4}',  # newer than class
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":0}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":"3"}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":3.0}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":true}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"version":99999999999999999999}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount":2}}',                   # missing version, old shape
    '{"stream":"a","type":"h.unknown","data":{"x":2},"version":-7}',
    '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":2},"type_version":1}',
])
def test_ingest_refuses_bad_version_lines_naming_the_line_and_writes_nothing(tmp_path, line):
    _app_module(tmp_path, "evomod", _EVOMOD)
    (tmp_path / "in.jsonl").write_text("\n".join([_GOOD, line, _GOOD]) + "\n")
    proc = _cli("ingest", "in.jsonl", "--dsn", "sqlite:///t.db", "--import", "evomod", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "line 2" in proc.stderr
    s = ec.connect(f"sqlite:///{tmp_path / 't.db'}")
    assert s.head_position() == 0
    s.close()


def test_ingest_accepts_declared_versions_and_unknown_types(tmp_path):
    _app_module(tmp_path, "evomod", _EVOMOD)
    lines = [_GOOD, '{"stream":"a","type":"bank.Deposited","data":{"cents":200},"version":2}',
             '{"stream":"a","type":"Deposited","data":{"amount":3},"version":1}',
             '{"stream":"b","type":"h.unknown","data":{"x":2},"version":7}',
             '{"stream":"a","type":"bank.Deposited","data":{"amount_cents":4},"version":null}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    proc = _cli("ingest", "in.jsonl", "--dsn", "sqlite:///t.db", "--import", "evomod", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = ec.connect(f"sqlite:///{tmp_path / 't.db'}")
    assert [(e.type, e.type_version) for e in s.read_all(decode=False)] == [
        ("bank.Deposited", 3), ("bank.Deposited", 2), ("Deposited", 1), ("h.unknown", 7), ("bank.Deposited", 3)]
    s.close()
    types = _cli("types", "--dsn", "sqlite:///t.db", "--import", "evomod", "--json", cwd=tmp_path)
    assert types.returncode == 0, types.stderr
    listed = {t["type"]: t for t in json.loads(types.stdout)}
    assert listed["Deposited"]["alias_of"] == "bank.Deposited" and listed["h.unknown"]["known"] is False
    tail = _cli("tail", "--dsn", "sqlite:///t.db", "--import", "evomod", "--type", "Deposited", cwd=tmp_path)
    assert tail.returncode == 0, tail.stderr
    assert [(d["type"], d["type_version"], d["data"]) for d in map(json.loads, tail.stdout.splitlines())] == [
        ("bank.Deposited", 3, {"amount_cents": 300, "currency": "EUR"})]


def test_import_errors_are_reported_without_traceback(tmp_path):
    _app_module(tmp_path, "badmod", """
        import eventcore as ec
        class Deposited(ec.Event):
            __event_type__ = "bank.Deposited"; __event_version__ = 0
            x: int
    """)
    (tmp_path / "in.jsonl").write_text(_GOOD + "\n")
    for args in (["ingest", "in.jsonl", "--dsn", "sqlite:///t.db", "--import", "badmod"],
                 ["ingest", "in.jsonl", "--dsn", "sqlite:///t.db", "--import", "nonexistent_mod"],
                 ["ingest", "in.jsonl", "--dsn", "sqlite:///t.db", "--import", ".rel"],
                 ["types", "--dsn", "sqlite:///t.db", "--import", "badmod"]):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error" in proc.stderr, proc.stderr
    assert not (tmp_path / "t.db").exists()


def test_ingest_resumed_by_a_later_release_passes_over_committed_lines(tmp_path):
    """README: `eventcore ingest` "is resumable by default ... Run the same command again — after a kill,
    after fixing the lines a run stopped at or rejected ... — and every line is written exactly once:
    committed lines are passed over". A run by release 1 commits lines 1-4 and stops at a bad line 5.
    Release 2 (the class now at version 2, an upcaster for 1) resumes after line 5 is fixed: each
    committed line is validated again, against version 2, so the run stops at line 1 — a line already
    in the store — and --skip-invalid lists lines 1-4 as rejected. "Fixing" them as the rejects say
    (adding "version": 1) then writes all five lines again: every event twice."""
    _app_module(tmp_path / "r1", "appev", """
        import eventcore as ec
        class Deposited(ec.Event):
            __event_type__ = "bank.Deposited"
            amount: int
    """)
    _app_module(tmp_path / "r2", "appev", """
        import eventcore as ec
        class Deposited(ec.Event):
            __event_type__ = "bank.Deposited"; __event_version__ = 2
            cents: int
        @ec.upcaster("bank.Deposited", from_version=1)
        def _1(d): return {"cents": d["amount"] * 100}
    """)
    path = tmp_path / "in.jsonl"
    lines = [f'{{"stream":"a","type":"bank.Deposited","data":{{"amount":{i}}}}}' for i in range(1, 5)]
    path.write_text("\n".join(lines + ['{"stream":"a","type":"bank.Deposited","data":{"amount":"five"}}']) + "\n")
    db = f"sqlite:///{tmp_path / 'rr.db'}"
    args = ["ingest", str(path), "--dsn", db, "--no-progress", "--import", "appev", "--batch-size", "2"]
    assert _cli(*args, cwd=tmp_path / "r1").returncode == 1          # 4 committed, stopped at line 5
    path.write_text("\n".join(lines + ['{"stream":"a","type":"bank.Deposited","data":{"cents":500},"version":2}'])
                    + "\n")
    proc = _cli(*args, "--skip-invalid", cwd=tmp_path / "r2")
    rejects = Path(str(path) + ".rejects.jsonl")
    rejected = [json.loads(x)["line"] for x in rejects.read_text().splitlines()] if rejects.exists() else []
    s = ec.connect(db)
    stored = [e.data for e in s.read_all(decode=False)]
    s.close()
    assert stored == [{"amount": 1}, {"amount": 2}, {"amount": 3}, {"amount": 4}, {"cents": 500}]
    assert proc.returncode == 0 and rejected == [], (proc.stdout, proc.stderr, rejected)


def test_store_ingest_resume_after_a_version_bump(tmp_path):
    """The same through `store.ingest(resume_key=...)`: the error says "run it again with
    resume_key='job' to finish it" — and running it again never finishes: item 0 is committed, but
    re-validated against the new class version."""
    db = tmp_path / "api.db"
    code = textwrap.dedent("""
        import sys, eventcore as ec
        if sys.argv[2] == "1":
            class Deposited(ec.Event):
                __event_type__ = "bank.Deposited"
                amount: int
        else:
            class Deposited(ec.Event):
                __event_type__ = "bank.Deposited"; __event_version__ = 2
                cents: int
            @ec.upcaster("bank.Deposited", from_version=1)
            def _1(d): return {"cents": d["amount"] * 100}
        s = ec.connect(sys.argv[1])
        items = [("a", ec.RawEvent("bank.Deposited", b'{"amount":%d}' % i)) for i in range(1, 5)]
        items.append(("a", ec.RawEvent("bank.Deposited", b'{"amount":"five"}' if sys.argv[2] == "1"
                                       else b'{"cents":500}', version=None if sys.argv[2] == "1" else 2)))
        try:
            r = s.ingest(items, batch_size=2, resume_key="job"); print("ok", r.events, r.skipped)
        except ec.IngestError as e:
            print("error", e.committed, e.item)
    """)
    run = lambda rel: subprocess.run([PY, "-c", code, f"sqlite:///{db}", rel], capture_output=True, text=True,
                                     timeout=60).stdout.split()
    assert run("1") == ["error", "4", "4"]
    assert run("2") == ["ok", "1", "4"]


def test_types_cli_reports_unreadable_versions(tmp_path):
    _app_module(tmp_path, "evomod", _EVOMOD)
    db = f"sqlite:///{tmp_path / 'ty.db'}"
    _write_raw(db, [["a", "Deposited", '{"amount":1}', 1], ["a", "bank.Deposited", '{"amount_cents":1}', 9],
                    ["b", "zz.Ünïcode ☃", "{}", 1]])
    proc = _cli("types", "--dsn", db, "--import", "evomod", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    listed = {t["type"]: t for t in json.loads(proc.stdout)}
    assert listed["bank.Deposited"]["versions"][0]["readable"] is False
    assert "version 9" in listed["bank.Deposited"]["versions"][0]["problem"]
    assert listed["zz.Ünïcode ☃"]["known"] is False
    missing = _cli("types", "--dsn", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert missing.returncode == 2 and not (tmp_path / "none.db").exists()


# ================================================================================================
# C and Python implementations: one workload of mixed versions, aliases and unknown types, read
# every way, must give byte-identical results.
# ================================================================================================

_PARITY = textwrap.dedent('''
    import hashlib, json, sys, eventcore as ec
    class K(ec.Event):
        __event_type__ = "par.K"; __event_version__ = 3; __event_aliases__ = ("par.old",)
        n: int
        tag: str = ""
    ec.upcaster("par.K", from_version=1)(lambda d: {"m": d["n"], "t": "from1"})
    ec.upcaster("par.K", from_version=2)(lambda d: {"n": d["m"], "tag": d.get("t", "from2")})
    s = ec.connect(sys.argv[1])
    if sys.argv[2] == "fill":
        for L in (255, 256, 257, 600):
            st = f"str-{L}"
            items = []
            for i in range(L):
                v = [1, 2, 3, None][i % 4]
                data = b'{"n":%d}' % i if v == 1 else b'{"m":%d}' % i if v == 2 else b'{"n":%d,"tag":"c"}' % i
                items.append(ec.emit(st, ec.RawEvent("par.old" if i % 5 == 0 else "par.K", data, version=v)))
            s.append(items)
            s.append([ec.emit(st + "-u", ec.RawEvent("par.Unknown", b'{"x":1}', version=9)) for _ in range(L)])
        sys.exit()
    out = []
    for L in (255, 256, 257, 600):
        st = f"str-{L}"
        for kw in ({}, {"from_version": 2}, {"from_version": 250}, {"limit": 256}):
            out.append([repr((e.version, e.type, e.type_version, e.data)) for e in s.read_stream(st, **kw)])
            out.append([repr((e.version, e.type, e.type_version, sorted(e.data.items())))
                        for e in s.read_stream(st + "-u", decode=False, **kw)])
        rs = s.read_streams([st, st + "-u"], decode=False)
        out.append({k: [repr((e.version, e.type, e.type_version, sorted(e.data.items()))) for e in v]
                    for k, v in sorted(rs.items())})
    out.append([repr((e.type, e.type_version, e.data)) for e in s.read_all(types=[K], page_size=77)])
    print(hashlib.sha256(json.dumps(out).encode()).hexdigest())
''')


def test_c_and_python_implementations_read_alike(url, tmp_path):
    script = tmp_path / "parity.py"
    script.write_text(_PARITY)
    subprocess.run([PY, str(script), url, "fill"], check=True, timeout=120)
    digests = set()
    for impl in ("c", "python"):
        proc = subprocess.run([PY, str(script), url, "read"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "EVENTCORE_IMPL": impl})
        assert proc.returncode == 0, proc.stderr
        digests.add(proc.stdout.strip())
    assert len(digests) == 1
