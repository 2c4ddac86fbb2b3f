"""Fuzzing the hot path's decoders and encoders, each target in a child interpreter.

A crash in compiled code (a segfault, an abort) would take pytest down with it, so every
target runs in its own `python tests/test_fuzz.py TARGET` process: the test fails with the
signal instead. Inside, hypothesis drives hostile input into both implementations (the
Cython `eventcore._speedups` and the pure-Python `eventcore._pure`) and checks, for every
example, that neither raises anything but the library's typed errors and that both agree:
the same value, or an error of the same type.

Targets: `decode_rows` (stored rows: random and mutated JSON, random envelopes), `decode_copy`
(binary COPY streams: well-formed ones mutated byte by byte, truncated, with lengths overwritten),
`encode_event` / `encode_metadata` / `encode_copy_events` (nested values with NaN, infinity,
NUL, lone surrogates, huge ints), `encode_copy_rows` (random columns), and the JSON Lines
parser and RawEvent validation (random and mutated lines; pure Python, one implementation).
Examples are derandomized (the same each run, for CI); EVENTCORE_FUZZ_EXAMPLES scales them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import eventcore as ec

HERE = Path(__file__).resolve().parent
TARGETS = ("decode_rows", "decode_copy", "encode", "encode_copy_rows", "json_lines")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_in_a_child_process(target):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), target], cwd=HERE, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert proc.returncode == 0, (
        f"fuzz target {target!r} exited with {proc.returncode}"
        f"{' (killed by signal %d: a crash)' % -proc.returncode if proc.returncode < 0 else ''}\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )
    assert f"fuzzed {target}" in proc.stdout, proc.stdout


def test_a_crash_in_the_child_fails_the_test_instead_of_pytest():
    """The harness itself: a child killed by a signal is reported, not lost."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "__abort__"], cwd=HERE,
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert proc.returncode < 0  # killed by SIGABRT, and pytest is still here to say so


# -- the child: events (module level, so their annotations resolve) and the targets ------------------------------------------------------------------------------------------------


class Item(ec.Event):
    __event_type__ = "fuzz.Item"
    n: int
    text: str
    tags: list[str] = []
    score: float | None = None


class Anything(ec.Event):
    __event_type__ = "fuzz.Anything"
    value: Any = None


