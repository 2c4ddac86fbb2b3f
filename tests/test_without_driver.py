"""The base package (no psycopg, no psycopg_pool) serves SQLite and memory in the library and in every
CLI command, and a PostgreSQL URL there is a one-line error naming the missing extra.

Each case runs in a subprocess where importing psycopg or psycopg_pool fails, as in an install
without the [postgres] extra.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

import eventcore as ec
from domain import Deposited

BLOCK_DRIVERS = "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
CLI = BLOCK_DRIVERS + "from eventcore.cli import main; sys.exit(main(sys.argv[1:]))"


def run_without_driver(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def cli_without_driver(*args: str) -> subprocess.CompletedProcess:
    return run_without_driver(CLI, *args)


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = ec.connect(url)
    store.append([ec.emit("account-1", Deposited(amount=5)), ec.emit("account-2", Deposited(amount=7))])
    store.close()
    return url


@pytest.fixture(params=["sqlite", "memory"])
def url(request, sqlite_url):
    return sqlite_url if request.param == "sqlite" else "memory://"


def test_status_without_driver(url):
    proc = cli_without_driver("status", "--dsn", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK  {url.split(':', 1)[0]} store {url}\n") and proc.stderr == ""
    proc = cli_without_driver("status", "--json", "--dsn", url)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_status_of_a_missing_sqlite_file_without_driver():
    proc = cli_without_driver("status", "--dsn", "sqlite:////no/such/dir/x.db")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("UNHEALTHY  sqlite store sqlite:////no/such/dir/x.db\n")
    assert "store           missing" in proc.stdout and "does not exist" in proc.stdout and proc.stderr == ""


def test_projections_without_driver(url):
    proc = cli_without_driver("projections", "--dsn", url)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "no projectors recorded in this store\n", "")
    proc = cli_without_driver("projections", "--json", "--dsn", url)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_tail_without_driver(sqlite_url):
    proc = cli_without_driver("tail", "--dsn", sqlite_url)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["stream_id"] for line in proc.stdout.splitlines()] == ["account-1", "account-2"]


def test_ingest_without_driver(url, tmp_path):
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"stream": f"s-{i}", "type": "t.Happened", "data": {"i": i}}) + "\n"
                             for i in range(3)))
    proc = cli_without_driver("ingest", str(lines), "--dsn", url, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ingested 3 events") and proc.stderr == ""


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_bench_without_driver(backend):
    proc = cli_without_driver("bench", "deposit", "--backend", backend, "--ops", "10", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["succeeded"] == 10


def test_migrate_of_a_sqlite_url_without_driver(sqlite_url):
    proc = cli_without_driver("migrate", "--dsn", sqlite_url)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "eventcore migrate: error: eventcore migrate needs a postgresql:// URL, got scheme 'sqlite'\n"


@pytest.mark.parametrize("argv", [
    ["status", "--dsn", "postgresql://app:pw@127.0.0.1:1/db"],
    ["migrate", "--dsn", "postgresql://app:pw@127.0.0.1:1/db"],
    ["tail", "--dsn", "postgresql://app:pw@127.0.0.1:1/db"],
    ["projections", "--dsn", "postgresql://app:pw@127.0.0.1:1/db"],
    ["bench", "deposit", "--backend", "postgres", "--ops", "5", "--no-progress"],
], ids=["status", "migrate", "tail", "projections", "bench"])
def test_a_postgresql_command_without_driver_is_a_one_line_error(argv):
    started = time.monotonic()
    proc = cli_without_driver(*argv)
    took = time.monotonic() - started
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"eventcore {argv[0]}: error: ") and "pip install 'pyeventcore[postgres]'" in lines[0] \
        and "'pyeventcore[postgres-binary]'" in lines[0]
    assert "pw" not in proc.stderr
    # The bench finds the driver missing before it starts a temporary cluster (seconds of initdb).
    assert "starting a temporary PostgreSQL cluster" not in proc.stderr, took


def test_library_without_driver(tmp_path):
    """import eventcore, connect, execute, project, measure and check health on SQLite and memory."""
    code = BLOCK_DRIVERS + textwrap.dedent("""
        import eventcore as ec
        from eventcore.bench.workloads import AccountOpened, DepositMoney

        for url in (sys.argv[1], "memory://"):
            collector = ec.MetricsCollector()
            store = ec.connect(url, metrics=collector)
            store.append([ec.emit("account-1", AccountOpened(initial_balance=0))])
            ec.execute(store, DepositMoney(account=ec.StreamId("account-1"), amount=5))
            seen = []
            ec.run_projection(store, ec.Projector("p", handler=lambda e, ctx: seen.append(e.position)),
                              until_caught_up=True)
            assert seen == [1, 2], seen
            assert [p.name for p in ec.projection_status(store)] == ["p"]
            assert collector.summary()["events_written"] == 2
            health = store.health()
            assert health.ok, health
            store.close()
        assert sys.modules["psycopg"] is None and sys.modules["psycopg_pool"] is None
        print("ok")
    """)
    proc = run_without_driver(code, f"sqlite:///{tmp_path / 'lib.db'}")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
