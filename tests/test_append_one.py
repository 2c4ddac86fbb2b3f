"""append_one (a lone append) and append_group (a group commit) are one contract: run on the same
arguments in two stores with the same history, they return the same rows, raise the same SQLSTATEs
and leave the same events, heads and idempotency keys (positions compared relative to each
transaction's base). Arguments are written as JSON here, as the client sends them
(group_commit._encode_group), including ones the client never sends."""
from __future__ import annotations

import json
import uuid

import pytest

import eventcore as ec
from optional import require

psycopg = require("psycopg")
from psycopg import sql  # noqa: E402

from eventcore.stores.postgres import sql as pg_sql  # noqa: E402

NO_STREAM, ANY, STREAM_EXISTS = ec.NO_STREAM, ec.ANY, ec.STREAM_EXISTS


class Noted(ec.Event):
    __event_type__ = "append_one.Noted"
    k: int


def _ev(stream, ordinal, amount=1, *, meta=None, type_version=None, event_id=None):
    event = [stream, event_id or uuid.uuid4().hex, "t.Deposited", {"amount": amount}, meta, ordinal]
    if type_version is not None:
        event.append(type_version)
    return event


def _doc(participants, events, key=None, n=None):
    member = [participants, events] if key is None else [participants, events, key]
    return json.dumps({"n": len(participants) if n is None else n, "g": [member]})


# (name, events it leaves written, [argument, ...]): each case runs its arguments in order, in both stores.
# The count makes sure no case passes by having both functions refuse everything.
CASES = [
    ("a new stream", 1, [_doc([["a", NO_STREAM, 1]], [_ev("a", 1)])]),
    ("two events on a stream, then a third", 3, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1), _ev("a", 2, 5)]),
        _doc([["a", 2, 1]], [_ev("a", 1, 7, meta={"by": "x"}, type_version=3)])]),
    ("an expected version that is not the head", 1, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1)]),
        _doc([["a", 0, 1]], [_ev("a", 1)]),
        _doc([["a", 5, 1]], [_ev("a", 1)])]),
    ("no stream expected, the stream exists", 1, [
        _doc([["a", ANY, 1]], [_ev("a", 1)]),
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1)])]),
    ("the stream must exist", 3, [
        _doc([["a", STREAM_EXISTS, 1]], [_ev("a", 1)]),
        _doc([["a", ANY, 1]], [_ev("a", 1)]),
        _doc([["a", STREAM_EXISTS, 1], ["b", STREAM_EXISTS, 0]], [_ev("a", 1)]),
        _doc([["a", STREAM_EXISTS, 1]], [_ev("a", 1), _ev("a", 2)])]),
    ("three participants, one read only, events interleaved", 8, [
        _doc([["c", NO_STREAM, 1]], [_ev("c", 1)]),
        _doc([["a", NO_STREAM, 1], ["b", NO_STREAM, 1], ["c", 1, 0]],
             [_ev("a", 1), _ev("b", 2), _ev("a", 3), _ev("b", 4), _ev("a", 5)]),
        _doc([["a", 3, 1], ["b", 2, 1], ["c", 1, 0]], [_ev("b", 1), _ev("a", 2)])]),
    ("the first failing participant is reported", 2, [
        _doc([["a", NO_STREAM, 1], ["b", NO_STREAM, 1]], [_ev("a", 1), _ev("b", 2)]),
        _doc([["a", 1, 1], ["b", 7, 1], ["c", 9, 0]], [_ev("a", 1)]),
        _doc([["a", 4, 1], ["b", 7, 1]], [_ev("a", 1)])]),
    ("a read-only participant that moved", 2, [
        _doc([["r", NO_STREAM, 1]], [_ev("r", 1)]),
        _doc([["r", ANY, 1]], [_ev("r", 1)]),
        _doc([["a", NO_STREAM, 1], ["r", 1, 0]], [_ev("a", 1)])]),
    ("an idempotency key: recorded, then a duplicate, also over a conflict", 4, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1), _ev("a", 2)], key="k-1"),
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1)], key="k-1"),
        _doc([["a", 2, 1]], [_ev("a", 1)], key="k-1"),
        _doc([["a", 2, 1], ["b", NO_STREAM, 1]], [_ev("b", 1), _ev("a", 2)], key="k-2"),
        _doc([["a", 0, 1]], [_ev("a", 1)], key="k-3")]),
    ("no events: checks only, nothing written", 1, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1)]),
        _doc([["a", 1, 0]], []),
        _doc([["a", 0, 0]], []),
        _doc([["a", 1, 0], ["b", NO_STREAM, 0]], [], key="k-none")]),
    ("an event on a stream that is not a participant", 0, [_doc([["a", NO_STREAM, 1]], [_ev("b", 1)])]),
    ("an ordinal outside the transaction's positions", 0, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 0)]),
        _doc([["a", NO_STREAM, 1]], [_ev("a", pg_sql.MAX_EVENTS_PER_TRANSACTION + 1)]),
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1), _ev("a", -3)])]),
    ("a participant twice", 0, [_doc([["a", NO_STREAM, 1], ["a", NO_STREAM, 1]], [_ev("a", 1)])]),
    ("n that is not the participants' count", 0, [_doc([["a", NO_STREAM, 1]], [_ev("a", 1)], n=2)]),
    ("a participant without a stream", 0, [_doc([[None, NO_STREAM, 1]], [])]),
    ("an event id used twice", 1, [
        _doc([["a", NO_STREAM, 1]], [_ev("a", 1, event_id="0" * 32)]),
        _doc([["b", NO_STREAM, 1]], [_ev("b", 1, event_id="0" * 32)])]),
    ("data jsonb cannot hold", 0, [_doc([["a", NO_STREAM, 1]], [["a", uuid.uuid4().hex, "t", {"s": "\u0000"}, None, 1]])]),
    ("a key with two participants and a read-only one", 3, [
        _doc([["z", NO_STREAM, 1]], [_ev("z", 1)]),
        _doc([["x", NO_STREAM, 1], ["y", NO_STREAM, 1], ["z", 1, 0]], [_ev("y", 1), _ev("x", 2)], key="k-xyz"),
        _doc([["x", 1, 1], ["y", 1, 1], ["z", 1, 0]], [_ev("y", 1)], key="k-xyz")]),
]


