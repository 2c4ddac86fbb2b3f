"""test_stateful's model-based test on the asyncio stores (eventcore.aio), through aio_adapter.AioAdapter.

The same state machine, rules, examples and model as for the sync stores (see test_stateful): random
appends of every kind, idempotency keys, stale snapshots, threads racing their appends (here, through
the adapter, onto one event loop) and every read, checked against the model after each step. A fresh
asyncio store per example, each with its adapter's loop.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
import uuid

import pytest

import test_stateful
from aio_adapter import AioAdapter


def _aio_factory(url_of):
    """A factory for test_stateful.FACTORIES: `url_of(request)` -> make() -> (url, options, cleanup)."""
    def factory(request):
        opener = url_of(request)

        def make():
            url, options, cleanup = opener()
            try:
                adapter = AioAdapter.connect(url, **options)
            except BaseException:
                cleanup()
                raise

            def done():
                try:
                    adapter.shutdown()
                finally:
                    cleanup()

            return adapter, done

        return make

    return factory


def _memory(request):
    return lambda: ("memory://", {}, lambda: None)


def _sqlite(request):
    root = request.getfixturevalue("tmp_path")

    def opener():
        folder = tempfile.mkdtemp(dir=root)
        return f"sqlite:///{folder}/events.db", {}, lambda: shutil.rmtree(folder, ignore_errors=True)

    return opener


def _postgres(request):
    if importlib.util.find_spec("eventcore.aio.postgres") is None:
        pytest.skip("eventcore.aio.postgres (AsyncPostgresStore) is not in this build yet")
    dsn = request.getfixturevalue("pg_dsn")

    def opener():
        import psycopg
        from psycopg import sql

        schema = f"sm_{uuid.uuid4().hex[:12]}"

        def drop():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

        # Every connection opened up front, as test_stateful's sync factory does (see there).
        return dsn, {"schema": schema, "pool_size": 5, "pool_min_size": 5}, drop

    return opener


AIO_FACTORIES = {"aio-memory": _aio_factory(_memory), "aio-sqlite": _aio_factory(_sqlite),
                 "aio-postgres": _aio_factory(_postgres)}


#: test_stateful's test, collected here too: run with `backend` below.
test_store_agrees_with_model = test_stateful.test_store_agrees_with_model


@pytest.fixture(params=list(AIO_FACTORIES))
def backend(request, monkeypatch) -> str:
    """The asyncio backend under test; test_stateful's test finds its factory in FACTORIES."""
    monkeypatch.setitem(test_stateful.FACTORIES, request.param, AIO_FACTORIES[request.param])
    return request.param
