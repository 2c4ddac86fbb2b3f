"""What type checkers see: mypy and pyright pass on the examples and on a typed user script,
pyright's `--verifytypes` finds the public API typed, and the package's own errors only go down.

tests/typing/user_script.py holds lines that must be type errors (a misspelt method or option, a
field the event class lacks), each under `# type: ignore[...]`; both checkers are configured
(pyproject.toml) to report an ignore comment that silences nothing, so a mistake they stop
catching fails here. The checkers come from the `test` extra; pyright from PyPI with its
`nodejs` extra, which runs on the Node.js of a wheel (nothing fetched from npm). Without them
the tests skip, except under CI=true, where a missing checker is a failure.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from optional import once_per_suite

ROOT = Path(__file__).resolve().parent.parent
#: What a user's code looks like to the checkers: the examples and the typed user script.
USER_CODE = ["examples", "tests/typing"]
#: The share of the public names whose types pyright can tell (`--verifytypes`), at least.
MIN_TYPE_COMPLETENESS = 0.95
#: The errors mypy and pyright still find in the package itself (internals: psycopg's LiteralString
#: queries, connections that are None until opened, ...), counted per file and rule. A count may only
#: go down: a change that adds an error fails here; one that removes some lowers the count here too.
PACKAGE_ERRORS = ROOT / "tests" / "typing" / "package_errors.json"


def _checker(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (pip install '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # PYRIGHT_PYTHON_IGNORE_WARNINGS: no look-up of the newest pyright release on each run. PATH: pyright's
    # --verifytypes finds the package through the first `python` on the PATH, this test's own first.
    env = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@once_per_suite
def test_mypy_accepts_the_examples_and_the_user_script_and_refuses_what_they_mark():
    _checker("mypy")
    done = _run("mypy", *USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    # --strict on the user script: a user's strictest settings find nothing either (no Any leaking out of
    # eventcore's signatures). The examples are written untyped, as most users' code is.
    done = _run("mypy", "--strict", "tests/typing")
    assert done.returncode == 0, done.stdout + done.stderr


@once_per_suite
def test_pyright_accepts_the_examples_and_the_user_script_and_refuses_what_they_mark():
    _checker("pyright")
    done = _run("pyright", "--pythonpath", sys.executable, *USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 errors" in done.stdout, done.stdout


@once_per_suite
def test_pyright_finds_the_public_api_typed():
    _checker("pyright")
    done = _run("pyright", "--pythonpath", sys.executable, "--verifytypes", "eventcore", "--ignoreexternal",
                "--outputjson")
    report = json.loads(done.stdout)  # exit status 1 whenever the score is under 100 %: the score decides
    completeness = report["typeCompleteness"]
    untyped = [s["name"] for s in completeness["symbols"] if s["isExported"] and not s["isTypeKnown"]]
    assert completeness["completenessScore"] >= MIN_TYPE_COMPLETENESS, (
        f"{completeness['completenessScore']:.1%} of eventcore's public names have known types; "
        f"untyped: {untyped}"
    )


def _pyright_package_errors() -> Counter[str]:
    done = _run("pyright", "--pythonpath", sys.executable, "--outputjson", "src/eventcore")
    found: Counter[str] = Counter()
    for diagnostic in json.loads(done.stdout)["generalDiagnostics"]:
        if diagnostic["severity"] == "error":
            path = Path(diagnostic["file"]).relative_to(ROOT).as_posix()
            found[f"{path} {diagnostic.get('rule', 'error')}"] += 1
    return found


def _mypy_package_errors() -> Counter[str]:
    done = _run("mypy", "src/eventcore")
    found: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        match = re.match(r"(\S+?):\d+: error: .*\[([a-z-]+)\]$", line)
        if match:
            found[f"{Path(match[1]).as_posix()} {match[2]}"] += 1
    assert done.returncode in (0, 1) and (found or done.returncode == 0), done.stdout + done.stderr
    return found


@once_per_suite
@pytest.mark.parametrize("checker", ["pyright", "mypy"])
def test_the_package_gains_no_type_error(checker):
    _checker(checker)
    found = _pyright_package_errors() if checker == "pyright" else _mypy_package_errors()
    allowed = Counter(json.loads(PACKAGE_ERRORS.read_text())[checker])
    new = {key: f"{n} (was {allowed[key]})" for key, n in found.items() if n > allowed[key]}
    assert not new, f"{checker} finds new errors in the package (file rule: count): {new}"
    fixed = {key: f"{found[key]} (was {n})" for key, n in allowed.items() if found[key] < n}
    assert not fixed, f"fewer {checker} errors than {PACKAGE_ERRORS.name} allows: lower its counts to {fixed}"
