"""`eventcore ingest FILE`: JSON Lines into a store, resumable in the file's own line numbers (resume keys
anchored on the file's first valid lines), with a rejects file for --skip-invalid."""
from __future__ import annotations

import json
import os
import sys

from ..errors import EventCoreError
from ..stores.ingest import committed_items
from .common import dsn_of as _dsn, import_event_modules


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
    from ..jsonl import BadLine, parse_line

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
    from ..jsonl import line_digest

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

    from ..jsonl import line_digest

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


def _lanes(store, given: int | None, resume_key: str | None) -> int:
    """--parallel if given; else the lane count an ingest under `resume_key` was started with (each
    stream's lane depends on it); else the store's default (two on PostgreSQL, one where commits are
    serialised: see EventStore.default_ingest_lanes)."""
    if given is not None:
        return given
    recorded = store._ingest_progress(resume_key) if resume_key is not None else {}
    if recorded:
        return max(lanes for lanes, _ in recorded.values())
    return store.default_ingest_lanes


def _cmd_ingest(args) -> int:
    import time

    from ..jsonl import BadLine, JsonLinesReader
    from ..stores import connect
    from ..stores.ingest import IngestError

    dsn = _dsn(args)
    import_event_modules(args)
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
        rejects.write(json.dumps({"line": bad.line, "reason": bad.reason, "text": text}).encode() + b"\n")

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

    status, error, lanes = 0, None, None
    with JsonLinesReader(args.file, on_bad=reject if args.skip_invalid else None) as reader:
        with connect(dsn) as store:
            if args.skip_invalid and _same_file(rejects_path, getattr(store, "path", None)):
                raise EventCoreError(f"the rejects file {rejects_path!r} is the store's own file: name another "
                                     "with --rejects")
            try:
                resume_key, reader.keep_places = _cli_resume_key(store, args)
                lanes = _lanes(store, args.parallel, resume_key)
                reader.committed = committed_items(store, resume_key, lanes)
                result = store.ingest(reader, batch_size=args.batch_size, on_batch=on_batch, parallel=lanes,
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
        "lanes": lanes,
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
        print(json.dumps(summary))
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
