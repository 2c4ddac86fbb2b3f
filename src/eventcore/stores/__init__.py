"""Store backends and `connect(url)`, which picks one from the URL scheme.

memory://                 in-process, for tests
sqlite:///relative.db     embedded default (sqlite:////absolute/path.db for an absolute path)
postgresql://...          production (its own package, stores/postgres/, imported only when asked for)
host=... dbname=...       libpq's key=value form, as psycopg takes it: PostgreSQL too
"""
from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, TypedDict
from urllib.parse import parse_qsl, urlsplit

from ..errors import ValidationError
from ..options import boolean
from .base import EventStore
from .dsn import check_url, redact, without_secrets
from .observer import StoreObserver

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: libpq's key=value connection string ("host=/tmp dbname=bank"): a keyword, optional blanks, '='.
_KEY_VALUE = re.compile(r"\s*[A-Za-z_]+\s*=")

# scheme -> (module, class); imported lazily so a backend's driver is needed only when used.
_BACKENDS = {
    "memory": ("eventcore.stores.memory", "MemoryStore"),
    "sqlite": ("eventcore.stores.sqlite", "SQLiteStore"),
    "postgresql": ("eventcore.stores.postgres", "PostgresStore"),
    "postgres": ("eventcore.stores.postgres", "PostgresStore"),
}


class ConnectOptions(TypedDict, total=False):
    """The keyword options of `connect` (each may also be given in the URL's query, as text).

    A type checker reports a misspelt or mistyped one; at run time a store refuses an option its
    backend does not know with a ValidationError that lists the ones it does."""

    #: Every backend: create the store if there is none and upgrade its schema (default True).
    migrate: bool
    #: SQLite: seconds to wait for another writer's lock (default 10).
    timeout: float
    #: SQLite: PRAGMA synchronous, "off", "normal", "full" (the default) or "extra".
    synchronous: str
    #: PostgreSQL: the schema holding the store's tables (default "eventcore").
    schema: str
    #: PostgreSQL: the connection pool's largest and smallest size.
    pool_size: int
    pool_min_size: int
    #: PostgreSQL: seconds to connect, per statement (0: no limit) and to wait for a pooled connection.
    connect_timeout: float
    statement_timeout: float
    pool_timeout: float
    #: PostgreSQL: share one transaction among concurrent single appends (default True).
    group_commit: bool


def connect(url: str, *, metrics: StoreObserver | None = None, **options: Unpack[ConnectOptions]) -> EventStore:
    """Open the store a URL names. Options come from the URL query and/or keyword arguments (which win).

    `migrate` (every backend, default True): create the store if there is none and upgrade its schema.
    With migrate=False nothing is created or changed: a missing store is StoreNotFoundError, a schema
    at another version SchemaVersionError. Either way, something that is not an eventcore store (another
    application's SQLite file or PostgreSQL schema) is NotAnEventStoreError and is left as it was.

    `metrics`: an `ec.MetricsCollector` to attach to the store (see `EventStore.attach`).

    >>> store = connect("sqlite:///bank.db")             # doctest: +SKIP
    >>> store = connect("sqlite:///bank.db?synchronous=normal&timeout=5")  # doctest: +SKIP
    >>> store = connect("host=/var/run/postgresql dbname=bank", schema="bank")  # doctest: +SKIP

    libpq's key=value form opens a PostgreSQL store, as psycopg.connect takes it; eventcore's own
    options are keyword arguments then (libpq refuses keys it does not know).
    """
    scheme = backend_of_url(url)
    store = _open(url, scheme, *_BACKENDS[scheme], options)
    if metrics is not None:
        try:
            store.attach(metrics)
        except BaseException:
            store.close()
            raise
    return store


def backend_of_url(url: object) -> str:
    """The scheme of the backend a store URL names ("memory", "sqlite" or "postgresql"; libpq's
    key=value form is PostgreSQL), the URL checked: what is wrong with it is a ValidationError."""
    if isinstance(url, str) and "://" not in url and _KEY_VALUE.match(url):
        return "postgresql"
    if not isinstance(url, str) or "://" not in url:
        # Not quoted when it may hold a password (libpq's key=value form: host=... password=...).
        shown = "a key=value string" if isinstance(url, str) and "password" in url.lower() else repr(url)
        raise ValidationError(
            f"store URL must look like memory://, sqlite:///path.db, postgresql://... or libpq's host=... "
            f"dbname=..., got {shown}"
        )
    scheme = url.split("://", 1)[0].lower()
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise ValidationError(f"unknown store scheme {scheme!r}; supported: memory, sqlite, postgresql")
    if backend[0] == "eventcore.stores.postgres":
        check_url(url)
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # libpq's multi-host URLs (h1:5432,h2:5433) have no single port
            parts.port  # noqa: B018 - raises ValueError unless a number in 0..65535
    except ValueError as exc:
        # urllib's message may quote the netloc, or the part of it it took for a host or a port.
        raise ValidationError(f"malformed {scheme}:// URL: {without_secrets(str(exc), url)}") from None
    return "postgresql" if scheme == "postgres" else scheme


#: How to install the PostgreSQL driver, as the errors of a missing one say it.
INSTALL_POSTGRES = ("pip install 'pyeventcore[postgres]' (psycopg compiled against libpq: needs pg_config and a C "
                    "compiler) or 'pyeventcore[postgres-binary]' (psycopg's prebuilt binary)")


def _open(url: str, scheme: str, module_name: str, class_name: str, options: ConnectOptions) -> EventStore:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValidationError(f"the {scheme} backend is not available in this version of eventcore") from None
        raise ImportError(f"the {scheme} backend needs {exc.name!r}: {INSTALL_POSTGRES}") from exc
    cls = getattr(module, class_name)
    if scheme == "memory":
        if url.split("://", 1)[1].strip("/"):
            raise ValidationError(f"memory:// takes no path or options, got {redact(url)!r}")
        unknown = set(options) - {"migrate"}
        if unknown:
            raise ValidationError(f"unknown memory option(s) {sorted(unknown)}; known: migrate")
        boolean("migrate", options.get("migrate", True))  # accepted for every backend; a memory store is always new
        return cls()
    if scheme == "sqlite":
        parts = urlsplit(url, allow_fragments=False)  # '#' is a character of the file name, not a fragment
        if parts.netloc:
            raise ValidationError(
                f"sqlite URLs have no host: use sqlite:///relative/path.db or sqlite:////absolute/path.db, "
                f"got {redact(url)!r}"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        merged = dict(parse_qsl(parts.query, keep_blank_values=True))
        merged.update(options)
        unknown = set(merged) - {"timeout", "synchronous", "migrate"}
        if unknown:
            raise ValidationError(f"unknown sqlite option(s) {sorted(unknown)}; known: migrate, synchronous, timeout")
        return cls(path, **merged)
    return cls.from_url(url, **options)
