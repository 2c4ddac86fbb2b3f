"""The eventcore pytest plugin: test and benchmark your own commands against every store backend.

Installed with pyeventcore and loaded by pytest automatically (entry point `pytest11`, named as this
module: `-p no:eventcore.testing.pytest_plugin` turns it off, `-p eventcore.testing.pytest_plugin` loads it
where PYTEST_DISABLE_PLUGIN_AUTOLOAD is set, and naming it while it is autoloaded loads it once). Loading it starts nothing and imports no database driver:
a store, a schema or a PostgreSQL server exists only once a test asks for one of these fixtures.

    eventcore_store           an empty store, closed after the test; a test using it runs once per
                              backend (memory, sqlite, postgres by default)
    eventcore_store_factory   makes more empty stores of the same backend; `pedantic_setup(prepare)`
                              gives pytest-benchmark's `benchmark.pedantic` a fresh store each round
    eventcore_backend         the backend name of this test run: "memory", "sqlite" or "postgres"
    eventcore_postgres_url    EVENTCORE_TEST_DSN, or a throwaway cluster started once per session

Backends come from `--eventcore-backends=memory,sqlite` on the command line, else the ini option
`eventcore_backends`, else all three; one test picks its own with
`@pytest.mark.parametrize("eventcore_backend", ["sqlite", "postgres"])`.

When PostgreSQL cannot be reached or started, the postgres runs are skipped with the reason; under
CI=true they fail instead, so a CI job never passes without having tested PostgreSQL.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import pytest

#: Every backend the plugin can give a test, in the order their runs appear.
BACKENDS = ("memory", "sqlite", "postgres")

#: A PostgreSQL server's URL to use instead of starting a throwaway one (the project's own tests read it too).
DSN_VARIABLE = "EVENTCORE_TEST_DSN"

_chosen_backends = pytest.StashKey[tuple]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("eventcore", "eventcore stores for tests and benchmarks")
    group.addoption(
        "--eventcore-backends", metavar="NAMES", default=None,
        help=f"comma-separated backends that tests using eventcore_store run on (of {', '.join(BACKENDS)}; "
             "default: the ini option eventcore_backends, else all)",
    )
    parser.addini(
        "eventcore_backends",
        help=f"backends that tests using eventcore_store run on, separated by commas or spaces (of {', '.join(BACKENDS)})",
        default=",".join(BACKENDS),
    )


def _parse_backends(text: str, where: str) -> tuple:
    names = tuple(name for name in re.split(r"[\s,]+", text.strip()) if name)
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise pytest.UsageError(
            f"{where}: unknown eventcore backend(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(BACKENDS)}"
        )
    return tuple(dict.fromkeys(names))  # each once, in the order given


def pytest_configure(config: pytest.Config) -> None:
    # Checked here, so a misspelt backend stops the run before any test, not only tests that use a store.
    option = config.getoption("eventcore_backends")
    if option is not None:
        backends = _parse_backends(option, "--eventcore-backends")
    else:
        ini = config.getini("eventcore_backends")
        backends = _parse_backends(" ".join(ini) if isinstance(ini, list) else ini, "ini option eventcore_backends")
    config.stash[_chosen_backends] = backends


def _names_parametrized(marker: pytest.Mark) -> list:
    argnames = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
    if isinstance(argnames, str):
        return [name.strip() for name in argnames.split(",")]
    return list(argnames)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "eventcore_backend" not in metafunc.fixturenames:
        return
    # A test (or its class or module) that parametrizes eventcore_backend itself chose its backends.
    for marker in metafunc.definition.iter_markers("parametrize"):
        if "eventcore_backend" in _names_parametrized(marker):
            return
    backends = metafunc.config.stash[_chosen_backends]
    metafunc.parametrize("eventcore_backend", backends, indirect=True, ids=list(backends))


@pytest.fixture
def eventcore_backend(request: pytest.FixtureRequest) -> str:
    """The backend of this test's stores: "memory", "sqlite" or "postgres" (one test run per backend)."""
    backend = getattr(request, "param", None)
    if backend not in BACKENDS:
        pytest.fail(
            f"eventcore_backend must be one of {', '.join(BACKENDS)}, got {backend!r} "
            "(request it as a test argument, so the plugin can parametrize it)",
            pytrace=False,
        )
    return backend


