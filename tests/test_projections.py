"""Projections: catch-up and live, checkpointed, never skipping, exactly-once with a transactional
read model across SIGKILL, take-over by a second instance, poison events, rebuild, lag, and the
`eventcore tail` / `eventcore projections` commands — on every backend where it applies."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import eventcore as ec
from waiting import wait_until
from conftest import BACKENDS
from eventcore.cli import main

HERE = Path(__file__).resolve().parent
WORKER = HERE / "projection_worker.py"
DEADLINE = 60.0


class Counted(ec.Event):
    __event_type__ = "projtest.Counted"
    n: int


class Noise(ec.Event):
    __event_type__ = "projtest.Noise"
    text: str


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request):
    s = BACKENDS[request.param](request)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def durable_store(request):
    s = BACKENDS[request.param](request)
    yield s
    s.close()


def store_url(store) -> str:
    """A URL another process can open the same store with."""
    if store.scheme == "sqlite":
        return store.url
    dsn = store._dsn
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={store.schema}"


class Collector(ec.Projector):
    """A read model in memory: position -> (stream, version, event id), idempotent by position."""

    def __init__(self, name="collector", **kw):
        super().__init__(name, **kw)
        self.seen: dict = {}
        self.order: list = []
        self.lock = threading.Lock()

    def handle(self, event, ctx):
        with self.lock:
            if event.position not in self.seen:
                self.order.append(event.position)
            self.seen[event.position] = (event.stream_id, event.version, event.event_id, event.type)


def feed(store) -> list:
    return [(e.position, (e.stream_id, e.version, e.event_id, e.type)) for e in store.read_all()]


# -- catch-up, live, checkpoints ------------------------------------------------------------------------


def test_catch_up_then_live_then_resume_from_checkpoint(store):
    store.append([ec.emit(f"acct-{i % 4}", Counted(i)) for i in range(30)])
    proj = Collector(batch_size=7)
    runner = ec.ProjectionRunner(store, proj, poll_interval=0.05).start()
    wait_until(lambda: runner.caught_up.is_set() and len(proj.seen) == 30, what="catch-up")
    for i in range(30, 45):
        store.append([ec.emit(f"acct-{i % 4}", Counted(i))])
    wait_until(lambda: len(proj.seen) == 45, what="live events")
    wait_until(lambda: runner.lag() == 0, what="lag 0 from the API")
    runner.stop()
    runner.join(DEADLINE)
    assert [p for p, _ in feed(store)] == proj.order
    assert runner.position == store.head_position()
    (status,) = ec.projection_status(store)
    assert (status.name, status.position, status.lag, status.pending, status.state) == (
        "collector", store.head_position(), 0, 0, "stopped")
    assert runner.batches < 45  # checkpoints per batch, not per event

    # A restart resumes after its checkpoint: only new events are handled.
    store.append([ec.emit("acct-9", Counted(99))])
    again = Collector(batch_size=7)
    ec.run_projection(store, again, until_caught_up=True)
    assert [store.read_stream("acct-9")[0].position] == again.order


def test_filters_by_type_and_prefix_and_checkpoint_passes_filtered_events(store):
    store.append([ec.emit("acct-1", Counted(1)), ec.emit("other-1", Counted(2)), ec.emit("acct-2", Noise("x"))])
    proj = Collector(types=[Counted], stream_prefix="acct-")
    runner = ec.run_projection(store, proj, until_caught_up=True)
    assert [v[0] for v in proj.seen.values()] == ["acct-1"]
    # Caught up: the checkpoint moved past the events it does not want, so the lag is 0.
    assert runner.position == store.head_position()
    assert ec.projection_status(store, "collector")[0].lag == 0


def test_stop_by_event_finishes_cleanly_and_records_state(store):
    stop = threading.Event()
    proj = Collector()
    runner = ec.ProjectionRunner(store, proj, stop_event=stop, poll_interval=0.05).start()
    wait_until(runner.caught_up.is_set, what="idle runner")
    store.append([ec.emit("s-1", Counted(1))])
    wait_until(lambda: len(proj.seen) == 1, what="live event")
    stop.set()
    runner.join(DEADLINE)
    assert not runner._thread.is_alive()
    assert ec.projection_status(store)[0].state == "stopped"


def test_lag_is_reported_while_behind(store):
    store.append([ec.emit(f"s-{i}", Counted(i)) for i in range(10)])
    proj = Collector(batch_size=3)
    ec.run_projection(store, proj, until_caught_up=True)
    store.append([ec.emit("late", Counted(1)), ec.emit("late", Counted(2))])
    (status,) = ec.projection_status(store)
    assert status.pending == 2
    assert status.lag == store.head_position() - status.position > 0
    assert status.state == "stopped"


def test_a_read_of_many_batches_still_hands_each_batch_alone(store, monkeypatch):
    """An unfiltered projector reads several batches at once (about READ_AHEAD_EVENTS events): each
    is still its own transaction of at most batch_size events, in order, across reads; the head is
    read only once a page comes short."""
    from eventcore.projections import runner as runner_module
    from eventcore.stores.projection_storage import ProjectionSession

    sessions = [ProjectionSession]
    if store.scheme == "postgresql":  # the PostgreSQL session module needs the driver: only where it runs
        from eventcore.stores.postgres.projections import PostgresProjectionSession

        sessions.append(PostgresProjectionSession)
    total = 2 * runner_module.READ_AHEAD_EVENTS + 11
    store.append([ec.emit(f"s-{i % 4}", Counted(i)) for i in range(total)])
    calls = []
    for cls in sessions:
        for name in ("head", "read_events"):
            if name in vars(cls):
                def counting(self, *args, _real=vars(cls)[name], _name=name):
                    calls.append(_name)
                    return _real(self, *args)
                monkeypatch.setattr(cls, name, counting)
    batches = []
    proj = ec.Projector("chunks", batch_handler=lambda events, ctx: batches.append([e.data.n for e in events]),
                        batch_size=7)
    runner = ec.run_projection(store, proj, until_caught_up=True)
    assert [len(b) for b in batches] == [7] * (total // 7) + [total % 7]
    assert [n for b in batches for n in b] == list(range(total))
    assert runner.batches == len(batches) and runner.events_handled == total
    assert ec.projection_status(store)[0].position == store.head_position()
    # 3 reads of 571 batches (3,997 events) and the short third read again after the head.
    read_size = 7 * (runner_module.READ_AHEAD_EVENTS // 7)
    assert calls == ["read_events"] * (total // read_size + 1) + ["head", "read_events"], calls


# -- never skip ----------------------------------------------------------------------------------------


def _slow_committer(store, stop: threading.Event, seed: int, written: list):
    """PostgreSQL: appends whose transactions get their id early and commit late, out of order."""
    import psycopg

    from eventcore.stores.postgres import sql as pg_sql

    rng = random.Random(seed)
    reserve = pg_sql.q(pg_sql.QUERIES["reserve"], store.schema)
    insert = pg_sql.q("INSERT INTO {s}.events (position, stream_id, version, event_id, type, data) "
                      "VALUES (%s, %s, %s, %s, %s, %s::jsonb)", store.schema)
    with psycopg.connect(store._dsn, autocommit=True) as conn:
        k = 0
        while not stop.is_set():
            sid = f"slow-{seed}-{k % 3}"
            with conn.transaction():
                versions, first, _ = conn.execute(reserve, ([sid], [ec.ANY], [1], 1)).fetchone()
                time.sleep(rng.uniform(0, 0.03))  # the id is taken: later transactions commit first
                conn.execute(insert, (first, sid, versions[0] + 1, uuid.uuid4(), "projtest.Counted",
                                      json.dumps({"n": k})))
            written.append(first)
            k += 1


def test_live_projection_never_skips_under_overlapping_out_of_order_commits(store):
    proj = Collector(batch_size=25)
    runner = ec.ProjectionRunner(store, proj, poll_interval=0.02).start()
    stop = threading.Event()
    errors: list = []
    written: list = []

    def writer(w: int):
        rng = random.Random(w)
        try:
            k = 0
            while not stop.is_set():
                n = rng.randint(1, 3)
                store.append([ec.emit(f"w{w}-{rng.randint(0, 4)}", Counted(k + j)) for j in range(n)])
                k += n
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def slow(w: int):
        try:
            _slow_committer(store, stop, w, written)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    if store.scheme == "postgresql":
        threads += [threading.Thread(target=slow, args=(100 + w,)) for w in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(proj.seen) >= 400, what="events projected while writers run")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    head = store.head_position()
    wait_until(lambda: runner.position >= head, what="projection to reach the head")
    runner.stop()
    runner.join(DEADLINE)

    expected = feed(store)
    assert len(expected) >= 400
    if store.scheme == "postgresql":
        assert written and set(written) <= {p for p, _ in expected}
    # The live read model equals a rebuild from scratch, event for event, in order.
    assert proj.order == [p for p, _ in expected]
    assert [proj.seen[p] for p in proj.order] == [v for _, v in expected]
    rebuilt = Collector("rebuilt")
    ec.run_projection(store, rebuilt, until_caught_up=True)
    assert rebuilt.order == proj.order and rebuilt.seen == proj.seen


# -- poison events -------------------------------------------------------------------------------------


def _poisoned(store):
    store.append([ec.emit("p-1", Counted(1)), ec.emit("p-1", Counted(2))])
    store.append([ec.emit("p-2", ec.RawEvent("projtest.NeverDefined", b'{"x": 1}'))],
                 metadata=ec.Metadata(user_id="u-1"))
    store.append([ec.emit("p-1", Counted(13)), ec.emit("p-1", Counted(4))])
    return {e.data.n if hasattr(e.data, "n") else "raw": e.position for e in _raw_feed(store)}


def _raw_feed(store):
    from eventcore.projections import read_rows

    class _E:
        pass

    out = []
    for row in read_rows(store, 0, None, None, 1000):
        e = _E()
        e.position = row[0]
        if row[4] == "projtest.Counted":
            e.data = Counted(json.loads(row[5])["n"])
        else:
            e.data = object()
        out.append(e)
    return out


class Unlucky(Collector):
    """Fails on n == 13: always, or for the first `failures` attempts."""

    def __init__(self, failures=None, **kw):
        super().__init__("unlucky", **kw)
        self.failures = failures
        self.attempts = 0

    def handle(self, event, ctx):
        if event.data.n == 13:
            self.attempts += 1
            if self.failures is None or self.attempts <= self.failures:
                raise RuntimeError("thirteen is unlucky")
        super().handle(event, ctx)


def test_skip_writes_dead_letters_with_event_and_error(store):
    pos = _poisoned(store)
    proj = Unlucky(on_error="skip")
    runner = ec.run_projection(store, proj, until_caught_up=True)
    assert sorted(proj.seen) == [pos[1], pos[2], pos[4]]
    assert runner.position == store.head_position()
    letters = ec.dead_letters(store, "unlucky")
    assert [d.position for d in letters] == [pos["raw"], pos[13]]
    raw, bad = letters
    assert (raw.stream_id, raw.version, raw.type, raw.data) == ("p-2", 1, "projtest.NeverDefined", {"x": 1})
    assert raw.metadata == {"user_id": "u-1"}
    assert "UnknownEventTypeError" in raw.error and "projtest.NeverDefined" in raw.error
    assert (bad.stream_id, bad.version, bad.type, bad.data, bad.attempts) == ("p-1", 3, "projtest.Counted", {"n": 13}, 1)
    assert bad.error == "RuntimeError: thirteen is unlucky"
    assert bad.event_id == store.read_stream("p-1")[2].event_id
    (status,) = ec.projection_status(store)
    assert status.dead_letters == 2 and status.lag == 0


def test_a_dead_letter_whose_stored_bytes_are_not_json_is_listed_with_those_bytes(tmp_path):
    """An event nobody can decode (its payload not UTF-8, written behind the store's back) is skipped
    into a dead letter, and listing the dead letters shows its bytes instead of failing."""
    import sqlite3

    path = tmp_path / "events.db"
    store = ec.connect(f"sqlite:///{path}")
    try:
        store.append([ec.emit("p-1", Noise("a")), ec.emit("p-1", Noise("b"))])
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("DROP TRIGGER events_are_immutable_update")
        raw.execute("UPDATE events SET data = x'7b2274657874223a2280227d' WHERE position = 2")
        raw.close()
        proj = Collector(on_error="skip")
        ec.run_projection(store, proj, until_caught_up=True)
        assert sorted(proj.seen) == [1]
        (letter,) = ec.dead_letters(store, "collector")
        assert (letter.position, letter.data, letter.metadata) == (2, b'{"text":"\x80"}', None)
        assert "payload is not valid UTF-8 (byte 9: b'\\x80')" in letter.error, letter.error
    finally:
        store.close()


def test_fatal_is_the_default_and_never_passes_the_event(store):
    pos = _poisoned(store)
    with pytest.raises(ec.ProjectionError) as info:
        ec.run_projection(store, Unlucky(), until_caught_up=True)
    assert info.value.position == pos["raw"]  # an undecodable event stops it: never dropped silently
    assert "projtest.NeverDefined" in str(info.value)
    (status,) = ec.projection_status(store)
    assert status.state == "failed" and status.position == pos[2] and "NeverDefined" in status.error
    assert ec.dead_letters(store, "unlucky") == []
    # Running again stops at the same event: the checkpoint never moved past it.
    with pytest.raises(ec.ProjectionError):
        ec.run_projection(store, Unlucky(), until_caught_up=True)
    assert ec.projection_status(store)[0].position == pos[2]


def test_retry_recovers_a_transient_failure(store):
    pos = _poisoned(store)
    proj = Unlucky(failures=2, on_error=ec.Retry(attempts=3, backoff=0.001, then="skip"),
                   types=[Counted])
    ec.run_projection(store, proj, until_caught_up=True)
    assert sorted(proj.seen) == [pos[1], pos[2], pos[13], pos[4]]
    assert proj.attempts == 3
    assert ec.dead_letters(store, "unlucky") == []


def test_retry_then_skip_and_retry_then_fatal(store):
    pos = _poisoned(store)
    proj = Unlucky(on_error=ec.Retry(attempts=3, backoff=0.001, then="skip"))
    ec.run_projection(store, proj, until_caught_up=True)
    letters = ec.dead_letters(store, "unlucky")
    # The undecodable event is not retried (decoding again cannot succeed); the failing one is, 3 times.
    assert [(d.position, d.attempts) for d in letters] == [(pos["raw"], 1), (pos[13], 3)]
    assert proj.attempts == 1 + 3  # once in its batch, then 3 attempts alone
    assert sorted(proj.seen) == [pos[1], pos[2], pos[4]]

    other = Unlucky(on_error="retry", types=[Counted])
    other.name = "unlucky-fatal"
    other.on_error = ec.Retry(attempts=2, backoff=0.001)
    with pytest.raises(ec.ProjectionError) as info:
        ec.run_projection(store, other, until_caught_up=True)
    assert info.value.position == pos[13] and "after 2 attempt(s)" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert isinstance(info.value.event, ec.RecordedEvent) and info.value.event.data == Counted(13)


def test_signal_handling_needs_the_main_thread(store):
    runner = ec.ProjectionRunner(store, Collector(), handle_signals=True, until_caught_up=True).start()
    with pytest.raises(ec.ValidationError, match="main thread"):
        runner.join(DEADLINE)


def test_bad_error_strategy_is_rejected():
    with pytest.raises(ec.ValidationError):
        ec.Projector("x", handler=print, on_error="ignore")
    with pytest.raises(ec.ValidationError):
        ec.Projector("x")  # no handler
    with pytest.raises(ec.ValidationError):
        ec.Retry(then="shrug")


@pytest.mark.parametrize("options", [
    {"poll_interval": float("inf")}, {"poll_interval": float("nan")},     {"lock_poll_interval": float("inf")}, {"reconnect_backoff": 2**1024}, {"max_reconnect_backoff": float("inf")},
    {"listen_lease": float("inf")}, {"idle_checkpoint_interval": float("inf")}, {"idle_checkpoint_interval": -1},
    {"poll_interval": "soon"}, {"poll_interval": True},
], ids=repr)
def test_run_options_that_no_wait_can_take_are_refused(options):
    store = ec.connect("memory://")
    with pytest.raises(ec.ValidationError) as info:
        ec.ProjectionRunner(store, Collector(), **options)
    assert next(iter(options)) in str(info.value)


def test_retry_and_batch_size_are_bounded():
    for options in ({"backoff": float("inf")}, {"max_backoff": float("inf")}, {"backoff": float("nan")},
                    {"backoff": ""}, {"max_backoff": None}):
        with pytest.raises(ec.ValidationError) as info:
            ec.Retry(**options)
        assert f"Retry.{next(iter(options))}" in str(info.value)
    for size in (2**63, 2**70, 1_000_001, 0, 1.5):
        with pytest.raises(ec.ValidationError, match="batch_size must be an int in 1..1,000,000"):
            ec.Projector("x", handler=print, batch_size=size)
    assert ec.Projector("x", handler=print, batch_size=1_000_000).batch_size == 1_000_000


def test_a_projector_with_the_largest_batch_size_runs_on_sqlite(tmp_path):
    store = ec.connect(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        store.append([ec.emit("b-1", Counted(n)) for n in range(3)])
        proj = Collector(batch_size=1_000_000)
        ec.run_projection(store, proj, until_caught_up=True)
        assert sorted(proj.seen) == [1, 2, 3]
    finally:
        store.close()


# -- rebuild -------------------------------------------------------------------------------------------


def test_rebuild_resets_the_read_model_and_replays(store):
    store.append([ec.emit(f"r-{i % 2}", Counted(i)) for i in range(12)])
    resets = []

    class Sums(ec.Projector):
        name = "sums"

        def __init__(self):
            super().__init__()
            self.sums = {}

        def handle(self, event, ctx):
            self.sums[event.stream_id] = self.sums.get(event.stream_id, 0) + event.data.n

        def reset(self, ctx):
            resets.append(ctx.position)
            self.sums.clear()

    proj = Sums()
    ec.run_projection(store, proj, until_caught_up=True)
    first = dict(proj.sums)
    proj.sums["r-0"] = -1  # a corrupted read model
    ec.run_projection(store, proj, until_caught_up=True)
    assert proj.sums["r-0"] == -1  # nothing new: nothing replayed
    ec.run_projection(store, proj, until_caught_up=True, rebuild=True)
    assert proj.sums == first and resets == [store.head_position()]


# -- one active instance per name ------------------------------------------------------------------------


def test_second_instance_in_process_waits_and_takes_over(store):
    store.append([ec.emit("t-1", Counted(i)) for i in range(5)])
    a, b = Collector(), Collector()
    ra = ec.ProjectionRunner(store, a, poll_interval=0.02, lock_poll_interval=0.02).start()
    wait_until(lambda: ra.leading.is_set() and ra.caught_up.is_set(), what="first instance leading")
    rb = ec.ProjectionRunner(store, b, poll_interval=0.02, lock_poll_interval=0.02).start()
    store.append([ec.emit("t-1", Counted(5))])
    wait_until(lambda: len(a.seen) == 6, what="leader handles the new event")
    assert not rb.leading.is_set() and b.seen == {}
    ra.stop()
    ra.join(DEADLINE)
    wait_until(rb.leading.is_set, what="take-over")
    store.append([ec.emit("t-1", Counted(6))])
    wait_until(lambda: len(b.seen) == 1, what="new leader handles only events after the checkpoint")
    rb.stop()
    rb.join(DEADLINE)
    assert set(a.seen) | set(b.seen) == {p for p, _ in feed(store)} and not set(a.seen) & set(b.seen)


# -- real processes: SIGKILL mid-batch, take-over -------------------------------------------------------


def _worker(store, mode: str, **env) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), store_url(store), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **{k: str(v) for k, v in env.items()}},
    )
    assert proc.stdout.readline().strip() == "started", proc.stderr.read() if proc.poll() is not None else ""
    return proc


def _effects(store) -> list:
    if store.scheme == "postgresql":
        import psycopg
        from psycopg import sql

        with psycopg.connect(store._dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                  (sql.Identifier(store.schema).as_string(conn) + ".effects",)).fetchone()[0]
            if not exists:
                return []
            return conn.execute(sql.SQL("SELECT position, n FROM {}.effects ORDER BY position").format(
                sql.Identifier(store.schema))).fetchall()
    import sqlite3

    with sqlite3.connect(store.path) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'effects'").fetchall():
            return []
        return conn.execute("SELECT position, n FROM effects ORDER BY position").fetchall()


def _totals(store) -> dict:
    if store.scheme == "postgresql":
        import psycopg
        from psycopg import sql

        with psycopg.connect(store._dsn, autocommit=True) as conn:
            return dict(conn.execute(sql.SQL("SELECT stream_id, total FROM {}.totals").format(
                sql.Identifier(store.schema))).fetchall())
    import sqlite3

    with sqlite3.connect(store.path) as conn:
        return dict(conn.execute("SELECT stream_id, total FROM totals").fetchall())


def _expected_totals(store) -> dict:
    out: dict = {}
    for e in store.read_all(types=[Counted]):
        out[e.stream_id] = out.get(e.stream_id, 0) + e.data.n
    return out


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no chance to clean up either way
    proc.wait(DEADLINE)
    proc.stdout.close()
    proc.stderr.close()


def test_sigkill_mid_batch_then_restart_applies_each_event_exactly_once(durable_store):
    store = durable_store
    for chunk in range(5):
        store.append([ec.emit(f"k-{i % 3}", Counted(chunk * 20 + i + 1)) for i in range(20)])
    proc = _worker(store, "live", HANG_AT=55)  # batches of 20: event 55 is in the middle of the third
    try:
        assert proc.stdout.readline().strip() == "hanging", proc.stderr.read()
    finally:
        _kill(proc)
    committed = _effects(store)
    checkpoint = ec.projection_status(store, "totals")[0].position
    assert len(committed) == 40 and committed[-1][0] == checkpoint  # two whole batches, nothing of the third
    assert ec.projection_status(store, "totals")[0].state == "dead"

    proc = _worker(store, "once")
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    effects = _effects(store)
    assert [n for _, n in effects] == list(range(1, 101))  # each effect exactly once, in feed order
    assert [p for p, _ in effects] == [e.position for e in store.read_all()]
    assert _totals(store) == _expected_totals(store)
    assert ec.projection_status(store, "totals")[0].position == store.head_position()


#: Windows has no signal another process can send and this one catch: its SIGTERM ends the process at once.
needs_posix_signals = pytest.mark.skipif(sys.platform == "win32",
                                         reason="a catchable SIGTERM from another process needs POSIX")


@needs_posix_signals
def test_take_over_after_the_leader_is_killed(durable_store):
    store = durable_store
    store.append([ec.emit(f"t-{i % 3}", Counted(i + 1)) for i in range(30)])
    procs = [_worker(store, "live"), _worker(store, "live")]
    try:
        owners = {f"{socket.gethostname()}:{p.pid}": p for p in procs}

        def leader():
            st = ec.projection_status(store, "totals")
            if st and st[0].state == "running" and st[0].owner in owners and st[0].pending == 0:
                return owners[st[0].owner]
            return None

        first = wait_until(leader, what="a leader that caught up")
        store.append([ec.emit(f"t-{i % 3}", Counted(i + 1)) for i in range(30, 50)])
        wait_until(lambda: ec.projection_status(store, "totals")[0].pending == 0, what="live events")
        _kill(first)
        store.append([ec.emit(f"t-{i % 3}", Counted(i + 1)) for i in range(50, 80)])
        second = wait_until(lambda: (lambda p: p if p is not None and p is not first else None)(leader()),
                            what="the other instance to take over and catch up")
        assert second.poll() is None
        effects = _effects(store)
        assert [n for _, n in effects] == list(range(1, 81))
        assert _totals(store) == _expected_totals(store)
        second.send_signal(signal.SIGTERM)  # a clean stop on a signal
        out, err = second.communicate(timeout=DEADLINE)
        assert second.returncode == 0 and "stopped" in out, err
        assert ec.projection_status(store, "totals")[0].state == "stopped"
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)


# -- PostgreSQL specifics ---------------------------------------------------------------------------------


@pytest.fixture
def pg(pg_dsn, pg_schema):
    s = ec.connect(pg_dsn, schema=pg_schema)
    yield s
    s.close()


def test_postgres_handler_writes_commit_with_the_checkpoint(pg):
    """A failing batch leaves neither its read-model rows nor a checkpoint move behind."""
    from psycopg import sql

    table = sql.SQL("{}.seen").format(sql.Identifier(pg.schema))
    pg.append([ec.emit("x", Counted(i)) for i in range(1, 6)])

    def setup(ctx):
        ctx.connection.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (n int)").format(table))

    def handle(events, ctx):
        for e in events:
            ctx.connection.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), (e.data.n,))
        if any(e.data.n == 4 for e in events):
            raise ValueError("no fours")

    proj = ec.Projector("tx", batch_handler=handle, setup=setup, batch_size=10)
    with pytest.raises(ec.ProjectionError):
        ec.run_projection(pg, proj, until_caught_up=True)
    with pg._pool.connection() as conn:
        rows = [r[0] for r in conn.execute(sql.SQL("SELECT n FROM {} ORDER BY n").format(table))]
    # The batch of 5 failed and was replayed one event per transaction: 1..3 committed, then 4 failed.
    assert rows == [1, 2, 3]
    assert ec.projection_status(pg, "tx")[0].position == pg.read_stream("x")[2].position


def test_postgres_follows_live_on_notify_without_polling(pg):
    """With a poll interval far beyond the test's deadline, only LISTEN/NOTIFY can deliver live events."""
    proj = Collector()
    runner = ec.ProjectionRunner(pg, proj, poll_interval=100 * DEADLINE).start()
    try:
        wait_until(lambda: runner.leading.is_set() and runner.caught_up.is_set(), what="an idle leader")
        for i in range(3):
            pg.append([ec.emit("n-1", Counted(i))])
            wait_until(lambda: len(proj.seen) == i + 1, what=f"live event {i} via NOTIFY")
        pg.append_batch([ec.emit(f"n-{k}", Counted(k)) for k in range(50)])  # COPY notifies too
        wait_until(lambda: len(proj.seen) == 53, what="a batch via NOTIFY")
    finally:
        runner.stop()
        runner.join(DEADLINE)
    assert proj.order == [p for p, _ in feed(pg)]


def test_postgres_appends_notify_only_while_a_projector_listens(pg, pg_dsn):
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        oid = listener.execute("SELECT to_regclass(%s)::oid", (
            sql.Identifier(pg.schema).as_string(listener) + ".events",)).fetchone()[0]
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"eventcore_events_{oid}")))

        def notified() -> int:
            return len(list(listener.notifies(timeout=0.5)))  # drains; only a count is asserted

        pg.append([ec.emit("q", Counted(1))])
        assert notified() == 0  # nobody listens: appends do not pay for NOTIFY
        runner = ec.ProjectionRunner(pg, Collector(), poll_interval=100 * DEADLINE).start()
        try:
            wait_until(runner.leading.is_set, what="a listening projector")
            pg.append([ec.emit("q", Counted(2))])
            wait_until(notified, what="a NOTIFY while a projector listens")
        finally:
            runner.stop()
            runner.join(DEADLINE)
        pg.append([ec.emit("q", Counted(3))])
        assert notified() == 0


