"""The PostgreSQL schema as package data: every function defined once, the position constant
written once, a fresh schema and an upgraded one the same, and functions re-applied only when
they may differ (a current schema takes no DDL when a store connects)."""
from __future__ import annotations

import re
from importlib import resources

import pytest

import eventcore as ec
from optional import require

psycopg = require("psycopg")
from psycopg import sql  # noqa: E402

import pg_legacy  # noqa: E402
from eventcore.stores.prepare import prepare_append  # noqa: E402
from eventcore.stores.postgres import least_privilege_grants  # noqa: E402
from eventcore.stores.postgres import migrations  # noqa: E402
from eventcore.stores.postgres import sql as pg_sql  # noqa: E402
from eventcore.stores.postgres.group_commit import _encode_group  # noqa: E402


class Deposited(ec.Event):
    __event_type__ = "pgschema.Deposited"
    amount: int


def _sql_files() -> dict[str, str]:
    """Every .sql file of the package, by its path below sql/, as written (placeholders unsubstituted)."""
    out = {}
    root = resources.files(pg_sql)

    def walk(folder, prefix):
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".sql"):
                out[prefix + entry.name] = entry.read_text(encoding="utf-8")

    walk(root, "")
    return out


_DEFINES = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+\{s\}\.(\w+)\s*\(", re.I)


def test_every_function_is_defined_in_exactly_one_sql_file_named_after_it():
    files = _sql_files()
    assert {"queries.sql"} < set(files) and any(p.startswith("migrations/") for p in files)
    defined: dict[str, list[str]] = {}
    for path, text in files.items():
        for name in _DEFINES.findall(text):
            defined.setdefault(name, []).append(path)
    assert defined and all(paths == [f"functions/{name}.sql"] for name, paths in defined.items()), defined
    assert set(defined) == set(pg_sql.FUNCTIONS)
    for name, text in pg_sql.FUNCTIONS.items():
        assert re.search(r"CREATE OR REPLACE FUNCTION \{s\}\." + name + r"\(", text), name
    # and no Python module of the backend carries a function body any more
    package = resources.files("eventcore.stores.postgres")
    modules = [p for p in package.iterdir() if p.name.endswith(".py")]
    assert any(p.name == "projections.py" for p in modules)
    for path in modules:
        assert not _DEFINES.search(path.read_text(encoding="utf-8")), path.name


def test_migrations_make_tables_and_triggers_only():
    for version, description, text in pg_sql.MIGRATIONS:
        assert description and not re.search(r"CREATE\s+(OR\s+REPLACE\s+)?FUNCTION|ALTER\s+FUNCTION", text, re.I), \
            version
    # The record of what earlier eventcores applied covers the versions made before function files.
    legacy = len(pg_legacy.MIGRATIONS)
    assert [v for v, _, _ in pg_sql.MIGRATIONS][:legacy] == [v for v, _, _ in pg_legacy.MIGRATIONS]
    assert [d for _, d, _ in pg_sql.MIGRATIONS][:legacy] == [d for _, d, _ in pg_legacy.MIGRATIONS]


def test_the_position_shift_is_written_once():
    """The fence, the functions and the table comments take POSITION_SHIFT and its derived limits
    from one Python constant; no .sql file spells them out."""
    for path, text in _sql_files().items():
        for literal in ("<< 20", "1048575", "1048576", "1,048,575", "7311142570156060530"):
            assert literal not in text, (path, literal)
    assert pg_sql.POSITION_SHIFT == 20 and pg_sql.MAX_EVENTS_PER_TRANSACTION == 2**20 - 1
    assert pg_sql.FENCE.endswith(f"<< {pg_sql.POSITION_SHIFT})")
    assert f"<< {pg_sql.POSITION_SHIFT}" in pg_sql.FUNCTIONS["append_group"]
    assert str(pg_sql.MAX_EVENTS_PER_TRANSACTION) in pg_sql.FUNCTIONS["reserve_append"]


def test_every_statement_renders_with_the_schema_alone():
    texts = list(pg_sql.QUERIES.values()) + list(pg_sql.FUNCTIONS.values()) + [t for _, _, t in pg_sql.MIGRATIONS]
    for text in texts:
        leftover = set(re.findall(r"\{(\w+)\}", text)) - {"s"}
        if leftover:  # the two statements psycopg fills with more than the schema
            assert leftover in ({"digest"}, {"role"}), leftover
            continue
        rendered = pg_sql.q(text, "we'ird").as_string(None)
        assert ("{s}" in text) == ('"we\'ird"' in rendered) and "{" not in rendered.replace("{}", ""), text


def _catalog(conn, schema: str) -> dict:
    """What a schema is made of, from pg_catalog, with its name replaced by <schema>."""
    ns = "(SELECT oid FROM pg_namespace WHERE nspname = %(s)s)"
    queries = {
        "relations": f"SELECT relname, relkind, relpersistence, coalesce(relacl::text, '') FROM pg_class "
                     f"WHERE relnamespace = {ns}",
        "columns": "SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
                   "coalesce(pg_get_expr(d.adbin, d.adrelid), '') FROM pg_attribute a "
                   "JOIN pg_class c ON c.oid = a.attrelid "
                   "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                   f"WHERE c.relnamespace = {ns} AND a.attnum > 0 AND NOT a.attisdropped",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s",
        "constraints": "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid), condeferrable, "
                       f"condeferred FROM pg_constraint WHERE connamespace = {ns}",
        "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled FROM pg_trigger "
                    f"WHERE tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = {ns})",
        "functions": "SELECT proname, pg_get_function_identity_arguments(oid), pg_get_functiondef(oid), "
                     f"coalesce(proacl::text, '') FROM pg_proc WHERE pronamespace = {ns}",
        "comments": "SELECT objoid::regclass::text, description FROM pg_description "
                    f"WHERE classoid = 'pg_class'::regclass AND objoid IN (SELECT oid FROM pg_class "
                    f"WHERE relnamespace = {ns})",
    }
    out = {}
    for key, query in queries.items():
        out[key] = sorted(tuple(v.replace(schema, "<schema>") if isinstance(v, str) else v for v in row)
                          for row in conn.execute(query, {"s": schema}).fetchall())
    out["migrations"] = conn.execute(sql.SQL("SELECT version, description FROM {}.schema_migrations ORDER BY 1").format(
        sql.Identifier(schema))).fetchall()
    return out


def _append_doc(stream: str, amount: int, expected: int, key: str | None = None) -> str:
    p = prepare_append([ec.emit(stream, Deposited(amount))], {stream: expected}, None)
    p.key = key
    return _encode_group([p])


def test_a_fresh_schema_and_one_upgraded_from_version_4_with_data_are_the_same(pg_dsn, pg_schema):
    legacy = pg_schema + "_v4"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg_legacy.make(conn, legacy, 4)
        s = sql.Identifier(legacy)
        # data written by eventcore 4's own functions: appends (one with an idempotency key), a
        # resumable ingest's progress, a projector's checkpoint
        call = sql.SQL("SELECT * FROM {}.append_group(%s::jsonb)").format(s)
        for amount, expected, key in ((1, ec.NO_STREAM, None), (2, 1, "deposit-2"), (3, 2, None)):
            conn.execute(call, (_append_doc("acct-1", amount, expected, key),))
        conn.execute(call, (_append_doc("acct-2", 10, ec.NO_STREAM),))
        conn.execute(sql.SQL("INSERT INTO {}.ingest_progress (key, lane, lanes, items) VALUES ('run', 0, 1, 7)")
                     .format(s))
        conn.execute(sql.SQL("INSERT INTO {}.projection_checkpoints (name, position) VALUES ('balances', 1)")
                     .format(s))
    try:
        with ec.connect(pg_dsn, schema=legacy) as upgraded:  # the owner upgrades
            assert upgraded.schema_version() == pg_sql.SCHEMA_VERSION
            assert [e.data.amount for e in upgraded.read_stream("acct-1")] == [1, 2, 3]
            assert [e.version for e in upgraded.read_all()] == [1, 2, 3, 1]
            upgraded.append([ec.emit("acct-1", Deposited(4))], {"acct-1": 3})
            with pytest.raises(ec.DuplicateCommandError):
                upgraded.append([ec.emit("acct-1", Deposited(2))], idempotency_key="deposit-2")
            result = upgraded.append_batch([ec.emit("acct-2", Deposited(k)) for k in range(5)], {"acct-2": 1})
            assert result.stream_versions == {"acct-2": 6}
            assert upgraded._ingest_progress("run") == {0: (1, 7)}
            positions = [e.position for e in upgraded.read_all()]
            assert positions == sorted(positions) and len(positions) == 10
        with ec.connect(pg_dsn, schema=pg_schema):  # a fresh schema
            pass
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            fresh, upgraded = _catalog(conn, pg_schema), _catalog(conn, legacy)
        assert fresh["functions"] and fresh["triggers"] and fresh["indexes"]
        for part in fresh:
            assert upgraded[part] == fresh[part], part
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(legacy)))


