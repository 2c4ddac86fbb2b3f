"""Optional test dependencies: skipped locally when missing, a failure under CI=true (where `.[test]`
installs them all), so a broken install can never pass CI by skipping.

The one exception is asked for by name: EVENTCORE_TEST_BACKENDS lists the backends a run covers
(comma-separated, from `memory`, `sqlite`, `postgres`; unset or empty means all of them). A backend left
out is deselected: conftest.py removes its tests at collection and pytest counts them as "deselected".
The PostgreSQL tests collection cannot see (a test reaching pg_dsn at run time, a module or a fixture
that asks for the driver, e.g. to start a cluster of its own) are skipped instead, naming the variable.
That is how a machine without PostgreSQL (the macOS and Windows CI jobs) runs under CI=true on purpose,
while a run that expected PostgreSQL and did not find it still fails.
"""
from __future__ import annotations

import importlib
import os

import pytest

#: Every backend the suite knows, as EVENTCORE_TEST_BACKENDS spells them.
ALL_BACKENDS = ("memory", "sqlite", "postgres")
#: The modules only the PostgreSQL backend needs.
POSTGRES_MODULES = ("psycopg", "psycopg_pool")


def selected_backends() -> tuple[str, ...]:
    """The backends this run covers, in ALL_BACKENDS order; a name not in ALL_BACKENDS is a usage error,
    so a typo cannot quietly deselect everything."""
    raw = os.environ.get("EVENTCORE_TEST_BACKENDS", "")
    names = {name.strip() for name in raw.split(",") if name.strip()}
    if not names:
        return ALL_BACKENDS
    unknown = sorted(names - set(ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(
            f"EVENTCORE_TEST_BACKENDS={raw!r}: unknown backend {', '.join(unknown)}; "
            f"choose from {', '.join(ALL_BACKENDS)} (comma-separated), or unset it to run all"
        )
    return tuple(b for b in ALL_BACKENDS if b in names)


def backend_of(value: object) -> str | None:
    """The backend a test parameter names ("postgres-single" is PostgreSQL too, and so is "aio-postgres",
    the asyncio store), or None.

    Only exact names count: a DSN such as "postgresql://..." or "sqlite:///x.db" is a test's input,
    not a choice of backend."""
    if not isinstance(value, str):
        return None
    value = value.removeprefix("aio-")
    for backend in ALL_BACKENDS:
        if value == backend or value.startswith(backend + "-"):
            return backend
    return None


def postgres_selected() -> bool:
    return "postgres" in selected_backends()


def skip_unless_postgres_selected() -> None:
    if not postgres_selected():
        pytest.skip("PostgreSQL left out by EVENTCORE_TEST_BACKENDS="
                    f"{os.environ.get('EVENTCORE_TEST_BACKENDS', '')!r}", allow_module_level=True)


def require(module: str):
    """`module`, imported; missing, a skip locally and a failure under CI=true. The PostgreSQL driver is
    asked for only by tests that need a server, so when EVENTCORE_TEST_BACKENDS leaves PostgreSQL out,
    asking for it skips the test (or, at module level, the module), installed or not."""
    if module.split(".")[0] in POSTGRES_MODULES:
        skip_unless_postgres_selected()
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


#: For a test whose subject does not depend on the implementation (building the distributions, type-checking
#: the sources): it runs under the compiled one only. The README's test command runs the suite under both,
#: so such a test ran once already when the pure-Python run skips it; a run under the pure twin alone
#: (EVENTCORE_IMPL=python) says so.
once_per_suite = pytest.mark.skipif(
    os.environ.get("EVENTCORE_IMPL") == "python",
    reason="does not depend on the implementation: it runs in the EVENTCORE_IMPL=c run of the suite")