def test_least_privilege_role_can_run_projections(pg, pg_dsn, pg_schema):
    import psycopg
    from psycopg import sql

    from eventcore.stores.postgres import least_privilege_grants

    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'app-pw'").format(sql.Identifier(role)))
        for statement in least_privilege_grants(pg_schema, role):
            admin.execute(statement)
    try:
        app_dsn = __import__("pgserver").url_as(pg_dsn, role, "app-pw")  # not the admin's credentials
        app = ec.connect(app_dsn, schema=pg_schema, migrate=False)
        try:
            pos = _poisoned(app)
            app.append_batch([ec.emit("p-9", Noise("copy"))])  # COPY as the role fires the NOTIFY trigger
            proj = Unlucky(on_error="skip", types=[Counted, "projtest.NeverDefined"])
            ec.run_projection(app, proj, until_caught_up=True, rebuild=True)
            assert sorted(proj.seen) == [pos[1], pos[2], pos[4]]
            assert [d.position for d in ec.dead_letters(app, "unlucky")] == [pos["raw"], pos[13]]
            assert ec.projection_status(app)[0].lag == 0
        finally:
            app.close()
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- command line ------------------------------------------------------------------------------------------

FIELDS = list(ec.RecordedEvent.__struct_fields__)


def test_tail_prints_recorded_event_fields_as_json_lines(durable_store, capsys):
    store = durable_store
    store.append([ec.emit("acct-1", Counted(1)), ec.emit("other-1", Noise("hi"))],
                 metadata=ec.Metadata(correlation_id="c-1"))
    store.append([ec.emit("acct-2", ec.RawEvent("projtest.Unregistered", b'{"k": [1, 2]}'))])
    url = store_url(store)
    assert main(["tail", "--dsn", url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert FIELDS == ["stream_id", "version", "position", "event_id", "type", "data", "metadata", "recorded_at",
                      "type_version"]
    assert all(list(obj) == FIELDS for obj in lines)
    events = list(store.read_all(types=[Counted, Noise]))
    assert [(o["stream_id"], o["version"], o["position"], o["event_id"], o["type"]) for o in lines[:2]] == [
        (e.stream_id, e.version, e.position, str(e.event_id), e.type) for e in events]
    assert lines[0]["data"] == {"n": 1} and lines[0]["metadata"] == {"correlation_id": "c-1"}
    assert lines[2]["type"] == "projtest.Unregistered" and lines[2]["data"] == {"k": [1, 2]}
    assert lines[2]["metadata"] == {}

    assert main(["tail", "--dsn", url, "--type", "projtest.Noise"]) == 0
    assert [json.loads(x)["stream_id"] for x in capsys.readouterr().out.splitlines()] == ["other-1"]
    assert main(["tail", "--dsn", url, "--prefix", "acct-"]) == 0
    assert [json.loads(x)["stream_id"] for x in capsys.readouterr().out.splitlines()] == ["acct-1", "acct-2"]
    assert main(["tail", "--dsn", url, "--from", str(lines[1]["position"])]) == 0
    assert [json.loads(x)["position"] for x in capsys.readouterr().out.splitlines()] == [
        lines[1]["position"], lines[2]["position"]]


@needs_posix_signals
def test_tail_follow_prints_new_events_live(durable_store):
    store = durable_store
    store.append([ec.emit("f-1", Counted(1))])
    env = {**os.environ, "EVENTCORE_DSN": store_url(store)}
    proc = subprocess.Popen([sys.executable, "-m", "eventcore", "tail", "--follow", "--interval", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline())["data"] == {"n": 1}
        store.append([ec.emit("f-2", Counted(2))])
        line = json.loads(proc.stdout.readline())
        assert (line["stream_id"], line["data"]) == ("f-2", {"n": 2})
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_projections_command_lists_checkpoint_lag_and_state(durable_store, capsys):
    store = durable_store
    store.append([ec.emit(f"c-{i}", Counted(i)) for i in range(3)])
    ec.run_projection(store, Collector("alpha"), until_caught_up=True)
    with pytest.raises(ec.ProjectionError):
        ec.run_projection(store, ec.Projector("beta", handler=lambda e, ctx: 1 / 0), until_caught_up=True)
    store.append([ec.emit("c-9", Counted(9))])
    url = store_url(store)
    assert main(["projections", "--dsn", url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["alpha", "beta"]
    alpha, beta = rows
    assert alpha["state"] == "stopped" and alpha["pending"] == 1 and alpha["lag"] == store.head_position() - alpha["position"]
    assert beta["state"] == "failed" and beta["pending"] == 4 and "ZeroDivisionError" in beta["error"]
    assert main(["projections", "--dsn", url]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split() == ["NAME", "CHECKPOINT", "LAG", "PENDING", "STATE", "DEAD", "LETTERS",
                                               "UPDATED"]
    assert "alpha" in out.out and "failed" in out.out and "ZeroDivisionError" in out.err


def test_postgres_projection_reconnects_after_losing_its_connection(pg, pg_dsn):
    import psycopg
    from psycopg import sql

    table = sql.SQL("{}.effects").format(sql.Identifier(pg.schema))

    def setup(ctx):
        ctx.connection.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (position bigint)").format(table))

    def handle(events, ctx):
        ctx.connection.cursor().executemany(sql.SQL("INSERT INTO {} VALUES (%s)").format(table),
                                            [(e.position,) for e in events])

    def effects():
        with pg._pool.connection() as conn:
            return [r[0] for r in conn.execute(sql.SQL("SELECT position FROM {} ORDER BY position").format(table))]

    proj = ec.Projector("reconnect", batch_handler=handle, setup=setup)
    runner = ec.ProjectionRunner(pg, proj, poll_interval=0.05, reconnect_backoff=0.05).start()
    try:
        wait_until(runner.leading.is_set, what="the projection to lead (its table exists)")
        pg.append([ec.emit("r", Counted(i)) for i in range(10)])
        wait_until(lambda: len(effects()) == 10, what="first events")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = 'eventcore-projection:reconnect'").fetchone()[0]
        assert ended == 1
        pg.append([ec.emit("r", Counted(i)) for i in range(10, 20)])
        wait_until(lambda: len(effects()) == 20, what="events after the reconnect")
    finally:
        runner.stop()
        runner.join(DEADLINE)
    assert effects() == [e.position for e in pg.read_all()]
    assert ec.projection_status(pg, "reconnect")[0].state == "stopped"


# -- review fixes (issue 6 review) ---------------------------------------------------------------------------


def _run_bounded(store, projector, **options):
    """run_projection in a thread, bounded by the deadline: a runner that loops forever fails the test."""
    runner = ec.ProjectionRunner(store, projector, **options).start()
    runner._thread.join(DEADLINE)
    alive = runner._thread.is_alive()
    if alive:
        runner.stop()
        runner._thread.join(DEADLINE)
    assert not alive, f"the projection never ended (state {[s.state for s in ec.projection_status(store)]})"
    return runner


def test_a_handlers_store_unavailable_error_goes_to_the_error_strategy(store):
    """An error the handler raises is the handler's, whatever its class (here: another store is down)."""
    pos = _poisoned(store)

    class OtherStoreDown(Unlucky):
        def handle(self, event, ctx):
            if event.data.n == 13:
                raise ec.StoreUnavailableError("the other database is down")
            Collector.handle(self, event, ctx)

    proj = OtherStoreDown(on_error="skip", types=[Counted])
    _run_bounded(store, proj, until_caught_up=True, reconnect_backoff=0.05)
    assert sorted(proj.seen) == [pos[1], pos[2], pos[4]]
    (letter,) = ec.dead_letters(store, "unlucky")
    assert letter.position == pos[13] and "the other database is down" in letter.error
    with pytest.raises(ec.ProjectionError):
        _run_bounded(store, OtherStoreDown(types=[Counted]), until_caught_up=True, rebuild=True).join()


def test_postgres_handler_operational_error_on_a_live_connection_goes_to_the_error_strategy(pg):
    """A statement timeout (QueryCanceled, an OperationalError) in the handler is the event's failure:
    skip dead-letters it, fatal stops; the projection's connection lives on."""
    pos = _poisoned(pg)

    def handle(event, ctx):
        if event.data.n == 13:
            ctx.connection.execute("SET LOCAL statement_timeout = 20")
            ctx.connection.execute("SELECT pg_sleep(5)")

    proj = ec.Projector("slow", handler=handle, types=[Counted], on_error="skip")
    _run_bounded(pg, proj, until_caught_up=True, reconnect_backoff=0.05)
    (letter,) = ec.dead_letters(pg, "slow")
    assert letter.position == pos[13] and "QueryCanceled" in letter.error
    assert ec.projection_status(pg, "slow")[0].position == pg.head_position()

    retried = ec.Projector("slow-retry", handler=handle, types=[Counted], on_error=ec.Retry(attempts=2, backoff=0.01))
    with pytest.raises(ec.ProjectionError) as info:
        _run_bounded(pg, retried, until_caught_up=True, reconnect_backoff=0.05).join()
    assert info.value.position == pos[13] and "QueryCanceled" in str(info.value)
    assert ec.projection_status(pg, "slow-retry")[0].state == "failed"


def test_reconnect_backoff_is_exponential_and_bounded(monkeypatch):
    from eventcore.stores.memory_projections import MemoryProjectionSession
    from eventcore.stores.projection_storage import StoreFailed

    class Down(MemoryProjectionSession):
        def open(self):
            raise StoreFailed("projection 'down': connection refused")

    class Recorder(threading.Event):
        def __init__(self):
            super().__init__()
            self.waits = []

        def wait(self, timeout=None):
            self.waits.append(timeout)
            if len(self.waits) == 8:
                self.set()
            return self.is_set()

    store = ec.connect("memory://")
    storage = store._projection_storage()
    monkeypatch.setattr(storage, "session", lambda name, listen=True: Down(storage, name))
    stop = Recorder()
    ec.run_projection(store, Collector("down"), stop_event=stop, reconnect_backoff=0.5, max_reconnect_backoff=10)
    assert stop.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    for bad in ({"reconnect_backoff": 0}, {"lock_poll_interval": -1}, {"max_reconnect_backoff": 0}):
        with pytest.raises(ec.ValidationError):
            ec.ProjectionRunner(store, Collector(), **bad)


def _notify_listener(pg, pg_dsn):
    """A connection LISTENing on the schema's append channel, and a function counting (draining) its NOTIFYs."""
    import psycopg
    from psycopg import sql

    listener = psycopg.connect(pg_dsn, autocommit=True)
    oid = listener.execute("SELECT to_regclass(%s)::oid", (
        sql.Identifier(pg.schema).as_string(listener) + ".events",)).fetchone()[0]
    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"eventcore_events_{oid}")))
    return listener, lambda: len(list(listener.notifies(timeout=0.3)))


def test_postgres_appends_stop_notifying_once_a_killed_listeners_lease_expires(pg, pg_dsn):
    """SIGKILL leaves no chance to say "stopped": the listening claim is a lease, and it expires."""
    from psycopg import sql

    child = (
        "import sys, eventcore as ec\n"
        "store = ec.connect(sys.argv[1], schema=sys.argv[2])\n"
        "print('started', flush=True)\n"
        "ec.run_projection(store, ec.Projector('killed', handler=lambda e, ctx: None, types=['projtest.Nothing']), listen_lease=1.0)\n"
    )
    listener, notified = _notify_listener(pg, pg_dsn)
    proc = subprocess.Popen([sys.executable, "-c", child, pg_dsn, pg.schema], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lease = sql.SQL("SELECT listening_until > now() FROM {}.projection_checkpoints WHERE name = 'killed'").format(
            sql.Identifier(pg.schema))
        wait_until(lambda: proc.poll() is None and (listener.execute(lease).fetchone() or [False])[0],
                   what="the child projector to claim its listening lease")
        pg.append([ec.emit("k", Counted(1))])
        wait_until(notified, what="a NOTIFY while the child listens")
        _kill(proc)
        # Appends keep notifying until the lease runs out, then stop for good.
        wait_until(lambda: pg.append([ec.emit("k", Counted(2))]) and notified() == 0,
                   what="appends to stop notifying after the killed listener's lease expired")
        pg.append([ec.emit("k", Counted(3))])
        assert notified() == 0
        assert ec.projection_status(pg, "killed")[0].state == "dead"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        listener.close()


def test_postgres_keyboard_interrupt_ends_the_listening_lease_at_once(pg, pg_dsn):
    listener, notified = _notify_listener(pg, pg_dsn)
    try:
        pg.append([ec.emit("i", Counted(1))])

        def handle(event, ctx):
            raise KeyboardInterrupt()

        runner = ec.ProjectionRunner(pg, ec.Projector("interrupted", handler=handle))  # default lease: 30 s
        with pytest.raises(KeyboardInterrupt):
            runner.run()
        notified()
        pg.append([ec.emit("i", Counted(2))])
        assert notified() == 0
    finally:
        listener.close()


def test_postgres_listener_renews_its_lease_while_it_waits(pg, pg_dsn):
    """A live projector idle far longer than its lease keeps it: appends still wake it by NOTIFY."""
    proj = Collector()
    runner = ec.ProjectionRunner(pg, proj, poll_interval=100 * DEADLINE, listen_lease=0.3).start()
    listener, notified = _notify_listener(pg, pg_dsn)
    try:
        wait_until(lambda: runner.leading.is_set() and runner.caught_up.is_set(), what="an idle leader")
        for i in range(4):
            time.sleep(0.3)  # not a timing assertion: lets leases lapse if they were not renewed
            pg.append([ec.emit("w", Counted(i))])
            wait_until(lambda: len(proj.seen) == i + 1, what=f"event {i} via NOTIFY after idling")
        assert notified() > 0
    finally:
        runner.stop()
        runner.join(DEADLINE)
        listener.close()


def test_rebuild_on_a_first_run_sets_up_before_it_resets(durable_store):
    """reset() may empty tables only setup() creates: a first run with rebuild=True must not fail."""
    store = durable_store
    if store.scheme == "postgresql":
        table, ph = '"' + store.schema.replace('"', '""') + '".rebuilt', "%s"
    else:
        table, ph = "rebuilt", "?"
    store.append([ec.emit("b", Counted(i)) for i in range(3)])
    proj = ec.Projector(
        "fresh", types=[Counted],
        setup=lambda ctx: ctx.connection.execute(f"CREATE TABLE IF NOT EXISTS {table} (n int)"),
        reset=lambda ctx: ctx.connection.execute(f"DELETE FROM {table}"),
        handler=lambda e, ctx: ctx.connection.execute(f"INSERT INTO {table} VALUES ({ph})", (e.data.n,)))
    for _ in range(2):  # first run, then a true rebuild over a full read model
        ec.run_projection(store, proj, until_caught_up=True, rebuild=True)
        conn = store._projection_storage().session("fresh")
        conn.open()
        try:
            assert sorted(r[0] for r in conn.connection.execute(f"SELECT n FROM {table}").fetchall()) == [0, 1, 2]
        finally:
            conn.close()


def test_postgres_keeps_looking_while_committed_events_wait_behind_the_fence(pg, pg_dsn):
    """An older transaction holds the feed's fence while a newer append commits (and notifies): the
    projector keeps looking soon, not once, so it sees the event when the fence passes, though that
    sends no NOTIFY and its poll interval is far beyond the deadline."""
    import psycopg

    proj = Collector()
    runner = ec.ProjectionRunner(pg, proj, poll_interval=100 * DEADLINE).start()
    try:
        wait_until(lambda: runner.leading.is_set() and runner.caught_up.is_set(), what="an idle leader")
        with psycopg.connect(pg_dsn) as holder:
            holder.execute("SELECT pg_current_xact_id()")  # an older transaction with an id: the fence waits
            pg.append([ec.emit("fenced", Counted(1))])  # commits and notifies, but behind the fence
            time.sleep(0.5)  # not an assertion: gives a single re-poll time to give up
            assert proj.seen == {}
            holder.commit()  # the fence passes; committing this transaction notifies nobody
        wait_until(lambda: len(proj.seen) == 1, what="the event once the fence passed")
    finally:
        runner.stop()
        runner.join(DEADLINE)


def test_filtered_projector_does_not_commit_a_checkpoint_per_idle_wake_up(store):
    """Events its filters leave out move a projector's read cursor at once, but its stored checkpoint
    only every idle_checkpoint_interval (here: never while it runs) and when it stops."""
    proj = Collector(types=[Counted])
    runner = ec.ProjectionRunner(store, proj, poll_interval=0.02, idle_checkpoint_interval=100 * DEADLINE).start()

    def stored() -> int:
        return ec.projection_status(store, "collector")[0].position

    def two_reads() -> None:  # the second read began after this call did: it saw what came before
        for _ in range(2):
            runner.caught_up.clear()
            wait_until(runner.caught_up.is_set, what="a read to the head")

    try:
        wait_until(runner.leading.is_set, what="a leader")
        store.append([ec.emit("m-1", Counted(1))])
        first = store.read_stream("m-1")[0].position
        wait_until(lambda: stored() == first, what="the first event's checkpoint")  # handled, then committed
        for i in range(3):
            store.append([ec.emit("noise", Noise(str(i)))])
            two_reads()
        assert stored() == first  # idle wake-ups past filtered-out events committed nothing
        store.append([ec.emit("m-1", Counted(2))])  # reading went on past the noise, and still sees this
        wait_until(lambda: stored() == store.read_stream("m-1")[1].position, what="an event after the noise")
        assert len(proj.seen) == 2
        store.append([ec.emit("noise", Noise("last"))])
        two_reads()
    finally:
        runner.stop()
        runner.join(DEADLINE)
    assert stored() == store.head_position()  # stopping saves the cursor past the last noise
    assert proj.order == [e.position for e in store.read_all(types=[Counted])]


def test_runner_lag_and_pending_come_from_the_stored_checkpoint(store, monkeypatch):
    """A waiting instance (its own position 0) reports the projector's lag, not the whole feed."""
    from eventcore.projections import status as listing

    store.append([ec.emit(f"l-{i}", Counted(i)) for i in range(3)])
    waiting = ec.ProjectionRunner(store, Collector())
    assert waiting.lag() == store.head_position() and waiting.pending() == 3  # never ran: everything
    ec.run_projection(store, Collector(), until_caught_up=True)
    assert (waiting.lag(), waiting.pending()) == (0, 0)
    store.append([ec.emit("l-9", Counted(9)), ec.emit("l-9", Counted(10))])
    assert waiting.lag() == store.head_position() - ec.projection_status(store, "collector")[0].position > 0
    assert waiting.pending() == 2 and waiting.status().pending == 2
    monkeypatch.setattr(listing, "PENDING_CAP", 1)  # pending is a bounded count
    assert waiting.pending() == 1 and ec.projection_status(store)[0].pending == 1


def test_postgres_filtered_read_looks_at_a_window_of_the_feed(pg, monkeypatch):
    """A filtered page reads at most a window of events after the cursor (an index range), not up to
    the fence; the runner walks the windows and finds what its filters want beyond them."""
    from eventcore.stores.postgres import projections as pg_projections

    monkeypatch.setattr(pg_projections, "WINDOW_MIN", 10)
    pg.append_batch([ec.emit(f"w-{i % 3}", Noise(str(i))) for i in range(25)])
    pg.append([ec.emit("w-9", Counted(1))])
    noise = [e.position for e in pg.read_all(types=[Noise])]
    backend = pg._projection_storage().session("window", listen=False)
    backend.open()
    try:
        assert backend.read_page(0, ["projtest.Counted"], None, 1) == ([], noise[9])  # the 10th event bounds it
        rows, bound = backend.read_page(noise[19], ["projtest.Counted"], "w-", 1)
        assert [r[0] for r in rows] == [pg.read_stream("w-9")[0].position] and bound is None  # reaches the fence
        rows, bound = backend.read_page(noise[0], ["projtest.Noise"], None, 1)  # a full page: the next one
        assert [r[0] for r in rows] == noise[1:2] and bound == noise[10]
        rows, bound = backend.read_page(0, ["projtest.Noise"], None, 2)  # a window of 20
        assert [r[0] for r in rows] == noise[:2] and bound == noise[19]
    finally:
        backend.close()
    proj = Collector(types=[Counted], batch_size=1)
    ec.run_projection(pg, proj, until_caught_up=True)
    assert proj.order == [pg.read_stream("w-9")[0].position]
    assert ec.projection_status(pg, "collector")[0].position == pg.head_position()


def test_postgres_selective_filter_over_many_events_within_a_small_statement_timeout(pg, pg_dsn):
    """Hundreds of thousands of events the filter leaves out and a 20 ms statement timeout: each page
    reads a window, so the projection gets through (a scan up to the fence would time out, forever)."""
    for i in range(0, 300_000, 20_000):
        pg.append_batch([ec.emit(f"bulk-{j % 50}", Noise("x")) for j in range(i, i + 20_000)])
    pg.append([ec.emit("wanted", Counted(1))])
    tight = ec.connect(pg_dsn, schema=pg.schema, statement_timeout=0.02, migrate=False)
    try:
        proj = Collector(types=[Counted])
        _run_bounded(tight, proj, until_caught_up=True, reconnect_backoff=0.05)
        assert proj.order == [pg.read_stream("wanted")[0].position]
    finally:
        tight.close()


def test_monitoring_commands_run_no_ddl_and_say_when_the_schema_is_behind(pg_dsn, capsys):
    import psycopg

    schema = f"absent_{uuid.uuid4().hex[:8]}"
    url = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={schema}"
    for argv in (["projections", "--dsn", url], ["tail", "--dsn", url]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and "eventcore migrate" in err, err
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # nothing was created
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()[0] == 0
    import pg_legacy
    from eventcore.stores.postgres import sql as pg_sql

    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # a schema at version 3
            pg_legacy.make(conn, schema, 3)
        for argv in (["projections", "--dsn", url], ["tail", "--dsn", url]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "at version 3" in err and "eventcore migrate" in err, err
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # and nothing was migrated
            assert conn.execute(pg_sql.q(pg_sql.QUERIES["current_version"], schema)).fetchone()[0] == 3
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_reconnect_warning_names_the_projection_once(monkeypatch, caplog):
    from eventcore.stores.memory_projections import MemoryProjectionSession
    from eventcore.stores.projection_storage import StoreFailed

    class Down(MemoryProjectionSession):
        def open(self):
            raise StoreFailed("projection 'down': connection refused")

    store = ec.connect("memory://")
    storage = store._projection_storage()
    monkeypatch.setattr(storage, "session", lambda name, listen=True: Down(storage, name))
    stop = threading.Event()
    runner = ec.ProjectionRunner(store, Collector("down"), stop_event=stop, reconnect_backoff=0.01).start()
    try:
        wait_until(lambda: any("reconnecting" in r.getMessage() for r in caplog.records), what="a reconnect warning")
    finally:
        stop.set()
        runner._thread.join(DEADLINE)
    message = next(r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage())
    assert message.count("projection 'down'") == 1 and "connection refused" in message, message


def test_sqlite_leader_lock_is_the_same_file_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    direct = ec.connect(f"sqlite:///{tmp_path / 'real' / 'events.db'}")
    (tmp_path / "linked.db").symlink_to(tmp_path / "real" / "events.db")
    linked = ec.connect(f"sqlite:///{tmp_path / 'linked.db'}")
    a, b = (s._projection_storage().session("one") for s in (direct, linked))
    try:
        a.open()
        b.open()
        assert a.try_acquire()
        assert not b.try_acquire()  # one active instance, whichever path each opened the file by
    finally:
        a.close()
        b.close()
        direct.close()
        linked.close()


def test_postgres_a_refused_checkpoint_write_is_not_the_events_failure(pg, pg_dsn):
    """When the store refuses the projection's own statement (here a trigger refuses to move the
    checkpoint), the run stops with that error: the event is not retried, skipped or blamed."""
    import psycopg
    from psycopg import sql

    pg.append([ec.emit("r", Counted(1))])
    s = sql.Identifier(pg.schema)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE FUNCTION {}.frozen() RETURNS trigger LANGUAGE plpgsql AS "
                              "$$ BEGIN RAISE EXCEPTION 'checkpoints are frozen'; END $$").format(s))
        admin.execute(sql.SQL("CREATE TRIGGER frozen BEFORE UPDATE ON {}.projection_checkpoints FOR EACH ROW "
                              "WHEN (OLD.position IS DISTINCT FROM NEW.position) EXECUTE FUNCTION {}.frozen()").format(s, s))
    calls = []
    proj = ec.Projector("frozen", handler=lambda e, ctx: calls.append(e.position),
                        on_error=ec.Retry(attempts=3, backoff=0.01, then="skip"))
    with pytest.raises(ec.EventCoreError) as info:
        _run_bounded(pg, proj, until_caught_up=True).join()
    assert not isinstance(info.value, ec.ProjectionError) and "checkpoints are frozen" in str(info.value)
    assert len(calls) == 1 and ec.dead_letters(pg, "frozen") == []
    assert ec.projection_status(pg, "frozen")[0].state == "failed"


def test_postgres_a_waiting_instance_does_not_listen(pg):
    """Only the leader LISTENs: a waiting instance never reads its socket, and a listener that does not
    drain its notifications holds back the cluster's NOTIFY queue."""
    leader = ec.ProjectionRunner(pg, Collector(), poll_interval=0.05).start()
    waiting = None
    try:
        wait_until(leader.leading.is_set, what="a leader")
        waiting = ec.ProjectionRunner(pg, Collector(), poll_interval=0.05, lock_poll_interval=0.05).start()
        wait_until(lambda: waiting._session is not None and waiting._session.connection is not None,
                   what="the second instance's connection")

        def channels(runner):
            return runner._session.connection.execute("SELECT pg_listening_channels()").fetchall()

        assert len(channels(leader)) == 1
        assert channels(waiting) == []
        leader.stop()
        leader.join(DEADLINE)
        wait_until(waiting.leading.is_set, what="the take-over")
        assert len(channels(waiting)) == 1
    finally:
        leader.stop()
        if waiting is not None:
            waiting.stop()
            waiting.join(DEADLINE)
