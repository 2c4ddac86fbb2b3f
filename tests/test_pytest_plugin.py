"""The eventcore pytest plugin: its example passes on every backend with benchmarks on, loading it starts
and imports nothing heavy, backends are chosen by option, ini or parametrize, a missing PostgreSQL is a
skip (a failure under CI=true), and every store a test made is closed (its schema dropped) afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eventcore.testing import pgcluster
from eventcore.testing.pytest_plugin import StoreFactory

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_with_plugin.py"


def _run_pytest(args, env_overrides, cwd):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env_overrides}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_example_tests_and_benchmarks_a_command_on_every_backend(pg_dsn, tmp_path):
    # The suite's PostgreSQL, so the example starts no second server; CI=true turns a missing one into a failure.
    proc = _run_pytest([str(EXAMPLE), "-v", "--eventcore-backends=memory,sqlite,postgres"],
                       {"EVENTCORE_TEST_DSN": pg_dsn, "CI": "true"}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "11 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    for backend in ("memory", "sqlite", "postgres"):
        assert f"test_a_transfer_writes_to_both_accounts[{backend}] PASSED" in proc.stdout
        assert f"test_transfer_speed[{backend}] " in proc.stdout.split("benchmark:", 1)[1]  # a row of the table
    assert "test_each_store_starts_empty[memory]" not in proc.stdout  # the test chose sqlite and postgres


def test_with_autoloading_off_the_plugin_loads_by_name(tmp_path):
    proc = _run_pytest([str(EXAMPLE), "-p", "eventcore.testing.pytest_plugin", "-p", "pytest_benchmark.plugin",
                        "--benchmark-disable", "--eventcore-backends=memory", "-k", "not starts_empty"],
                       {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout


def test_naming_the_plugin_while_it_is_autoloaded_loads_it_once(pytester, no_postgres):
    pytester.makeconftest('pytest_plugins = ["eventcore.testing.pytest_plugin"]\n')
    pytester.makepyfile(USES_STORE)
    pytester.runpytest("-p", "eventcore.testing.pytest_plugin", "--eventcore-backends=memory").assert_outcomes(passed=1)


def test_it_can_be_turned_off(pytester):
    pytester.makepyfile(USES_STORE)
    result = pytester.runpytest("-p", "no:eventcore.testing.pytest_plugin")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'eventcore_store' not found*"])


def test_loading_the_plugin_imports_no_driver_and_starts_nothing():
    code = ("import sys, eventcore.testing.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_pool', 'sqlite3')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.fixture
def no_postgres(monkeypatch):
    """No EVENTCORE_TEST_DSN and no server binaries: the plugin cannot have a PostgreSQL."""
    monkeypatch.delenv("EVENTCORE_TEST_DSN", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(pgcluster, "find_pg_bindir", lambda: None)


USES_STORE = """
def test_store(eventcore_store):
    assert eventcore_store.stream_version("s-1") == 0 and not eventcore_store.closed
"""


def test_a_test_using_eventcore_store_runs_once_per_chosen_backend(pytester, no_postgres):
    pytester.makepyfile(USES_STORE)
    result = pytester.runpytest("-v", "--eventcore-backends=sqlite,memory")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_store[[]sqlite[]] PASSED*", "*test_store[[]memory[]] PASSED*"])


def test_the_ini_option_chooses_backends_and_the_command_line_wins(pytester, no_postgres):
    pytester.makeini("[pytest]\neventcore_backends = memory sqlite\n")
    pytester.makepyfile(USES_STORE)
    pytester.runpytest("-v").assert_outcomes(passed=2)
    pytester.runpytest("-v", "--eventcore-backends=memory").assert_outcomes(passed=1)


def test_an_unknown_backend_stops_the_run_before_any_test(pytester):
    pytester.makepyfile(USES_STORE)
    result = pytester.runpytest("--eventcore-backends=memory,mysql")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown eventcore backend(s) 'mysql'; choose from memory, sqlite, postgres*"])


def test_without_postgresql_its_runs_are_skipped_with_the_reason(pytester, no_postgres):
    pytester.makepyfile(USES_STORE)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*PostgreSQL unavailable*no PostgreSQL server binaries found*EVENTCORE_TEST_DSN*"])


def test_under_ci_a_missing_postgresql_fails(pytester, no_postgres, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(USES_STORE)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*PostgreSQL unavailable*a failure, not a skip, because CI=true*"])


def test_tests_without_eventcore_fixtures_start_no_server(pytester, monkeypatch):
    monkeypatch.delenv("EVENTCORE_TEST_DSN", raising=False)

    def refuse(self):
        raise AssertionError("a PostgreSQL server was started")

    monkeypatch.setattr(pgcluster.TemporaryCluster, "start", refuse)
    pytester.makepyfile("def test_plain():\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_test_can_choose_its_own_backends(pytester, no_postgres):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("eventcore_backend", ["sqlite"])
        def test_only_sqlite(eventcore_store, eventcore_backend):
            assert eventcore_backend == "sqlite" and type(eventcore_store).__name__ == "SQLiteStore"
    """))
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1)


def test_each_benchmark_round_gets_a_fresh_store_and_the_last_is_closed_at_the_end():
    factory = StoreFactory("memory")
    prepared = []
    setup = factory.pedantic_setup(prepared.append)
    (first,), _ = setup()
    (second,), _ = setup()
    assert first.closed and not second.closed  # one store open at a time, however many rounds
    assert prepared == [first, second]
    other = factory()
    factory.close_all()
    assert second.closed and other.closed


def test_a_postgres_store_lives_in_its_own_schema_dropped_after_use(pg_dsn):
    import psycopg

    factory = StoreFactory("postgres", postgres_url=pg_dsn)
    first, second = factory(pool_size=2), factory(pool_size=2)
    assert first.schema != second.schema
    factory.close_all()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = ANY(%s)",
                            ([first.schema, second.schema],)).fetchall()
    assert rows == [] and first.closed and second.closed


def test_the_readme_shows_tests_of_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Testing your own commands: the pytest plugin\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    example = EXAMPLE.read_text()
    for function in code.strip().split("\n\n\n"):
        assert function in example, function


def test_the_pypi_page_example_and_its_test_pass(pytester):
    page = (ROOT / "PYPI.md").read_text()
    blocks = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    assert len(blocks) == 2 and "eventcore_store" in blocks[1]
    pytester.makepyfile(test_page="\n".join(blocks))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--eventcore-backends=memory,sqlite")
    result.assert_outcomes(passed=2)
