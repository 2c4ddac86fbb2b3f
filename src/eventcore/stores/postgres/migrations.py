"""Creating and upgrading a store's schema, and checking it: the PostgreSQL side of `migrate`.

A migration run, under a transaction-scoped advisory lock (concurrent runs take turns):
create the schema and schema_migrations if missing, apply every function (functions/*.sql,
CREATE OR REPLACE: grants on them survive), then the pending migrations (table changes; the
triggers they make call those functions, so the functions come first, in a new schema and in
an old one alike), then record the functions' digest as schema_migrations' comment and, after
an upgrade, grant the application roles what the new version needs.

Functions are applied again only when they may differ from this eventcore's: a migration is
pending, the recorded digest is not FUNCTIONS_DIGEST, or the caller asks (`eventcore migrate`
always does). The digest is read with the version, so a store connecting to a current schema
runs SELECTs only, no DDL, and a role without the owner's rights (no CREATE) connects with the
default migrate=True. The
digest lives in the catalog, not in a table, so recording it needs no new schema version.

CREATE OR REPLACE cannot change a function's argument or result types: such a change is a new
function (its own file, applied before the migrations) and a migration that drops the old one.
"""
from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pgsql

from ...errors import EventCoreError, NotAnEventStoreError, SchemaVersionError, StoreNotFoundError, \
    StoreUnavailableError
from .connections import _one_line
from .sql import FUNCTIONS, FUNCTIONS_DIGEST, MIGRATIONS, OWN_RELATIONS, QUERIES, SCHEMA_VERSION, q

log: logging.Logger = logging.getLogger("eventcore.store.postgres")

#: The columns of eventcore's schema_migrations (queries.sql: create_migrations), sorted.
MIGRATIONS_COLUMNS = ["applied_at", "description", "version"]
#: The functions of a schema migrated to the current version before digests were recorded (no comment on
#: schema_migrations): those of the migrations of that time, which are today's files up to comments and
#: layout (tests/test_pg_schema.py compares them). While FUNCTIONS_DIGEST is this, such a schema is current.
UNRECORDED_DIGEST = "eventcore functions sha256:7d315834ed2183b86d22c3bd80f7d97e47a664d127f769fe3ee557eef112ee16"


def least_privilege_grants(schema: str, role: str) -> list[pgsql.Composed]:
    """What an application role needs to append and read, and nothing more (see queries.sql).

    It may SELECT and INSERT events (never UPDATE, DELETE or TRUNCATE them), read
    stream heads and call the append function, which moves the heads with its
    owner's rights (SECURITY DEFINER), and run projections (their checkpoints and
    dead letters). Migrations need the schema owner.
    """
    s, r = pgsql.Identifier(schema), pgsql.Identifier(role)
    return [pgsql.SQL(line.rstrip(";")).format(s=s, role=r)
            for line in QUERIES["least_privilege_grants"].splitlines()]


def _functions_current(version: int, recorded: str | None) -> bool:
    if recorded is None and version == SCHEMA_VERSION:
        recorded = UNRECORDED_DIGEST
    return recorded == FUNCTIONS_DIGEST


