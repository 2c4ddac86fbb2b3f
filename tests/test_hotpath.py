"""The hot path's contract: both implementations, and the stubs of the compiled one, match
`eventcore._impl.HotPath` function for function and signature for signature; the switch
exposes exactly the chosen implementation; and only the switch reaches into `_pure`."""
from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest

import eventcore
from eventcore import _impl, _pure
from eventcore._impl import HOT_PATH_NAMES, HotPath

try:
    from eventcore import _speedups as C
except ImportError:  # the compiled extension is part of every CI build
    if os.environ.get("CI", "").lower() == "true" or os.environ.get("EVENTCORE_IMPL") == "c":
        raise
    C = None

needs_extension = pytest.mark.skipif(C is None, reason="compiled extension not built")

PACKAGE = Path(eventcore.__file__).resolve().parent


def _protocol_signature(name: str) -> inspect.Signature:
    sig = inspect.signature(getattr(HotPath, name))
    params = list(sig.parameters.values())
    assert params[0].name == "self"
    return sig.replace(parameters=params[1:])


def _shape(sig: inspect.Signature) -> list[tuple]:
    """Names, kinds and defaults: what every implementation can show."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_names_the_hot_path():
    assert HOT_PATH_NAMES == (
        "encode_event", "encode_metadata", "decode_rows", "decode_copy", "copy_from_result", "new_event_ids",
        "check_expected_versions", "assign_versions", "encode_copy_rows", "encode_copy_events",
        "encode_column_payloads", "fill_columns", "decode_copy_columns",
    )


def test_pure_twins_satisfy_the_protocol_with_the_same_annotations():
    assert isinstance(_pure, HotPath)
    assert sorted(_pure.__all__) == sorted(HOT_PATH_NAMES)
    for name in HOT_PATH_NAMES:
        # Annotations compared as written (both sides use postponed evaluation).
        assert inspect.signature(getattr(_pure, name)) == _protocol_signature(name), name


# What Cython's embedsignature writes for a typed argument, as the Python type it accepts.
_C_TYPES = {"bytearray": "bytearray", "list": "list", "dict": "dict", "str": "str", "bytes": "bytes", "tuple": "tuple",
            "int64_t": "int", "Py_ssize_t": "int", "bool": "bool"}


@needs_extension
def test_compiled_extension_satisfies_the_protocol():
    assert isinstance(C, HotPath)
    for name in HOT_PATH_NAMES:
        func = getattr(C, name)
        want = _protocol_signature(name)
        assert _shape(inspect.signature(func)) == _shape(want), name
        # The C-level types embedsignature puts first in the docstring agree with the annotations.
        first = func.__doc__.splitlines()[0]
        m = re.fullmatch(rf"{name}\((.*)\)", first)
        assert m, first
        for arg, param in zip(m.group(1).split(", ") if m.group(1) else [], want.parameters.values()):
            *ctype, argname = arg.split()
            argname, _, default = argname.partition("=")
            assert argname == param.name, (name, arg)
            assert not default or default == repr(param.default), (name, arg)
            if ctype:
                assert _C_TYPES[ctype[0]] == param.annotation.split("[")[0], (name, arg, param.annotation)


def test_stubs_of_the_extension_match_the_protocol():
    tree = ast.parse((PACKAGE / "_speedups.pyi").read_text())
    stubs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert sorted(stubs) == sorted(HOT_PATH_NAMES)
    for name, node in stubs.items():
        want = _protocol_signature(name)
        got = [(a.arg, ast.unparse(a.annotation)) for a in node.args.args]
        assert got == [(p.name, p.annotation) for p in want.parameters.values()], name
        assert ast.unparse(node.returns) == want.return_annotation, name


def test_the_switch_exposes_exactly_the_chosen_implementation():
    expected = C if _impl.IMPL == "c" else _pure
    assert _impl.implementation is expected
    for name in HOT_PATH_NAMES:
        assert getattr(_impl, name) is getattr(expected, name), name


def _imports(path: Path) -> set[str]:
    """The eventcore modules `path` imports, absolute, lazy imports included."""
    module = "eventcore." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {name for name in found if name == "eventcore" or name.startswith("eventcore.")}


def test_only_the_switch_imports_the_pure_twins():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "_pure" or rel == Path("_impl.py"):
            continue
        reached = {m for m in _imports(path) if m == "eventcore._pure" or m.startswith("eventcore._pure.")}
        assert not reached, f"{rel} imports {sorted(reached)}: call the hot path through eventcore._impl"
