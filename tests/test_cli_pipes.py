"""Every command whose stdout reader goes away (`eventcore ... | head`) stops quietly: no error message, no
traceback, no complaint from the interpreter's flush at exit; status 0, unless the command had already come
to a failure (an unhealthy store, an ingest that stopped), which keeps its status."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import eventcore as ec
from domain import Deposited


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run `eventcore argv` with stdout a pipe whose reader has already exited: every write fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "eventcore", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    with ec.connect(url) as store:
        store.append([ec.emit(f"account-{i}", Deposited(amount=i)) for i in range(1, 4)])
    return url


@pytest.mark.parametrize("argv", [
    ["bench", "deposit", "--backend", "memory", "--ops", "200", "--no-progress"],
    ["bench", "deposit", "--backend", "memory", "--ops", "20", "--no-progress", "--json"],
], ids=["table", "json"])
def test_bench_into_a_closed_pipe(argv):
    proc = run_into_closed_pipe(*argv)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["projections"], ["tail"],
])
def test_read_commands_into_a_closed_pipe(argv, sqlite_url):
    proc = run_into_closed_pipe(*argv, "--dsn", sqlite_url)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_bench_piped_into_head_prints_the_first_lines_and_exits_0():
    """The shell's `eventcore bench ... | head -3`: head's three lines, nothing on stderr, status 0."""
    proc = subprocess.run(
        f"{sys.executable} -m eventcore bench deposit --backend memory --ops 200 --no-progress | head -3; "
        "exit ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 3 and proc.stdout.startswith("Single-stream commands: deposits")


def test_a_command_started_with_stdout_closed_runs(sqlite_url):
    """`eventcore status >&-`: Python has no sys.stdout then; the command still runs and exits 0."""
    proc = subprocess.run(["/bin/sh", "-c", 'exec "$0" -m eventcore status --dsn "$1" >&-', sys.executable,
                           sqlite_url], stderr=subprocess.PIPE, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_failure_keeps_its_status_when_the_pipe_is_closed(tmp_path):
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    for argv in (["status", "--dsn", missing], ["status", "--json", "--dsn", missing]):
        proc = run_into_closed_pipe(*argv)
        assert (proc.returncode, proc.stderr) == (1, ""), argv
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"stream": "s", "type": "t", "data": {}}\n{broken\n')
    proc = run_into_closed_pipe("ingest", str(lines), "--dsn", f"sqlite:///{tmp_path / 's.db'}", "--no-progress")
    assert proc.returncode == 1 and "line 2" in proc.stderr