def _run(conn, schema: str, function: str, argument: str):
    """One call in its own transaction: ("ok", rows with positions made relative) or ("error", SQLSTATE)."""
    call = sql.SQL("SELECT member, versions, base_position, conflict FROM {}.{}(%s::jsonb)").format(
        sql.Identifier(schema), sql.Identifier(function))
    try:
        rows = conn.execute(call, (argument,)).fetchall()
    except psycopg.Error as exc:
        return ("error", exc.sqlstate)
    return ("ok", [(m, v, base != 0, conflict and json.loads(conflict)) for m, v, base, conflict in rows])


def _state(conn, schema: str):
    s = sql.Identifier(schema)
    events = conn.execute(sql.SQL(
        "SELECT stream_id, version, event_id, type, data, metadata, type_version, position & %s "
        "FROM {}.events ORDER BY position").format(s), (pg_sql.POSITIONS_PER_TRANSACTION - 1,)).fetchall()
    heads = conn.execute(sql.SQL("SELECT stream_id, version FROM {}.streams ORDER BY 1").format(s)).fetchall()
    keys = conn.execute(sql.SQL(
        "SELECT k.key, k.event_count, e.stream_id, e.version FROM {0}.command_keys k "
        "JOIN {0}.events e ON e.position = k.first_position ORDER BY 1").format(s)).fetchall()
    return events, heads, keys


@pytest.mark.parametrize("written, arguments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_append_one_and_append_group_agree(pg_dsn, pg_schema, written, arguments):
    lone, grouped = pg_schema, pg_schema + "_group"
    try:
        for schema in (lone, grouped):
            ec.connect(pg_dsn, schema=schema).close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for argument in arguments:
                assert _run(conn, lone, "append_one", argument) == _run(conn, grouped, "append_group", argument), \
                    argument
            state = _state(conn, lone)
            assert state == _state(conn, grouped)
            assert len(state[0]) == written
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(grouped)))


@pytest.mark.parametrize("argument", [
    json.dumps({"n": 2, "g": [[[["a", NO_STREAM, 1]], [_ev("a", 1)]], [[["b", NO_STREAM, 1]], [_ev("b", 2)]]]}),
    json.dumps({"n": 0, "g": []}),
    json.dumps({"n": 0, "g": [[[], []]]}),
    json.dumps({"g": [[[["a", NO_STREAM, 1]], [_ev("a", 1)]]]}),
    json.dumps({"n": 1, "g": {"a": 1}}),
], ids=["two members", "no member", "no participant", "no n", "g not an array"])
def test_append_one_refuses_anything_but_one_member(pg_dsn, pg_schema, argument):
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert _run(conn, pg_schema, "append_one", argument) == ("error", "EC400")
        assert _state(conn, pg_schema) == ([], [], [])


def test_append_one_is_one_append_per_transaction(pg_dsn, pg_schema):
    ec.connect(pg_dsn, schema=pg_schema).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(sql.SQL("SELECT {}.append_one(%s::jsonb)").format(sql.Identifier(pg_schema)),
                     (_doc([["a", NO_STREAM, 1]], [_ev("a", 1)]),))
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql.SQL("SELECT {}.append_one(%s::jsonb)").format(sql.Identifier(pg_schema)),
                         (_doc([["b", NO_STREAM, 1]], [_ev("b", 1)]),))
        assert info.value.sqlstate == "EC412"


def test_the_store_appends_in_read_committed_whatever_the_dsn_asks(pg_dsn, pg_schema):
    """The append functions refuse any isolation but READ COMMITTED (see their guard); the store pins it
    on its connections after the DSN's own options, so a DSN (or a role) that asks for REPEATABLE READ
    still gets a working store."""
    separator = "&" if "?" in pg_dsn else "?"
    dsn = pg_dsn + separator + "options=-c%20default_transaction_isolation%3Drepeatable%5C%20read"
    with psycopg.connect(dsn) as conn:  # the DSN does ask for it
        assert conn.execute("SHOW transaction_isolation").fetchone()[0] == "repeatable read"
    with ec.connect(dsn, schema=pg_schema) as store:
        store.append([ec.emit("r", Noted(1))])
        store.append([ec.emit("w", Noted(2))], {"r": 1, "w": ec.NO_STREAM})
        with store._pool.connection() as conn:
            assert conn.execute("SHOW transaction_isolation").fetchone()[0] == "read committed"
    with psycopg.connect(dsn, autocommit=True) as conn:  # a caller of the function in REPEATABLE READ: refused
        assert _run(conn, pg_schema, "append_one", _doc([["x", NO_STREAM, 1]], [_ev("x", 1)])) == ("error", "EC400")
        assert _run(conn, pg_schema, "append_group", _doc([["x", NO_STREAM, 1]], [_ev("x", 1)])) == ("error", "EC400")
