"""Defects found by the review of idempotency keys, resumable ingest and the client-side deadline.

Each test states the promised behaviour and is a strict xfail until the defect is fixed: when a
fix lands the test passes, the strict xfail fails, and its marker is removed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import eventcore as ec
from domain import Deposited
from eventcore.stores.base import prepare_append


def _cli_ingest(db: str, path: str) -> None:
    subprocess.run([sys.executable, "-m", "eventcore", "ingest", "--dsn", f"sqlite:///{db}", path,
                    "--no-progress", "--batch-size", "2"], capture_output=True, text=True, timeout=60)


def _line(i: int) -> str:
    return '{"stream": "s", "type": "T", "data": {"i": %d}}\n' % i


@pytest.mark.xfail(strict=True, reason="cli.default_resume_key hashes the first 64 KiB: a smaller file that grew "
                   "gets a new key, so the rerun writes every earlier line again (README: 'a log that only grew keeps it')")
def test_cli_rerun_on_a_small_file_that_grew_writes_only_the_new_lines(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines(_line(i) for i in range(3))
    _cli_ingest(db, path)
    with open(path, "a") as f:
        f.write(_line(3))
    _cli_ingest(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 4


@pytest.mark.xfail(strict=True, reason="fixing the bad line that stopped `eventcore ingest` changes the default "
                   "resume key (it is in the first 64 KiB), so the rerun writes the committed batches again")
def test_cli_rerun_after_fixing_the_bad_line_writes_each_line_once(tmp_path):
    db, path = str(tmp_path / "s.db"), str(tmp_path / "in.jsonl")
    with open(path, "w") as f:
        f.writelines([_line(0), _line(1), _line(2), '{"stream": "s", "type": "T", "data": {"i": 3}\n', _line(4)])
    _cli_ingest(db, path)  # stops at line 4: the batch of lines 1-2 is committed
    with open(path) as f:
        text = f.read().replace('"i": 3}\n', '"i": 3}}\n')
    with open(path, "w") as f:
        f.write(text)
    _cli_ingest(db, path)
    with ec.connect(f"sqlite:///{db}") as store:
        assert store.stream_version("s") == 5


@pytest.mark.xfail(strict=True, reason="ingest(resume_key=...) checks `expected` again in the resumed run, against "
                   "streams the first run already wrote: the documented 'run it again with the same key' fails")
def test_resumed_ingest_with_expected_finishes():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(5)]

    def killed_after(n):
        for i, item in enumerate(items):
            if i == n:
                raise RuntimeError("killed")
            yield item

    with pytest.raises(RuntimeError):
        store.ingest(killed_after(4), batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    store.ingest(items, batch_size=2, expected={"a": ec.NO_STREAM}, resume_key="r")
    assert store.stream_version("a") == 5


@pytest.mark.xfail(strict=True, reason="two runs of one resumable ingest at once (cron overlap, a rerun while the "
                   "first is still alive) both write what neither had committed: nothing excludes them")
def test_two_overlapping_runs_under_one_resume_key_write_each_item_once():
    store = ec.connect("memory://")
    items = [("a", Deposited(amount=i, balance=i)) for i in range(6)]
    second_done = threading.Event()
    first_reading = threading.Event()  # set once the first run has read the recorded progress

    def first_input():
        first_reading.set()
        for i, item in enumerate(items):
            if i == 2:
                second_done.wait(30)
            yield item

    first = threading.Thread(target=lambda: store.ingest(first_input(), batch_size=2, resume_key="r"))
    first.start()
    assert first_reading.wait(30)
    store.ingest(items, batch_size=2, resume_key="r")
    second_done.set()
    first.join(30)
    assert store.stream_version("a") == 6


@pytest.mark.xfail(strict=True, reason="append_group reports a member as a duplicate when an earlier member of the "
                   "group with the same key was refused: nothing is recorded under the key, nothing written")
def test_group_member_with_the_key_of_a_refused_member_is_written(pg_dsn, pg_schema):
    with ec.connect(pg_dsn, schema=pg_schema) as store:
        store.append([ec.emit("s1", Deposited(amount=1, balance=1))])
        refused = prepare_append([ec.emit("s1", Deposited(amount=2, balance=2))], {"s1": ec.NO_STREAM}, None)
        refused.key = "K"
        valid = prepare_append([ec.emit("s2", Deposited(amount=3, balance=3))], None, None)
        valid.key = "K"
        out = store._append_group([refused, valid])
        assert isinstance(out[0], ec.ConcurrencyError)
        assert not isinstance(out[1], BaseException), out[1]  # now: DuplicateCommandError('K'), events None
        assert store.recorded_command("K") is not None


@pytest.mark.xfail(strict=True, reason="_Watchdog after fork keeps the parent's in-flight calls: the child's "
                   "watchdog thread shuts down the parent's (shared) socket when their deadline passes")
def test_a_forked_child_never_shuts_the_parents_connections(pg_dsn, pg_schema):
    import psycopg

    with ec.connect(pg_dsn, schema=pg_schema, statement_timeout=1, pool_size=1, pool_min_size=1) as store:
        store.head_position()
        slow = threading.Thread(target=lambda: store._fetch("SELECT pg_sleep(0.8)", ()))
        slow.start()
        time.sleep(0.2)  # the parent's call is in flight (registered with the watchdog) when it forks
        pid = os.fork()
        if pid == 0:
            try:
                with psycopg.connect(pg_dsn) as own:  # the child's first watched call of its own
                    store._watchdog.done(store._watchdog.watch(own))
                time.sleep(4)  # past the parent's call's deadline (1 s + 2 s margin)
            finally:
                os._exit(0)
        slow.join()
        os.waitpid(pid, 0)
        assert store.head_position() >= 0  # now: StoreUnavailableError, server closed the connection
