"""The PostgreSQL backend's SQL, read from the .sql files beside this module (package data).

    migrations/NNNN_*.sql   what each schema version changed in tables, indexes and triggers, in
                            order; the first line says `-- description: ...` (as recorded in
                            schema_migrations). Append-only: never edit one that has shipped.
    functions/NAME.sql      one PL/pgSQL function each, its live definition, as CREATE OR REPLACE
                            (with its REVOKE): migrate re-applies them (see migrations.py).
    queries.sql             every statement the store runs, in `-- name: NAME` sections.

Every file is read once, at import. In their text `{s}` is the schema (quoted with psycopg's
`sql.Identifier` by `q`), `{UPPER_CASE}` one of the constants below, substituted here, and in
queries.sql `{lower_case}` another section (a fragment such as the fence). Every value is a
parameter. Global order and the position fence: see the `fence` section of queries.sql.
"""
from __future__ import annotations

import hashlib
from typing import Any
import re
from importlib import resources

from psycopg import sql as _pgsql

#: Bits of `position` that index an event within its transaction: position = (xid << 20) + ordinal.
POSITION_SHIFT = 20
#: Positions one transaction owns, and the most events it can number (ordinals start at 1).
POSITIONS_PER_TRANSACTION = 1 << POSITION_SHIFT
MAX_EVENTS_PER_TRANSACTION = POSITIONS_PER_TRANSACTION - 1
#: Advisory lock key every append takes (shared; exclusive for a bulk append): 'eventcor' in ASCII.
STORE_LOCK_KEY = int.from_bytes(b"eventcor", "big")
#: An append naming more streams than this takes the store-wide key exclusive instead of one lock
#: per stream (see functions/lock_streams.sql).
BULK_STREAMS = 2048

#: Events a read of one stream fetches by prepared statement before it goes on by COPY, and the size
#: past which a read of several streams marks its longest ones to be read by COPY next time (see
#: PostgresStore._read_stream, _read_streams). Measured here (compiled hot path): the prepared
#: statement starts 0.05-0.1 ms sooner than a COPY and costs ~0.4 us more per event (a libpq value
#: per column, against one message per row), so they break even around 150-250 events; a one-stream
#: read past 256 pays one COPY more (~0.2 ms), which the first 256 events' head start mostly repays.
FIRST_ROWS = 256

#: What `{NAME}` stands for in the .sql files.
CONSTANTS = {
    "POSITION_SHIFT": POSITION_SHIFT,
    "POSITIONS_PER_TRANSACTION": POSITIONS_PER_TRANSACTION,
    "MAX_EVENTS_PER_TRANSACTION": MAX_EVENTS_PER_TRANSACTION,
    "STORE_LOCK_KEY": STORE_LOCK_KEY,
    "BULK_STREAMS": BULK_STREAMS,
    "FIRST_ROWS": FIRST_ROWS,
}

#: SQLSTATE raised by the append function on a version conflict (class "EC": eventcore).
CONFLICT_SQLSTATE = "EC409"
#: SQLSTATEs of arguments the server refuses (a caller bypassing the library, or a second append in one transaction).
BAD_CALL_SQLSTATES = ("EC400", "EC412")
#: SQLSTATE for more events in one transaction than positions allow.
TOO_MANY_SQLSTATE = "EC413"

_FILES = resources.files(__name__)
_CONSTANT = re.compile(r"\{([A-Z][A-Z_]*)\}")


def _read(path) -> str:
    return _CONSTANT.sub(lambda m: str(CONSTANTS[m.group(1)]), path.read_text(encoding="utf-8"))


