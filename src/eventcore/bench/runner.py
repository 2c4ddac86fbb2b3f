"""Runs the bench's workloads against a real store and measures them (the tables are report.py's).

Each workload sets up its streams (not timed), then runs its operations from
`concurrency` threads and records every operation's latency. The report is the
same whether printed as a table or as JSON lines: throughput, success, retries,
P50/P95/P99/min/max latency. `BenchStore` opens the store a run asks for and
removes what it created for the run afterwards.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import _impl
from ..errors import EventCoreError, ValidationError
from ..events import emit
from ..executor import STORE_CACHE, RetryPolicy, StateCache, execute
from ..expected import NO_STREAM
from ..stores import connect
from .workloads import AccountOpened, DepositMoney, ProductStocked, TransferMoney, random_order, MoneyDeposited

WORKLOADS = ("deposit", "transfer", "order", "batch")
DEFAULT_OPS = {"deposit": 1000, "transfer": 1000, "order": 500, "batch": 2000}
#: Events per append in the batch workload: the report's 2,000 events in 20 batches.
DEFAULT_BATCH_SIZE = 100
#: Accounts/products the commands spread over. 100 keeps conflicts rare but
#: present at high concurrency, as in a real ledger with hot accounts.
ACCOUNTS = 100
PRODUCTS = 100
CUSTOMERS = 50
#: Benchmarks retry conflicts generously: a conflict is normal under load, a
#: failure should mean something is wrong.
BENCH_RETRY = RetryPolicy(max_retries=20, base_delay=0.001, max_delay=0.05)
#: Untimed operations before each run (at least; 4 per thread at higher concurrency): one per
#: connection of the bench's pool, since connections are handed out in turn.
WARMUP_OPS = 16
#: Progress is shown only for runs longer than this many seconds.
PROGRESS_AFTER_S = 2.0


@dataclass
class BenchResult:
    workload: str
    backend: str
    impl: str
    ops: int
    concurrency: int
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    events: int = 0
    duration_s: float = 0.0
    latencies_s: list = field(default_factory=list, repr=False)
    errors: dict = field(default_factory=dict)
    cache: bool = False
    group_commit: bool | None = None
    #: CPU seconds used during the run: this process, and the database server's processes
    #: when they run on this machine and can be seen (None otherwise).
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds."""
        data = self.latencies_s
        if not data:
            return 0.0
        data = sorted(data)
        rank = max(1, min(len(data), int(-(-q * len(data) // 100))))
        return data[rank - 1] * 1000.0

    def as_dict(self) -> dict:
        d = self.duration_s or float("nan")
        return {
            "workload": self.workload,
            "backend": self.backend,
            "impl": self.impl,
            "ops": self.ops,
            "concurrency": self.concurrency,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "success_rate": round(100.0 * self.succeeded / self.ops, 2) if self.ops else 0.0,
            "retries": self.retries,
            "events": self.events,
            "duration_s": round(self.duration_s, 4),
            "throughput_ops_s": round(self.succeeded / d, 1),
            "events_per_s": round(self.events / d, 1),
            "latency_ms": {
                "p50": round(self.percentile(50), 3),
                "p95": round(self.percentile(95), 3),
                "p99": round(self.percentile(99), 3),
                "min": round(min(self.latencies_s) * 1000, 3) if self.latencies_s else 0.0,
                "max": round(max(self.latencies_s) * 1000, 3) if self.latencies_s else 0.0,
            },
            "errors": dict(self.errors),
            "cache": self.cache,
            "group_commit": self.group_commit,
            # CPU used per second of run, in cores (2.0 = two cores busy), and per operation.
            "cpu": {
                "cores": os.cpu_count(),
                "client_cores": round(self.client_cpu_s / d, 3),
                "server_cores": None if self.server_cpu_s is None else round(self.server_cpu_s / d, 3),
                "client_us_per_op": round(1e6 * self.client_cpu_s / max(1, self.succeeded + self.failed), 1),
                "server_us_per_op": None if self.server_cpu_s is None else
                round(1e6 * self.server_cpu_s / max(1, self.succeeded + self.failed), 1),
            },
        }


class _Progress:
    """Prints progress to stderr once a run has lasted PROGRESS_AFTER_S seconds."""

    def __init__(self, label: str, total: int, done, stream=sys.stderr) -> None:
        self.label, self.total, self.done, self.stream = label, total, done, stream
        self._stop = threading.Event()
        self._shown = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        tty = self.stream.isatty()
        interval = 0.5 if tty else 5.0
        if self._stop.wait(PROGRESS_AFTER_S):
            return
        while True:
            n = self.done()
            rate = n / (time.perf_counter() - self._start)
            msg = f"{self.label}: {n:,}/{self.total:,} ({100.0 * n / max(1, self.total):.0f} %, {rate:,.0f}/s)"
            self.stream.write(("\r" + msg) if tty else (msg + "\n"))
            self.stream.flush()
            self._shown = True
            if self._stop.wait(interval):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._shown and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def _run_ops(result: BenchResult, op, progress: bool) -> None:
    """Run op(i) for i in range(result.ops) from result.concurrency threads."""
    counter = itertools.count()
    done = itertools.count()
    finished = [0]
    lock = threading.Lock()
    perf = time.perf_counter

    def worker() -> None:
        lat = []
        ok = failed = retries = events = 0
        errors: dict = {}
        while True:
            i = next(counter)
            if i >= result.ops:
                break
            t0 = perf()
            try:
                n_events, attempts = op(i)
            except EventCoreError as exc:
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            else:
                ok += 1
                events += n_events
                retries += attempts - 1
            lat.append(perf() - t0)
            finished[0] = next(done) + 1
        with lock:
            result.latencies_s.extend(lat)
            result.succeeded += ok
            result.failed += failed
            result.retries += retries
            result.events += events
            for k, v in errors.items():
                result.errors[k] = result.errors.get(k, 0) + v

    threads = [threading.Thread(target=worker, name=f"bench-{k}") for k in range(result.concurrency)]
    cpu0, server0 = _process_cpu(), _server_cpu(result.backend)
    t0 = perf()
    if progress:
        with _Progress(result.workload, result.ops, lambda: finished[0]):
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    else:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    result.duration_s = perf() - t0
    result.client_cpu_s = _process_cpu() - cpu0
    server1 = _server_cpu(result.backend)
    if server0 is not None and server1 is not None:
        # Per process: one that ended during the run took its CPU time with it (not counted),
        # one that started counts from zero.
        result.server_cpu_s = sum(max(0.0, t - server0.get(pid, 0.0)) for pid, t in server1.items())


def _process_cpu() -> float:
    return time.process_time()  # user + system CPU of every thread of this process


def _server_cpu(backend: str) -> dict | None:
    """CPU seconds of each PostgreSQL server process on this machine (Linux /proc), by pid, or None."""
    if backend != "postgres" or not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)
            if not fields[0].split(b"(", 1)[1].startswith(b"postgres"):
                continue
            rest = fields[1].split()
            out[pid] = (int(rest[11]) + int(rest[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return out or None


def _setup_balances(store, prefix: str, n: int, kind: str) -> list[str]:
    ids = [f"{prefix}{kind}-{k}" for k in range(n)]
    event = AccountOpened(1_000_000_000) if kind == "account" else ProductStocked(1_000_000_000)
    store.append([emit(s, event) for s in ids], {s: NO_STREAM for s in ids})
    return ids


#: Most threads a benchmark run starts: far past where a 2..64-core machine's throughput stops growing,
#: and few enough that starting them (and their warm-up operations) takes seconds, not minutes.
MAX_CONCURRENCY = 1024


def run_workload(
    store,
    workload: str,
    *,
    backend: str,
    ops: int | None = None,
    concurrency: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
    cache: bool = False,
    warmup: bool = True,
    metrics=None,
) -> dict:
    """Run one workload against an open store and return its report (see BenchResult.as_dict).

    cache: run the commands with one shared `StateCache()`, which reuses folded states (its opt-in
    mode); without, with the store's exact cache, as `execute` does by default.
    warmup: first run a few untimed operations of the workload on streams of their own, enough
    to use every pooled connection once: a connection's first statements cost several times a
    warm one's (the server compiles and plans the append functions per connection), which
    would otherwise dominate short runs such as the 20-batch workload.
    metrics: an `ec.MetricsCollector` attached to the store for the timed run only (not the warm-up),
    then detached; the store's own collector, if it had one, is put back."""
    if type(concurrency) is not int or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValidationError(f"concurrency must be an int in 1..{MAX_CONCURRENCY}, got {concurrency!r}")
    if warmup:
        run_workload(store, workload, backend=backend, ops=max(WARMUP_OPS, 4 * concurrency) *
                     (batch_size if workload == "batch" else 1), concurrency=concurrency,
                     batch_size=batch_size, seed=seed + 1, cache=cache, warmup=False)
    if workload not in WORKLOADS:
        raise ValidationError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    ops = DEFAULT_OPS[workload] if ops is None else ops
    if ops < 1:
        raise ValidationError(f"--ops must be >= 1, got {ops}")
    if concurrency < 1:
        raise ValidationError(f"--concurrency must be >= 1, got {concurrency}")
    # A run-unique prefix: benches can share one database file without colliding.
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    local = threading.local()
    # Without --cache the commands use what a program gets by default: the store's exact cache.
    state_cache = StateCache() if cache else STORE_CACHE
    group_commit = getattr(store, "_group", False) is not None if backend == "postgres" else None

    def rng() -> random.Random:
        r = getattr(local, "rng", None)
        if r is None:
            r = local.rng = random.Random(f"{seed}-{threading.current_thread().name}")
        return r

    if workload == "deposit":
        accounts = [f"{prefix}account-{k}" for k in range(ACCOUNTS)]

        def op(i):
            res = execute(store, DepositMoney(accounts[i % ACCOUNTS], 100), retry=BENCH_RETRY, cache=state_cache)
            return len(res.events), res.attempts

    elif workload == "transfer":
        accounts = _setup_balances(store, prefix, ACCOUNTS, "account")

        def op(i):
            source, target = rng().sample(accounts, 2)
            res = execute(store, TransferMoney(source, target, rng().randint(1, 100)), retry=BENCH_RETRY,
                          cache=state_cache)
            return len(res.events), res.attempts

    elif workload == "order":
        products = _setup_balances(store, prefix, PRODUCTS, "product")
        customers = [f"{prefix}customer-{k}" for k in range(CUSTOMERS)]

        def op(i):
            cmd = random_order(rng(), customers[i % CUSTOMERS], products, f"order-{i}")
            res = execute(store, cmd, retry=BENCH_RETRY, cache=state_cache)
            return len(res.events), res.attempts

    else:  # batch: `ops` events in append_batch calls of `batch_size`, each to 10 new streams
        if batch_size < 1:
            raise ValidationError(f"--batch-size must be >= 1, got {batch_size}")
        per_stream = max(1, batch_size // 10)
        n_batches = -(-ops // batch_size)

        def op(i):
            size = min(batch_size, ops - i * batch_size)
            streams = [f"{prefix}batch-{i}-{k}" for k in range(-(-size // per_stream))]
            events = [emit(streams[j // per_stream], MoneyDeposited(j + 1)) for j in range(size)]
            written = store.append_batch(events, {s: NO_STREAM for s in streams})
            return written.count, 1

    if workload == "batch":
        result = BenchResult(workload, backend, _impl.IMPL, n_batches, concurrency, group_commit=group_commit)
    else:
        result = BenchResult(workload, backend, _impl.IMPL, ops, concurrency, cache=cache, group_commit=group_commit)
    if metrics is None:
        _run_ops(result, op, progress)
        return result.as_dict()
    previous = store.metrics
    store.attach(metrics)
    try:
        _run_ops(result, op, progress)
    finally:
        store.detach()
        if previous is not None:
            store.attach(previous)
    return result.as_dict()


#: Schema the bench writes to on a user's PostgreSQL, so it never mixes with application data.
BENCH_SCHEMA = "eventcore_bench"
#: One connection per thread at the concurrencies the bench is usually run with (up to 16).
BENCH_POOL_SIZE = 16


class BenchStore:
    """Opens the store a bench run asks for, and removes what it created for the run afterwards.

    sqlite: a temporary file unless `path`; postgres: `dsn` (or EVENTCORE_DSN),
    else a temporary local cluster started from the installed binaries.
    """

    def __init__(self, backend: str, path: str | None = None, dsn: str | None = None, log=sys.stderr,
                 group_commit: bool = True) -> None:
        self.backend = backend
        self.group_commit = group_commit
        self._tmpdir = None
        self._cluster = None
        self._log = log
        if backend == "memory":
            self.url = "memory://"
        elif backend == "sqlite":
            if path is None:
                self._tmpdir = tempfile.mkdtemp(prefix="eventcore-bench-")
                path = os.path.join(self._tmpdir, "bench.db")
            self.url = f"sqlite:///{os.path.abspath(path)}"
        elif backend == "postgres":
            self.url = dsn or os.environ.get("EVENTCORE_DSN") or None
        else:
            raise ValidationError(f"unknown backend {backend!r}; choose memory, sqlite or postgres")
        self.store = None

    def __enter__(self):
        try:
            if self.backend == "postgres":
                if self.url is None:
                    import importlib

                    from ..testing.pgcluster import TemporaryCluster

                    # The driver first (ImportError without the [postgres] extra): a run that could not
                    # connect starts no cluster.
                    importlib.import_module("eventcore.stores.postgres")

                    self._cluster = TemporaryCluster()
                    print("eventcore bench: no --dsn or EVENTCORE_DSN; starting a temporary PostgreSQL cluster "
                          "(removed afterwards)", file=self._log, flush=True)
                    self.url = self._cluster.start()
                # Enough connections for 16 threads plus group commit's transactions in flight.
                # The pool grows to what a run's threads use during its untimed warm-up (connecting is
                # set-up). It is not opened whole: the pool hands connections out in turn, and one thread
                # cycling through 16 server processes ran up to 1.6x slower than through 2 (their caches
                # go cold between uses).
                self.store = connect(self.url, schema=BENCH_SCHEMA, pool_size=BENCH_POOL_SIZE,
                                     group_commit=self.group_commit)
            else:
                self.store = connect(self.url)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.store

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
