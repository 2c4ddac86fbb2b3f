"""What a release carries and how an installation without its compiled hot path behaves.

The licence is in the metadata and the distributions; the sdist carries what its own tests read
(docs/, examples/, bench/, .ci/run); an import that falls back to the pure-Python twin says so
once, and an import that chose it says nothing. Under CI=true (they take a minute each) the built
wheel is installed the way a user installs it and tested, and a build whose compiler fails is shown
to fail, naming EVENTCORE_PUREPYTHON=1, the way out.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from optional import once_per_suite

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


@once_per_suite
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


@once_per_suite
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


# -- built and installed like a user's copy (CI=true only) ------------------------------------------------------

def _under_ci_with_build(what: str) -> None:
    """Skip a slow build test outside CI; under CI=true `build` (in the test extra) must be there."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"{what} builds and installs from PyPI (about a minute): runs under CI=true")
    assert _build_installed(), "PyPA build is in the test extra: `pip install '.[test]'`"


#: What a build must not pick up from a developer's checkout: build products (a stale build/lib would go into
#: the wheel as it is), virtualenvs, caches, databases. The generated C is left out too, so the build cythonizes.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                     ".hypothesis", ".benchmarks", "*.so", "*.pyd", "*.c", "*.db", "*.db-*")


def _source_copy(tmp_path: Path) -> Path:
    """The source tree, copied: building in place would write build/ and ext/*.c into the checkout under test."""
    return Path(shutil.copytree(ROOT, tmp_path / "source", ignore=_NOT_SOURCE))


def _bare_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that points Python at this checkout or its virtualenv, and
    none of the build switches CI sets."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "EVENTCORE_IMPL", "EVENTCORE_PUREPYTHON",
               "EVENTCORE_REQUIRE_EXTENSIONS", "EVENTCORE_TEST_DSN", "EVENTCORE_TEST_BACKENDS", "CC", "LDSHARED"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def _run(args: list, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _new_venv(path: Path) -> Path:
    """A virtualenv with pip and nothing else; returns its python."""
    venv.create(path, with_pip=True, clear=True)
    return path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


@once_per_suite
def test_the_built_wheel_installs_from_pypi_like_a_users_and_passes_its_tests(tmp_path):
    """`python -m build --wheel` gives a wheel with the compiled hot path, the licence and the type marker; pip
    installs it into a bare virtualenv, fetching its dependencies from PyPI; and the model and hot-path tests
    pass against that installation, run from a directory where this checkout's src/ cannot be imported."""
    _under_ci_with_build("the wheel test")
    source = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, source], tmp_path, _bare_env())
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("pyeventcore-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), "a wheel with a compiled extension is platform-specific"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert [n for n in names if re.fullmatch(r"eventcore/_speedups\.[^/]*(\.so|\.pyd)", n)], names
    assert [n for n in names if re.fullmatch(r"pyeventcore-[^/]*\.dist-info/licenses/LICENSE", n)], names
    assert "eventcore/py.typed" in names
    assert [n for n in names if n.startswith("eventcore/stores/postgres/sql/migrations/")], "the SQL is package data"

    python = _new_venv(tmp_path / "venv")
    # No --no-deps: msgspec comes from PyPI, as for a user.
    installed = _run([python, "-m", "pip", "install", "-q", wheel, "pytest>=7", "hypothesis>=6"], tmp_path, _bare_env())
    assert installed.returncode == 0, installed.stderr[-3000:]

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    where = _run([python, "-c", "import eventcore, json; print(json.dumps([eventcore.__file__, eventcore.__impl__]))"],
                 run_dir, _bare_env(EVENTCORE_IMPL="c"))
    assert where.returncode == 0, where.stderr
    module_file, impl = json.loads(where.stdout)
    assert Path(module_file).resolve().is_relative_to((tmp_path / "venv").resolve()) and impl == "c"

    tests = _run([python, "-m", "pytest", "-p", "no:cacheprovider", ROOT / "tests/test_model.py",
                  ROOT / "tests/test_speedups.py"], run_dir,
                 _bare_env(EVENTCORE_IMPL="c", EVENTCORE_TEST_BACKENDS="memory,sqlite", CI="true"))
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    assert "eventcore impl: c" in tests.stdout and " passed" in tests.stdout

    # twine's checks of the metadata PyPI will show (wheels.yml runs them on the sdist before publishing).
    if importlib.util.find_spec("twine") is not None:
        sdist = _run([sys.executable, "-m", "build", "--sdist", "--outdir", dist, source], tmp_path, _bare_env())
        assert sdist.returncode == 0, sdist.stderr[-3000:]
        checked = _run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())], tmp_path,
                       _bare_env())
        assert checked.returncode == 0, checked.stdout + checked.stderr


@once_per_suite
def test_a_failing_compiler_fails_the_build_unless_pure_python_is_asked_for(tmp_path):
    """A compiler that fails fails `pip install`, and the error names EVENTCORE_PUREPYTHON=1; with it the same
    build succeeds, builds no extension, and the installation runs the pure-Python implementation."""
    _under_ci_with_build("the failing-compiler test")
    if sys.platform == "win32":
        pytest.skip("the failing compiler is a shell script (setuptools reads CC on POSIX only)")
    source = _source_copy(tmp_path)
    failing_cc = tmp_path / "failing-cc"
    failing_cc.write_text("#!/bin/sh\necho 'failing-cc: this compiler always fails' >&2\nexit 1\n")
    failing_cc.chmod(0o755)
    python = _new_venv(tmp_path / "venv")
    install = [python, "-m", "pip", "install", "-v", source]

    failed = _run(install, tmp_path, _bare_env(CC=str(failing_cc)))
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    assert "failing-cc: this compiler always fails" in output, output[-3000:]
    assert "could not be built" in output and "EVENTCORE_PUREPYTHON=1" in output, output[-3000:]
    assert _run([python, "-m", "pip", "show", "pyeventcore"], tmp_path, _bare_env()).returncode != 0

    built = _run(install, tmp_path, _bare_env(CC=str(failing_cc), EVENTCORE_PUREPYTHON="1"))
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    imported = _run([python, "-c", "import eventcore, importlib.util; "
                     "print(eventcore.__impl__, importlib.util.find_spec('eventcore._speedups') is None)"],
                    tmp_path, _bare_env())
    assert (imported.returncode, imported.stdout) == (0, "python True\n"), imported.stderr
    assert "PurePythonWarning" in imported.stderr  # not chosen with EVENTCORE_IMPL=python: the import says so
