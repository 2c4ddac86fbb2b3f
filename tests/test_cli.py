"""The `eventcore` command line: bench workloads end to end, JSON shape, errors for bad options."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eventcore.bench.runner import run_workload
from eventcore.cli import main
import eventcore as ec

JSON_KEYS = {"workload", "backend", "impl", "ops", "succeeded", "failed", "retries",
             "throughput_ops_s", "events_per_s", "latency_ms"}


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_bench_all_workloads_succeed_json(backend, capsys, tmp_path):
    path = ["--path", str(tmp_path / "b.db")] if backend == "sqlite" else []
    rc = main(["bench", "all", "--backend", backend, "--ops", "60", "--json", "--no-progress", *path])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    reports = [json.loads(line) for line in out]
    assert [r["workload"] for r in reports] == ["deposit", "transfer", "order", "batch"]
    for r in reports:
        assert JSON_KEYS <= set(r)
        assert set(r["latency_ms"]) >= {"p50", "p95", "p99", "max"}
        assert r["backend"] == backend and r["impl"] == ec.__impl__
        assert r["failed"] == 0 and r["succeeded"] == r["ops"]
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    # batch: 60 events in appends of 100 -> one batch of 60 events
    assert reports[3]["ops"] == 1 and reports[3]["events"] == 60
    assert reports[0]["events"] == 60 and reports[1]["events"] == 120


def test_bench_writes_what_it_reports(tmp_path):
    """The bench's counts are the store's contents, and transfers conserve money."""
    store = ec.connect(f"sqlite:///{tmp_path / 'b.db'}")
    r = run_workload(store, "transfer", backend="sqlite", ops=200, concurrency=4, warmup=False)
    assert r["succeeded"] == 200 and r["failed"] == 0
    events = list(store.read_all())
    # 100 accounts opened (one batch) + 2 events per transfer
    assert len(events) == 100 + 2 * 200
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    balances: dict = {}
    for e in events:
        amount = getattr(e.data, "amount", None)
        if amount is None:
            amount = e.data.initial_balance
        elif type(e.data).__name__ == "MoneyWithdrawn":
            amount = -amount
        balances[e.stream_id] = balances.get(e.stream_id, 0) + amount
    assert sum(balances.values()) == 100 * 1_000_000_000
    assert all(b >= 0 for b in balances.values())
    store.close()


def test_bench_table_output(capsys):
    assert main(["bench", "deposit", "--backend", "memory", "--ops", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Single-stream commands: deposits" in out
    for metric in ("Throughput", "Success rate", "P50 latency", "P95 latency", "P99 latency", "Max latency"):
        assert f"| {metric}" in out
    assert "100.0 %" in out


def test_bench_scaling_table_and_cache(capsys):
    """Several concurrencies: one JSON report each, or a scaling table and the best one's table."""
    argv = ["bench", "transfer", "--backend", "memory", "--ops", "40", "--concurrency", "1,3", "--cache",
            "--no-progress"]
    assert main([*argv, "--json"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["concurrency"], r["cache"], r["succeeded"]) for r in reports] == [(1, True, 40), (3, True, 40)]
    assert reports[0]["cpu"]["client_us_per_op"] > 0 and reports[0]["cpu"]["server_cores"] is None
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Scaling: transfer") and "| Concurrency |" in out and "a shared StateCache" in out
    assert "At the best concurrency" in out


def test_bench_group_commit_flag_is_postgres_only(capsys):
    assert main(["bench", "deposit", "--backend", "memory", "--no-group-commit", "--ops", "5"]) == 2
    assert "--no-group-commit applies to --backend postgres only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "nope"], "invalid choice: 'nope'"),
        (["bench", "deposit", "--ops", "0"], "expected a positive integer"),
        (["bench", "deposit", "--concurrency", "x"], "expected a positive integer"),
        (["bench", "deposit", "--concurrency", "1,0"], "expected a positive integer"),
        (["bench", "deposit", "--backend", "oracle"], "invalid choice: 'oracle'"),
        (["bench"], "required"),
    ],
)
def test_bad_options_give_one_line_error(argv, fragment):
    proc = subprocess.run([sys.executable, "-m", "eventcore", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0] and lines[0].startswith("eventcore")


def test_console_script_runs_default_backend(tmp_path):
    """`eventcore bench` with no --backend uses the embedded SQLite default and cleans up its temp file."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "eventcore", "bench", "deposit", "--ops", "30", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "sqlite" and report["succeeded"] == 30
    assert list(tmp_path.iterdir()) == []


def test_bench_concurrency_is_bounded(capsys):
    assert main(["bench", "deposit", "--backend", "memory", "--concurrency", "100000", "--no-progress"]) == 2
    assert "concurrency must be an int in 1..1024" in capsys.readouterr().err
