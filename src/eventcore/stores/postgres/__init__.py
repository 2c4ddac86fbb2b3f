"""The PostgreSQL backend (`postgresql://...`), the production store.

    store.py         PostgresStore: appends, reads, the batch writer's transaction, errors
    group_commit.py  appends from concurrent threads sharing one transaction
    copy_writer.py   the binary COPY fill loop of append_batch and ingest
    watchdog.py      the client-side deadline of every call
    connections.py   how connections are made, and what a failed one means
    migrations.py    creating, upgrading and checking the schema; least_privilege_grants
    sql/             the SQL: migrations (tables), functions (one file each), queries
"""
from __future__ import annotations

try:
    import psycopg
    import psycopg_pool
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    from .. import INSTALL_POSTGRES

    raise ImportError(f"the PostgreSQL backend needs psycopg 3 and psycopg_pool: {INSTALL_POSTGRES}") from exc
del psycopg, psycopg_pool

# Redaction lives in a module without a driver (the CLI shows URLs of every backend); it is offered here too.
from .. import dsn as _dsn
from ..dsn import DEFAULT_SCHEMA, redact
from .connections import KEEPALIVES, RECONNECT_TIMEOUT
from .migrations import least_privilege_grants
from .sql import MAX_EVENTS_PER_TRANSACTION, POSITION_SHIFT, SCHEMA_VERSION
from .store import DEFAULT_POOL_SIZE, MAX_STATEMENT_TIMEOUT, PostgresStore

_without_secrets = _dsn.without_secrets

__all__ = [
    "DEFAULT_POOL_SIZE", "DEFAULT_SCHEMA", "KEEPALIVES", "MAX_EVENTS_PER_TRANSACTION", "MAX_STATEMENT_TIMEOUT",
    "POSITION_SHIFT", "RECONNECT_TIMEOUT", "SCHEMA_VERSION", "PostgresStore", "least_privilege_grants", "redact",
]
