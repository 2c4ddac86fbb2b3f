"""DSN redaction (eventcore.stores.dsn): passwords hidden, every other byte of the URL kept."""
from __future__ import annotations

import re

import pytest

from eventcore.cli import main
from eventcore.stores.dsn import redact, without_secrets


@pytest.mark.parametrize("url", [
    "sqlite:///rel.db",
    "sqlite:////abs/path/x.db",
    "sqlite:////no/such/dir/x.db",
    "sqlite:///dir/a:b@c.db",  # ':' and '@' in a file name are not credentials
    "sqlite:///x.db?timeout=5&synchronous=normal",
    "memory://",
    "postgresql://app@/postgres?host=/tmp/eventcore-pg-x&port=5432",
    "postgresql://app@db.example:5432/orders?sslmode=verify-full&application_name=a%20b+c",
    "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
    "postgres://localhost",
    "postgresql://app@[::1/db",  # malformed (no closing bracket): shown, not raised on
    "host=/tmp port=5432 user=app dbname=orders",
])
def test_a_url_without_secrets_is_shown_byte_for_byte(url):
    assert redact(url) == url


@pytest.mark.parametrize("url, shown", [
    ("postgresql://app:pw@db:5432/orders", "postgresql://app:***@db:5432/orders"),
    ("postgresql://app:pw@/orders?host=/tmp/sock", "postgresql://app:***@/orders?host=/tmp/sock"),
    ("postgresql://app@db/orders?password=pw&sslmode=require", "postgresql://app@db/orders?password=***&sslmode=require"),
    ("postgresql://app@db/orders?sslpassword=pw", "postgresql://app@db/orders?sslpassword=***"),
    ("postgresql://app@db/orders?pass%77ord=pw", "postgresql://app@db/orders?pass%77ord=***"),  # libpq decodes keys
    # libpq's userinfo ends at the first '@' before any '/': a '?' or '#' there is part of the password.
    ("postgresql://app:p?w#d@db/orders", "postgresql://app:***@db/orders"),
    ("postgresql://app:%40pw@db/orders", "postgresql://app:***@db/orders"),
    ("host=db password=pw user=app", "host=db password=*** user=app"),
    ("host=db password='p w' user=app", "host=db password=*** user=app"),
])
def test_passwords_are_masked_and_nothing_else_changes(url, shown):
    assert redact(url) == shown


@pytest.mark.parametrize("dsn, secret", [
    ("postgresql://app:p%3Fw@db/orders", "p?w"),
    ("postgresql://app:p?w@db/orders", "p?w"),
    ("postgresql://app@db/orders?password=s%20t", "s t"),
    ("host=db password='it\\'s' user=app", "it's"),
])
def test_a_message_quoting_the_password_as_written_or_decoded_is_masked(dsn, secret):
    assert without_secrets(f'invalid token: "{secret}" in {dsn}', dsn).count(secret) == 0


