"""Connecting to PostgreSQL: a DSN that cannot work fails at the first attempt with libpq's reason
(no password in it) as ec.StoreUnavailableError, and each CLI command prints that reason once.

Later outages are the pool's business (it reconnects by itself): see test_faults.py. Here, a pool
that cannot get a connection says why its latest attempt failed.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

import eventcore as ec
from domain import Deposit
from optional import require
from pgserver import url_as

SECRET = "S3cr3t-pw"
#: Long enough that a pool retrying until it runs out stands out from a failure at the first attempt.
CONNECT_TIMEOUT = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_query(dsn: str, **params) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{dsn}{'&' if '?' in dsn else '?'}{extra}"


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def tcp_server():
    """A server of this module's own listening on 127.0.0.1 (the test cluster has only a Unix socket),
    without SSL, as initdb makes it: postgresql://postgres@127.0.0.1:PORT/postgres."""
    require("psycopg")
    from eventcore.testing.pgcluster import TemporaryCluster

    port = _free_port()
    try:
        cluster = TemporaryCluster(settings={"listen_addresses": "'127.0.0.1'", "port": port, "ssl": "off"})
        cluster.start()
    except ec.StoreUnavailableError as exc:
        pytest.fail(f"PostgreSQL server binaries needed: {exc}", pytrace=False)
    yield f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres"
    cluster.stop()


@pytest.fixture
def bad_dsns(pg_dsn, tcp_server):
    """name -> (DSN that cannot connect, with a secret in it; a pattern of libpq's reason)."""
    role = f"nosuchrole_{uuid.uuid4().hex[:8]}"
    database = f"nosuchdb_{uuid.uuid4().hex[:8]}"
    secret_param = {"sslpassword": SECRET}  # a secret libpq accepts and, without a client key, ignores
    return {
        "wrong-port": (f"postgresql://app:{SECRET}@127.0.0.1:{_free_port()}/db", "Connection refused"),
        # psycopg resolves the name itself: from 3.3 it says "failed to resolve host ...: <the resolver's words>",
        # before that only the resolver's words (glibc's "Name or service not known"); libpq says it its own way.
        # One match per mention: a prefix takes the rest of its line.
        "unknown-host": (f"postgresql://app:{SECRET}@no-such-host.invalid/db",
                         "(?:failed to resolve host|could not translate host name)[^\n]*|Name or service not known"),
        # Under trust: 'role "..." does not exist'; under password authentication the server names the
        # role in 'password authentication failed for user "..."'. Either way, libpq's words.
        "missing-role": (with_query(url_as(pg_dsn, role, SECRET), **secret_param),
                         f'role "{role}" does not exist|password authentication failed for user "{role}"'),
        "missing-database": (with_query(with_database(pg_dsn, database), **secret_param),
                             f'database "{database}" does not exist'),
        "bad-sslmode": (with_query(pg_dsn, sslmode="bogus", **secret_param), 'invalid sslmode value: "bogus"'),
        "ssl-required": (with_query(tcp_server, sslmode="require"), "server does not support SSL"),
    }


CASES = ["wrong-port", "unknown-host", "missing-role", "missing-database", "bad-sslmode", "ssl-required"]


@pytest.mark.parametrize("case", CASES)
def test_a_dsn_that_cannot_connect_fails_at_once_with_libpqs_reason(case, bad_dsns):
    dsn, reason = bad_dsns[case]
    started = time.monotonic()
    with pytest.raises(ec.StoreUnavailableError) as info:
        ec.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    took = time.monotonic() - started
    message = str(info.value)
    assert re.search(reason, message) and message.startswith("cannot connect to PostgreSQL at postgresql://"), message
    assert SECRET not in message and "\n" not in message, message
    assert not info.value.maybe_committed
    # Not the pool's retries until connect_timeout: one attempt (libpq's own timeouts never come into play).
    assert took < CONNECT_TIMEOUT / 2, (took, message)


def _cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eventcore", *argv], capture_output=True, text=True, timeout=120,
                          input=stdin)


