"""Stores know their own: a read-only command creates and changes nothing, and eventcore never
takes another application's SQLite file or PostgreSQL schema for a store of its own.

Every check that a file was "left as it was" compares its bytes and the directory's listing
(no -wal, -shm or journal file appears beside it)."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid

import pytest

import eventcore as ec
from domain import Noted
from eventcore.cli import main
from eventcore.stores import sqlite as sqlite_store


def _snapshot(path):
    """The file's bytes (hashed) and what lies beside it."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return digest, sorted(os.listdir(path.parent))


def _cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# -- a store that is not there --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "tail", "projections"])
def test_read_only_commands_on_a_missing_sqlite_file_create_nothing(tmp_path, capsys, command):
    db = tmp_path / "typo.db"
    rc, out, err = _cli(capsys, command, "--dsn", f"sqlite:///{db}")
    assert rc == (1 if command == "status" else 2)
    assert "no eventcore store" in out + err and "does not exist" in out + err
    assert os.listdir(tmp_path) == []
    if command == "status":
        assert "missing" in out and "unreachable" not in out


def test_status_json_names_the_problem(tmp_path, capsys):
    db = tmp_path / "typo.db"
    rc, out, _ = _cli(capsys, "status", "--dsn", f"sqlite:///{db}", "--json")
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and report["problem"] == "missing" and report["connected"] is False
    assert os.listdir(tmp_path) == []


def test_connect_without_migrate_refuses_a_missing_or_empty_store(tmp_path):
    with pytest.raises(ec.StoreNotFoundError, match="does not exist"):
        ec.connect(f"sqlite:///{tmp_path / 'none.db'}", migrate=False)
    with pytest.raises(ec.StoreNotFoundError, match="does not exist"):
        ec.connect(f"sqlite:///{tmp_path / 'none.db'}?migrate=false")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(ec.StoreNotFoundError, match="empty"):
        ec.connect(f"sqlite:///{empty}", migrate=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.db"] and empty.read_bytes() == b""
    with pytest.raises(ec.ValidationError, match="migrate"):
        ec.connect(f"sqlite:///{tmp_path / 'x.db'}", migrate="perhaps")


def test_an_empty_file_or_database_becomes_a_store(tmp_path):
    """A 0-byte file (a temporary file's) or a SQLite database without tables holds nothing to harm."""
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.db"
    sqlite3.connect(blank).execute("VACUUM")  # a valid database, no tables
    for path in (empty, blank):
        with ec.connect(f"sqlite:///{path}") as store:
            store.append([ec.emit("s", Noted(text="x"))])
        assert path.read_bytes()[68:72] == b"EvCo"  # application_id in the header
        with ec.connect(f"sqlite:///{path}", migrate=False) as store:
            assert store.stream_version("s") == 1


def test_a_new_store_carries_its_application_id_in_the_file_header(tmp_path):
    path = tmp_path / "new.db"
    with ec.connect(f"sqlite:///{path}") as store:
        store.append([ec.emit("s", Noted(text="x"))])
        assert path.read_bytes()[68:72] == b"EvCo"  # in the main file, not only in the WAL
    assert sqlite_store.inspect_file(str(path)) == "store"


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ec.StoreUnavailableError, match="does not exist"):
        ec.connect(f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}")
    assert os.listdir(tmp_path) == []


# -- another application's file --------------------------------------------------------------------


def _foreign_db(path, wal=False, keep_open=False, application_id=0):
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    if application_id:
        conn.execute(f"PRAGMA application_id = {application_id}")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    conn.execute("INSERT INTO events (what) VALUES ('login'), ('logout')")
    if keep_open:
        return conn
    conn.close()
    return None