def test_status_shows_an_absolute_sqlite_url_as_given(capsys):
    assert main(["status", "--dsn", "sqlite:////no/such/dir/x.db"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("UNHEALTHY  sqlite store sqlite:////no/such/dir/x.db\n"), out
    assert main(["status", "--json", "--dsn", "sqlite:////no/such/dir/x.db"]) == 1
    assert '"url": "sqlite:////no/such/dir/x.db"' in capsys.readouterr().out


def test_postgres_module_still_offers_redaction():
    pytest.importorskip("psycopg")
    from eventcore.stores import postgres

    assert postgres.redact is redact
    assert postgres._without_secrets("x pw y", "postgresql://a:pw@h/d") == "x *** y"


@pytest.mark.parametrize("url", ["memory://app:S3cr3t-pw@x", "sqlite://app:S3cr3t-pw@host/x.db"])
def test_a_refused_url_is_shown_without_its_password(url):
    import eventcore as ec

    with pytest.raises(ec.ValidationError) as info:
        ec.connect(url)
    assert "S3cr3t-pw" not in str(info.value) and "app:***@" in str(info.value)


# -- URLs whose password would be misread: refused, quoting nothing of the password ---------------------

SECRET = "TopSecretPw"
#: Pieces the passwords below are made of: none may appear anywhere, whole or cut at a delimiter.
PIECES = (SECRET, "Sx1y", "Qz2w")
DELIMITERS = "/#?@[]"


def _misread_urls():
    """(id, URL) of URLs whose user name or password holds an unencoded delimiter, in every position."""
    for c in DELIMITERS:
        for password in (f"{SECRET}{c}{SECRET}", f"Sx1y{c}{SECRET}", f"{SECRET}{c}Qz2w", f"{c}{SECRET}"):
            yield f"password {password!r}", f"postgresql://app:{password}@127.0.0.1:1/db"
        yield f"user and password {c!r}", f"postgresql://me{c}corp:{SECRET}@127.0.0.1:1/db"
    yield "'/' then a query value with '@'", f"postgresql://app:{SECRET}/Sx1y?user=Qz2w@127.0.0.1:1"
    yield "'/' then a query key with '@'", f"postgresql://app:{SECRET}/Sx1y?Qz2w@127.0.0.1:1"
    yield "'?' and '@' with a query after", f"postgresql://app:{SECRET}?Sx1y@127.0.0.1:1/db?sslmode=disable"
    yield "'@' and '/' with a password parameter", f"postgresql://app:Sx1y@{SECRET}/Qz2w@h/db?password={SECRET}"
    yield "no host list, a query value with '@'", f"postgresql://h?password={SECRET}@Qz2w"
    yield "a password, then '@' in a query value", f"postgresql://app:{SECRET}@/?Sx1y=@127.0.0.1:1/db"
    yield "a port, then '@' in a query value", f"postgresql://app:{SECRET}/db?user=Qz2w@127.0.0.1"


MISREAD = dict(_misread_urls())


def _assert_no_piece(text: str) -> None:
    for piece in PIECES:
        assert piece not in text, text


@pytest.mark.parametrize("url", MISREAD.values(), ids=MISREAD.keys())
def test_a_url_libpq_would_misread_is_refused_without_quoting_its_password(url, caplog):
    import logging

    import eventcore as ec

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ec.ValidationError, match="where its password ends is ambiguous; percent-encode") as info:
        ec.connect(url, connect_timeout=1)
    _assert_no_piece(f"{info.value} {info.value!r}")
    assert "%2F %23 %3F %40 %5B %5D" in str(info.value)
    _assert_no_piece(caplog.text)


@pytest.mark.parametrize("url", MISREAD.values(), ids=MISREAD.keys())
def test_a_postgres_store_made_directly_refuses_a_url_libpq_would_misread(url, caplog):
    import logging

    import eventcore as ec

    postgres = pytest.importorskip("eventcore.stores.postgres")
    caplog.set_level(logging.DEBUG)
    for make in (postgres.PostgresStore, postgres.PostgresStore.from_url):
        with pytest.raises(ec.ValidationError, match="where its password ends is ambiguous") as info:
            make(url, connect_timeout=1)
        _assert_no_piece(f"{info.value} {info.value!r}")
    _assert_no_piece(caplog.text)


@pytest.mark.parametrize("url", MISREAD.values(), ids=MISREAD.keys())
def test_a_url_libpq_would_misread_is_redacted_up_to_its_last_at(url):
    shown = redact(url)
    _assert_no_piece(shown)
    assert shown.startswith(("postgresql://app:***@", "postgresql://me", "postgresql://h?password=***")), shown
    # A message quoting any piece a parser could cut the URL into: a host, a port, a database name...
    echo = "; ".join(f"'{piece}'" for piece in re.split(r"[/#?@:\[\]&=]", url))
    _assert_no_piece(without_secrets(echo, url))


@pytest.mark.parametrize("url, shown", [
    ("postgresql://app:Top/Sec@h:5/db", "postgresql://app:***@h:5/db"),
    ("postgresql://app:x@Top@h:5/db?sslmode=disable", "postgresql://app:***@h:5/db?sslmode=disable"),
    ("postgresql://me@corp:pw@h/db", "postgresql://me@corp:***@h/db"),
    ("postgresql://app:a/b@h/db?password=c", "postgresql://app:***@h/db?password=***"),
])
def test_a_url_libpq_would_misread_keeps_its_host_and_query_in_view(url, shown):
    assert redact(url) == shown


@pytest.mark.parametrize("url", [
    "postgresql://app:p%2Fw%40d@h:5432/db",
    "postgresql://app:a:b@h/db",
    "postgresql://h/db?user=me@corp",
    "postgresql://h1,h2/db?user=me@corp&password=a@b",  # no ':' before an '@': no user name or password
    "postgresql://[::1]:5432/db",
    "postgresql:///db@x?host=/tmp",
    "postgresql://app@[bad/db",  # libpq's own error (no ']'), not a password question
])
def test_a_url_libpq_reads_like_everyone_else_passes_the_check(url):
    from eventcore.stores.dsn import check_url

    check_url(url)


def test_every_password_libpq_would_take_is_the_one_written_or_the_url_is_refused():
    """Random passwords of the pieces and every delimiter: each URL is either refused, or libpq finds
    exactly the user, password, host and database written, and redaction shows none of the pieces."""
    import random

    import eventcore as ec
    from eventcore.stores.dsn import check_url

    psycopg = pytest.importorskip("psycopg")
    rng = random.Random(13)
    accepted = refused = 0
    for _ in range(3000):
        password = "".join(rng.choice(PIECES[1:] + tuple(DELIMITERS) + (":", "%40", "=", "&"))
                           for _ in range(rng.randint(1, 6)))
        tail = rng.choice(["/db", "/db?sslmode=disable", "?dbname=db", "/db?user=a@b", ""])
        url = f"postgresql://app:{password}@127.0.0.1:5432{tail}"
        shown = redact(url)
        _assert_no_piece(shown)
        try:
            check_url(url)
        except ec.ValidationError:
            refused += 1
            continue
        accepted += 1
        params = psycopg.conninfo.conninfo_to_dict(url)
        assert params["password"] == password.replace("%40", "@"), url
        assert params["host"] == "127.0.0.1" and params["port"] == "5432", url
    assert accepted > 100 and refused > 100, (accepted, refused)


# -- every command: a malformed URL is one line, never a traceback ------------------------------------

MALFORMED = {
    "unclosed bracket": "postgresql://app@[bad/db",
    "bracket in password": "postgresql://app:pw[x@127.0.0.1:1/db",
    "bracketed password": f"postgresql://app:Sx1y[{SECRET}]Qz2w@127.0.0.1:1/db",
    "empty brackets": "postgresql://app@[]/db",
    "port not a number": "postgresql://app@127.0.0.1:port/db",
    "port out of range": "postgresql://app@127.0.0.1:99999/db",
    "compatibility character in password": f"postgresql://app:{SECRET}\uff20x@127.0.0.1:1/db",
    "slash in password": f"postgresql://app:{SECRET}/{SECRET}@127.0.0.1:1/db",
    "hash in password": f"postgresql://app:{SECRET}#{SECRET}@127.0.0.1:1/db",
    "question mark in password": f"postgresql://app:{SECRET}?{SECRET}@127.0.0.1:1/db",
    "at in password": f"postgresql://app:x@{SECRET}@127.0.0.1:1/db",
    "sqlite with a host and brackets": f"sqlite://app:Sx1y[{SECRET}]@host/x.db",
}


_COMMANDS = [
    ["status"], ["status", "--json"], ["tail"], ["projections"], ["migrate"], ["ingest", "{lines}"],
    ["bench", "deposit", "--backend", "postgres", "--ops", "1", "--no-progress"],
]


@pytest.mark.parametrize("argv, url", [
    pytest.param(argv, url, id=f"{' '.join(argv[:2]).replace('{lines}', '').strip()}-{name}")
    for argv in _COMMANDS for name, url in MALFORMED.items()
    if not (argv[0] == "migrate" and url.startswith("sqlite"))  # migrate takes postgresql:// URLs only
])
def test_every_command_says_a_malformed_url_is_malformed_on_one_line(argv, url, tmp_path, capsys, caplog):
    import json
    import logging

    caplog.set_level(logging.DEBUG)
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"stream": "s-1", "type": "t.Happened", "data": {}}\n')
    rc = main([a.format(lines=lines) for a in argv] + ["--dsn", url])
    out, err = capsys.readouterr()
    _assert_no_piece(out + err + caplog.text)
    if argv[0] == "status":
        assert rc == 1 and err == "", (out, err)
        report = json.loads(out) if "--json" in argv else None
        if report is not None:
            assert report["ok"] is False and report["problem"] == "unreachable", report
            assert "malformed" in report["error"] and "\n" not in report["error"], report
        else:
            assert out.startswith("UNHEALTHY  ") and "  error           malformed " in out, out
    else:
        assert rc == 2 and out == "", (out, err)
        assert err.startswith(f"eventcore {argv[0]}: error: ") and err.count("\n") == 1, err
        assert "malformed" in err or "sqlite URLs have no host" in err, err


