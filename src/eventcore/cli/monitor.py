"""The read-only commands: `eventcore tail`, `types`, `projections` and `status`. They open the store
with migrate=False: they create and change nothing."""
from __future__ import annotations

import json
import os
import sys

from ..errors import EventCoreError
from ..streams import forbidden_character
from .common import dsn_of as _dsn, import_event_modules, scheme_of as _scheme


def _cmd_snapshots(args) -> int:
    """The snapshots a store holds, or --drop them (the only change: snapshots are an optimisation)."""
    import time

    from ..stores import connect

    with connect(_dsn(args), migrate=False) as store:
        if args.older_than is not None and args.drop is None:
            raise EventCoreError("--older-than applies to --drop only")
        if args.drop is not None:
            dropped = store.drop_snapshots(args.drop or None, older_than=args.older_than)
            if args.json:
                print(json.dumps({"dropped": dropped}))
            else:
                print(f"dropped {dropped} snapshot(s)" + (f" of {args.drop}" if args.drop else ""))
            return 0
        infos = store.snapshots()
    now = time.time()
    rows = [{"key": s.key, "command": s.command, "state_version": s.state_version, "bytes": s.size,
             "events": s.events, "age_s": round(max(0.0, now - s.written_at), 3)} for s in infos]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no snapshots stored")
        return 0
    width = max(len(s.command) for s in infos)
    for r in rows:
        print(f"{r['command']:<{width}}  v{r['state_version']}  {r['bytes']:>9,} B  {r['events']:>12,} events  "
              f"{r['age_s']:>10.1f} s old  {r['key']}")
    return 0


def _cmd_types(args) -> int:
    """Each stored type name with its versions and counts, and whether this process can read it: the
    class registered for the name (its own or an alias), its version, and for each older stored
    version whether the upcaster chain to it is complete."""
    from ..errors import EventVersionError
    from ..events import known_type_names
    from ..evolution import chain_for
    from ..stores import connect

    import_event_modules(args)
    with connect(_dsn(args), migrate=False) as store:
        counts = store.type_counts()
    known = known_type_names()
    by_type: dict = {}
    for name, version, count in counts:
        by_type.setdefault(name, []).append((version, count))
    out = []
    for name, versions in by_type.items():
        cls = known.get(name)
        entry = {"type": name, "events": sum(n for _, n in versions),
                 "versions": [{"version": v, "events": n} for v, n in versions], "known": cls is not None}
        if cls is not None:
            entry["class"] = f"{cls.__module__}.{cls.__qualname__}"
            entry["class_version"] = cls.__event_version__
            if cls.__event_type__ != name:
                entry["alias_of"] = cls.__event_type__
            for v in entry["versions"]:
                try:
                    if v["version"] != cls.__event_version__:
                        chain_for(cls, v["version"])
                    v["readable"] = True
                except EventVersionError as exc:
                    v["readable"] = False
                    v["problem"] = str(exc)
        out.append(entry)
    if args.json:
        print(json.dumps(out))
        return 0
    if not out:
        print("no events stored")
        return 0
    width = max(len(e["type"]) for e in out)
    for e in out:
        for i, v in enumerate(e["versions"]):
            name = e["type"] if i == 0 else ""
            if not e["known"]:
                note = "unknown here (read it with decode=False)"
            elif v.get("readable") is False:
                note = "NOT READABLE: " + v["problem"]
            else:
                note = f"{e['class']} v{e['class_version']}"
                if "alias_of" in e:
                    note += f" (alias of {e['alias_of']!r})"
                if v["version"] != e["class_version"]:
                    note += ", upcast"
            print(f"{name:<{width}}  v{v['version']:<5} {v['events']:>12,}  {note}")
    return 0


def _cmd_tail(args) -> int:
    import signal
    import threading

    from ..projections import follow_waiter, read_rows, row_json
    from ..stores import connect

    from ..formats import INT64_MAX

    if not 0 <= args.from_position <= INT64_MAX:
        raise EventCoreError(f"--from must be a position in 0..2**63-1, got {args.from_position}")
    if args.interval is not None and not 0 < args.interval <= 86400:  # also refuses nan and inf
        raise EventCoreError(f"--interval must be > 0 and at most 86400 seconds, got {args.interval}")
    types = None
    if args.type:
        from ..stores.prepare import type_names as _type_names

        types = _type_names([t for chunk in args.type for t in chunk.split(",") if t])  # ValidationError if bad
    prefix = args.prefix or None
    if prefix is not None and forbidden_character(prefix):
        raise EventCoreError(f"--prefix {prefix!r} contains {forbidden_character(prefix)}: no stream id has one")
    after = max(0, args.from_position - 1)
    import_event_modules(args)
    decode = bool(args.imports)  # with the application's classes: its events as it reads them
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
                                lines.append(row_json(row, decode) + b"\n")
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
    from ..projections import projection_status
    from ..stores import connect

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
    from ..errors import NotAnEventStoreError, SchemaVersionError, StoreNotFoundError
    from ..stores import connect
    from ..stores.base import StoreHealth
    from ..stores.dsn import redact

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

    from ..errors import ValidationError
    from ..stores.dsn import DEFAULT_SCHEMA, check_url, split_query

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
