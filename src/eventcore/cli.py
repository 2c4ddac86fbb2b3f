"""The `eventcore` command line.

    eventcore bench deposit|transfer|order|batch|all [--backend memory|sqlite|postgres] [--ops N]
                    [--concurrency N[,N...]] [--cache] [--no-group-commit] [--batch-size N]
                    [--path FILE] [--dsn URL] [--json]
    eventcore tail [--follow] [--type T] [--prefix P] [--from POSITION] [--dsn URL]
    eventcore projections [--json] [--dsn URL]
    eventcore status [--json] [--dsn URL]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__, _impl
from .errors import EventCoreError
from .streams import forbidden_character


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
    from .bench.runner import WORKLOADS

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
                       help="run commands with an ec.StateCache (warm streams skip the read)")
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
    ingest.add_argument("--parallel", type=_positive_int, default=1,
                        help="connections writing at once; each stream stays on one, in file order (default 1)")
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
    tail.add_argument("--from", dest="from_position", type=int, default=0, metavar="POSITION",
                      help="start at this global position, inclusive (default: the beginning); positions are "
                           "opaque cursors: pass one printed earlier, e.g. the last one seen + 1")
    tail.add_argument("--interval", type=float, default=None,
                      help="seconds between polls with --follow (default 0.2; on PostgreSQL a NOTIFY, sent "
                           "while a live projector listens, wakes it earlier)")

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


def _dsn(args) -> str:
    dsn = args.dsn or os.environ.get("EVENTCORE_DSN")
    if not dsn:
        raise EventCoreError("no database: pass --dsn URL or set EVENTCORE_DSN")
    return dsn


def _scheme(dsn: str) -> str:
    """The URL's scheme, for messages: never the whole string (a libpq key=value DSN may hold a password)."""
    return dsn.split("://", 1)[0].lower() if "://" in dsn else "none"


def _cmd_migrate(args) -> int:
    from .stores import connect
    from .stores.dsn import redact

    dsn = _dsn(args)
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise EventCoreError(f"eventcore migrate needs a postgresql:// URL, got scheme {_scheme(dsn)!r}")
    options = {"schema": args.schema} if args.schema else {}
    with connect(dsn, **options) as store:  # connecting migrates (migrate=true is the default)
        store.migrate(reapply_functions=True)  # and the functions are applied again, even if current
        version = store.schema_version()
        print(f"schema {store.schema!r} at {redact(dsn)} is at version {version}")
    return 0


#: Bytes of the first line hashed by the resume keys of eventcore before schema 3 (still recognised).
_LEGACY_FINGERPRINT_BYTES = 64 * 1024


def _file_lines(path: str):
    """The file's lines (bytes), decompressed if it is gzip (by its magic bytes, whatever its name)."""
    import gzip

    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


#: Valid lines a default resume key is anchored on: with two, blanking or breaking one of them (a
#: committed line: outside the contract, but easily done) still finds the key through the other.
RESUME_ANCHORS = 2


def _lines_at(path: str, numbers) -> dict:
    """{number: line} for the (1-based) line numbers the file has; {} if it cannot be read."""
    wanted = set(numbers)
    found: dict = {}
    if not wanted:
        return found
    try:
        with _file_lines(path) as f:
            for n, raw in enumerate(f, start=1):
                if n in wanted:
                    found[n] = raw
                    if len(found) == len(wanted):
                        break
    except (OSError, EOFError):
        pass
    return found


def _is_event_line(number: int, raw: bytes) -> bool:
    from .jsonl import BadLine, parse_line

    if not raw.strip():
        return False
    try:
        parse_line(number, raw.strip())
    except BadLine:
        return False
    return True


def _anchors_hold(path: str, anchors: list) -> bool:
    """Whether the file is the one a key's anchors were taken from: at least one anchor line is as it was,
    and none holds another event (a blanked or broken anchor line is a line of this file edited; another
    event there means another file, e.g. a rotated log)."""
    from .jsonl import line_digest

    lines = _lines_at(path, [n for n, _ in anchors])
    same = False
    for number, digest in anchors:
        raw = lines.get(number)
        if raw is not None and line_digest(raw) == digest:
            same = True
        elif raw is not None and _is_event_line(number, raw):
            return False
    return same