def test_status_of_a_misread_url_shows_it_redacted(capsys):
    url = f"postgresql://app:{SECRET}/{SECRET}@127.0.0.1:1/db?schema=Sx1y"
    assert main(["status", "--dsn", url]) == 1
    out = capsys.readouterr().out
    assert out.startswith("UNHEALTHY  postgresql store postgresql://app:***@127.0.0.1:1/db?schema=Sx1y\n"), out
    assert "  schema   " not in out  # a query that cannot be told apart from the password is not read
    _assert_no_piece(out.replace("?schema=Sx1y", ""))


# -- libpq's key=value form: the password as libpq reads it, and the words it would refuse -------------

@pytest.mark.parametrize("dsn, shown, quoted", [
    # (the DSN, as shown, what a message may quote of it: the password as libpq reads it, a word it refuses)
    ("host=db password=Top\\ Secret port=1", "host=db password=*** port=1", ["Top Secret"]),  # '\\' escapes ' '
    ("host=db password='Top \\' Secret' port=1", "host=db password=*** port=1", ["Top ' Secret"]),
    ("host=db password=Top Secret port=1", "host=db password=*** port=1", ["Top", "Secret"]),
    ("host=db password=Top Secret", "host=db password=***", ["Top", "Secret"]),
    ("host=db password=TopSecret port = 1", "host=db password=*** port = 1", ["TopSecret"]),  # ' = ' is libpq's
    ("host=db sslpassword=Top\\Sec\\ ret user=app", "host=db sslpassword=*** user=app", ["TopSec ret"]),
])
def test_a_key_value_password_is_masked_as_libpq_reads_it_and_words_it_would_refuse(dsn, shown, quoted):
    assert redact(dsn) == shown
    echo = "; ".join(f'"{piece}"' for piece in quoted)
    assert without_secrets(echo, dsn) == "; ".join('"***"' for _ in quoted), dsn


