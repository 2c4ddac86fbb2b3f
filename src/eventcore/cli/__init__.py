"""The `eventcore` command line.

    eventcore bench deposit|transfer|order|batch|all [--backend memory|sqlite|postgres] [--ops N]
                    [--concurrency N[,N...]] [--cache] [--no-group-commit] [--batch-size N]
                    [--path FILE] [--dsn URL] [--json]
    eventcore ingest FILE [--dsn URL] [--batch-size N] [--parallel N] [--skip-invalid] [--rejects FILE]
                     [--resume-key KEY | --no-resume] [--import MODULE] [--json]    (cli/ingest.py)
    eventcore tail [--follow] [--type T] [--prefix P] [--from POSITION] [--import MODULE] [--dsn URL]
    eventcore types [--import MODULE] [--json] [--dsn URL]                            (cli/monitor.py)
    eventcore projections [--json] [--dsn URL]                                       (cli/monitor.py)
    eventcore status [--json] [--dsn URL]                                            (cli/monitor.py)
    eventcore migrate [--dsn URL] [--schema NAME]

This module parses the arguments and runs the command; what every command shares is in cli/common.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import __version__, _impl
from ..errors import EventCoreError
from .common import dsn_of as _dsn, scheme_of as _scheme, stdout_to_devnull as _stdout_to_devnull
from .ingest import _cmd_ingest, default_resume_key
from .monitor import _cmd_projections, _cmd_snapshots, _cmd_status, _cmd_tail, _cmd_types

__all__ = ["build_parser", "default_resume_key", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()] or [_positive_int(text)]


def build_parser() -> argparse.ArgumentParser:
    from ..bench.runner import WORKLOADS

    parser = _Parser(prog="eventcore", description="eventcore: event sourcing with atomic multi-stream commands")
    parser.add_argument("--version", action="version", version=f"eventcore {__version__} (impl {_impl.IMPL})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="run the reference report's workloads and print their tables",
        description="Run the reference report's workloads against a store and print a table per workload.",
    )
    bench.add_argument(
        "workloads", nargs="+", metavar="WORKLOAD", choices=WORKLOADS + ("all",),
        help=f"one or more of: {', '.join(WORKLOADS)}, all",
    )
    bench.add_argument("--backend", choices=("memory", "sqlite", "postgres"), default="sqlite",
                       help="store to run against (default: sqlite, in a temporary file unless --path)")
    bench.add_argument("--path", help="SQLite file to use (kept afterwards)")
    bench.add_argument("--dsn", help="PostgreSQL URL for --backend postgres (default: $EVENTCORE_DSN, else a "
                                     "temporary local cluster); the bench writes to schema eventcore_bench")
    bench.add_argument("--ops", type=_positive_int,
                       help="operations per workload (default: 1000 deposit/transfer, 500 order, 2000 events for batch)")
    bench.add_argument("--concurrency", type=_int_list, default=[1], metavar="N[,N...]",
                       help="threads issuing operations (default 1); several, e.g. 1,4,8,16, run the workload at "
                            "each and print a scaling table")
    bench.add_argument("--cache", action="store_true",
                       help="run commands with a shared ec.StateCache() that reuses folded states (default: each "
                            "store's exact cache, as ec.execute uses)")
    bench.add_argument("--no-group-commit", action="store_true",
                       help="PostgreSQL: one transaction per append instead of sharing them between threads")
    bench.add_argument("--batch-size", type=_positive_int, default=100, help="events per append in the batch workload")
    bench.add_argument("--seed", type=int, default=0, help="random seed for the workload's choices")
    bench.add_argument("--json", action="store_true", help="print one JSON object per workload instead of tables")
    bench.add_argument("--no-progress", action="store_true", help="never print progress to stderr")

    migrate = sub.add_parser(
        "migrate",
        help="create or upgrade the PostgreSQL schema",
        description="Apply pending schema migrations (idempotent; safe to run from several processes at once).",
    )
    migrate.add_argument("--dsn", help="PostgreSQL URL (default: $EVENTCORE_DSN)")
    migrate.add_argument("--schema", default=None, help="schema name (default: eventcore, or ?schema= in the URL)")

    ingest = sub.add_parser(
        "ingest",
        help="stream a JSON Lines file of events into a store",
        description=(
            'Stream a JSON Lines file (one {"stream", "type", "data", "metadata"} object per line; gzip allowed) '
            "into a store, one transaction per batch. A malformed line stops the run with its line number and "
            "nothing of that batch written, unless --skip-invalid."
        ),
    )
    ingest.add_argument("file", metavar="FILE", help="JSON Lines file (.jsonl or .jsonl.gz)")
    ingest.add_argument("--dsn", help="store URL (postgresql://..., sqlite:///file.db; default: $EVENTCORE_DSN)")
    ingest.add_argument("--batch-size", type=_positive_int, default=10_000,
                        help="events per transaction (default 10000)")
    ingest.add_argument("--parallel", type=_positive_int, default=None,
                        help="connections writing at once; each stream stays on one, in file order (default 2 on "
                             "PostgreSQL, 1 on SQLite; a resumed ingest keeps the count it was started with)")
    ingest.add_argument("--skip-invalid", action="store_true",
                        help="record malformed lines in a rejects file (line number, reason, text) instead of "
                             "stopping; run again once they are fixed and they are written")
    ingest.add_argument("--rejects", help="rejects file for --skip-invalid (default: FILE.rejects.jsonl)")
    ingest.add_argument("--resume-key", metavar="KEY",
                        help="name under which each batch records how far the file is committed (default: "
                             "derived from the file's path and its first valid line); running again with the "
                             "same key writes each line once")
    ingest.add_argument("--no-resume", action="store_true",
                        help="neither skip nor record progress: write every line again")
    ingest.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                        help="import MODULE first (its event classes and upcasters): a line of a type it defines "
                             "must decode as that class at the version it declares, or it is refused; repeatable")
    ingest.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    tail = sub.add_parser(
        "tail",
        help="print events in feed order as JSON lines",
        description=(
            "Print the store's events in global feed order, one JSON object per line with the keys of "
            "ec.RecordedEvent (stream_id, version, position, event_id, type, data, metadata, recorded_at). "
            "Events of types this process does not know are printed as stored. With --follow, keep printing "
            "new events as they are committed (SIGINT/SIGTERM end it)."
        ),
    )
    tail.add_argument("--dsn", help="store URL (postgresql://..., sqlite:///file.db; default: $EVENTCORE_DSN)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep running and print new events live")
    tail.add_argument("--type", action="append", metavar="T",
                      help="only events of this type name (repeat or comma-separate for several)")
    tail.add_argument("--prefix", metavar="P", help="only events of streams whose id starts with P")
    tail.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                      help="import MODULE first (its event classes and upcasters) and print the events of its types "
                           "as the application reads them (current version, upcast); other types as stored")
    tail.add_argument("--from", dest="from_position", type=int, default=0, metavar="POSITION",
                      help="start at this global position, inclusive (default: the beginning); positions are "
                           "opaque cursors: pass one printed earlier, e.g. the last one seen + 1")
    tail.add_argument("--interval", type=float, default=None,
                      help="seconds between polls with --follow (default 0.2; on PostgreSQL a NOTIFY, sent "
                           "while a live projector listens, wakes it earlier)")

    types = sub.add_parser(
        "types",
        help="list each stored event type with its versions, counts and whether this process knows it",
        description=("List each event type name stored, with each type version and how many events hold it, "
                     "and whether this process can read it: the class registered for it (after --import), and "
                     "for older versions whether the upcaster chain is complete. Plan an upcaster before "
                     "deploying a change to an event class."),
    )
    types.add_argument("--dsn", help="store URL (postgresql://..., sqlite:///file.db; default: $EVENTCORE_DSN)")
    types.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import MODULE first (its event classes and upcasters); repeatable")
    types.add_argument("--json", action="store_true", help="print one JSON array")

    projections = sub.add_parser(
        "projections",
        help="list projectors with their checkpoint, lag and state",
        description=(
            "List the projectors recorded in a store: checkpoint (the last position processed), lag (head "
            "position minus checkpoint), pending events, state (running, stopped, failed, dead, idle) and "
            "dead letters."
        ),
    )
    projections.add_argument("--dsn", help="store URL (default: $EVENTCORE_DSN)")
    projections.add_argument("--json", action="store_true", help="one JSON object per projector")

    snapshots = sub.add_parser(
        "snapshots",
        help="list commands' stored snapshots (keys, sizes, ages), or drop them",
        description=("List the snapshots of commands' state a store holds (see ec.SnapshotPolicy): key, command "
                     "class, state version, size, events covered and age. --drop removes them, which is safe at "
                     "any time: commands fold their streams from the first event until they write new ones."),
    )
    snapshots.add_argument("--dsn", help="store URL (default: $EVENTCORE_DSN)")
    snapshots.add_argument("--drop", nargs="?", const="", default=None, metavar="COMMAND",
                           help="remove the snapshots of COMMAND (a name the list shows), or all without one")
    snapshots.add_argument("--older-than", type=float, default=None, metavar="SECONDS",
                           help="with --drop: only snapshots written more than SECONDS ago")
    snapshots.add_argument("--json", action="store_true", help="print one JSON array (or, with --drop, object)")

    status = sub.add_parser(
        "status",
        help="check a store: connectivity, schema version, pool, projection lag",
        description=(
            "Connect to a store (without migrating it) and print store.health(): whether it answers and how "
            "fast, its schema version against the one this eventcore needs, the connection pool (PostgreSQL) "
            "and each projector's lag. Exit status 0 when healthy, 1 otherwise."
        ),
    )
    status.add_argument("--dsn", help="store URL (default: $EVENTCORE_DSN)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cmd_migrate(args) -> int:
    from ..stores import connect
    from ..stores.dsn import redact

    dsn = _dsn(args)
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise EventCoreError(f"eventcore migrate needs a postgresql:// URL, got scheme {_scheme(dsn)!r}")
    options = {"schema": args.schema} if args.schema else {}
    with connect(dsn, **options) as store:  # connecting migrates (migrate=true is the default)
        store.migrate(reapply_functions=True)  # and the functions are applied again, even if current
        version = store.schema_version()
        print(f"schema {store.schema!r} at {redact(dsn)} is at version {version}")
    return 0


def _cmd_bench(args) -> int:
    from ..bench.report import format_scaling, format_table
    from ..bench.runner import WORKLOADS, BenchStore, run_workload
    from ..metrics import MetricsCollector

    if args.path and args.backend != "sqlite":
        raise EventCoreError("--path applies to --backend sqlite only")
    if args.dsn and args.backend != "postgres":
        raise EventCoreError("--dsn applies to --backend postgres only")
    if args.no_group_commit and args.backend != "postgres":
        raise EventCoreError("--no-group-commit applies to --backend postgres only")
    workloads = list(WORKLOADS) if "all" in args.workloads else list(dict.fromkeys(args.workloads))
    concurrencies = list(dict.fromkeys(args.concurrency))
    status = 0
    first = True
    # The same collector a user attaches in production watches every timed run: the summary printed
    # at the end is its view (with --json, each report carries the view of its own run under "metrics").
    collector = MetricsCollector()
    timed = 0.0
    with BenchStore(args.backend, args.path, args.dsn, group_commit=not args.no_group_commit) as store:
        for name in workloads:
            reports = []
            for concurrency in concurrencies:
                run_collector = MetricsCollector() if args.json else collector
                report = run_workload(
                    store, name, backend=args.backend, ops=args.ops, concurrency=concurrency,
                    batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, cache=args.cache,
                    metrics=run_collector,
                )
                timed += report["duration_s"]
                reports.append(report)
                if report["failed"]:
                    status = 1
                if args.json:
                    store.attach(run_collector)  # for the gauges (pool, projections), read now
                    report["metrics"] = run_collector.summary(duration_s=report["duration_s"])
                    store.detach()
                    print(json.dumps(report), flush=True)
            if args.json:
                continue
            if not first:
                print()
            first = False
            best = max(reports, key=lambda r: r["throughput_ops_s"])
            if len(reports) > 1:
                print(format_scaling(reports), flush=True)
                print(f"\nAt the best concurrency ({best['concurrency']}):")
            print(format_table(best), flush=True)
        if not args.json:
            store.attach(collector)  # for the gauges (pool, projections), read now
            print()
            print(collector.format_summary(duration_s=timed), flush=True)
            store.detach()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    if not logging.getLogger().handlers:
        # psycopg's pool logs every failed connection attempt; the command reports the outcome in one line.
        logging.getLogger("psycopg").addHandler(logging.NullHandler())
    commands = {"bench": _cmd_bench, "migrate": _cmd_migrate, "ingest": _cmd_ingest, "tail": _cmd_tail,
                "types": _cmd_types, "projections": _cmd_projections, "status": _cmd_status,
                "snapshots": _cmd_snapshots}
    command = commands.get(args.command)
    if command is None:
        parser.error(f"unknown command {args.command!r}")
    try:
        status = command(args)
        if sys.stdout is not None:  # None: started with stdout closed (print() then writes nothing)
            sys.stdout.flush()  # a reader that has gone shows here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        # The reader of stdout is gone (`eventcore ... | head`): nothing more to say, to anyone. As
        # Python's documentation advises, stdout then points at devnull, so that the interpreter's
        # flush at exit does not fail on the same pipe again. The exit status is the one the command had
        # come to before it printed (an unhealthy store, an ingest that stopped), else 0.
        _stdout_to_devnull()
        return getattr(args, "outcome", 0)
    except EventCoreError as exc:
        print(f"eventcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a backend whose driver is not installed (psycopg without the [postgres] extra)
        print(f"eventcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command was told to read or write (e.g. --rejects in a missing directory)
        print(f"eventcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eventcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