def default_resume_key(path: str, store=None) -> str:
    """The resume key `eventcore ingest FILE` uses unless told otherwise (see _default_resume_key)."""
    return _default_resume_key(path, store)[0]


def _default_resume_key(path: str, store=None) -> tuple[str, bool]:
    """(key, whether it counts the file's lines) for `eventcore ingest FILE` without --resume-key:
    `file:<name>:<hash of the absolute path>:<line>:<hash of that line>[:<line>:<hash>]`, at most ~180
    characters (a key an earlier eventcore recorded for this file is found too, and counts valid lines).

    The lines are the file's anchors: its first two valid event lines when the first run began. Line
    numbers are the file's own coordinates, which fixing, blanking or appending lines does not move,
    so a file whose lines were fixed (the first one included) keeps its key and resumes; another file
    at the same path (a rotated log) has other events at the anchor lines and gets a key of its own.
    With `store`, the keys already recorded for this path are tried first (the most recent one whose
    anchors hold wins); without, or if none does, the anchors are the file's first valid lines now.
    """
    import hashlib

    from .jsonl import line_digest

    real = os.path.realpath(path)
    path_hash = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = os.path.basename(real)[:100].encode("ascii", "replace").decode()
    name = "".join(c if c.isprintable() and c != ":" else "?" for c in name)
    prefix = f"file:{name}:{path_hash}:"
    if store is not None:
        for key in store._resume_keys(prefix):
            parts = key[len(prefix):].split(":")
            if len(parts) == 1:  # a key of an eventcore before schema 3: the hash of the raw first line
                raw = _lines_at(real, [1]).get(1)
                if raw is not None and hashlib.sha256(raw[:_LEGACY_FINGERPRINT_BYTES]).hexdigest()[:16] == parts[0]:
                    return key, False  # it counted valid lines only
            elif len(parts) % 2 == 0 and all(n.isdigit() for n in parts[::2]):
                if _anchors_hold(real, list(zip(map(int, parts[::2]), parts[1::2]))):
                    return key, True
    anchors: list = []
    try:
        with _file_lines(real) as f:
            for n, raw in enumerate(f, start=1):
                if _is_event_line(n, raw):
                    anchors.append(f"{n}:{line_digest(raw)}")
                    if len(anchors) == RESUME_ANCHORS:
                        break
    except (OSError, EOFError):  # a corrupt .gz: the reader reports it; the key needs only to be stable
        pass
    return prefix + (":".join(anchors) or "0:" + line_digest(b"")), True  # no valid line: nothing will be committed


#: Prefix of the resume keys `eventcore ingest --resume-key KEY` records: KEY counted in line numbers.
LINES_KEY_PREFIX = "lines:"


def _cli_resume_key(store, args) -> tuple[str | None, bool]:
    """(resume key, whether it counts the file's lines) for `eventcore ingest`.

    This eventcore counts lines (a passed-over line keeps its number); one before schema 3 counted
    valid lines only. An ingest an earlier version started is finished in its own count: its default
    keys have their own shape, and a key named with --resume-key is recorded as `lines:KEY` now, so a
    plain KEY with progress recorded is an earlier version's."""
    if args.no_resume:
        return None, True
    if args.resume_key is None:
        return _default_resume_key(args.file, store)
    named = LINES_KEY_PREFIX + args.resume_key
    if len(named) > 255:
        raise EventCoreError(f"--resume-key must be at most {255 - len(LINES_KEY_PREFIX)} characters")
    if store._ingest_progress(named) or not store._ingest_progress(args.resume_key):
        return named, True
    return args.resume_key, False


