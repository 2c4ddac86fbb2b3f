"""The README's projection example is the real examples/balances.py, and it works: a live
account-balance table in PostgreSQL keeps up with the bench's transfer and deposit workloads
(8 threads) and equals a full replay, with its lag reported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import eventcore as ec
from eventcore.bench.runner import run_workload

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "balances.py"
DEADLINE = 120.0


def test_readme_embeds_the_projection_example_verbatim():
    assert EXAMPLE.read_text().rstrip() in (ROOT / "README.md").read_text()


def _caught_up(store, live: subprocess.Popen):
    """Poll the reported lag until the live example (this process) leads and has caught up."""
    owner = f"{os.uname().nodename}:{live.pid}"
    deadline = time.monotonic() + DEADLINE
    while True:
        status = ec.projection_status(store, "account-balances")
        if status and status[0].owner == owner and status[0].pending == 0 and status[0].lag == 0:
            return status[0]
        assert live.poll() is None, live.communicate()
        assert time.monotonic() < deadline, f"projection did not catch up: {status}"
        time.sleep(0.05)


def _check(pg_dsn, pg_schema):
    check = subprocess.run([sys.executable, str(EXAMPLE), pg_dsn, pg_schema, "--check"],
                           capture_output=True, text=True, timeout=DEADLINE)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "balances match a full replay" in check.stdout
    assert "lag 0, 0 events pending, state running" in check.stdout


def _stop(live: subprocess.Popen) -> str:
    live.send_signal(signal.SIGTERM)
    out, err = live.communicate(timeout=DEADLINE)
    assert live.returncode == 0, err
    return out


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_balances_example_keeps_up_with_the_bench_and_matches_a_replay(pg_dsn, pg_schema):
    store = ec.connect(pg_dsn, schema=pg_schema)
    procs = []
    try:
        live = _start(pg_dsn, pg_schema)
        procs.append(live)
        for workload in ("transfer", "deposit"):  # what `eventcore bench transfer|deposit --concurrency 8` runs
            report = run_workload(store, workload, backend="postgres", ops=300, concurrency=8)
            assert report["failed"] == 0
        assert _caught_up(store, live).state == "running"
        _check(pg_dsn, pg_schema)
        assert _stop(live).startswith("stopped at position")

        # A rebuild (reset the checkpoint and the table, replay) gives the same table.
        rebuild = _start(pg_dsn, pg_schema, "--rebuild")
        procs.append(rebuild)
        _caught_up(store, rebuild)
        _check(pg_dsn, pg_schema)
        _stop(rebuild)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        store.close()
