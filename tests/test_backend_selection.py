"""EVENTCORE_TEST_BACKENDS: a run narrowed to some backends leaves the others' tests out, visibly.

Unset, every backend runs and, under CI=true, a missing PostgreSQL is a failure. Set (the macOS and
Windows CI jobs set `memory,sqlite`), the tests of the backends it leaves out are deselected at
collection, or skipped naming the variable when only running them shows they need PostgreSQL; a name
it does not know stops the run, so a typo cannot deselect a backend by accident.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optional import ALL_BACKENDS, backend_of, selected_backends

TESTS = Path(__file__).resolve().parent


def _pytest(args: list[str], backends: str | None, cwd: Path = TESTS.parent,
            **extra: str) -> subprocess.CompletedProcess:
    """pytest in a child process under CI=true, with EVENTCORE_TEST_BACKENDS set to `backends` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTCORE_TEST_BACKENDS", "EVENTCORE_TEST_DSN")}
    env.update(CI="true", **extra)
    if backends is not None:
        env["EVENTCORE_TEST_BACKENDS"] = backends
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _collected(backends: str | None) -> tuple[list[str], str]:
    proc = _pytest(["--collect-only", "-q", "tests/test_conformance.py", "tests/test_evolution.py"], backends)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line], proc.stdout


def test_unset_or_empty_selects_every_backend(monkeypatch):
    monkeypatch.delenv("EVENTCORE_TEST_BACKENDS", raising=False)
    assert selected_backends() == ALL_BACKENDS == ("memory", "sqlite", "postgres")
    monkeypatch.setenv("EVENTCORE_TEST_BACKENDS", " , ")
    assert selected_backends() == ALL_BACKENDS


def test_names_are_read_in_any_order_with_spaces(monkeypatch):
    monkeypatch.setenv("EVENTCORE_TEST_BACKENDS", " sqlite , memory")
    assert selected_backends() == ("memory", "sqlite")


def test_an_unknown_name_is_a_usage_error_naming_it(monkeypatch):
    monkeypatch.setenv("EVENTCORE_TEST_BACKENDS", "sqlite,postgresql")
    with pytest.raises(pytest.UsageError, match="unknown backend postgresql; choose from memory, sqlite, postgres"):
        selected_backends()


@pytest.mark.parametrize("value,backend", [
    ("postgres", "postgres"), ("postgres-single", "postgres"), ("sqlite", "sqlite"), ("memory", "memory"),
    ("aio-postgres", "postgres"), ("aio-sqlite", "sqlite"), ("aio-memory", "memory"), ("aio-", None),
    ("postgresql://localhost/db", None), ("sqlite:///events.db", None), ("memory://", None),
    (["postgres"], None), (1, None),
])
def test_a_parameter_names_a_backend_only_when_it_is_one(value, backend):
    assert backend_of(value) == backend


def _parameters(test_id: str) -> str:
    return test_id.partition("[")[2]


def test_leaving_postgres_out_deselects_its_tests_and_keeps_the_others():
    everything, _ = _collected(None)
    narrowed, summary = _collected("memory,sqlite")
    postgres = {t for t in everything if "postgres" in _parameters(t)}
    assert postgres and not postgres & set(narrowed)
    assert {t for t in narrowed if "memory" in _parameters(t)} and {t for t in narrowed if "sqlite" in _parameters(t)}
    # Also gone: the tests that take a PostgreSQL fixture without a backend parameter.
    assert set(narrowed) < set(everything) - postgres
    assert f"({len(everything) - len(narrowed)} deselected)" in summary


def test_one_backend_alone_keeps_only_its_own_parametrized_tests():
    narrowed, _ = _collected("sqlite")
    assert narrowed and [t for t in narrowed if "memory" in _parameters(t) or "postgres" in _parameters(t)] == []


def test_a_misspelt_backend_stops_the_run_before_collection():
    proc = _pytest(["--collect-only", "-q", "tests/test_conformance.py"], "memory,sqlight")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "unknown backend sqlight" in proc.stderr


def test_a_test_that_reaches_postgres_only_at_run_time_is_skipped_naming_the_variable(tmp_path):
    """Under CI=true a missing PostgreSQL fails; left out on purpose, it is a skip that says why."""
    (tmp_path / "test_late.py").write_text(
        "def test_late(request):\n"
        "    request.getfixturevalue('pg_dsn')\n"
        "\n"
        "def test_driver():\n"
        "    from optional import require\n"
        "    require('psycopg')\n"
    )
    # The suite's own plugin and helpers, loaded as tests/conftest.py loads them.
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    proc = _pytest(["-p", "pgserver", "-rs", "--rootdir", str(tmp_path), "test_late.py"], "memory,sqlite",
                   cwd=tmp_path, PYTHONPATH=pythonpath)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "2 skipped" in proc.stdout
    assert "PostgreSQL left out by EVENTCORE_TEST_BACKENDS='memory,sqlite'" in proc.stdout
