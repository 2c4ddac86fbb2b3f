"""A longer stress run than the test suite's: processes x threads of random transfers, then every invariant.

    python bench/stress.py --backend postgres --processes 4 --threads 8 --seconds 30
    python bench/stress.py --backend sqlite --processes 4 --threads 4 --seconds 30 --json

PostgreSQL: EVENTCORE_BENCH_DSN (or --dsn), else a throwaway cluster from the
installed binaries; the run uses a schema of its own, dropped afterwards.
SQLite: a file in a temporary directory (or --path). The workers and the checks
are tests/stress_worker.py's; a failed invariant, an error or a hung worker
ends the run with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import stress_worker  # noqa: E402 - tests/ joins the path first


@contextlib.contextmanager
def _postgres(dsn: str | None):
    """A DSN and a fresh schema name; the schema is dropped (and a throwaway cluster stopped) at the end."""
    import psycopg
    from psycopg import sql

    cluster = None
    if dsn is None:
        from eventcore.testing.pgcluster import TemporaryCluster

        cluster = TemporaryCluster(settings={"max_connections": 300})
        dsn = cluster.start()
    schema = f"stress_{uuid.uuid4().hex[:10]}"
    try:
        yield dsn, schema
    finally:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        finally:
            if cluster is not None:
                cluster.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="threads per process")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--seconds", type=float, help="seconds of transfers per thread (default 30)")
    run.add_argument("--transfers", type=int, help="transfers per thread")
    parser.add_argument("--accounts", type=int, default=stress_worker.ACCOUNTS)
    parser.add_argument("--no-group-commit", action="store_true", help="PostgreSQL: one transaction per append")
    parser.add_argument("--pool-size", type=int, default=8, help="PostgreSQL connections per process")
    parser.add_argument("--synchronous", default="full", help="SQLite synchronous setting")
    parser.add_argument("--dsn", default=os.environ.get("EVENTCORE_BENCH_DSN"))
    parser.add_argument("--path", help="SQLite file (default: a new temporary file)")
    parser.add_argument("--watchdog", type=float, default=None,
                        help="seconds before workers still running count as hung (default: run time + 300)")
    parser.add_argument("--nice", type=int, default=0, help="run the workers under nice -n N")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.seconds is None and args.transfers is None:
        args.seconds = 30.0
    watchdog = args.watchdog or (args.seconds or 0) + 300

    def go(url: str, options: dict) -> dict:
        return stress_worker.run_stress(url, options=options, processes=args.processes, threads=args.threads,
                                        transfers=args.transfers, seconds=args.seconds, accounts=args.accounts,
                                        watchdog=watchdog, seed=args.seed, nice=args.nice)

    try:
        if args.backend == "postgres":
            with _postgres(args.dsn) as (dsn, schema):
                report = go(dsn, {"schema": schema, "pool_size": args.pool_size,
                                  "group_commit": not args.no_group_commit})
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = args.path or str(Path(tmp) / "stress.db")
                report = go(f"sqlite:///{path}", {"synchronous": args.synchronous, "timeout": 60})
    except stress_worker.StressFailure as exc:
        print(f"stress run FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else stress_worker.format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
