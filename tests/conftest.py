"""Shared fixtures. `store` runs a test once per backend in `BACKENDS`.

To add a backend (e.g. PostgreSQL), add one entry to `BACKENDS`: a factory
taking the pytest `request` and returning an open store. A factory may pull
other fixtures (a server, a schema name) with `request.getfixturevalue(...)`.
"""
from __future__ import annotations

import os

import pytest

import eventcore

# Child processes the tests start run the implementation under test; and a pure-Python build,
# named by EVENTCORE_IMPL=python, keeps PurePythonWarning off the stderr that tests compare.
os.environ.setdefault("EVENTCORE_IMPL", eventcore.__impl__)

# PostgreSQL fixtures (pg_dsn, pg_schema): a throwaway cluster or EVENTCORE_TEST_DSN.
pytest_plugins = ["pgserver"]


def _memory_store(request):
    return eventcore.connect("memory://")


def _sqlite_store(request):
    tmp_path = request.getfixturevalue("tmp_path")
    return eventcore.connect(f"sqlite:///{tmp_path / 'events.db'}")


#: backend name -> factory(request) -> open EventStore
BACKENDS = {
    "memory": _memory_store,
    "sqlite": _sqlite_store,
    "postgres": lambda request: __import__("pgserver").postgres_store(request),
    "postgres-single": lambda request: __import__("pgserver").postgres_single_commit_store(request),
}


def pytest_report_header(config):
    return f"eventcore impl: {eventcore.__impl__}"


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    """The name of the backend under test."""
    return request.param


@pytest.fixture
def store(backend, request):
    """An empty store of each backend, closed after the test."""
    s = BACKENDS[backend](request)
    try:
        yield s
    finally:
        s.close()