def _sql_files(folder: str) -> list:
    return sorted((p for p in _FILES.joinpath(folder).iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)


def _migrations() -> list[tuple[int, str, str]]:
    out = []
    for path in _sql_files("migrations"):
        text = _read(path)
        first = text.split("\n", 1)[0]
        if not first.startswith("-- description: "):
            raise RuntimeError(f"eventcore: migration {path.name} does not start with '-- description: '")
        out.append((int(path.name.split("_", 1)[0]), first[len("-- description: "):].strip(), text))
    if [v for v, _, _ in out] != list(range(1, len(out) + 1)):
        raise RuntimeError(f"eventcore: migrations are not numbered 1..{len(out)}: {[v for v, _, _ in out]}")
    return out


def _queries(text: str, fragments: dict | None = None) -> dict[str, str]:
    """`-- name:` sections of a .sql file; `{name}` in one is another's text (or one of `fragments`)."""
    sections: dict[str, list[str]] = {}
    lines = None
    for line in text.splitlines():
        if line.startswith("-- name: "):
            lines = sections.setdefault(line[len("-- name: "):].strip(), [])
        elif lines is not None and line.strip() and not line.lstrip().startswith("--"):
            lines.append(line.rstrip())
    queries = {name: "\n".join(body) for name, body in sections.items()}
    known = {**(fragments or {}), **queries}
    fragment = re.compile(r"\{(" + "|".join(map(re.escape, known)) + r")\}")
    return {name: fragment.sub(lambda m: known[m.group(1)], body) for name, body in queries.items()}


#: (version, description, text): the table changes of each schema version, in order.
MIGRATIONS: list[tuple[int, str, str]] = _migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: Function name -> its file's text (CREATE OR REPLACE ...), in file name order.
FUNCTIONS: dict[str, str] = {p.name[:-len(".sql")]: _read(p) for p in _sql_files("functions")}
#: What migrate records (in schema_migrations' comment) once it has applied FUNCTIONS: when the
#: schema's differs, the functions are applied again.
FUNCTIONS_DIGEST = "eventcore functions sha256:" + hashlib.sha256(
    "".join(f"-- {name}\n{text}\n" for name, text in FUNCTIONS.items()).encode()).hexdigest()
#: Statement name -> text (see queries.sql).
QUERIES: dict[str, str] = _queries(_read(_FILES.joinpath("queries.sql")))
#: Every relation the migrations make, and schema_migrations: a schema holding one of these without
#: eventcore's schema_migrations belongs to another application.
OWN_RELATIONS = sorted({m for _, _, text in MIGRATIONS for m in re.findall(r"CREATE TABLE \{s\}\.(\w+)", text)}
                       | {"schema_migrations"})

#: The columns of a stored event as formats.ROW_COLUMNS reads them, and the feed's visibility fence.
COLUMNS = QUERIES["columns"]
FENCE = QUERIES["fence"]
#: Statement name -> text for the projection storage (see projections.sql; the fragments of queries.sql apply).
PROJECTION_QUERIES: dict[str, str] = _queries(_read(_FILES.joinpath("projections.sql")), QUERIES)

_READ_ALL = {(False, False): "read_all", (True, False): "read_all_by_type", (False, True): "read_all_by_prefix",
             (True, True): "read_all_by_type_and_prefix"}


def q(template: str, schema: str) -> _pgsql.Composed:
    """A statement's text (QUERIES[...] or any text using {s}) with the schema name, quoted."""
    return _pgsql.SQL(template).format(s=_pgsql.Identifier(schema))


def read_all_sql(with_types: bool, with_prefix: bool) -> str:
    """The feed's page query, filtered by type and/or stream id prefix."""
    return QUERIES[_READ_ALL[with_types, with_prefix]]


def copy_read_all_sql(with_types: bool, with_prefix: bool) -> str:
    """`read_all_sql` as the store runs it: a COPY (FORMAT BINARY) for decode_copy (same parameters)."""
    return QUERIES["copy_" + _READ_ALL[with_types, with_prefix]]


def copy_read_columns_sql(with_types: bool, with_prefix: bool, with_data: bool) -> str:
    """`copy_read_all_sql` with read_columns' columns (column_columns, or envelope_columns when no payload
    field is read) in place of copy_columns: the same conditions, order and parameters."""
    text = copy_read_all_sql(with_types, with_prefix)
    columns = QUERIES["copy_columns"]
    if text.count(columns) != 1:
        raise RuntimeError("eventcore: copy_read_all's statements must hold copy_columns once (queries.sql)")
    return text.replace(columns, QUERIES["column_columns" if with_data else "envelope_columns"])


def read_all_params(after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int) -> tuple[Any, ...]:
    """The parameters of `read_all_sql(types is not None, prefix is not None)`, in order."""
    params: list = [after]
    if types is not None:
        params.append(list(types))
    if prefix is not None:
        params.append(prefix)
    params.append(limit)
    return tuple(params)
