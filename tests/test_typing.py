"""What type checkers see: mypy and pyright pass on the examples and on a typed user script, and
pyright's `--verifytypes` finds the public API typed.

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
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What a user's code looks like to the checkers: the examples and the typed user script.
USER_CODE = ["examples", "tests/typing"]
#: The share of the public names whose types pyright can tell (`--verifytypes`), at least.
MIN_TYPE_COMPLETENESS = 0.95


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


def test_mypy_accepts_the_examples_and_the_user_script_and_refuses_what_they_mark():
    _checker("mypy")
    done = _run("mypy", *USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    # --strict on the user script: a user's strictest settings find nothing either (no Any leaking out of
    # eventcore's signatures). The examples are written untyped, as most users' code is.
    done = _run("mypy", "--strict", "tests/typing")
    assert done.returncode == 0, done.stdout + done.stderr


def test_pyright_accepts_the_examples_and_the_user_script_and_refuses_what_they_mark():
    _checker("pyright")
    done = _run("pyright", "--pythonpath", sys.executable, *USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 errors" in done.stdout, done.stdout


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