@pytest.mark.parametrize("case", CASES)
def test_status_prints_the_reason_once(case, bad_dsns):
    dsn, reason = bad_dsns[case]
    proc = _cli("status", "--dsn", with_query(dsn, connect_timeout=CONNECT_TIMEOUT))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert len(re.findall(reason, said)) == 1 and SECRET not in said, said
    assert proc.stderr == "", said  # the report is the output; no log line besides it
    assert "  error           cannot connect to PostgreSQL at postgresql://" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["migrate"], ["tail"], ["projections"], ["status", "--json"], ["ingest", "-"],
    ["bench", "deposit", "--backend", "postgres", "--ops", "5", "--no-progress"],
], ids=["migrate", "tail", "projections", "status-json", "ingest", "bench"])
def test_every_command_prints_the_reason_once(argv, bad_dsns, tmp_path):
    dsn, reason = bad_dsns["missing-database"]
    if argv[0] == "ingest":
        lines = tmp_path / "in.jsonl"
        lines.write_text(json.dumps({"stream": "s-1", "type": "t.Happened", "data": {}}) + "\n")
        argv = ["ingest", str(lines)]
    proc = _cli(*argv, "--dsn", with_query(dsn, connect_timeout=CONNECT_TIMEOUT))
    said = proc.stdout + proc.stderr
    if "--json" in argv:
        said = json.loads(proc.stdout)["error"] + proc.stderr
    assert proc.returncode == (1 if argv[0] == "status" else 2), said
    assert len(re.findall(reason, said)) == 1 and SECRET not in said, said
    assert "Traceback" not in said
    if argv[0] != "status":
        assert proc.stderr.startswith(f"eventcore {argv[0]}: error: cannot connect to PostgreSQL at ")
        assert proc.stderr.count("\n") == 1, said


def test_the_first_connection_becomes_the_pools(pg_dsn, pg_schema):
    """The connection that migrated is the pool's first, with the pool's settings (a URL's
    application_name, eventcore's statement_timeout), warmed up like any other: one connection made."""
    store = ec.connect(with_query(pg_dsn, application_name="probe-app"), schema=pg_schema, statement_timeout=7)
    try:
        stats = store.pool_stats()
        assert (stats["connections_num"], stats["size"]) == (1, 1)
        with store._pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "7s"
            assert conn.execute("SHOW application_name").fetchone()[0] == "probe-app"
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] >= 3  # warmed up
        ec.execute(store, Deposit(ec.StreamId("first-1"), 5))
        assert store.pool_stats()["connections_num"] == 1
    finally:
        store.close()


def test_a_pool_without_connections_says_why_its_last_attempt_failed(pg_dsn, pg_schema):
    """After the first connection, a pool whose server refuses new connections: the caller waiting on it
    gets pool_timeout's error with the server's reason, not only that the wait timed out."""
    import psycopg
    from psycopg import sql

    from eventcore.stores.postgres import least_privilege_grants

    role = f"limited_{uuid.uuid4().hex[:8]}"
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:  # superusers are exempt from connection limits
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1 PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(SECRET)))
        for grant in least_privilege_grants(pg_schema, role):
            admin.execute(grant)
    try:
        store = ec.connect(url_as(pg_dsn, role, SECRET), schema=pg_schema, migrate=False, pool_min_size=1,
                           pool_size=2, pool_timeout=2, connect_timeout=2)
        try:
            with store._pool.connection():  # the one connection the role may hold, taken
                with pytest.raises(ec.StoreUnavailableError) as info:
                    store.head_position()
        finally:
            store.close()
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    message = str(info.value)
    assert message.startswith("PostgreSQL read failed: no connection within 2.0s; the last attempt failed ")
    assert f'too many connections for role "{role}"' in message and SECRET not in message, message


def test_a_parameter_libpq_refuses_is_a_one_line_error(pg_dsn):
    from eventcore.stores.postgres import PostgresStore

    with pytest.raises(ec.ValidationError) as info:
        ec.connect(with_query(pg_dsn, bogus=1, password=SECRET))
    message = str(info.value)
    assert 'invalid URI query parameter: "bogus"' in message and "\n" not in message and SECRET not in message
    with pytest.raises(ec.ValidationError) as info:
        PostgresStore(f"host=/nowhere bogus=1 password={SECRET}")
    message = str(info.value)
    assert 'invalid connection option "bogus"' in message and "\n" not in message and SECRET not in message


def test_migrating_without_the_owners_rights_says_what_to_do(pg_dsn, pg_schema):
    import psycopg
    from psycopg import sql

    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(SECRET)))
    try:
        with pytest.raises(ec.StoreUnavailableError) as info:
            ec.connect(url_as(pg_dsn, role, SECRET), schema=pg_schema)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    message = str(info.value)
    assert message.startswith(f"migration of schema {pg_schema!r} failed: permission denied"), message
    assert "run `eventcore migrate --dsn URL` as the owner" in message and "migrate=false" in message


def test_a_projection_that_cannot_connect_says_why_on_one_line(pg_dsn, pg_schema):
    """A projector's own connection, made after the store's, to a server that is no longer where it was."""
    store = ec.connect(pg_dsn, schema=pg_schema)
    try:
        store._dsn = f"postgresql://app:{SECRET}@127.0.0.1:{_free_port()}/db"  # the server moved away
        with pytest.raises(ec.StoreUnavailableError) as info:
            store._projection_storage().session("balances").open()
    finally:
        store.close()
    message = str(info.value)
    assert message.startswith("projection 'balances' cannot connect to postgresql://app:***@127.0.0.1:"), message
    assert "Connection refused" in message and "\n" not in message and SECRET not in message
