"""Stress run: processes x threads making random transfers among accounts, then every invariant checked.

Each worker process (a fresh interpreter, started with `subprocess`) runs
threads that execute `Transfer` commands between random accounts with
`ec.execute`: the command reads both accounts, refuses an overdraft with
`ec.require`, and emits a debit and a credit in one atomic append. Every
process attaches an `ec.MetricsCollector` to its store to count conflicts and
retries, and reports as one JSON line on stdout.

After the run `verify` reads the whole store back and checks: money conserved
(balances replayed from every stream sum to the opening total, none negative),
each stream's versions exactly 1..n with positions strictly increasing, no
event id twice, every transfer a worker saw succeed stored exactly once as a
debit immediately followed by its credit (one append: consecutive positions)
and no transfer stored that no worker saw succeed. "No deadlock" is the
watchdog: every worker must end within it, else they are killed and the run fails.

Used by tests/test_stress.py (small) and bench/stress.py (a longer run).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import eventcore as ec

HERE = Path(__file__).resolve().parent
ACCOUNTS = 50
OPENING_BALANCE = 300
#: Transfers of up to two thirds of the opening balance: most pass, accounts run dry and some are refused.
MAX_AMOUNT = 200
#: Conflicts are the point of the run: retry them for as long as it takes (the watchdog bounds the run).
RETRY = ec.RetryPolicy(max_retries=10_000, base_delay=0.0005, max_delay=0.05)


class AccountOpened(ec.Event):
    __event_type__ = "stress.AccountOpened"
    balance: int


class Debited(ec.Event):
    __event_type__ = "stress.Debited"
    transfer: str
    amount: int
    to: str


class Credited(ec.Event):
    __event_type__ = "stress.Credited"
    transfer: str
    amount: int
    source: str


def apply_balance(balance: int, data) -> int:
    if type(data) is Debited:
        return balance - data.amount
    if type(data) is Credited:
        return balance + data.amount
    if type(data) is AccountOpened:
        return balance + data.balance
    raise AssertionError(f"unexpected event {data!r} in an account stream")


class Transfer(ec.Command):
    """Move `amount` from `source` to `target`: both accounts read, both written, atomically."""

    source: ec.StreamId
    target: ec.StreamId
    amount: int
    transfer: str

    def initial_state(self) -> dict:
        return {}

    def apply(self, state, event):
        state[event.stream_id] = apply_balance(state.get(event.stream_id, 0), event.data)
        return state

    def handle(self, state):
        ec.require(self.source != self.target, "cannot transfer to the same account")
        ec.require(self.source in state, f"no account {self.source}")
        ec.require(state[self.source] >= self.amount, f"insufficient funds in {self.source}")
        return [
            ec.emit(self.source, Debited(self.transfer, self.amount, self.target)),
            ec.emit(self.target, Credited(self.transfer, self.amount, self.source)),
        ]


def account_ids(n: int = ACCOUNTS) -> list[str]:
    return [f"account-{i:03d}" for i in range(n)]


def open_accounts(url: str, n: int = ACCOUNTS, opening: int = OPENING_BALANCE, **options) -> None:
    """Open every account in one append (each must be new)."""
    with ec.connect(url, **options) as store:
        ids = account_ids(n)
        store.append([ec.emit(a, AccountOpened(opening)) for a in ids], {a: ec.NO_STREAM for a in ids})


# -- one worker process -----------------------------------------------------------------------------------------


def run_worker(url: str, options: dict, worker: int, threads: int, transfers: int | None, seconds: float | None,
               accounts: int, seed: int) -> dict:
    """Run `threads` threads of transfers in this process; returns the counts (JSON-ready).

    Each thread makes `transfers` transfers, or as many as it can in `seconds`.
    """
    collector = ec.MetricsCollector()
    store = ec.connect(url, metrics=collector, **options)
    ids = [ec.StreamId(a) for a in account_ids(accounts)]
    lock = threading.Lock()
    totals = {"succeeded": 0, "rejected": 0, "conflict_exhausted": 0, "attempt_retries": 0, "errors": []}
    succeeded: list[str] = []
    deadline = None if seconds is None else time.monotonic() + seconds

    def thread_main(t: int) -> None:
        rng = random.Random(seed * 1_000_003 + worker * 1009 + t)
        mine = {"succeeded": 0, "rejected": 0, "conflict_exhausted": 0, "attempt_retries": 0}
        done: list[str] = []
        errors: list[str] = []
        i = 0
        while (transfers is None or i < transfers) and (deadline is None or time.monotonic() < deadline):
            source, target = rng.sample(ids, 2)
            transfer = f"w{worker}-t{t}-{i}"
            i += 1
            command = Transfer(source=source, target=target, amount=rng.randint(1, MAX_AMOUNT), transfer=transfer)
            try:
                result = ec.execute(store, command, retry=RETRY, timeout=None)
            except ec.BusinessRuleViolation:
                mine["rejected"] += 1
            except ec.ConcurrencyError:
                mine["conflict_exhausted"] += 1
            except Exception as exc:  # noqa: BLE001 - reported; the run fails on any error
                errors.append(f"{transfer}: {type(exc).__name__}: {exc}")
                if len(errors) > 20:
                    break
            else:
                mine["succeeded"] += 1
                mine["attempt_retries"] += result.attempts - 1
                done.append(transfer)
        with lock:
            for k, v in mine.items():
                totals[k] += v
            totals["errors"].extend(errors)
            succeeded.extend(done)

    def guarded(t: int) -> None:
        try:
            thread_main(t)
        except BaseException:  # noqa: BLE001 - a crashed thread is an error of the run, not a silent stop
            with lock:
                totals["errors"].append(traceback.format_exc())

    started = time.perf_counter()
    pool = [threading.Thread(target=guarded, args=(t,), name=f"stress-{worker}-{t}") for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - started
    store.close()
    ops = collector.operations
    totals.update(
        worker=worker,
        seconds=elapsed,
        # Retries the executor made after a version conflict (the collector's count; attempt_retries cross-checks it).
        retries=collector.retry_count("Transfer", "conflict"),
        # Commands that needed at least one retry.
        commands_retried=collector.count("Transfer", "conflict_retried"),
        # Appends the store refused with a ConcurrencyError.
        append_conflicts=ops.get(("append", "conflict"), 0),
        appends=sum(n for (op, _), n in ops.items() if op == "append"),
        succeeded_ids=succeeded,
    )
    return totals


def worker_main() -> None:
    """Entry point of a worker process: arguments as one JSON object in argv[1]; the result as JSON on stdout."""
    args = json.loads(sys.argv[1])
    result = run_worker(**args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# -- the run ----------------------------------------------------------------------------------------------------


class StressFailure(AssertionError):
    pass


def run_stress(url: str, *, options: dict | None = None, processes: int = 3, threads: int = 4,
               transfers: int | None = None, seconds: float | None = None, accounts: int = ACCOUNTS,
               watchdog: float = 300.0, seed: int = 1, nice: int = 0) -> dict:
    """Open the accounts, run the workers, verify the store; returns the report (raises StressFailure).

    `transfers` per thread, or `seconds` of transfers per thread. `watchdog`: seconds after which
    workers still running are killed and the run fails (a deadlock or a hang).
    """
    if (transfers is None) == (seconds is None):
        raise ValueError("give either transfers (per thread) or seconds")
    options = dict(options or {})
    open_accounts(url, accounts, **options)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = []
    started = time.perf_counter()
    tail = FeedTail(url, options)
    tail.start()
    for w in range(processes):
        args = dict(url=url, options=options, worker=w, threads=threads, transfers=transfers, seconds=seconds,
                    accounts=accounts, seed=seed)
        cmd = [sys.executable, "-c", "import stress_worker; stress_worker.worker_main()", json.dumps(args)]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results, hung, crashed = [], [], []
    deadline = time.monotonic() + watchdog
    for w, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(w)
            continue
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            crashed.append(f"worker {w} exited {proc.returncode}: {err[-2000:]}")
            continue
        results.append(json.loads(lines[-1]))
    wall = time.perf_counter() - started
    for w in hung:  # by the PID we started, and only those
        procs[w].kill()
        procs[w].communicate()
    tail.finish(timeout=watchdog)
    if hung:
        raise StressFailure(f"workers {hung} still running after the {watchdog:.0f} s watchdog: a deadlock or a hang")
    if crashed:
        raise StressFailure("; ".join(crashed))
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise StressFailure(f"{len(errors)} errors in the workers, first: {errors[:3]}")

    succeeded_ids = [t for r in results for t in r["succeeded_ids"]]
    checks = verify(url, options, accounts, succeeded_ids, tail.seen)
    total = {k: sum(r[k] for r in results) for k in ("succeeded", "rejected", "conflict_exhausted", "retries",
                                                      "attempt_retries", "commands_retried", "append_conflicts",
                                                      "appends")}
    # Succeeded commands' extra attempts are a part of the collector's retries (a rejected command may
    # have retried too); fewer would mean retries the collector never saw.
    if total["retries"] < total["attempt_retries"]:
        raise StressFailure(f"the collector counted {total['retries']} retries, the succeeded commands' "
                            f"attempts {total['attempt_retries']}")
    ops = total["succeeded"] + total["rejected"] + total["conflict_exhausted"]
    # Rates over the workers' own running time: process start-up and the checks are not load.
    run_s = max(r["seconds"] for r in results)
    return {
        "url": _redact(url), "options": options, "processes": processes, "threads": threads,
        "transfers_per_thread": transfers, "seconds_per_thread": seconds, "wall_s": round(wall, 2),
        "run_s": round(run_s, 2), "operations": ops, "ops_per_s": round(ops / run_s, 1),
        "transfers_per_s": round(total["succeeded"] / run_s, 1),
        **total,
        "checks": checks,
    }


def _redact(url: str) -> str:
    if not url.startswith("postgres"):
        return url
    from eventcore.stores.postgres import redact  # the password never reaches a report

    return redact(url)


class FeedTail(threading.Thread):
    """A reader following the global feed while the workers write, as a projection would.

    It must end up with exactly the final feed, in order: an event committed below a
    position the reader had already passed would be missing from what it saw (a skip).
    """

    def __init__(self, url: str, options: dict) -> None:
        super().__init__(name="stress-feed-tail", daemon=True)
        self.store = ec.connect(url, **options)
        self.seen: list = []  # event ids in the order read
        self.reads = 0
        self.error: BaseException | None = None
        self._stop_after_catching_up = threading.Event()

    def run(self) -> None:
        after = 0
        try:
            while True:
                last_round = self._stop_after_catching_up.is_set()
                page = list(self.store.read_all(after_position=after, page_size=500))
                self.reads += 1
                if page:
                    if page[0].position <= after:
                        raise StressFailure(f"read_all after {after} returned position {page[0].position}")
                    after = page[-1].position
                    self.seen.extend(e.event_id for e in page)
                elif last_round:
                    return  # every writer had ended before this empty read: caught up
                else:
                    time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout: float) -> None:
        self._stop_after_catching_up.set()
        self.join(timeout)
        self.store.close()
        if self.is_alive():
            raise StressFailure("the feed reader did not catch up within the watchdog")
        if self.error is not None:
            raise StressFailure(f"the feed reader failed: {self.error!r}") from self.error


def verify(url: str, options: dict, accounts: int, succeeded_ids: list[str], tailed: list | None = None) -> dict:
    """Read the whole store back and check every invariant of the run; returns what was checked.

    `tailed`: the event ids a reader saw following the feed during the run (see FeedTail)."""
    ids = account_ids(accounts)
    with ec.connect(url, **options) as store:
        feed = list(store.read_all())
        head = store.head_position()
        versions = store.stream_versions(ids)
        by_stream_read = store.read_streams(ids)

    def fail(message: str):
        raise StressFailure(message)

    positions = [e.position for e in feed]
    if any(a >= b for a, b in zip(positions, positions[1:])):
        fail("the feed's positions are not strictly increasing")
    if head != (positions[-1] if positions else 0):
        fail(f"head_position {head} is not the last event's position {positions[-1:]}")
    event_ids = [e.event_id for e in feed]
    if len(set(event_ids)) != len(event_ids):
        fail(f"{len(event_ids) - len(set(event_ids))} duplicate event ids")
    if tailed is not None and tailed != event_ids:
        missing = len(set(event_ids) - set(tailed))
        fail(f"the reader following the feed saw {len(tailed)} events, the feed holds {len(event_ids)} "
             f"({missing} skipped), or in another order")

    by_stream: dict[str, list] = {}
    for e in feed:
        by_stream.setdefault(e.stream_id, []).append(e)
    if set(by_stream) != set(ids):
        fail(f"streams other than the accounts, or accounts without events: {sorted(set(by_stream) ^ set(ids))[:5]}")
    balances = {}
    for sid in ids:
        events = by_stream[sid]
        if [e.version for e in events] != list(range(1, len(events) + 1)):
            fail(f"{sid}: versions are not 1..{len(events)}")
        if versions[sid] != len(events):
            fail(f"{sid}: stream_versions says {versions[sid]}, the feed holds {len(events)} events")
        if [e.event_id for e in by_stream_read[sid]] != [e.event_id for e in events]:
            fail(f"{sid}: read_streams and the feed disagree")
        balance = 0
        for e in events:
            balance = apply_balance(balance, e.data)
            if balance < 0:
                fail(f"{sid} went below zero at version {e.version}: an overdraft got past the business rule")
        balances[sid] = balance
    if sum(balances.values()) != OPENING_BALANCE * accounts:
        fail(f"money not conserved: {sum(balances.values())} != {OPENING_BALANCE * accounts}")

    debits = {e.data.transfer: e for e in feed if type(e.data) is Debited}
    credits = {e.data.transfer: e for e in feed if type(e.data) is Credited}
    n_debits = sum(type(e.data) is Debited for e in feed)
    n_credits = sum(type(e.data) is Credited for e in feed)
    if n_debits != len(debits) or n_credits != len(credits):
        fail("a transfer was stored twice")
    if set(debits) != set(credits):
        fail(f"transfers with only one side: {sorted(set(debits) ^ set(credits))[:5]}")
    for t, d in debits.items():
        c = credits[t]
        if c.position != d.position + 1 or (d.data.amount, d.data.to, d.stream_id) != (c.data.amount, c.stream_id,
                                                                                      c.data.source):
            fail(f"transfer {t}: debit {d.position} and credit {c.position} are not one append of the same transfer")
    if len(succeeded_ids) != len(set(succeeded_ids)) or set(succeeded_ids) != set(debits):
        fail(f"workers saw {len(succeeded_ids)} transfers succeed, the store holds {len(debits)}")
    return {
        "events": len(feed), "streams": len(by_stream), "transfers_stored": len(debits),
        "money": sum(balances.values()), "min_balance": min(balances.values()),
        "max_version": max(versions.values()),
        "tailed": None if tailed is None else len(tailed),
    }


def format_report(report: dict) -> str:
    checks = report["checks"]
    lines = [
        f"stress {report['url']} {report['options'] or ''}: {report['processes']} processes x {report['threads']} "
        f"threads, {report['run_s']} s of transfers ({report['wall_s']} s with start-up and checks)",
        f"  operations {report['operations']} ({report['ops_per_s']}/s): transfers {report['succeeded']} "
        f"({report['transfers_per_s']}/s), rejected (insufficient funds) {report['rejected']}, "
        f"conflicts exhausted {report['conflict_exhausted']}",
        f"  appends {report['appends']}, append conflicts {report['append_conflicts']}, retries {report['retries']} "
        f"({report['commands_retried']} commands needed one or more)",
        f"  checked: {checks['events']} events in {checks['streams']} streams, versions 1..n (max {checks['max_version']}), "
        f"feed strictly increasing, event ids unique, money {checks['money']} conserved (min balance "
        f"{checks['min_balance']}), {checks['transfers_stored']} transfers each one debit + credit append, "
        f"a live reader of the feed saw all {checks['tailed']} events in order, no worker hung",
    ]
    return "\n".join(lines)
