"""PostgreSQL for the tests: EVENTCORE_TEST_DSN when set, else a throwaway cluster for the session.

Under CI=true a missing PostgreSQL fails the run; elsewhere its tests are skipped
with the reason. EVENTCORE_TEST_BACKENDS without `postgres` (optional.py) leaves it out on purpose:
conftest.py deselects the tests it can see need it, and pg_dsn skips the rest.
Each test gets its own schema, so tests never see each other's events.
"""
from __future__ import annotations

import atexit
import os
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

import eventcore as ec
from optional import skip_unless_postgres_selected

_cluster = None
_error: str | None = None


def _start() -> str | None:
    global _cluster, _error
    dsn = os.environ.get("EVENTCORE_TEST_DSN")
    if dsn:
        return dsn
    if _error is not None:
        return None
    try:
        __import__("psycopg")  # the PostgreSQL tests need the driver; say so once if it is missing
        from eventcore.testing.pgcluster import TemporaryCluster

        _cluster = TemporaryCluster(settings={"max_connections": 200})
        atexit.register(_cluster.stop)  # also on an interrupted run
        return _cluster.start()
    except Exception as exc:  # report why, once
        _error = f"{type(exc).__name__}: {exc}"
        _cluster = None
        return None


@pytest.fixture(scope="session")
def pg_dsn():
    skip_unless_postgres_selected()
    dsn = _start()
    if dsn is None:
        message = f"PostgreSQL unavailable (set EVENTCORE_TEST_DSN or install the server binaries): {_error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield dsn
    if _cluster is not None:
        _cluster.stop()


@pytest.fixture
def pg_schema(pg_dsn):
    """A fresh schema name for one test, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def postgres_store(request):
    """Factory for conftest.BACKENDS: a PostgreSQL store in a schema of its own (group commit on, the default)."""
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return ec.connect(dsn, schema=schema, pool_size=20)


def postgres_single_commit_store(request):
    """Factory for conftest.BACKENDS: PostgreSQL with group commit off (one transaction per append)."""
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return ec.connect(dsn, schema=schema, pool_size=20, group_commit=False)


def url_as(dsn: str, user: str, password: str | None) -> str:
    """`dsn` (a URL) connecting as `user` with `password` instead of its own credentials (CI's server
    checks passwords over TCP; the throwaway cluster trusts its socket and ignores them)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    query = "&".join(p for p in parts.query.split("&") if p and p.split("=", 1)[0] not in ("user", "password"))
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}", query=query))