FOREIGN = {
    "rollback journal": dict(),
    "WAL, closed": dict(wal=True),
    "WAL, open with a live -wal file": dict(wal=True, keep_open=True),
    "another application id": dict(application_id=0x12345678),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_another_applications_sqlite_file_is_refused_and_left_byte_identical(tmp_path, capsys, kind):
    path = tmp_path / "app.db"
    held = _foreign_db(path, **FOREIGN[kind])
    try:
        before = _snapshot(path)
        for migrate in (True, False):
            with pytest.raises(ec.NotAnEventStoreError, match="not an eventcore store"):
                ec.connect(f"sqlite:///{path}", migrate=migrate)
        for argv in (["status"], ["tail"], ["projections"]):
            rc, out, err = _cli(capsys, *argv, "--dsn", f"sqlite:///{path}")
            assert rc != 0 and "not an eventcore store" in out + err
        lines = tmp_path / "in.jsonl"
        lines.write_text('{"stream": "s", "type": "t", "data": {}}\n')
        rc, out, err = _cli(capsys, "ingest", str(lines), "--dsn", f"sqlite:///{path}", "--no-progress")
        assert rc == 2 and "not an eventcore store" in err
        lines.unlink()
        assert _snapshot(path) == before
    finally:
        if held is not None:
            held.close()
    # The other application still owns its table, triggers-free: its own DELETE works.
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM events WHERE what = 'login'")
    conn.commit()
    assert conn.execute("SELECT what FROM events").fetchall() == [("logout",)]
    assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    conn.close()


@pytest.mark.parametrize("content", [b"hello, world\n" * 20, b"SQLite format 3\x00" + b"\x00" * 20, b"\x00" * 4096])
def test_a_file_that_is_not_a_sqlite_database_is_refused_untouched(tmp_path, content):
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    before = _snapshot(path)
    with pytest.raises(ec.NotAnEventStoreError):
        ec.connect(f"sqlite:///{path}")
    assert _snapshot(path) == before


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ec.NotAnEventStoreError, match="directory"):
        ec.connect(f"sqlite:///{tmp_path}")


# -- eventcore stores from before the application id ------------------------------------------------


def _legacy_store(path):
    """A store as eventcore wrote it at schema 2: no application_id, no ingest_holes or projection tables
    until a projection ran."""
    with ec.connect(f"sqlite:///{path}") as store:
        store.append([ec.emit("s", Noted(text="old"))])
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE ingest_holes")
    conn.execute("DROP TABLE projection_checkpoints")
    conn.execute("DROP TABLE projection_dead_letters")
    conn.execute("PRAGMA application_id = 0")
    conn.execute("PRAGMA user_version = 2")
    conn.close()


def test_a_store_of_an_earlier_schema_is_recognised_and_upgraded(tmp_path, capsys):
    path = tmp_path / "old.db"
    _legacy_store(path)
    before = _snapshot(path)
    with pytest.raises(ec.SchemaVersionError) as info:
        ec.connect(f"sqlite:///{path}", migrate=False)
    assert (info.value.found, info.value.expected) == (2, sqlite_store.SCHEMA_VERSION)
    rc, out, _ = _cli(capsys, "status", "--dsn", f"sqlite:///{path}")
    assert rc == 1 and f"schema version  2 (this eventcore needs {sqlite_store.SCHEMA_VERSION})" in out
    assert "unreachable" not in out
    assert _snapshot(path) == before  # the probes changed nothing
    with ec.connect(f"sqlite:///{path}") as store:  # the default: upgraded in place
        assert [e.data.text for e in store.read_stream("s")] == ["old"]
        store.append([ec.emit("s", Noted(text="new"))])
    rc, out, _ = _cli(capsys, "status", "--dsn", f"sqlite:///{path}")
    assert rc == 0 and out.startswith("OK")
    assert sqlite_store.inspect_file(str(path)) == "store"


def test_a_store_from_a_newer_eventcore_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with ec.connect(f"sqlite:///{path}"):
        pass
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION + 1}")
    conn.close()
    for migrate in (True, False):
        with pytest.raises(ec.SchemaVersionError, match="upgrade eventcore"):
            ec.connect(f"sqlite:///{path}", migrate=migrate)


def test_a_projection_status_of_a_store_opened_read_only_writes_nothing(tmp_path, capsys):
    path = tmp_path / "s.db"
    with ec.connect(f"sqlite:///{path}") as store:
        store.append([ec.emit("s", Noted(text="x"))])
    before = _snapshot(path)
    rc, out, _ = _cli(capsys, "projections", "--dsn", f"sqlite:///{path}")
    assert rc == 0 and "no projectors recorded" in out
    rc, out, _ = _cli(capsys, "tail", "--dsn", f"sqlite:///{path}")
    assert rc == 0 and json.loads(out)["data"] == {"text": "x"}
    assert _snapshot(path)[0] == before[0]


# -- PostgreSQL: a schema that is not there, or not eventcore's --------------------------------------


