"""What a release carries and how an installation without its compiled hot path behaves.

The licence is in the metadata and the distributions; the sdist carries what its own tests read
(docs/, examples/, bench/, .ci/run); an import that falls back to the pure-Python twin says so
once, and an import that chose it says nothing.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: tomli, its model, if installed; else the tests that read pyproject skip
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text()) if tomllib is not None else None


def _pyproject() -> dict:
    if PYPROJECT is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    return PYPROJECT

#: What the tests of an unpacked sdist read besides the package and tests/ themselves.
SDIST_NEEDS = ["LICENSE", "PYPI.md", "README.md", "docs/reliability.md", "examples/bank.py",
               "bench/conftest.py", ".ci/run", "ext/_speedups.pyx"]


def test_the_licence_is_mit_and_pyproject_names_its_file():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n") and "eventcore contributors" in licence
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    # license-files and an SPDX `license` need setuptools 77.
    (setuptools,) = [r for r in _pyproject()["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"


def test_the_installed_distribution_carries_the_licence():
    dist = importlib.metadata.distribution("pyeventcore")
    assert dist.metadata["License-Expression"] == "MIT"
    assert dist.metadata.get_all("License-File") == ["LICENSE"]


def test_the_pypi_page_links_only_absolute_urls():
    """PyPI shows the page away from the repository: a relative link there leads nowhere."""
    text = (ROOT / _pyproject()["project"]["readme"]).read_text()
    targets = re.findall(r"\]\(([^)]*)\)", text)
    assert [t for t in targets if not t.startswith("https://")] == []
    assert all(url.startswith("https://") for url in _pyproject()["project"]["urls"].values())


def test_the_pypi_page_example_runs(tmp_path):
    text = (ROOT / _pyproject()["project"]["readme"]).read_text()
    # The first block; the second, a test using the pytest plugin, runs in tests/test_pytest_plugin.py.
    example = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    script = example + "print([(e.version, e.data.amount) for e in store.read_stream('account-alice')])\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "[(1, 100)]\n"), proc.stderr


def _manifest_files() -> set[str]:
    """The files MANIFEST.in adds (its `include` and `recursive-include` lines), as setuptools globs them."""
    files: set[str] = set()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "include":
            files.update(str(p.relative_to(ROOT)) for pattern in words[1:] for p in ROOT.glob(pattern))
        elif words[0] == "recursive-include":
            folder, patterns = ROOT / words[1], words[2:]
            files.update(str(p.relative_to(ROOT)) for p in folder.rglob("*")
                         if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in patterns))
    return files


def _build_installed() -> bool:
    """Whether PyPA's `build` is installed (by its distribution: a checkout's own build/ folder, which
    setuptools leaves behind, would pass for an importable `build` package from the repository root)."""
    try:
        importlib.metadata.distribution("build")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _sdist_files(tmp_path: Path) -> set[str]:
    # Run from tmp_path: from the repository root `-m build` would find the build/ folder first.
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600, cwd=tmp_path)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_the_sdist_carries_what_its_tests_read(tmp_path):
    if os.environ.get("CI", "").lower() == "true" and _build_installed():
        files = _sdist_files(tmp_path)
    else:
        files = _manifest_files()
    assert [f for f in SDIST_NEEDS if f not in files] == []
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    assert sorted(tests - files) == []


_RECORD_IMPORT = """
import json, sys, warnings
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "eventcore._speedups":
            raise ImportError("hidden by the test: no compiled extension")
if sys.argv[1] == "hide":
    sys.meta_path.insert(0, _Hide())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import eventcore
    import eventcore._impl
print(json.dumps({"impl": eventcore.__impl__, "warnings": [
    {"category": w.category.__name__, "runtime": issubclass(w.category, RuntimeWarning),
     "ours": w.category is eventcore.PurePythonWarning, "message": str(w.message)} for w in caught]}))
"""


def _import(extension: str, impl: str | None, code: str = _RECORD_IMPORT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTCORE_IMPL", "PYTHONWARNINGS")}
    if impl is not None:
        env["EVENTCORE_IMPL"] = impl
    return subprocess.run([sys.executable, "-c", code, extension], env=env, capture_output=True, text=True,
                          timeout=60)


def _warnings(extension: str, impl: str | None) -> tuple[str, list[dict]]:
    proc = _import(extension, impl)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return report["impl"], [w for w in report["warnings"] if "eventcore" in w["message"] or w["ours"]]


def test_falling_back_to_pure_python_warns_once():
    impl, caught = _warnings("hide", None)
    assert impl == "python"
    assert len(caught) == 1, caught
    (warning,) = caught
    assert warning["ours"] and warning["runtime"] and warning["category"] == "PurePythonWarning"
    assert "pure-Python" in warning["message"] and "eventcore._speedups" in warning["message"]
    assert "hidden by the test" in warning["message"] and "EVENTCORE_IMPL=python" in warning["message"]


def test_the_fallback_warning_is_shown_under_default_filters():
    hide_and_import = _RECORD_IMPORT.split("with warnings")[0] + "import eventcore\n"
    proc = _import("hide", "", code=hide_and_import)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("PurePythonWarning:") == 1, proc.stderr


def test_choosing_pure_python_does_not_warn():
    for extension in ("hide", "keep"):
        impl, caught = _warnings(extension, "python")
        assert (impl, caught) == ("python", [])


def test_the_compiled_extension_does_not_warn():
    if importlib.util.find_spec("eventcore._speedups") is None:
        assert os.environ.get("CI", "").lower() != "true", "the compiled extension is part of every CI build"
        pytest.skip("compiled extension not built")
    for impl in (None, "c"):
        assert _warnings("keep", impl) == ("c", [])
