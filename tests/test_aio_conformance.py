"""The sync store suites, run unchanged on the asyncio stores (eventcore.aio).

Every test of SUITES that takes the `store` fixture runs here on the asyncio backends of
conftest.AIO_BACKENDS, each store behind aio_adapter.AioAdapter (the sync contract, each call awaited
on the adapter's event loop), with `ec.execute` running `eventcore.aio.execute`. So the asyncio API
is held to the very assertions the sync one is, and a test added to one of these suites covers both.

A test that cannot apply to an asyncio store is skipped with its reason (NOT_APPLICABLE); what it
proves is proved for the asyncio API by a test of its own in test_aio.py where it matters.
To keep the asyncio tests within their share of CI time (about 90 s per implementation), aio-postgres
leaves out what does not depend on the backend (ABOVE_THE_STORE, BEFORE_THE_STORE), and the other
store-fixture suites (ingest, projections, metrics...) are not run here: test_aio.py covers the
asyncio side of those.
"""
from __future__ import annotations

import importlib
import inspect
import re

import pytest

from aio_adapter import patch_execute

#: The sync suites run here.
SUITES = ("test_conformance", "test_idempotency", "test_cache", "test_executor")
#: Suites of code above the store (the executor's steps, the command cache), the same whatever the backend:
#: run on the memory and SQLite asyncio stores, not on PostgreSQL's, whose store-level behaviour the
#: other suites (and test_aio.py, test_aio_stateful.py, test_aio_faults.py) cover. Saves ~15 s of CI time.
ABOVE_THE_STORE = ("test_cache", "test_executor")
#: Tests of input refused before any store is reached (eventcore.stores.prepare, shared by every backend), many
#: parameters each: run on aio-memory and aio-sqlite, not on aio-postgres (about 10 s of CI time).
BEFORE_THE_STORE = re.compile(r"^test_bad_|_rejected$|^test_expected_version_past_int64")
#: The asyncio backends (conftest.AIO_BACKENDS).
AIO = ("aio-memory", "aio-sqlite", "aio-postgres")

_IN_HANDLE = ("its command's handle() writes to the store through the sync API: on an event loop, handle() runs on "
              "the loop and a blocking call there waits for itself (a competing writer is tested in test_aio.py)")
_SYNC_PROXY = ("it hands ec.execute a sync proxy of the store (ec.EventStore.register) that fails its appends: "
               "eca.execute takes asyncio stores only (test_aio.py runs it with an asyncio proxy)")
_PATCHED_READ = ("it replaces the store object's read_streams, which eca.execute never calls: it reads through the "
                 "asyncio store (test_aio.py races an asyncio store's reads instead)")
_SYNC_OTHER = ("it pairs the store under test with a sync ec.connect('memory://') store in one ec.execute: "
               "eca.execute takes asyncio stores only (test_aio.py checks a cache over several asyncio stores)")

#: test name -> why it cannot run on an asyncio store; or (backends, why) when only some backends.
NOT_APPLICABLE: dict[str, str | tuple[tuple[str, ...], str]] = {
    "test_read_only_participant_change_causes_retry": _IN_HANDLE,
    "test_retries_exhausted_raises_concurrency_error": _IN_HANDLE,
    "test_timeout_with_a_command_that_always_conflicts": _IN_HANDLE,
    "test_list_stream_fields_take_part_in_version_check": _IN_HANDLE,
    "test_discovered_streams_take_part_in_version_check": _IN_HANDLE,
    "test_discovered_stream_read_only_participant": _IN_HANDLE,
    "test_waiting_for_a_stream_held_in_the_process_respects_the_timeout": (
        "its command's handle() blocks its thread on a threading.Event until the test lets it go: on an event loop "
        "that blocks the loop, so the competing command cannot even start (test_aio.py holds a stream with a "
        "command awaiting its read instead)"),
    "test_refusal_on_state_read_in_several_rounds_is_confirmed_current": _PATCHED_READ,
    "test_a_read_that_fails_through_the_cache_is_a_store_error": _PATCHED_READ,
    "test_execute_retries_an_ambiguous_store_error_under_a_key": _SYNC_PROXY,
    "test_a_later_failure_does_not_hide_an_ambiguous_attempt": _SYNC_PROXY,
    "test_cache_is_bounded_and_per_store": _SYNC_OTHER,
    "test_closing_a_store_drops_only_its_entries": _SYNC_OTHER,
    "test_keys_from_other_processes_of_the_same_key_write_once": (
        ("aio-memory",), "a memory store is not shared between processes"),
}


def _store_tests(module_name: str):
    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
        if name.startswith("test_") and inspect.isfunction(obj) and "store" in inspect.signature(obj).parameters:
            yield name, obj


_ABOVE_THE_STORE_TESTS: set = set()
for _suite in SUITES:
    for _name, _test in _store_tests(_suite):
        assert _name not in globals(), f"{_name} is in two suites: give one a prefix here"
        globals()[_name] = _test
        if _suite in ABOVE_THE_STORE:
            _ABOVE_THE_STORE_TESTS.add(_name)
    del _suite, _name, _test

globals()["new_cache"] = importlib.import_module("test_cache").new_cache  # a fixture test_cache's tests take


@pytest.fixture(params=AIO)
def backend(request) -> str:
    """The asyncio backend under test (see conftest.AIO_BACKENDS): overrides conftest's `backend` here."""
    return request.param


def _count_async_reads(store, monkeypatch):
    """test_cache._count_reads for an adapter: counts the reads eca.execute makes, on the asyncio store."""
    calls = []
    inner = store.async_store
    real = inner.read_streams

    async def counting(ids, **kwargs):
        calls.append(list(ids))
        return await real(ids, **kwargs)

    monkeypatch.setattr(inner, "read_streams", counting)
    return calls


@pytest.fixture(autouse=True)
def _on_the_asyncio_api(request, monkeypatch):
    """ec.execute runs eca.execute; read counting counts the asyncio store's reads; tests that cannot
    apply are skipped, naming why."""
    name = request.function.__name__
    if request.getfixturevalue("backend") == "aio-postgres":
        if name in _ABOVE_THE_STORE_TESTS:
            pytest.skip("code above the store: run on aio-memory and aio-sqlite (see ABOVE_THE_STORE)")
        if BEFORE_THE_STORE.search(name):
            pytest.skip("input refused before the store is reached: run on aio-memory and aio-sqlite "
                        "(see BEFORE_THE_STORE)")
    reason = NOT_APPLICABLE.get(name)
    if isinstance(reason, tuple):
        backends, reason = reason
        if request.getfixturevalue("backend") not in backends:
            reason = None
    if reason is not None:
        pytest.skip(f"not applicable to an asyncio store: {reason}")
    patch_execute(monkeypatch)
    monkeypatch.setattr("test_cache._count_reads", _count_async_reads)
