"""Metrics and hooks: what eventcore is doing, counted where it happens, at no cost when unused.

A `MetricsCollector` attached to a store (`store.attach(collector)` or
`ec.connect(url, metrics=collector)`) sees every command executed on that store
and every store operation: counters of commands by type and outcome, retries,
events written and read, and latency histograms per command type and per store
operation (read, read_all, append, append_batch, ingest_batch, ingest). Passing
`execute(..., metrics=collector)` overrides the store's collector for that
command's own counters. Gauges (connection pool, projection lag) are read from
the attached stores when asked (`snapshot()`, `summary()`, a Prometheus scrape).

With nothing attached the executor and the stores pay one attribute test per
call (`if metrics is not None`): no clock read, no allocation.

Histograms use fixed log-scale buckets (20 per decade, 10 us to 1,000 s): a
percentile read from them is the upper edge of its bucket, at most 12 % above
the true value; count, sum, min and max are exact.

Hooks (`on_command_complete`, `on_retry`, `on_store_operation`) are called in
the thread that did the work; one that raises is logged on the
`eventcore.metrics` logger and never breaks the command.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from .errors import (
    BusinessRuleViolation,
    CommandTimeoutError,
    ConcurrencyError,
    StoreUnavailableError,
)

log: logging.Logger = logging.getLogger("eventcore.metrics")

if TYPE_CHECKING:
    from .commands import Command
    from .stores.base import EventStore

#: A hook function, handed back by the decorator that registers it.
HookT = TypeVar("HookT", bound=Callable[["CommandInfo"], Any])
RetryHookT = TypeVar("RetryHookT", bound=Callable[["RetryInfo"], Any])
OperationHookT = TypeVar("OperationHookT", bound=Callable[["OperationInfo"], Any])

#: Final outcomes of a command. `conflict_retried` (commands that needed at least one retry
#: after a version conflict, whatever their final outcome) is counted beside them.
OUTCOMES = ("succeeded", "rejected", "conflict_exhausted", "timeout", "store_error", "error")
#: Store operations timed, and which of them count events written or read.
WRITE_OPS = ("append", "append_batch", "ingest_batch")
READ_OPS = ("read", "read_all")
STORE_OPS = READ_OPS + WRITE_OPS + ("ingest",)

#: Bucket upper bounds in seconds: 10 ** (k / 20) * 10 us, k = 0..160 (10 us .. 1,000 s).
BUCKETS_PER_DECADE = 20
BUCKET_BOUNDS = tuple(1e-5 * 10 ** (k / BUCKETS_PER_DECADE) for k in range(8 * BUCKETS_PER_DECADE + 1))


def outcome_of(exc: BaseException | None) -> str:
    """The outcome name of a command that ended with `exc` (None: it succeeded)."""
    if exc is None:
        return "succeeded"
    if isinstance(exc, BusinessRuleViolation):
        return "rejected"
    if isinstance(exc, ConcurrencyError):
        return "conflict_exhausted"
    if isinstance(exc, CommandTimeoutError):
        return "timeout"
    if isinstance(exc, StoreUnavailableError):
        return "store_error"
    return "error"


class Histogram:
    """Latencies in fixed log-scale buckets (see BUCKET_BOUNDS); not locked: its owner locks."""

    __slots__ = ("counts", "count", "sum", "min", "max")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (len(BUCKET_BOUNDS) + 1)  # the last one: above the top bound
        self.count: int = 0
        self.sum: float = 0.0
        self.min: float = float("inf")
        self.max: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKET_BOUNDS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile in seconds: the upper bound of the bucket holding it (0.0 if empty)."""
        if not self.count:
            return 0.0
        rank = max(1, min(self.count, -int(-q * self.count // 100)))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                edge = BUCKET_BOUNDS[i] if i < len(BUCKET_BOUNDS) else self.max
                return max(self.min, min(edge, self.max))
        return self.max  # pragma: no cover

    def as_dict(self) -> dict[str, float]:
        """Count, sum (seconds), min, max and percentiles (milliseconds)."""
        return {
            "count": self.count,
            "sum_s": self.sum,
            "min_ms": round(self.min * 1000, 3) if self.count else 0.0,
            "max_ms": round(self.max * 1000, 3),
            "p50_ms": round(self.percentile(50) * 1000, 3),
            "p95_ms": round(self.percentile(95) * 1000, 3),
            "p99_ms": round(self.percentile(99) * 1000, 3),
        }


class CommandInfo:
    """What `on_command_complete` hooks receive about one `execute` call."""

    __slots__ = ("command", "command_type", "outcome", "attempts", "duration_s", "streams", "stream_versions",
                 "events_written", "error", "replayed")

    def __init__(self, command: Command, command_type: str, outcome: str, attempts: int, duration_s: float,
                 streams: list[str], stream_versions: dict[str, int], events_written: int,
                 error: BaseException | None, replayed: bool = False) -> None:
        self.command: Command = command
        self.command_type: str = command_type
        #: One of OUTCOMES.
        self.outcome: str = outcome
        self.attempts: int = attempts
        self.duration_s: float = duration_s
        #: Every stream the command touched (declared, discovered and written) in order.
        self.streams: list[str] = streams
        #: Version of each stream after the command (succeeded only; else {}).
        self.stream_versions: dict[str, int] = stream_versions
        #: Events this call wrote: 0 when it replayed an earlier run's result (`replayed`).
        self.events_written: int = events_written
        self.error: BaseException | None = error
        #: True when an idempotency key had already committed: nothing was written, and
        #: `stream_versions` are those the earlier run's events gave their streams.
        self.replayed: bool = replayed

    def __repr__(self) -> str:
        return (f"CommandInfo({self.command_type}, {self.outcome}, attempts={self.attempts}, "
                f"duration={self.duration_s * 1000:.3f} ms, streams={self.streams})")


class RetryInfo:
    """What `on_retry` hooks receive: the command, the attempt that failed, why, and the pause before the next.

    `reason`: "conflict" (a version conflict), "store_error" (a store error that provably wrote
    nothing) or "stale_cache" (a StateCache entry proved stale: re-read at once, not counted
    against the retry policy)."""

    __slots__ = ("command", "command_type", "attempt", "reason", "delay_s", "error")

    def __init__(self, command: Command, command_type: str, attempt: int, reason: str, delay_s: float,
                 error: BaseException) -> None:
        self.command: Command = command
        self.command_type: str = command_type
        self.attempt: int = attempt
        self.reason: str = reason
        self.delay_s: float = delay_s
        self.error: BaseException = error

    def __repr__(self) -> str:
        return f"RetryInfo({self.command_type}, attempt={self.attempt}, {self.reason}, delay={self.delay_s:.4f}s)"


class OperationInfo:
    """What `on_store_operation` hooks receive about one store call."""

    __slots__ = ("store", "operation", "duration_s", "events", "outcome", "streams", "error")

    def __init__(self, store: EventStore, operation: str, duration_s: float, events: int, outcome: str,
                 streams: list[str], error: BaseException | None) -> None:
        self.store: EventStore = store
        self.operation: str = operation
        self.duration_s: float = duration_s
        self.events: int = events
        #: "ok", "conflict" or "error".
        self.outcome: str = outcome
        self.streams: list[str] = streams
        self.error: BaseException | None = error


class _CommandRun:
    """One command being executed under a collector (created only when one is attached)."""

    __slots__ = ("collector", "command", "started", "streams", "retries", "conflicts", "spans")

    def __init__(self, collector, command, streams) -> None:
        self.collector = collector
        self.command = command
        self.started = time.perf_counter()
        self.streams = streams
        self.retries = 0
        self.conflicts = 0
        self.spans: list[Any] | None = None


class _OpRun:
    __slots__ = ("store", "op", "streams", "started", "spans")

    def __init__(self, store: EventStore, op: str, streams: Iterable[str] | None) -> None:
        self.store = store
        self.op = op
        self.streams = streams
        self.started = time.perf_counter()
        self.spans: list[Any] | None = None


class MetricsCollector:
    """Counters, latency histograms and hooks for commands and store operations; thread-safe.

        collector = ec.MetricsCollector()
        store = ec.connect(url, metrics=collector)        # or store.attach(collector)
        ...
        collector.count("Deposit", "succeeded"); collector.latency("Deposit").percentile(95)
        print(collector.format_summary())
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: "weakref.WeakSet" = weakref.WeakSet()
        self._command_hooks: list = []
        self._retry_hooks: list = []
        self._op_hooks: list = []
        #: Tracers (e.g. eventcore.otel's): start(name, attributes) -> handle; end(handle, attributes, error).
        self._tracers: list = []
        self.reset()

    # -- configuration -------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero every counter and histogram (hooks, tracers and attached stores stay)."""
        with self._lock:
            #: (command type, outcome) -> commands; outcome in OUTCOMES or "conflict_retried".
            self.commands: dict[tuple[str, str], int] = {}
            #: (command type, reason) -> retries; reason "conflict", "store_error" or "stale_cache".
            self.retries: dict[tuple[str, str], int] = {}
            #: command type -> Histogram of execute() durations (every outcome).
            self.command_latency: dict[str, Histogram] = {}
            #: (operation, outcome) -> calls; outcome "ok", "conflict" or "error".
            self.operations: dict[tuple[str, str], int] = {}
            #: operation -> Histogram of store call durations (every outcome).
            self.operation_latency: dict[str, Histogram] = {}
            self.events_written: int = 0
            self.events_read: int = 0
            self.started: float = time.monotonic()
            #: command type -> [first start, last end] (perf_counter): the window its ops/s is taken over.
            self._windows: dict = {}

    def on_command_complete(self, fn: HookT) -> HookT:
        """Call fn(CommandInfo) after every command (any outcome). Usable as a decorator."""
        self._command_hooks.append(fn)
        return fn

    def on_retry(self, fn: RetryHookT) -> RetryHookT:
        """Call fn(RetryInfo) before every retry of a command. Usable as a decorator."""
        self._retry_hooks.append(fn)
        return fn

    def on_store_operation(self, fn: OperationHookT) -> OperationHookT:
        """Call fn(OperationInfo) after every timed store operation. Usable as a decorator."""
        self._op_hooks.append(fn)
        return fn

    def add_tracer(self, tracer: Any) -> None:
        """Register a tracer: `start(name, attributes) -> handle` and `end(handle, attributes, error)`."""
        self._tracers.append(tracer)

    # -- the stores' StoreObserver protocol (eventcore.stores.observer) -------------------------

    def store_attached(self, store: EventStore, /) -> None:
        """Measure `store` too (called by `store.attach`)."""
        self._stores.add(store)

    def store_detached(self, store: EventStore, /) -> None:
        """Stop measuring `store` (called by `store.detach`)."""
        self._stores.discard(store)

    # -- reading ---------------------------------------------------------------------------------

    def count(self, command_type: str, outcome: str) -> int:
        """Commands of this type (class name) that ended with `outcome` (or needed a conflict retry)."""
        return self.commands.get((command_type, outcome), 0)

    def retry_count(self, command_type: str | None = None, reason: str | None = None) -> int:
        return sum(n for (t, r), n in list(self.retries.items())
                   if (command_type is None or t == command_type) and (reason is None or r == reason))

    def latency(self, command_type: str) -> Histogram:
        """The execute() latency histogram of a command type (empty if none ran)."""
        return self.command_latency.get(command_type) or Histogram()

    def operation(self, name: str) -> Histogram:
        """The latency histogram of a store operation (see STORE_OPS)."""
        return self.operation_latency.get(name) or Histogram()

    def gauges(self) -> dict[str, dict[str, Any]]:
        """Read now from the attached stores: {store url: {"pool": {...} or None, "projections": {name: lag}}}."""
        out = {}
        for store in list(self._stores):
            try:
                pool = store.pool_stats()
            except Exception:  # noqa: BLE001 - a gauge read must never fail a scrape
                pool = None
            out[store.url] = {"pool": pool, "projections": _projection_lags(store)}
        return out

    def snapshot(self) -> dict[str, Any]:
        """Every counter and histogram as plain data (a consistent copy), plus the gauges."""
        with self._lock:
            snap = {
                "commands": {f"{t}:{o}": n for (t, o), n in sorted(self.commands.items())},
                "retries": {f"{t}:{r}": n for (t, r), n in sorted(self.retries.items())},
                "command_latency": {t: h.as_dict() for t, h in sorted(self.command_latency.items())},
                "operations": {f"{op}:{o}": n for (op, o), n in sorted(self.operations.items())},
                "operation_latency": {op: h.as_dict() for op, h in sorted(self.operation_latency.items())},
                "events_written": self.events_written,
                "events_read": self.events_read,
            }
        snap["stores"] = self.gauges()
        return snap

    def summary(self, duration_s: float | None = None) -> dict[str, Any]:
        """The reference report's "key metrics to track", over `duration_s` (default: since reset()).

        Throughput by command type, events written per second, success rate, P50/P95/P99 by
        command type and store operation, pool use and connection time, projection lag."""
        if duration_s is None:
            duration_s = time.monotonic() - self.started
        d = duration_s if duration_s > 0 else float("nan")
        with self._lock:
            types = sorted({t for t, _ in self.commands} | set(self.command_latency))
            commands = {}
            for t in types:
                outcomes = {o: self.commands.get((t, o), 0) for o in OUTCOMES}
                total = sum(outcomes.values())
                h = self.command_latency.get(t) or Histogram()
                w = self._windows.get(t)
                span = (w[1] - w[0]) if w and w[1] > w[0] else float("nan")
                commands[t] = {
                    "total": total,
                    # over the time this command type ran: first start to last end
                    "ops_per_s": round(outcomes["succeeded"] / span, 1),
                    "success_rate": round(100.0 * outcomes["succeeded"] / total, 2) if total else 0.0,
                    "outcomes": outcomes,
                    "conflict_retried": self.commands.get((t, "conflict_retried"), 0),
                    "retries": sum(n for (tt, _), n in self.retries.items() if tt == t),
                    "latency_ms": {k: h.as_dict()[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
                }
            ops = {}
            for op, h in sorted(self.operation_latency.items()):
                hd = h.as_dict()
                ops[op] = {"count": h.count, "errors": self.operations.get((op, "error"), 0),
                           "conflicts": self.operations.get((op, "conflict"), 0),
                           "latency_ms": {k: hd[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}}
            written, read = self.events_written, self.events_read
        return {
            "duration_s": round(duration_s, 4),
            "commands": commands,
            "operations": ops,
            "events_written": written,
            "events_written_per_s": round(written / d, 1),
            "events_read": read,
            "stores": self.gauges(),
        }

    def format_summary(self, duration_s: float | None = None, summary: dict[str, Any] | None = None) -> str:
        """summary() as the text `eventcore bench` ends with."""
        s = summary if summary is not None else self.summary(duration_s)
        lines = [f"Metrics collector: key metrics over {s['duration_s']:.2f} s "
                 f"({s['events_written']:,} events written, {s['events_written_per_s']:,.1f} events/s; "
                 f"{s['events_read']:,} events read)"]
        rows = [("Command", "Total", "ops/s", "Success", "Rejected", "Conflict-retried", "Retries",
                 "Exhausted", "Timeouts", "Store errors", "P50 ms", "P95 ms", "P99 ms")]
        for t, c in s["commands"].items():
            o, lat = c["outcomes"], c["latency_ms"]
            rows.append((t, f"{c['total']:,}", f"{c['ops_per_s']:,.1f}", f"{c['success_rate']:.1f} %",
                         f"{o['rejected']:,}", f"{c['conflict_retried']:,}", f"{c['retries']:,}",
                         f"{o['conflict_exhausted']:,}", f"{o['timeout']:,}", f"{o['store_error']:,}",
                         f"{lat['p50_ms']:.2f}", f"{lat['p95_ms']:.2f}", f"{lat['p99_ms']:.2f}"))
        if len(rows) > 1:
            lines += [""] + _table(rows)
        rows = [("Store operation", "Calls", "Conflicts", "Errors", "P50 ms", "P95 ms", "P99 ms", "Max ms")]
        for op, c in s["operations"].items():
            lat = c["latency_ms"]
            rows.append((op, f"{c['count']:,}", f"{c['conflicts']:,}", f"{c['errors']:,}", f"{lat['p50_ms']:.2f}",
                         f"{lat['p95_ms']:.2f}", f"{lat['p99_ms']:.2f}", f"{lat['max_ms']:.2f}"))
        if len(rows) > 1:
            lines += [""] + _table(rows)
        for url, g in s["stores"].items():
            pool = g["pool"]
            if pool:
                connect = (f", {pool.get('connections_ms', 0) / pool['connections_num']:.1f} ms per new connection"
                           if pool.get("connections_num") else "")
                wait = (f", {pool.get('requests_wait_ms', 0) / pool['requests_num']:.3f} ms average wait for one"
                        if pool.get("requests_num") else "")
                lines.append(f"Pool {url}: {pool['in_use']} in use of {pool['size']} open (max {pool['max']}), "
                             f"{pool['waiting']} waiting{wait}{connect}")
            for name, lag in sorted(g["projections"].items()):
                lines.append(f"Projection {name}: lag {lag:,}")
        return "\n".join(lines)

    # -- recording (called by the executor and, through the StoreObserver protocol, the stores) ---

    def _command_start(self, command, streams) -> _CommandRun:
        run = _CommandRun(self, command, streams)
        if self._tracers:
            attrs = {"eventcore.command": type(command).__name__, "eventcore.stream_ids": [str(s) for s in streams]}
            run.spans = [t.start("eventcore.execute", attrs) for t in self._tracers]
        return run

    def _retry(self, run: _CommandRun, attempt: int, reason: str, delay: float, error: BaseException) -> None:
        t = type(run.command).__name__
        if reason != "stale_cache":
            run.retries += 1
        if reason == "conflict":
            run.conflicts += 1
        with self._lock:
            key = (t, reason)
            self.retries[key] = self.retries.get(key, 0) + 1
        if self._retry_hooks:
            info = RetryInfo(run.command, t, attempt, reason, delay, error)
            for fn in self._retry_hooks:
                _call_hook(fn, info)

    def _command_end(self, run: _CommandRun, result, error: BaseException | None) -> None:
        now = time.perf_counter()
        duration = now - run.started
        t = type(run.command).__name__
        outcome = outcome_of(error)
        with self._lock:
            c = self.commands
            key = (t, outcome)
            c[key] = c.get(key, 0) + 1
            if run.conflicts:
                key = (t, "conflict_retried")
                c[key] = c.get(key, 0) + 1
            h = self.command_latency.get(t)
            if h is None:
                h = self.command_latency[t] = Histogram()
            h.observe(duration)
            w = self._windows.get(t)
            if w is None:
                self._windows[t] = [run.started, now]
            else:
                if run.started < w[0]:
                    w[0] = run.started
                w[1] = now
        replayed = result is not None and result.replayed
        if result is not None:
            # A replay's events were written by an earlier run, not by this one.
            attempts, versions, written = result.attempts, result.stream_versions, 0 if replayed else len(result.events)
            streams = list(versions)
        else:
            attempts, versions, written, streams = run.retries + 1, {}, 0, list(run.streams)
        if run.spans is not None:
            attrs = {"eventcore.outcome": outcome, "eventcore.attempts": attempts,
                     "eventcore.stream_ids": [str(s) for s in streams],
                     "eventcore.events_written": written, "eventcore.replayed": replayed}
            if versions:
                attrs["eventcore.stream_versions"] = [versions[s] for s in streams]
            for tracer, span in zip(self._tracers, run.spans):
                _end_span(tracer, span, attrs, error)
        if self._command_hooks:
            info = CommandInfo(run.command, t, outcome, attempts, duration, streams, dict(versions), written, error,
                               replayed)
            for fn in self._command_hooks:
                _call_hook(fn, info)

    def operation_started(self, store: EventStore, op: str, streams: Iterable[str] | None,
                          expected: dict[str, int] | None = None, /) -> _OpRun:
        """A store operation begins (the StoreObserver protocol): its span starts, if a tracer is added."""
        run = _OpRun(store, op, streams)
        if self._tracers and op != "ingest_batch":
            attrs = {"db.system": _DB_SYSTEM.get(getattr(store, "scheme", ""), "other"), "eventcore.operation": op}
            if streams:
                attrs["eventcore.stream_ids"] = [str(s) for s in streams]
            if expected:
                attrs["eventcore.expected_versions"] = [expected[s] for s in streams]
            run.spans = [t.start(f"eventcore.{op}", attrs) for t in self._tracers]
        return run

    def operation_ended(self, run: _OpRun, events: int, error: BaseException | None,
                        versions: dict[str, int] | Callable[[], dict[str, int] | None] | None = None, /) -> None:
        """`versions`: a dict, or a function returning one, of stream -> version after (for spans only)."""
        duration = time.perf_counter() - run.started
        op = run.op
        outcome = "ok" if error is None else ("conflict" if isinstance(error, ConcurrencyError) else "error")
        with self._lock:
            key = (op, outcome)
            self.operations[key] = self.operations.get(key, 0) + 1
            h = self.operation_latency.get(op)
            if h is None:
                h = self.operation_latency[op] = Histogram()
            h.observe(duration)
            if error is None:
                if op in WRITE_OPS:
                    self.events_written += events
                elif op in READ_OPS:
                    self.events_read += events
        if run.spans is not None:
            attrs: dict = {"eventcore.events": events, "eventcore.outcome": outcome}
            if callable(versions):
                versions = versions()
            if versions:
                attrs["eventcore.stream_ids"] = [str(s) for s in versions]
                attrs["eventcore.stream_versions"] = list(versions.values())
            for tracer, span in zip(self._tracers, run.spans):
                _end_span(tracer, span, attrs, error)
        if self._op_hooks:
            info = OperationInfo(run.store, op, duration, events, outcome, list(run.streams or ()), error)
            for fn in self._op_hooks:
                _call_hook(fn, info)


_DB_SYSTEM = {"postgresql": "postgresql", "sqlite": "sqlite", "memory": "memory"}


def _call_hook(fn, info) -> None:
    try:
        fn(info)
    except Exception:  # noqa: BLE001 - a hook must never break the command it observes
        log.exception("eventcore hook %r raised; ignored", getattr(fn, "__qualname__", fn))


def _end_span(tracer, span, attrs, error) -> None:
    try:
        tracer.end(span, attrs, error)
    except Exception:  # noqa: BLE001
        log.exception("eventcore tracer %r raised; ignored", tracer)


def _projection_lags(store) -> dict:
    """{projector: lag} as the store records it; {} where projections are not set up."""
    try:
        from .projections import projection_status  # read side: imported only when asked

        return {p.name: p.lag for p in projection_status(store)}
    except Exception:  # noqa: BLE001 - no projection tables yet, or a backend without projections
        return {}


def _table(rows: list) -> list:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(cells)) + " |"

    return [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]]