def _child(target: str) -> None:  # noqa: C901 - one function per target, kept together
    from hypothesis import HealthCheck, given, settings, strategies as st

    from eventcore._pure import codec as P_codec, copy as P_copy
    from eventcore.events import validate_raw_event
    from eventcore.evolution import check_raw_event
    from eventcore.jsonl import BadLine, parse_line

    try:
        from eventcore import _speedups as C
    except ImportError:
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
            raise
        C = None  # a pure-Python build: check the Python twin alone

    IMPLS = {"python": {"decode_rows": P_codec.decode_rows, "decode_copy": P_copy.decode_copy,
                        "encode_event": P_codec.encode_event,
                        "encode_metadata": P_codec.encode_metadata, "encode_copy_events": P_copy.encode_copy_events,
                        "encode_copy_rows": P_copy.encode_copy_rows}}
    if C is not None:
        IMPLS["c"] = {name: getattr(C, name) for name in IMPLS["python"]}

    scale = float(os.environ.get("EVENTCORE_FUZZ_EXAMPLES", "1"))

    def fuzz(examples: int):
        return settings(max_examples=max(1, int(examples * scale)), deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck))

    def outcome(f, *args):
        """("ok", result) or ("error", error type); anything but a SerializationError fails the example."""
        try:
            return ("ok", f(*args))
        except ec.SerializationError as exc:
            return ("error", type(exc))

    def same_everywhere(name, *args, copy_args=None, key=None):
        """Run `name` in every implementation (fresh arguments from `copy_args()` when it mutates them);
        `key(outcome, args)` (default: the outcome) must be equal across implementations."""
        seen = []
        for funcs in IMPLS.values():
            call_args = copy_args() if copy_args else args
            result = outcome(funcs[name], *call_args)
            seen.append((result, call_args, result if key is None else key(result, call_args)))
        for (_, _, a), (_, _, b) in zip(seen, seen[1:]):
            assert a == b, (name, args, a, b)
        return seen[0][0], seen[0][1]

    # JSON-shaped values, with what JSON and PostgreSQL cannot hold mixed in.
    text = st.one_of(st.text(max_size=12), st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfff", "null", "\\u0000",
                                                             "back\\\\u0000slash", "é😀\u2028"]))
    leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.floats(allow_nan=True, allow_infinity=True), text)
    values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(text, inner, max_size=4)), max_leaves=20)

    def json_bytes(value) -> bytes:
        # allow_nan: NaN/Infinity literals; surrogatepass: invalid UTF-8 in strings.
        return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")

    @st.composite
    def mutated(draw, base):
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.integers(0, 3))
            pos = draw(st.integers(0, len(data)))
            if kind == 0 and data:  # flip a byte
                pos = min(pos, len(data) - 1)
                data[pos] ^= draw(st.integers(1, 255))
            elif kind == 1:  # truncate
                del data[pos:]
            elif kind == 2:  # insert
                data[pos:pos] = draw(st.sampled_from([b"\x00", b"\xff", b"\\u0000", b"NaN", b"[", b"{", b'"', b"\\",
                                                      b"\xed\xa0\x80", b"1e400", b",", b"}"]))
            else:  # duplicate a slice
                data[pos:pos] = data[:pos][-draw(st.integers(1, 8)):]
        return bytes(data)

    good_items = st.builds(lambda n, t: json_bytes({"n": n, "text": t, "tags": [t]}),
                           st.integers(-(2**63), 2**63 - 1), st.text(max_size=8))
    payloads = st.one_of(st.binary(max_size=60), st.builds(json_bytes, values), mutated(good_items),
                         mutated(st.builds(lambda v: json_bytes({"value": v}), values)))

    if target == "decode_rows":
        anything = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                             st.binary(max_size=20))

        @fuzz(600)
        @given(
            type_name=st.one_of(st.sampled_from(["fuzz.Item", "fuzz.Anything"]), anything),
            data=st.one_of(payloads, anything),
            metadata=st.one_of(st.none(), mutated(st.just(b'{"user_id":"u","custom":{"k":[1,2.5,null]}}')),
                               st.builds(lambda v: json_bytes({"custom": v}), values), anything),
            envelope=st.tuples(st.one_of(st.integers(1, 2**62), anything), st.one_of(st.text(max_size=5), anything),
                               st.one_of(st.integers(1, 2**62), anything),
                               st.one_of(st.binary(min_size=16, max_size=16), anything),
                               st.one_of(st.integers(-(2**62), 2**62), anything),
                               st.one_of(st.integers(-1, 3), anything)),
        )
        def run(type_name, data, metadata, envelope):
            position, sid, version, event_id, at, type_version = envelope
            row = (position, sid, version, event_id, type_name, data, metadata, at, type_version)
            same_everywhere("decode_rows", [row])

    elif target == "encode":
        events = st.one_of(st.builds(Anything, values),
                           st.builds(Item, st.integers(-(2**63), 2**63 - 1), text, st.lists(text, max_size=3),
                                     st.one_of(st.none(), st.floats())))
        metadatas = st.one_of(st.none(), st.builds(ec.Metadata, st.one_of(st.none(), text), st.none(),
                                                   st.one_of(st.none(), text), st.dictionaries(text, values, max_size=3)))

        @fuzz(400)
        @given(event=events, metadata=metadatas, head=st.integers(0, 2**63 - 1))
        def run(event, metadata, head):
            result, _ = same_everywhere("encode_event", event)
            if result[0] == "ok":  # what is accepted comes back as it was
                name, data = result[1]
                assert type(event).__event_type__ == name
                back = P_codec.decode_rows([(1, "s", 1, b"0" * 16, name, data, None, 0, 1)])[0].data
                assert back == event, (event, back)
            same_everywhere("encode_metadata", metadata)

            def fresh():
                return (bytearray(b"keep"), 5, ["s", "t"], [Item(1, "a"), event], [None, metadata], {"s": head}, 0)

            def comparable(result, args):  # event ids are random: compare what else came out
                return result[0], (len(result[1]) if result[0] == "ok" else result[1]), len(args[0]), args[5]

            (kind, _), args = same_everywhere("encode_copy_events", copy_args=fresh, key=comparable)
            buf, heads = args[0], args[5]
            if kind == "error":
                assert buf == bytearray(b"keep") and heads == {"s": head}, "a failed encode left state behind"

        deep: Any = []
        for _ in range(10_000):
            deep = [deep]
        for impl, funcs in IMPLS.items():  # far past the recursion limit: a typed error in both
            for value in (Anything(deep), ec.Metadata(custom={"d": deep})):
                f = funcs["encode_event"] if isinstance(value, Anything) else funcs["encode_metadata"]
                assert outcome(f, value)[0] == "error", impl

    elif target == "decode_copy":
        import struct

        from eventcore.formats import COPY_HEADER, COPY_TRAILER

        def stream(rows) -> bytes:
            buf = bytearray(COPY_HEADER)
            for i, (sid, data, metadata, at) in enumerate(rows):
                P_copy.encode_copy_rows(buf, i + 1, [sid], [i + 1], [bytes(range(i, i + 16))],
                                        ["fuzz.Item" if i % 2 else "fuzz.Anything"], [1], [data], [metadata], at)
            return bytes(buf + COPY_TRAILER)

        good = st.builds(stream, st.lists(st.tuples(
            st.text(max_size=6), st.one_of(good_items, st.builds(lambda v: json_bytes({"value": v}), values), payloads),
            st.one_of(st.none(), st.just(b'{"user_id":"u"}'), payloads),
            st.integers(-(2**62), 2**62)), max_size=4))

        @st.composite
        def lengths_overwritten(draw, base):
            data = bytearray(draw(base))
            for _ in range(draw(st.integers(1, 3))):
                if data:
                    pos = draw(st.integers(0, len(data) - 1))
                    data[pos:pos + 4] = struct.pack(">i", draw(st.sampled_from([-2, -1, 0, 1, 8, 16, 2**31 - 1,
                                                                                len(data)])))
            return bytes(data)

        @fuzz(600)
        @given(buf=st.one_of(good, mutated(good), lengths_overwritten(good), st.binary(max_size=80)))
        def run(buf):
            (kind, result), _ = same_everywhere("decode_copy", buf)
            for other in (bytearray(buf), memoryview(buf)):
                assert outcome(IMPLS["python"]["decode_copy"], other) == (kind, result)

    elif target == "encode_copy_rows":
        anything = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                             st.binary(max_size=20), st.lists(st.integers(), max_size=2))

        @fuzz(400)
        @given(sid=st.one_of(text, anything), version=st.one_of(st.integers(-(2**64), 2**64), anything),
               event_id=st.one_of(st.binary(min_size=15, max_size=17), anything), type_name=st.one_of(text, anything),
               data=st.one_of(payloads, anything), metadata=st.one_of(st.none(), payloads, anything),
               position=st.integers(-(2**63), 2**63 - 1), at=st.integers(-(2**62), 2**62),
               type_version=st.one_of(st.integers(-2, 2**16), anything))
        def run(sid, version, event_id, type_name, data, metadata, position, at, type_version):
            def fresh():
                return (bytearray(b"keep"), position, ["ok", sid], [1, version], [b"0" * 16, event_id],
                        ["T", type_name], [1, type_version], [b"{}", data], [None, metadata], at)

            (kind, _), args = same_everywhere("encode_copy_rows", copy_args=fresh,
                                              key=lambda result, args: (result, bytes(args[0])))
            if kind == "error":
                assert args[0] == bytearray(b"keep")
            else:
                assert args[0] != bytearray(b"keep")

    elif target == "json_lines":
        good_lines = st.builds(
            lambda s, t, v, md: json_bytes({"stream": s, "type": t, "data": {"v": v}, **({"metadata": md} if md else {})}),
            st.text(min_size=1, max_size=6), st.text(min_size=1, max_size=6), values,
            st.one_of(st.none(), st.fixed_dictionaries({"user_id": text, "custom": st.dictionaries(text, values, max_size=2)})))
        lines = st.one_of(st.binary(max_size=80), good_lines, mutated(good_lines))

        @fuzz(500)
        @given(line=lines)
        def run(line):
            try:
                sid, raw, md = parse_line(3, line)
            except BadLine as bad:
                assert bad.line == 3 and bad.reason and "\n" not in bad.reason
                return
            except Exception as exc:  # noqa: BLE001 - the point: nothing else escapes
                raise AssertionError(f"parse_line raised {type(exc).__name__}: {exc} on {line!r}") from exc
            # what parse_line accepts is what the store accepts (and can store on every backend)
            assert validate_raw_event(raw) == (raw.type, raw.data)
            assert check_raw_event(raw) == (raw.type, raw.data, raw.version)
            assert isinstance(sid, ec.StreamId) and (md is None or isinstance(md, ec.Metadata))
            raw.data.decode("utf-8")
            if md is not None:
                P_codec.encode_metadata(md)
                if C is not None:
                    C.encode_metadata(md)

        @fuzz(300)
        @given(data=payloads, type_name=text)
        def run_raw(data, type_name):
            try:
                t, checked = validate_raw_event(ec.RawEvent(type_name, data))
            except ec.ValidationError:
                return
            assert checked.lstrip()[:1] == b"{"
            checked.decode("utf-8")
            assert b"\x00" not in checked

        run_raw()

    else:
        raise SystemExit(f"unknown fuzz target {target!r}; one of {TARGETS}")
    run()
    print(f"fuzzed {target} ({', '.join(IMPLS)})")


if __name__ == "__main__":
    if sys.argv[1] == "__abort__":
        os.abort()
    _child(sys.argv[1])
