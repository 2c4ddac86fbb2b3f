"""SQLite-specific guarantees: durability, several processes on one file, immutability, URLs."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3

import pytest

import eventcore as ec
from domain import Deposit, Deposited, Noted, assert_gap_free, deposit_worker

emit = ec.emit


def assert_dense(store) -> None:
    """SQLite (unlike the store contract, and unlike PostgreSQL) hands out positions 1, 2, 3, ... with no hole."""
    positions = [e.position for e in store.read_all(page_size=97)]
    assert positions == list(range(1, len(positions) + 1))
    assert store.head_position() == len(positions)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "events.db"


@pytest.fixture
def url(db_path):
    return f"sqlite:///{db_path}"


@pytest.fixture
def sqlite_store(url):
    s = ec.connect(url)
    try:
        yield s
    finally:
        s.close()


# -- durability ------------------------------------------------------------------------------


def test_data_survives_reopen(url):
    md = ec.Metadata(user_id="alice", custom={"k": [1, 2]})
    with ec.connect(url) as store:
        written = store.append([emit("a", Deposited(amount=1)), emit("b", Noted(text="x"))], metadata=md)
        written += ec.execute(store, Deposit(account=ec.StreamId("a"), amount=2)).events
    with ec.connect(url) as store:
        assert list(store.read_all()) == written
        assert store.head_position() == 3
        assert store.stream_versions(["a", "b"]) == {"a": 2, "b": 1}
        assert store.read_stream("a")[0].metadata == md
        out = store.append([emit("a", Deposited(amount=3))], {"a": 2})
        assert (out[0].version, out[0].position) == (3, 4)
    with ec.connect(url) as store:
        assert [e.version for e in store.read_stream("a")] == [1, 2, 3]


def test_relative_path_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ec.connect("sqlite:///rel.db") as store:
        store.append([emit("a", Noted())])
    assert (tmp_path / "rel.db").exists()
    with ec.connect("sqlite:///rel.db") as store:
        assert store.head_position() == 1


def test_closed_store_refuses_use(url):
    store = ec.connect(url)
    store.append([emit("a", Noted())])
    store.close()
    with pytest.raises(ec.EventCoreError):
        store.read_stream("a")
    with pytest.raises(ec.EventCoreError):
        store.append([emit("a", Noted())])
    with ec.connect(url) as again:
        assert again.head_position() == 1


def test_wal_mode_and_schema(sqlite_store, db_path):
    sqlite_store.append([emit("a", Noted())])
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] >= 1
    finally:
        raw.close()


def test_newer_schema_version_is_refused(url, db_path):
    ec.connect(url).close()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = 999")
    raw.close()
    with pytest.raises(ec.StoreUnavailableError, match="999"):
        ec.connect(url)


# -- immutability -----------------------------------------------------------------------------


def test_update_and_delete_rejected_by_the_database(sqlite_store, db_path):
    sqlite_store.append([emit("a", Deposited(amount=1)), emit("a", Deposited(amount=2))])
    before = list(sqlite_store.read_all())
    raw = sqlite3.connect(db_path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("UPDATE events SET data = ? WHERE position = 1", (b'{"amount":1000}',))
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("UPDATE events SET version = 7")
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("DELETE FROM events WHERE position = 2")
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("DELETE FROM events")
        # A duplicate (stream, version) is rejected by the database too.
        row = raw.execute(
            "SELECT stream_id, version, type, data, recorded_at FROM events WHERE position = 2"
        ).fetchone()
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute(
                "INSERT INTO events (position, stream_id, version, event_id, type, data, metadata, recorded_at) "
                "VALUES (3, ?, ?, ?, ?, ?, NULL, ?)",
                (row[0], row[1], b"\x00" * 16, row[2], row[3], row[4]),
            )
    finally:
        raw.close()
    assert list(sqlite_store.read_all()) == before


# -- several writers on one file ----------------------------------------------------------------


def test_two_store_objects_on_one_file_see_each_others_writes(url):
    with ec.connect(url) as one, ec.connect(url) as two:
        one.append([emit("s", Noted())])
        seen = two.stream_version("s")
        assert seen == 1
        one.append([emit("s", Noted())])
        with pytest.raises(ec.ConcurrencyError) as info:
            two.append([emit("s", Noted())], {"s": seen})
        assert (info.value.expected, info.value.actual) == (1, 2)
        out = two.append([emit("s", Noted())], {"s": 2})
        assert (out[0].version, out[0].position) == (3, 3)
        assert one.read_stream("s") == two.read_stream("s")


PROCESSES = 4
PER_PROCESS = 50
STREAMS = ["shared-0", "shared-1", "shared-2"]


def test_several_processes_append_to_one_file(url):
    ec.connect(url).close()  # create the schema up front
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        results = pool.starmap(deposit_worker, [(url, STREAMS, PER_PROCESS, w) for w in range(PROCESSES)])
    assert [ok for ok, _ in results] == [PER_PROCESS] * PROCESSES
    total = PROCESSES * PER_PROCESS
    with ec.connect(url) as store:
        assert store.head_position() == total
        assert_gap_free(store, STREAMS)
        assert_dense(store)
        events = list(store.read_all())
        assert len(events) == total
        assert sum(e.data.amount for e in events) == total
        assert sum(store.stream_version(s) for s in STREAMS) == total
        assert len({e.event_id for e in events}) == total


def _forked_child(store, streams, count, worker):
    # Uses the store object inherited from the parent: it must open its own connection.
    policy = ec.RetryPolicy(max_retries=10_000, base_delay=0.0005, max_delay=0.02)
    for i in range(count):
        sid = ec.StreamId(streams[(i + worker) % len(streams)])
        ec.execute(store, Deposit(account=sid, amount=1), retry=policy, timeout=None)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_processes_share_an_open_store(sqlite_store):
    sqlite_store.append([emit("shared-0", Deposited(amount=1))])  # the parent's connection is open
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_child, args=(sqlite_store, STREAMS, 25, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sqlite_store.head_position() == 1 + 3 * 25
    assert_gap_free(sqlite_store, STREAMS)
    assert_dense(sqlite_store)
    # The parent's own connection still works after the children are gone.
    assert sqlite_store.append([emit("shared-1", Deposited(amount=1))])[0].position == 77


def test_positions_are_dense(sqlite_store):
    """A property of the SQLite backend: positions are 1..n, and a failed append leaves no hole."""
    assert sqlite_store.head_position() == 0
    out = sqlite_store.append([emit("a", Noted()), emit("b", Noted())])
    assert [e.position for e in out] == [1, 2]
    with pytest.raises(ec.ConcurrencyError):
        sqlite_store.append([emit("a", Noted()), emit("c", Noted())], {"a": 5})
    with pytest.raises(ec.ValidationError):
        sqlite_store.append([emit("a", Noted()), "junk"])
    assert sqlite_store.append([emit("c", Noted())])[0].position == 3
    batch = sqlite_store.append_batch([emit(f"d-{i}", Noted()) for i in range(5)])
    assert (batch.first_position, batch.last_position) == (4, 8)
    assert_dense(sqlite_store)


# -- URLs and options ------------------------------------------------------------------------


def test_url_options(db_path):
    with ec.connect(f"sqlite:///{db_path}?synchronous=normal&timeout=5") as store:
        assert store.synchronous == "normal"
        assert store.timeout == 5.0
        store.append([emit("a", Noted())])
        assert store.head_position() == 1
    # Keyword options win over the URL's.
    with ec.connect(f"sqlite:///{db_path}?synchronous=normal", synchronous="off", timeout=2) as store:
        assert (store.synchronous, store.timeout) == ("off", 2.0)
        assert store.head_position() == 1
    with ec.connect(f"sqlite:///{db_path}") as store:
        assert store.synchronous == "full"  # durable by default


@pytest.mark.parametrize(
    "query",
    ["bogus=1", "synchronous=sometimes", "timeout=abc", "timeout=0", "timeout=-1", "journal_mode=delete",
     "timeout=inf", "timeout=nan", "migrate=maybe"],
)
def test_bad_url_options_rejected(db_path, query):
    with pytest.raises(ec.ValidationError):
        ec.connect(f"sqlite:///{db_path}?{query}")
    assert not db_path.exists()  # refused before the file is made


@pytest.mark.parametrize("timeout", [float("inf"), 10**400, True, None, [5]])
def test_bad_keyword_timeout_rejected(db_path, timeout):
    with pytest.raises(ec.ValidationError, match="timeout"):
        ec.connect(f"sqlite:///{db_path}", timeout=timeout)


def test_unknown_keyword_option_rejected(db_path):
    with pytest.raises(ec.ValidationError):
        ec.connect(f"sqlite:///{db_path}", cache="big")


@pytest.mark.parametrize(
    "url",
    ["sqlite:///:memory:", "sqlite://", "sqlite:///", "sqlite://host/events.db"],
)
def test_bad_sqlite_urls_rejected(url):
    with pytest.raises(ec.ValidationError):
        ec.connect(url)


@pytest.mark.parametrize("url", ["bogus://x", "mysql://localhost/db", "events.db", "", 42, None])
def test_bad_urls_rejected(url):
    with pytest.raises(ec.ValidationError):
        ec.connect(url)


@pytest.mark.parametrize("url", ["memory://x", "memory://?a=1"])
def test_memory_url_takes_no_path(url):
    with pytest.raises(ec.ValidationError):
        ec.connect(url)


def test_memory_url():
    with ec.connect("memory://") as store:
        assert store.head_position() == 0
    assert ec.connect("memory:///").head_position() == 0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://127.0.0.1:1/eventcore?connect_timeout=1",
        "postgres://127.0.0.1:1/eventcore?connect_timeout=1",
    ],
)
def test_postgres_url_without_a_server_fails_cleanly(url):
    # No server listens on port 1 (and the driver may be missing): a typed error, never a crash or a hang.
    with pytest.raises((ec.EventCoreError, ImportError)):
        store = ec.connect(url)
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_holds_the_write_lock(tmp_path):
    """A lock held by another thread at fork() would stay held in the child forever."""
    import threading

    url = f"sqlite:///{tmp_path / 'fork.db'}"
    store = ec.connect(url)
    store.append([ec.emit("parent", Noted("before"))])
    held, release = threading.Event(), threading.Event()

    def hold():
        with store._write_lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:  # child: must be able to write, through the inherited store and a new one
        code = 1
        try:
            import signal

            signal.alarm(20)  # a deadlock ends the child instead of hanging the suite
            store.append([ec.emit("child", Noted("inherited store"))])
            other = ec.connect(url)
            other.append([ec.emit("child", Noted("new store"))])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    release.set()
    t.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert [e.data.text for e in store.read_stream("child")] == ["inherited store", "new store"]
    store.close()
