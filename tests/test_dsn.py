"""DSN redaction (eventcore.stores.dsn): passwords hidden, every other byte of the URL kept."""
from __future__ import annotations

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
