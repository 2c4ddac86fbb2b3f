"""A throwaway PostgreSQL cluster from the installed server binaries: a test and bench aid, not a store.

The test suite (tests/pgserver.py), the benchmarks (bench/) and `eventcore bench` without a DSN
start one: initdb into a temporary directory, start `postgres` listening on a Unix socket in that
directory only (no TCP port, nothing reachable from outside), hand out a DSN, and on exit stop the
server (by the PID it wrote) and delete the directory. PostgreSQL refuses to run as root, so as
root the server runs as the `postgres` system user on a directory it owns.

    with TemporaryCluster() as dsn:
        store = eventcore.connect(dsn)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import StoreUnavailableError

#: Socket "port": with no TCP listener it only names the socket file.
_PORT = 5432


def find_pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: PATH first, then `pg_config --bindir`, then Debian's layout."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


class TemporaryCluster:
    """`with TemporaryCluster() as dsn: ...` — a private PostgreSQL server for the duration of the block."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir: Path | None = find_pg_bindir()
        if self.bindir is None:
            raise StoreUnavailableError(
                "no PostgreSQL server binaries found (initdb/pg_ctl on PATH or via pg_config --bindir); "
                "install PostgreSQL or pass a DSN"
            )
        self.settings: dict[str, str] = dict(settings or {})
        self.dir: Path | None = None
        self.pid: int | None = None
        self.dsn: str | None = None
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise StoreUnavailableError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> str:
        self.dir = Path(tempfile.mkdtemp(prefix="eventcore-pg-"))
        data = self.dir / "data"
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-N")
        opts = {"listen_addresses": "''", "unix_socket_directories": f"'{self.dir}'", "port": str(_PORT)}
        opts.update({k: str(v) for k, v in self.settings.items()})
        with open(data / "postgresql.auto.conf", "a") as conf:
            for key, value in opts.items():
                conf.write(f"{key} = {value}\n")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(self.dir / "server.log"))
        self.pid = int((data / "postmaster.pid").read_text().split()[0])
        # The socket lives in a directory only postgres may enter; open it to clients.
        os.chmod(self.dir, 0o711)
        self.dsn = f"postgresql://postgres@/postgres?host={self.dir}&port={_PORT}"
        return self.dsn

    def stop(self) -> None:
        if self.pid is not None:
            try:
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.dir / "data"))
            except (StoreUnavailableError, subprocess.SubprocessError):
                try:
                    os.kill(self.pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        os.kill(self.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)
            self.pid = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
