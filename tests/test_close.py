"""Closing a store: any thread may close it while others use it. Those others get
StoreUnavailableError ("... is closed"), never a crash, and no StateCache keeps (or later gains)
entries for it. Runs in a child process, so that a crash would fail the test rather than the run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import eventcore as ec
from domain import Noted

CLOSE_UNDER_THREADS = """
import sys, threading, time
import eventcore as ec
from domain import Deposit, Noted
url, mode = sys.argv[1], sys.argv[2]
for round_ in range(15):
    s = ec.connect(url + f"{round_}.db" if url.startswith("sqlite") else url)
    cache = ec.StateCache()
    stop, errors = threading.Event(), []
    def work(k):
        while not stop.is_set():
            try:
                if mode == "read":
                    s.read_stream(f"t-{k}")
                elif mode == "append":
                    s.append([ec.emit(f"t-{k}", Noted())])
                else:
                    ec.execute(s, Deposit(ec.StreamId(f"t-{k}"), 1), cache=cache)
            except ec.StoreUnavailableError as exc:
                if "closed" not in str(exc):
                    errors.append(repr(exc))
                return
            except Exception as exc:
                errors.append(repr(exc))
                return
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.03)
    s.close()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(cache) == 0 and not cache._folded, (len(cache), len(cache._folded))
print("survived")
"""


@pytest.mark.parametrize("mode", ["read", "append", "cached-execute"])
def test_closing_a_store_while_threads_use_it(store, request, tmp_path, mode):
    if store.scheme == "sqlite":
        url = f"sqlite:///{tmp_path}/c"
    elif store.scheme == "memory":
        url = "memory://"
    else:
        dsn = request.getfixturevalue("pg_dsn")
        url = f"{dsn}{'&' if '?' in dsn else '?'}schema={store.schema}"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CLOSE_UNDER_THREADS, url, mode],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_a_closed_store_refuses_every_operation(store):
    store.append([ec.emit("s", Noted(text="x"))])
    store.close()
    assert store.closed
    for call in (lambda: store.read_stream("s"), lambda: store.read_streams(["s"]), lambda: list(store.read_all()),
                 lambda: store.stream_version("s"), lambda: store.head_position(),
                 lambda: store.append([ec.emit("s", Noted(text="y"))]),
                 lambda: store.ingest([("s", Noted(text="z"))], resume_key="k")):
        with pytest.raises(ec.StoreUnavailableError):
            call()
