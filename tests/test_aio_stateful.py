"""test_stateful's model-based test on the asyncio stores (eventcore.aio), through aio_adapter.AioAdapter.

The same state machine, rules, examples and model as for the sync stores (see test_stateful): random
appends of every kind, idempotency keys, stale snapshots, threads racing their appends (here, through
the adapter, onto one event loop) and every read, checked against the model after each step. A fresh
asyncio store per example, each with its adapter's loop.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import uuid

import pytest
from hypothesis import seed, settings
from hypothesis.stateful import run_state_machine_as_test

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


#: The outcomes test_stateful's test requires its examples to reach (see there).
REQUIRED = {"conflict: exact", "conflict: no stream", "conflict: stream exists", "conflict on a read-only participant",
            "conflict among several streams", "append written", "check-only append passed",
            "append with a read-only participant", "invalid input rejected", "race: racers won",
            "race: racers lost", "duplicate key refused", "key recorded"}
#: Examples per run unless EVENTCORE_STATEFUL_EXAMPLES says otherwise, and runs at most. Which racer of a
#: race wins varies with timing, and so do the model and the steps hypothesis draws next; a run of
#: 20 examples may then pick a rule too rarely to reach one outcome (a keyed append recorded). Further
#: runs, on other seeds, go on until every outcome is reached: each run checks every step all the same.
AIO_EXAMPLES = {"aio-memory": 20, "aio-sqlite": 20, "aio-postgres": 10}  # PostgreSQL's take ~4x as long
RUNS = 4


@pytest.fixture(params=list(AIO_FACTORIES))
def backend(request) -> str:
    return request.param


def test_asyncio_store_agrees_with_model(backend, request):
    """test_stateful.test_store_agrees_with_model on an asyncio store."""
    machine = type(f"StoreMachine_{backend.replace('-', '_')}", (test_stateful.StoreMachine,),
                   {"make_store": staticmethod(AIO_FACTORIES[backend](request))})
    SEEN = test_stateful.SEEN
    SEEN.clear()
    extra = os.environ.get("EVENTCORE_STATEFUL_EXAMPLES")
    for run in range(1 if extra else RUNS):
        settings_ = test_stateful.SETTINGS if extra else settings(
            test_stateful.SETTINGS, max_examples=AIO_EXAMPLES[backend], derandomize=run == 0)
        run_state_machine_as_test(seed(run)(machine) if run else machine, settings=settings_)
        missing = REQUIRED - {k for k, v in SEEN.items() if v}
        if not missing:
            break
    print(f"\n{backend} ({run + 1} run(s)): " + ", ".join(f"{k} {v}" for k, v in sorted(SEEN.items())))
    assert not missing, missing