@pytest.mark.parametrize("dsn", ["host=/nowhere port=1 password=Top\\ Secret", "host=/nowhere password=Top Secret"])
def test_a_store_made_from_a_key_value_dsn_shows_no_piece_of_its_password(dsn, caplog):
    import logging

    import eventcore as ec

    postgres = pytest.importorskip("eventcore.stores.postgres")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ec.EventCoreError) as info:
        postgres.PostgresStore(dsn, connect_timeout=1)
    for piece in ("Top", "Secret"):
        assert piece not in f"{info.value} {info.value!r} {caplog.text}", info.value


# -- connect() takes libpq's key=value form, as psycopg does ---------------------------------------------

@pytest.mark.parametrize("dsn, options, says", [
    ("host=/nowhere bogus=1", {}, 'invalid connection option "bogus"'),   # libpq's parser refuses the key
    ("host=/nowhere dbname=x", {"schemaa": "x"}, "unknown postgresql option(s) ['schemaa']"),
])
def test_connect_takes_a_key_value_string_for_postgresql_and_checks_it_before_connecting(dsn, options, says):
    import eventcore as ec

    pytest.importorskip("eventcore.stores.postgres")
    with pytest.raises(ec.ValidationError) as info:
        ec.connect(dsn, **options)
    assert says in str(info.value)


def test_a_key_value_string_opens_the_postgresql_store_its_url_form_opens(pg_dsn, pg_schema):
    import psycopg

    import eventcore as ec
    from eventcore.stores.postgres import PostgresStore

    key_value = psycopg.conninfo.make_conninfo(**psycopg.conninfo.conninfo_to_dict(pg_dsn))
    assert "://" not in key_value
    with ec.connect(key_value, schema=pg_schema, pool_size=2) as store:
        assert isinstance(store, PostgresStore) and store.schema == pg_schema and store.pool_size == 2
        store.append([ec.emit("kv-1", ec.RawEvent("test.KeyValue", b'{"n": 1}'))])
    with ec.connect(pg_dsn, schema=pg_schema) as same:
        assert [e.stream_id for e in same.read_stream("kv-1", decode=False)] == ["kv-1"]