def _function_rows(conn, schema: str) -> dict:
    """Each function's signature, attributes and body without comments or layout, by name."""
    rows = conn.execute(
        "SELECT proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid), prosecdef, "
        "proconfig, provolatile, coalesce(proacl::text, ''), prosrc FROM pg_proc p "
        "WHERE pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = %s)", (schema,)).fetchall()
    return {r[0]: r[1:-1] + (" ".join(re.sub(r"--[^\n]*", "", r[-1].replace(schema, "<schema>")).split()),)
            for r in rows}


def _function_versions(conn, schema: str) -> dict:
    """Each function's row version in pg_proc: it changes whenever the function is (re)defined."""
    return dict(conn.execute(
        "SELECT proname, xmin::text FROM pg_proc WHERE pronamespace = (SELECT oid FROM pg_namespace "
        "WHERE nspname = %s)", (schema,)).fetchall())


def test_a_schema_an_earlier_eventcore_migrated_to_the_current_version_is_current(pg_dsn, pg_schema):
    """Schemas migrated before function digests were recorded carry none. While the current version is
    theirs, their functions are today's up to comments and layout, so connecting changes nothing. Once
    a later version exists, the owner's migrate brings them to it (and records the digest); from then on
    an application role connects with the default migrate=True and changes nothing."""
    import uuid

    from pgserver import url_as

    fresh = pg_schema + "_fresh"
    role, password = f"app_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    ec.connect(pg_dsn, schema=fresh).close()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            pg_legacy.make(admin, pg_schema, len(pg_legacy.MIGRATIONS))
            if pg_sql.FUNCTIONS_DIGEST == migrations.UNRECORDED_DIGEST:
                assert _function_rows(admin, pg_schema) == _function_rows(admin, fresh)
            if pg_sql.SCHEMA_VERSION > len(pg_legacy.MIGRATIONS):
                ec.connect(pg_dsn, schema=pg_schema).close()  # the owner migrates it
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                             sql.Literal(password)))
            for statement in least_privilege_grants(pg_schema, role):
                admin.execute(statement)
            before = _function_versions(admin, pg_schema)
        with ec.connect(url_as(pg_dsn, role, password), schema=pg_schema) as app:  # migrate=True, the default
            app.append([ec.emit("v5", Deposited(1))])
            assert [e.data.amount for e in app.read_stream("v5")] == [1]
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            assert _function_versions(admin, pg_schema) == before
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(fresh)))
            if admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]:
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_functions_are_applied_again_only_when_they_may_differ(pg_dsn, pg_schema, capsys):
    from eventcore.cli import main

    s = sql.Identifier(pg_schema)
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        made = _function_versions(conn, pg_schema)
        assert set(made) == set(pg_sql.FUNCTIONS)
        assert conn.execute("SELECT obj_description(%s::regclass, 'pg_class')",
                            (f"{s.as_string(conn)}.schema_migrations",)).fetchone()[0] == pg_sql.FUNCTIONS_DIGEST

    ec.connect(pg_dsn, schema=pg_schema).close()  # current: nothing is applied
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert _function_versions(conn, pg_schema) == made
        # a function changed by hand, and a digest that is not this eventcore's
        conn.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}.notify_events() RETURNS trigger LANGUAGE plpgsql "
                             "AS $$ BEGIN RETURN NULL; END $$").format(s))
        conn.execute(sql.SQL("COMMENT ON TABLE {}.schema_migrations IS 'eventcore functions sha256:other'").format(s))

    ec.connect(pg_dsn, schema=pg_schema).close()  # the digest differs: the owner's connect applies them all
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        applied = _function_versions(conn, pg_schema)
        assert all(applied[name] != made[name] for name in made)
        assert "pg_notify" in conn.execute(sql.SQL("SELECT prosrc FROM pg_proc WHERE oid = {}::regprocedure").format(
            sql.Literal(f"{s.as_string(conn)}.notify_events()"))).fetchone()[0]
        # changed by hand again, digest left as recorded: connecting does not see it ...
        conn.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}.notify_events() RETURNS trigger LANGUAGE plpgsql "
                             "AS $$ BEGIN RETURN NULL; END $$").format(s))
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert "pg_notify" not in conn.execute(sql.SQL("SELECT prosrc FROM pg_proc WHERE oid = {}::regprocedure").format(
            sql.Literal(f"{s.as_string(conn)}.notify_events()"))).fetchone()[0]
    # ... `eventcore migrate` always applies them
    assert main(["migrate", "--dsn", pg_dsn, "--schema", pg_schema]) == 0
    assert f"at version {pg_sql.SCHEMA_VERSION}" in capsys.readouterr().out
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert "pg_notify" in conn.execute(sql.SQL("SELECT prosrc FROM pg_proc WHERE oid = {}::regprocedure").format(
            sql.Literal(f"{s.as_string(conn)}.notify_events()"))).fetchone()[0]
        again = _function_versions(conn, pg_schema)
        assert all(again[name] != applied[name] for name in made)


def test_wheels_and_the_sdist_carry_every_sql_file():
    """pyproject's package data (wheels) and MANIFEST.in (the sdist) name every .sql file of the
    package: the PostgreSQL backend's and SQLite's schema alike."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    src = root / "src"

    def carried(path: Path) -> bool:  # as setuptools globs: `*` stays within one folder
        for package, globs in data.items():
            folder = src.joinpath(*package.split("."))
            if folder in path.parents:
                parts = path.relative_to(folder).parts
                if any(len(g.split("/")) == len(parts) and all(map(fnmatch.fnmatch, parts, g.split("/")))
                       for g in globs):
                    return True
        return False

    files = sorted(src.rglob("*.sql"))
    assert len(files) > len(_sql_files()), files  # the PostgreSQL files and SQLite's schema
    assert [f for f in files if not carried(f)] == []
    manifest = (root / "MANIFEST.in").read_text().splitlines()
    assert any(line.startswith("recursive-include src/eventcore ") and "*.sql" in line.split() for line in manifest)