def _cmd_ingest(args) -> int:
    import json as _json
    import time

    from .jsonl import BadLine, JsonLinesReader
    from .stores import connect
    from .stores.ingest import IngestError

    dsn = _dsn(args)
    rejects_path = args.rejects or f"{args.file}.rejects.jsonl"
    rejects = None
    if args.skip_invalid and args.rejects and _rejects_list(rejects_path) is False:
        # The input, the store's own file, anyone's file: written over, it would be lost. (The default,
        # FILE.rejects.jsonl, is eventcore's own name: an earlier version's list of raw lines is replaced.)
        raise EventCoreError(f"--rejects {rejects_path!r} exists and is not a rejects file eventcore wrote: "
                             "it is left as it is; name another file")
    if args.skip_invalid and _same_file(rejects_path, args.file):
        raise EventCoreError(f"the rejects file {rejects_path!r} is the input file: name another with --rejects")
    if args.no_resume and args.resume_key is not None:
        raise EventCoreError("--no-resume and --resume-key contradict each other: give one")
    if args.resume_key is not None and not args.resume_key:
        raise EventCoreError("--resume-key must not be empty")

    def reject(bad: BadLine) -> None:
        nonlocal rejects
        if rejects is None:
            rejects = open(rejects_path, "wb")
        text = bad.text.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        rejects.write(_json.dumps({"line": bad.line, "reason": bad.reason, "text": text}).encode() + b"\n")

    progress_state = {"events": 0}
    started = time.perf_counter()
    tty = sys.stderr.isatty()
    last_draw = [0.0]

    def draw(final: bool = False) -> None:
        if args.no_progress:
            return
        now = time.perf_counter()
        if not final and now - last_draw[0] < (0.2 if tty else 5.0):
            return
        last_draw[0] = now
        done = progress_state["events"]
        rate = done / max(now - started, 1e-9)
        frac = reader.progress()
        bar = "#" * int(frac * 30)
        line = f"ingest [{bar:<30}] {frac * 100:5.1f} %  {done:,} events  {rate:,.0f} events/s"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
        sys.stderr.flush()

    def on_batch(total: int) -> None:
        progress_state["events"] = total
        draw()

    status, error = 0, None
    with JsonLinesReader(args.file, on_bad=reject if args.skip_invalid else None) as reader:
        with connect(dsn) as store:
            if args.skip_invalid and _same_file(rejects_path, getattr(store, "path", None)):
                raise EventCoreError(f"the rejects file {rejects_path!r} is the store's own file: name another "
                                     "with --rejects")
            try:
                resume_key, reader.keep_places = _cli_resume_key(store, args)
                result = store.ingest(reader, batch_size=args.batch_size, on_batch=on_batch, parallel=args.parallel,
                                      resume_key=resume_key)
                events, batches, skipped = result.events, result.batches, result.skipped
                first, last = result.first_position, result.last_position
            except BadLine as bad:
                status, error = 1, f"line {bad.line}: {bad.reason}"
                events, batches, first, last, skipped = progress_state["events"], None, None, None, None
            except IngestError as exc:
                cause = exc.__cause__ or exc
                status, error = 1, f"{cause} (stopped after reading line {reader.lines})"
                events, batches, first, last, skipped = exc.committed, None, None, None, None
            finally:
                if rejects is not None:
                    rejects.close()
        draw(final=True)
    if args.skip_invalid and status == 0 and not reader.rejected:
        _remove_stale_rejects(rejects_path)  # the whole file read, nothing rejected: an old list is wrong now
    args.outcome = status  # kept if printing the summary fails on a closed pipe (see main)
    elapsed = time.perf_counter() - started
    summary = {
        "file": args.file,
        "events": events,
        "skipped": skipped,
        "batches": batches,
        "lines": reader.lines,
        "rejected": reader.rejected,
        "rejects_file": rejects_path if reader.rejected else None,
        "duration_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed, 1) if elapsed > 0 else 0.0,
        "first_position": first,
        "last_position": last,
        "error": error,
    }
    if error and not args.json:  # first, on stderr: it must reach the user even if stdout's reader is gone
        print(f"error: {error}; nothing of the failing batch was written", file=sys.stderr)
    if args.json:
        print(_json.dumps(summary))
    else:
        verb = "ingested" if status == 0 else "stopped after committing"
        print(f"{verb} {events:,} event{'' if events == 1 else 's'} from {args.file} in {elapsed:.2f} s "
              f"({summary['events_per_s']:,.0f} events/s)")
        if skipped:
            print(f"{skipped:,} event(s) skipped: committed by an earlier run (resume key {resume_key!r})")
        if reader.rejected:
            print(f"{reader.rejected:,} invalid line(s) written to {rejects_path}")
    return status