def _pg_url(pg_dsn, schema):
    return f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={schema}"


def _schema_exists(pg_dsn, schema):
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()[0] == 1


@pytest.mark.parametrize("command", ["status", "tail", "projections"])
def test_read_only_commands_on_a_missing_postgres_schema_create_nothing(pg_dsn, capsys, command):
    schema = f"missing_{uuid.uuid4().hex[:8]}"
    rc, out, err = _cli(capsys, command, "--dsn", _pg_url(pg_dsn, schema))
    assert rc == (1 if command == "status" else 2)
    assert f"schema '{schema}'" in out + err and "does not exist" in out + err
    assert not _schema_exists(pg_dsn, schema)
    if command == "status":
        assert f"schema          {schema}" in out and "store           missing" in out and "unreachable" not in out


def test_connect_without_migrate_to_a_missing_schema_creates_nothing(pg_dsn):
    schema = f"missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ec.StoreNotFoundError, match="does not exist"):
        ec.connect(pg_dsn, schema=schema, migrate=False)
    assert not _schema_exists(pg_dsn, schema)


def test_another_applications_postgres_schema_is_refused(pg_dsn, pg_schema):
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.events (id serial PRIMARY KEY, what text)").format(
            sql.Identifier(pg_schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.schema_migrations (version text PRIMARY KEY)").format(
            sql.Identifier(pg_schema)))

        def objects():
            return conn.execute(
                "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s ORDER BY 1", (pg_schema,)).fetchall(), conn.execute(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
                (pg_schema,)).fetchone()

        before = objects()
        for migrate in (True, False):
            with pytest.raises(ec.NotAnEventStoreError, match="another application"):
                ec.connect(pg_dsn, schema=pg_schema, migrate=migrate)
        assert objects() == before


def test_status_names_the_postgres_schema_it_checked(pg_dsn, pg_schema, capsys):
    ec.connect(pg_dsn, schema=pg_schema).close()
    rc, out, _ = _cli(capsys, "status", "--dsn", _pg_url(pg_dsn, pg_schema))
    assert rc == 0 and f"schema          {pg_schema}" in out


def test_processes_creating_one_new_file_at_once_all_open_it(tmp_path):
    """Several processes connect to a file none has created yet: one creates the store, the others find
    it being created or made, and none takes it for another application's."""
    import multiprocessing

    from domain import deposit_worker

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for attempt in range(8):
            url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
            results = pool.starmap(deposit_worker, [(url, ["a", "b"], 5, w) for w in range(4)])
            assert [ok for ok, _ in results] == [5] * 4
            with ec.connect(url, migrate=False) as store:
                assert store.head_position() == 20


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    for url in (f"sqlite:///{fifo}", "sqlite:////dev/null"):
        for migrate in (True, False):
            with pytest.raises(ec.NotAnEventStoreError, match="not a regular file"):
                ec.connect(url, migrate=migrate)
        rc, out, _ = _cli(capsys, "status", "--dsn", url)
        assert rc == 1 and "not an eventcore store" in out
    assert sorted(os.listdir(tmp_path)) == ["pipe.db"] and not os.path.exists("/dev/null-journal")


def test_many_connections_opening_one_new_file_at_once_all_succeed(tmp_path):
    """Eight store objects (eight connections) open one new file at the same instant, forty times: SQLite
    lets one switch it to WAL and refuses the others without waiting; they try again and open it."""
    import threading

    errors = []
    for attempt in range(40):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        barrier = threading.Barrier(8)

        def open_it():
            barrier.wait()
            try:
                ec.connect(url).close()
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_store_of_an_earlier_schema_holding_read_models_is_recognised(tmp_path):
    """Projections write their read models into the store's own file, and ANALYZE adds its statistics:
    such a store, made before the application id, is still eventcore's and is upgraded."""
    path = tmp_path / "old-with-models.db"
    _legacy_store(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER)")
    conn.execute("CREATE VIEW rich AS SELECT * FROM balances WHERE balance > 100")
    conn.execute("ANALYZE")
    conn.close()
    with ec.connect(f"sqlite:///{path}") as store:
        assert [e.data.text for e in store.read_stream("s")] == ["old"]
    assert sqlite_store.inspect_file(str(path)) == "store"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM balances").fetchone() == (0,)
    conn.close()
