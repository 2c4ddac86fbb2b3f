"""Shared fixtures. `store` runs a test once per backend in `BACKENDS`.

To add a backend (e.g. PostgreSQL), add one entry to `BACKENDS`: a factory
taking the pytest `request` and returning an open store. A factory may pull
other fixtures (a server, a schema name) with `request.getfixturevalue(...)`.

EVENTCORE_TEST_BACKENDS (see optional.py) narrows a run to some backends: the tests of the others are
deselected here, at collection.
"""
from __future__ import annotations

import os

import pytest

import eventcore
from optional import backend_of, selected_backends

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


def _aio_store(url_of):
    def factory(request):
        from aio_adapter import AioAdapter

        url, options = url_of(request)
        return AioAdapter.connect(url, **options)
    return factory


def _aio_postgres_url(request):
    import importlib.util

    if importlib.util.find_spec("eventcore.aio.postgres") is None:
        pytest.skip("eventcore.aio.postgres (AsyncPostgresStore) is not in this build yet")
    return request.getfixturevalue("pg_dsn"), {"schema": request.getfixturevalue("pg_schema"), "pool_size": 20}


#: The asyncio stores (eventcore.aio), each behind a sync facade (aio_adapter.AioAdapter), so that the
#: sync suites run on them unchanged. Not in BACKENDS: the modules that run them (test_aio_*.py) say
#: which suites, as `backend` there takes these names.
AIO_BACKENDS = {
    "aio-memory": _aio_store(lambda request: ("memory://", {})),
    "aio-sqlite": _aio_store(lambda request: (f"sqlite:///{request.getfixturevalue('tmp_path') / 'events.db'}", {})),
    "aio-postgres": _aio_store(_aio_postgres_url),
}


def pytest_report_header(config):
    backends = selected_backends()
    chosen = "all" if not os.environ.get("EVENTCORE_TEST_BACKENDS", "").strip() else "EVENTCORE_TEST_BACKENDS"
    return [f"eventcore impl: {eventcore.__impl__}", f"eventcore backends: {', '.join(backends)} ({chosen})"]


def pytest_configure(config):
    selected_backends()  # a misspelt EVENTCORE_TEST_BACKENDS stops the run before anything is collected


def _backends_needed(item) -> set[str]:
    """The backends a collected test runs on, as far as collection can tell: the backend names among its
    parameters (the `backend` fixture's and every test's own), and PostgreSQL for a test that uses its
    fixtures. A test that reaches pg_dsn only at run time (request.getfixturevalue) is skipped by pg_dsn."""
    needed = set()
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        needed.update(b for b in map(backend_of, callspec.params.values()) if b is not None)
    if {"pg_dsn", "pg_schema"} & set(getattr(item, "fixturenames", ())):
        needed.add("postgres")
    return needed


def pytest_collection_modifyitems(config, items):
    selected = set(selected_backends())
    kept, deselected = [], []
    for item in items:
        (kept if _backends_needed(item) <= selected else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    """The name of the backend under test."""
    return request.param


@pytest.fixture
def store(backend, request):
    """An empty store of each backend, closed after the test."""
    s = (BACKENDS.get(backend) or AIO_BACKENDS[backend])(request)
    try:
        yield s
    finally:
        getattr(s, "shutdown", s.close)()  # an AioAdapter also stops its loop


@pytest.fixture(params=["aio-memory", "aio-sqlite", "aio-postgres"])
def aio_store(request):
    """An empty asyncio store of each backend behind the sync facade (aio_adapter), shut down after: for
    the tests that run sync checks against the asyncio stores too."""
    s = AIO_BACKENDS[request.param](request)
    try:
        yield s
    finally:
        s.shutdown()