def _postgres_unavailable(reason: str) -> NoReturn:
    message = (
        f"PostgreSQL unavailable for the eventcore postgres backend: {reason}. Set {DSN_VARIABLE} to a server's URL, "
        "install the PostgreSQL server binaries (initdb, pg_ctl), or leave postgres out with "
        "--eventcore-backends=memory,sqlite"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (a failure, not a skip, because CI=true)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def eventcore_postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server for the tests: EVENTCORE_TEST_DSN when set, else a throwaway cluster
    from the installed server binaries, started on first use and removed when the session ends."""
    url = os.environ.get(DSN_VARIABLE)
    if url:
        yield url
        return
    # Without the driver no store could use the cluster: say so before starting one.
    if importlib.util.find_spec("psycopg") is None:
        _postgres_unavailable("the driver psycopg is not installed: pip install 'pyeventcore[postgres]'")
    from .pgcluster import TemporaryCluster

    try:
        cluster = TemporaryCluster(settings={"max_connections": "200"})
    except Exception as exc:
        _postgres_unavailable(f"{type(exc).__name__}: {exc}")
    # The server is a separate process: stop it even if the session ends without its teardown (Ctrl-C).
    atexit.register(cluster.stop)
    try:
        url = cluster.start()
    except Exception as exc:
        cluster.stop()
        _postgres_unavailable(f"{type(exc).__name__}: {exc}")
    try:
        yield url
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


class StoreFactory:
    """Makes empty stores of one backend (this test run's). Every store it made is closed at the end of the
    test, and on PostgreSQL its schema dropped: each store lives in a schema of its own."""

    def __init__(self, backend: str, *, sqlite_dir: Path | None = None, postgres_url: str | None = None) -> None:
        self.backend = backend
        self._sqlite_dir = sqlite_dir
        self._postgres_url = postgres_url
        self._made = 0
        self._open: list = []  # (store, PostgreSQL schema or None), closed in reverse order
        self._round_store = None  # the store pedantic_setup made for the round that is running

    def __call__(self, **options: Any):
        """A new, empty store; `options` go to `eventcore.connect` (e.g. pool_size=20, group_commit=False)."""
        import eventcore

        self._made += 1
        schema = None
        if self.backend == "memory":
            store = eventcore.connect("memory://", **options)
        elif self.backend == "sqlite":
            assert self._sqlite_dir is not None, "a SQLite factory is made with the directory of its files"
            store = eventcore.connect(f"sqlite:///{self._sqlite_dir / f'events-{self._made}.db'}", **options)
        else:
            assert self._postgres_url is not None, "a PostgreSQL factory is made with the server's URL"
            schema = f"eventcore_test_{uuid.uuid4().hex[:12]}"
            connect_options: dict[str, Any] = {"schema": schema, **options}
            store = eventcore.connect(self._postgres_url, **connect_options)
        self._open.append((store, schema))
        return store

    def pedantic_setup(self, prepare: Callable[[Any], Any] | None = None) -> Callable[[], tuple]:
        """A `setup` for `benchmark.pedantic(target, setup=..., rounds=N)`: each round gets a new, empty store,
        passed to `prepare(store)` (untimed: open the accounts the command needs, and warm the store, since a
        new connection's first statements cost several times a warm one's), then to `target(store)` (timed).
        Each round closes the store of the round before, so a long benchmark holds one store open, not N."""

        def setup() -> tuple:
            if self._round_store is not None:
                self._close(self._round_store)
            store = self._round_store = self()
            if prepare is not None:
                prepare(store)
            return (store,), {}

        return setup

    def _close(self, store) -> None:
        for index, (made, schema) in enumerate(self._open):
            if made is store:
                del self._open[index]
                break
        else:
            return
        try:
            if not store.closed:
                store.close()
        finally:
            if schema is not None:
                self._drop_schema(schema)

    def _drop_schema(self, schema: str) -> None:
        import psycopg
        from psycopg import sql

        assert self._postgres_url is not None
        with psycopg.connect(self._postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def close_all(self) -> None:
        """Close every store still open (newest first) and drop their schemas; the first error is raised
        after all were tried."""
        error = None
        while self._open:
            store, _ = self._open[-1]
            try:
                self._close(store)
            except Exception as exc:
                error = error or exc
        self._round_store = None
        if error is not None:
            raise error


@pytest.fixture
def eventcore_store_factory(eventcore_backend: str, request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """Call it for a new, empty store of this test run's backend (several per test if needed);
    `.pedantic_setup(prepare)` makes a fresh store per round of `benchmark.pedantic`. All are closed
    after the test."""
    if eventcore_backend == "postgres":
        factory = StoreFactory("postgres", postgres_url=request.getfixturevalue("eventcore_postgres_url"))
    elif eventcore_backend == "sqlite":
        factory = StoreFactory("sqlite", sqlite_dir=request.getfixturevalue("tmp_path"))
    else:
        factory = StoreFactory(eventcore_backend)
    try:
        yield factory
    finally:
        factory.close_all()


@pytest.fixture
def eventcore_store(eventcore_store_factory: StoreFactory):
    """An empty store of each chosen backend (memory, sqlite, postgres), closed after the test."""
    return eventcore_store_factory()