def _rejects_list(path: str) -> bool | None:
    """None if nothing is at `path`; True if it is a rejects file an earlier run wrote (every line one of
    our {"line", "reason", "text"} records); False for anything else, which eventcore never writes over."""
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return False
    return all(isinstance(r, dict) and set(r) == {"line", "reason", "text"} for r in records)


def _same_file(a: str, b: str | None) -> bool:
    """Whether two paths name one existing file (through links too)."""
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _remove_stale_rejects(path: str) -> None:
    """Remove a rejects file an earlier run wrote; any other file at that path is left alone."""
    if _rejects_list(path):
        os.remove(path)


def _cmd_tail(args) -> int:
    import signal
    import threading

    from .projections import follow_waiter, read_rows, row_json
    from .stores import connect

    from .formats import INT64_MAX

    if not 0 <= args.from_position <= INT64_MAX:
        raise EventCoreError(f"--from must be a position in 0..2**63-1, got {args.from_position}")
    if args.interval is not None and not 0 < args.interval <= 86400:  # also refuses nan and inf
        raise EventCoreError(f"--interval must be > 0 and at most 86400 seconds, got {args.interval}")
    types = None
    if args.type:
        from .stores.prepare import type_names as _type_names

        types = _type_names([t for chunk in args.type for t in chunk.split(",") if t])  # ValidationError if bad
    prefix = args.prefix or None
    if prefix is not None and forbidden_character(prefix):
        raise EventCoreError(f"--prefix {prefix!r} contains {forbidden_character(prefix)}: no stream id has one")
    after = max(0, args.from_position - 1)
    out = sys.stdout.buffer
    page = 1000
    stop = threading.Event()
    previous = {}
    if args.follow and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    dsn = _dsn(args)
    try:
        # A monitoring command creates and changes nothing: a missing store, another application's
        # file or schema, or a schema at another version is an error saying so.
        with connect(dsn, migrate=False) as store:
            waiter = follow_waiter(store) if args.follow else None
            interval = args.interval or 0.2
            try:
                while not stop.is_set():
                    if waiter is not None:
                        waiter.clear_wake()
                    rows = read_rows(store, after, types, prefix, page)
                    if rows:
                        lines = []
                        try:  # a corrupt row stops the command; the rows before it are printed
                            for row in rows:
                                lines.append(row_json(row) + b"\n")
                        finally:
                            out.write(b"".join(lines))
                            out.flush()
                        after = rows[-1][0]
                    if len(rows) < page:
                        if waiter is None:
                            break
                        waiter.wait(interval, stop)
            finally:
                if waiter is not None:
                    waiter.close()
    except BrokenPipeError:  # `eventcore tail | head`: the reader is gone
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _cmd_projections(args) -> int:
    from .projections import projection_status
    from .stores import connect

    dsn = _dsn(args)
    with connect(dsn, migrate=False) as store:  # creates and changes nothing (see _cmd_tail)
        rows = projection_status(store)
    if args.json:
        for r in rows:
            d = {f: getattr(r, f) for f in r.__struct_fields__}
            d["updated_at"] = r.updated_at.isoformat() if r.updated_at else None
            print(json.dumps(d))
        return 0
    if not rows:
        print("no projectors recorded in this store")
        return 0
    header = ("NAME", "CHECKPOINT", "LAG", "PENDING", "STATE", "DEAD LETTERS", "UPDATED")
    table = [header] + [
        (r.name, str(r.position), str(r.lag), str(r.pending), r.state, str(r.dead_letters),
         r.updated_at.strftime("%Y-%m-%d %H:%M:%S") if r.updated_at else "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in rows:
        if r.error:
            print(f"{r.name}: {r.error}", file=sys.stderr)
    return 0


def _cmd_status(args) -> int:
    from .errors import NotAnEventStoreError, SchemaVersionError, StoreNotFoundError
    from .stores import connect
    from .stores.base import StoreHealth
    from .stores.dsn import redact

    dsn = _dsn(args)
    scheme = _scheme(dsn)
    try:
        store = connect(dsn, migrate=False)  # a probe creates and changes nothing
    except EventCoreError as exc:
        # Which of these it is says whether the store answered: only "unreachable" means it did not.
        problem = ("missing" if isinstance(exc, StoreNotFoundError) else
                   "not_an_event_store" if isinstance(exc, NotAnEventStoreError) else
                   "schema_version" if isinstance(exc, SchemaVersionError) else "unreachable")
        # "connected": the server or the file answered (a missing SQLite file has nothing to answer).
        connected = problem in ("not_an_event_store", "schema_version") or (problem == "missing" and scheme != "sqlite")
        health = StoreHealth(ok=False, backend=scheme, url=redact(dsn), connected=connected,
                             latency_ms=0.0, head_position=None,
                             schema_version=getattr(exc, "found", None), schema_expected=getattr(exc, "expected", None),
                             pool=None, projections=[], error=str(exc), schema=_schema_option(dsn, scheme),
                             problem=problem)
    else:
        with store:
            health = store.health()
    args.outcome = 0 if health.ok else 1  # kept if printing fails on a closed pipe (see main)
    if args.json:
        print(json.dumps(health.as_dict()))
        return 0 if health.ok else 1
    print(f"{'OK' if health.ok else 'UNHEALTHY'}  {health.backend} store {health.url}")
    if health.schema is not None:
        print(f"  schema          {health.schema}")
    if health.problem in ("missing", "not_an_event_store"):
        print(f"  store           {'missing' if health.problem == 'missing' else 'not an eventcore store'}")
    elif health.head_position is not None:
        print(f"  round trip      {health.latency_ms:.2f} ms (head position {health.head_position:,})")
    elif health.problem == "unreachable":
        print("  round trip      unreachable")
    if health.schema_expected is not None or health.schema_version is not None:
        print(f"  schema version  {health.schema_version} (this eventcore needs {health.schema_expected})")
    if health.pool:
        p = health.pool
        print(f"  pool            {p['in_use']} in use, {p['idle']} idle of {p['size']} open "
              f"(min {p['min']}, max {p['max']}), {p['waiting']} waiting")
    for proj in health.projections:
        print(f"  projection      {proj['name']}: {proj['state']}, lag {proj['lag']:,} "
              f"({proj['pending']:,} pending, {proj['dead_letters']} dead letters)")
    if not health.projections and health.ok:
        print("  projections     none recorded")
    if health.error:
        print(f"  error           {health.error}")
    return 0 if health.ok else 1


def _schema_option(dsn: str, scheme: str) -> str | None:
    """The PostgreSQL schema a DSN names (?schema=, else the default), for a status report; None for a
    URL whose query cannot be told apart from its password (see `stores.dsn.check_url`)."""
    if scheme not in ("postgresql", "postgres"):
        return None
    from urllib.parse import parse_qsl

    from .errors import ValidationError
    from .stores.dsn import DEFAULT_SCHEMA, check_url, split_query

    try:
        check_url(dsn)
    except ValidationError:
        return None
    schema = DEFAULT_SCHEMA
    for pair in (split_query(dsn)[1] or "").split("&"):  # where PostgresStore.from_url finds it
        parsed = parse_qsl(pair, keep_blank_values=True)
        if parsed and parsed[0][0] == "schema":
            schema = parsed[0][1]
    return schema


def _cmd_bench(args) -> int:
    from .bench.report import format_scaling, format_table
    from .bench.runner import WORKLOADS, BenchStore, run_workload
    from .metrics import MetricsCollector

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
                "projections": _cmd_projections, "status": _cmd_status}
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


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced, e.g. captured)
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