def migrate(conn: psycopg.Connection[Any], schema: str, dsn: str, *, reapply_functions: bool = False) -> int:
    """Apply pending migrations, and the functions when they may differ (always with `reapply_functions`).

    Returns the schema version now in place.
    """
    s = schema
    table = pgsql.Identifier(s, "schema_migrations").as_string(conn)
    try:
        with conn.transaction():
            conn.execute(QUERIES["migration_lock"], (f"eventcore.migrate:{s}",), prepare=False)
            # Another application's schema is refused before anything is made. A current schema
            # needs no DDL at all: a role with only the application's rights (no CREATE on the
            # database, which even CREATE SCHEMA IF NOT EXISTS asks for) connects with the default.
            if schema_state(conn, s) == "store" and not reapply_functions:
                version, recorded = conn.execute(q(QUERIES["migration_state"], s), (table,),
                                                 prepare=False).fetchone()
                if version == SCHEMA_VERSION and _functions_current(version, recorded):
                    return SCHEMA_VERSION
            conn.execute(q(QUERIES["create_schema"], s), prepare=False)
            conn.execute(q(QUERIES["create_migrations"], s), prepare=False)
            current = conn.execute(q(QUERIES["current_version"], s), prepare=False).fetchone()[0]
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"schema {s!r} is at version {current}, newer than this eventcore "
                    f"understands ({SCHEMA_VERSION}); upgrade eventcore", current, SCHEMA_VERSION
                )
            log.info("schema %r: applying %d functions", s, len(FUNCTIONS))
            for text in FUNCTIONS.values():
                conn.execute(q(text, s), prepare=False)
            for version, description, body in MIGRATIONS:
                if version > current:
                    log.info("schema %r: applying migration %d (%s)", s, version, description)
                    conn.execute(q(body, s), prepare=False)
                    conn.execute(q(QUERIES["record_migration"], s), (version, description), prepare=False)
            conn.execute(pgsql.SQL(QUERIES["record_functions"]).format(
                s=pgsql.Identifier(s), digest=pgsql.Literal(FUNCTIONS_DIGEST)), prepare=False)
            if 0 < current < SCHEMA_VERSION:
                regrant(conn, s)
        return SCHEMA_VERSION
    except EventCoreError:
        raise
    except pg_errors.InsufficientPrivilege as exc:
        raise StoreUnavailableError(
            f"migration of schema {s!r} failed: {_one_line(exc, dsn)} (migrations need the rights of the "
            "schema's owner: run `eventcore migrate --dsn URL` as the owner, and connect roles with fewer "
            "rights with migrate=false)") from exc
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"migration of schema {s!r} failed: {exc}") from exc


def regrant(conn: psycopg.Connection[Any], schema: str) -> None:
    """After an upgrade: application roles (those, other than the owner, that may INSERT events)
    get least_privilege_grants again, so they can use the new tables (e.g. migration 4's
    command_keys and ingest_progress) without an administrator re-running the grants."""
    events = pgsql.Identifier(schema, "events").as_string(conn)
    roles = [r[0] for r in conn.execute(QUERIES["application_roles"], (events, events), prepare=False)]
    for role in roles:
        log.info("schema %r: granting role %r what the new schema version needs", schema, role)
        for statement in least_privilege_grants(schema, role):
            conn.execute(statement, prepare=False)


def schema_state(conn: psycopg.Connection[Any], schema: str) -> str:
    """"missing" (no such schema), "empty" (a schema without eventcore's tables) or "store"; another
    application's schema (one of eventcore's table names, but not eventcore's schema_migrations)
    raises NotAnEventStoreError."""
    exists, own, columns = conn.execute(QUERIES["schema_state"], (OWN_RELATIONS, schema), prepare=False).fetchone()
    if not exists:
        return "missing"
    if columns == MIGRATIONS_COLUMNS:
        return "store"
    if own:
        raise NotAnEventStoreError(
            f"schema {schema!r} holds another application's tables ({', '.join(own)}), not an eventcore "
            "store; eventcore refuses it and changed nothing (choose another schema with ?schema=NAME)")
    return "empty"


def schema_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The migration version of the schema (0: not created)."""
    try:
        if schema_state(conn, schema) != "store":
            return 0
        return conn.execute(q(QUERIES["current_version"], schema), prepare=False).fetchone()[0]
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"cannot read the schema version: {exc}") from exc


def check_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """For a store opened with migrate=False: the schema must exist, be eventcore's and be current.
    Functions that differ from this eventcore's are only logged: nothing is changed."""
    try:
        state = schema_state(conn, schema)
        if state != "store":
            raise StoreNotFoundError(
                f"no eventcore store in schema {schema!r}: "
                + ("the schema does not exist" if state == "missing" else "the schema holds none of its tables")
                + " (nothing was created; `eventcore migrate --dsn URL`, as the schema owner, creates it)")
        table = pgsql.Identifier(schema, "schema_migrations").as_string(conn)
        version, recorded = conn.execute(q(QUERIES["migration_state"], schema), (table,), prepare=False).fetchone()
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"cannot read the schema version: {exc}") from exc
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {version}, this eventcore needs {SCHEMA_VERSION}: "
            + ("upgrade eventcore" if version > SCHEMA_VERSION
               else "run `eventcore migrate --dsn URL` as the schema owner"), version, SCHEMA_VERSION)
    if not _functions_current(version, recorded):
        log.warning("schema %r: its functions are not this eventcore's; run `eventcore migrate --dsn URL` as the "
                    "schema owner", schema)
