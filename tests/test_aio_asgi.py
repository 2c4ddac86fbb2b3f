"""The example HTTP service (examples/bank_asgi.py) on eventcore.aio, driven as an ASGI server drives it:
lifespan start-up and shutdown, then requests, through a small client in this process. On memory://,
SQLite and PostgreSQL: the routes, the error statuses, an idempotent retry writing once, 50 concurrent
transfers on one event loop keeping the money whole, and the store closed at shutdown."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import eventcore as ec
import eventcore.aio as eca

ROOT = Path(__file__).resolve().parent.parent


def _load_example():
    spec = importlib.util.spec_from_file_location("bank_asgi", ROOT / "examples" / "bank_asgi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bank_asgi"] = module
    spec.loader.exec_module(module)
    return module


bank_asgi = _load_example()


class Client:
    """An ASGI server in miniature: `async with Client(app) as c` runs the lifespan start-up (and the
    shutdown at the end), `await c.request(...)` one HTTP request, its body JSON."""

    def __init__(self, app):
        self.app = app
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._lifespan = None

    async def _lifespan_event(self, event: str) -> dict:
        await self._to_app.put({"type": f"lifespan.{event}"})
        return await asyncio.wait_for(self._from_app.get(), 10)

    async def __aenter__(self):
        self._lifespan = asyncio.ensure_future(
            self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, self._to_app.get, self._from_app.put))
        reply = await self._lifespan_event("startup")
        assert reply["type"] == "lifespan.startup.complete", reply
        return self

    async def __aexit__(self, *exc):
        reply = await self._lifespan_event("shutdown")
        assert reply["type"] == "lifespan.shutdown.complete", reply
        await self._lifespan

    async def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        path, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        # The body in two chunks, as a server may deliver it.
        incoming = [{"type": "http.request", "body": data[:3], "more_body": True},
                    {"type": "http.request", "body": data[3:], "more_body": False}]
        sent = []

        async def receive():
            if incoming:
                return incoming.pop(0)
            await asyncio.Event().wait()  # a server's receive() blocks until the client goes away

        async def send(message):
            sent.append(message)

        await self.app(scope, receive, send)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        headers = dict(sent[0]["headers"])
        assert headers[b"content-type"] == b"application/json"
        assert int(headers[b"content-length"]) == len(sent[1]["body"])
        return sent[0]["status"], json.loads(sent[1]["body"])


def _app_factory(request, tmp_path):
    if request.param == "memory":
        return lambda: bank_asgi.BankApp("memory://")
    if request.param == "sqlite":
        return lambda: bank_asgi.BankApp(f"sqlite:///{tmp_path / 'bank.db'}")
    dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
    return lambda: bank_asgi.BankApp(dsn, schema=schema, pool_size=8)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_app(request, tmp_path):
    """() -> a new BankApp on this test's database (one SQLite file or PostgreSQL schema, opened by each
    app; memory: a store of each app's own)."""
    return _app_factory(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def make_shared_app(request, tmp_path):
    """make_app on the backends that several processes share."""
    return _app_factory(request, tmp_path)


def run(app, scenario):
    """asyncio.run a scenario(client, app) against `app`, started and shut down; returns what it returns."""

    async def main():
        async with Client(app) as client:
            return await scenario(client, app)

    return asyncio.run(asyncio.wait_for(main(), 15))


async def _open(client, *accounts, deposit=0):
    for account in accounts:
        assert (await client.request("POST", f"/accounts/{account}", {"owner": account.title()}))[0] == 201
        if deposit:
            status, body = await client.request("POST", f"/accounts/{account}/deposits", {"amount": deposit})
            assert status == 200, body


def test_open_deposit_transfer_read_and_feed(make_app):
    async def scenario(client, app):
        status, body = await client.request("POST", "/accounts/alice", {"owner": "Alice"})
        assert status == 201 and body["replayed"] is False
        assert [(e["stream"], e["version"], e["type"]) for e in body["events"]] == [
            ("account-alice", 1, "bank.AccountOpened")]
        await _open(client, "bob")
        status, body = await client.request("POST", "/accounts/alice/deposits", {"amount": 100})
        assert status == 200 and [(e["stream"], e["version"]) for e in body["events"]] == [("account-alice", 2)]
        status, body = await client.request("POST", "/transfers", {"from": "alice", "to": "bob", "amount": 30})
        assert status == 200
        assert [(e["stream"], e["version"], e["type"]) for e in body["events"]] == [
            ("account-alice", 3, "bank.Withdrawn"), ("account-bob", 2, "bank.Deposited")]
        assert body["events"][1]["position"] > body["events"][0]["position"]

        assert await client.request("GET", "/accounts/alice") == (
            200, {"account": "alice", "balance": 70, "version": 3})
        assert await client.request("GET", "/accounts/bob") == (200, {"account": "bob", "balance": 30, "version": 2})

        status, feed = await client.request("GET", "/events?after=0")
        assert status == 200
        assert [(e["stream"], e["type"], e["data"]) for e in feed["events"]] == [
            ("account-alice", "bank.AccountOpened", {"owner": "Alice"}),
            ("account-bob", "bank.AccountOpened", {"owner": "Bob"}),
            ("account-alice", "bank.Deposited", {"amount": 100}),
            ("account-alice", "bank.Withdrawn", {"amount": 30}),
            ("account-bob", "bank.Deposited", {"amount": 30}),
        ]
        positions = [e["position"] for e in feed["events"]]
        assert positions == sorted(positions) and feed["last_position"] == positions[-1]
        assert all(e["recorded_at"] for e in feed["events"])
        # Paging: after=N is what follows N; limit bounds a page.
        status, page = await client.request("GET", f"/events?after={positions[1]}&limit=2")
        assert [e["position"] for e in page["events"]] == positions[2:4] and page["last_position"] == positions[3]
        status, tail = await client.request("GET", f"/events?after={positions[-1]}")
        assert (status, tail) == (200, {"events": [], "last_position": positions[-1]})

    run(make_app(), scenario)


def test_errors_are_json_with_their_status(make_app):
    async def scenario(client, app):
        await _open(client, "alice", "bob", deposit=50)

        async def error(method, path, body=None, headers=None, raw=None):
            status, reply = await client.request(method, path, body, headers, raw)
            assert set(reply) >= {"error", "message"}, reply
            return status, reply["error"], reply["message"]

        # Refused by a command: 409 with the command's message.
        assert await error("POST", "/accounts/alice", {"owner": "Alice"}) == (
            409, "BusinessRuleViolation", "account-alice is already open")
        assert await error("POST", "/transfers", {"from": "alice", "to": "bob", "amount": 51}) == (
            409, "BusinessRuleViolation", "insufficient funds in account-alice")
        assert await error("POST", "/accounts/carol/deposits", {"amount": 5}) == (
            409, "BusinessRuleViolation", "account-carol is not open")
        assert await error("POST", "/transfers", {"from": "alice", "to": "carol", "amount": 5}) == (
            409, "BusinessRuleViolation", "account-carol is not open")
        # Bad input: 400, nothing written.
        for bad in ({"amount": 0}, {"amount": -5}, {"amount": "5"}, {"amount": 2.5}, {"amount": True}, {},
                    {"amount": 10**13}):
            status, kind, message = await error("POST", "/accounts/alice/deposits", bad)
            assert (status, kind) == (400, "ValidationError") and "amount must be an integer" in message
        assert (await error("POST", "/accounts/alice/deposits", raw=b"{not json"))[:2] == (400, "ValidationError")
        assert (await error("POST", "/accounts/alice/deposits", [1]))[:2] == (400, "ValidationError")
        assert (await error("POST", "/accounts/alice", {"owner": ""}))[:2] == (400, "ValidationError")
        assert (await error("POST", "/accounts/al\x01ice", {"owner": "A"}))[:2] == (400, "ValidationError")
        assert (await error("POST", "/transfers", {"from": "alice", "amount": 5}))[:2] == (400, "ValidationError")
        assert (await error("POST", "/transfers", {"from": "alice", "to": "alice", "amount": 5}))[:2] == (
            400, "ValidationError")
        assert (await error("POST", "/accounts/alice/deposits", {"amount": 5},
                            {"Idempotency-Key": "k" * 256}))[:2] == (400, "ValidationError")
        assert (await error("GET", "/events?after=-1"))[:2] == (400, "ValidationError")
        assert (await error("GET", "/events?limit=0"))[:2] == (400, "ValidationError")
        # Unknown things: 404.
        assert (await error("GET", "/accounts/carol"))[:2] == (404, "NotFound")
        assert (await error("GET", "/nowhere"))[:2] == (404, "NotFound")
        assert (await error("DELETE", "/accounts/alice"))[:2] == (404, "NotFound")
        assert (await error("POST", "/accounts/alice/deposits", raw=b"x" * (bank_asgi.MAX_BODY + 1)))[:2] == (
            413, "TooLarge")

        # Nothing above wrote: the two accounts' open and deposit only.
        status, feed = await client.request("GET", "/events")
        assert len(feed["events"]) == 4
        assert await client.request("GET", "/accounts/alice") == (
            200, {"account": "alice", "balance": 50, "version": 2})

    run(make_app(), scenario)


def test_a_conflict_that_outlasts_the_retries_is_409(make_app, monkeypatch):
    monkeypatch.setattr(bank_asgi, "RETRY", ec.RetryPolicy(max_retries=2, base_delay=0.001))

    async def scenario(client, app):
        await _open(client, "alice")
        store = app.store
        append = store._append
        interfering, beaten = [], []

        async def another_writer_first(prepared):
            # Another process deposits into the account between every attempt's read and its append.
            if not interfering:
                interfering.append(1)
                try:
                    await store.append([ec.emit("account-alice", bank_asgi.Deposited(amount=1))])
                    beaten.append(1)
                finally:
                    interfering.clear()
            return await append(prepared)

        store._append = another_writer_first
        status, reply = await client.request("POST", "/accounts/alice/deposits", {"amount": 5})
        del store._append
        assert status == 409 and reply["error"] == "ConcurrencyError", reply
        assert "account-alice" in reply["message"]
        # Every attempt (at least the first and two retries; a stale cache's re-read is free) was beaten.
        assert len(beaten) >= 3
        assert await client.request("GET", "/accounts/alice") == (
            200, {"account": "alice", "balance": len(beaten), "version": 1 + len(beaten)})

    run(make_app(), scenario)


def test_an_unavailable_store_is_503_and_says_whether_the_write_may_have_committed(make_app):
    async def scenario(client, app):
        await _open(client, "alice")
        store = app.store

        async def lost(*args):
            raise ec.StoreUnavailableError("connection lost after COMMIT was sent", maybe_committed=True)

        async def down(*args):
            raise ec.StoreUnavailableError("connection refused")

        store._append, store._read_stream = lost, down
        try:
            status, reply = await client.request("POST", "/accounts/alice/deposits", {"amount": 5})
            assert (status, reply["error"], reply["maybe_committed"]) == (503, "StoreUnavailableError", True)
            status, reply = await client.request("GET", "/accounts/alice")
            assert (status, reply["error"], reply["maybe_committed"]) == (503, "StoreUnavailableError", False)
        finally:
            del store._append, store._read_stream

    run(make_app(), scenario)


def test_a_deposit_retried_with_its_idempotency_key_writes_once(make_app):
    async def scenario(client, app):
        await _open(client, "alice", "bob")
        key = {"Idempotency-Key": "deposit-3c1e"}
        status, first = await client.request("POST", "/accounts/alice/deposits", {"amount": 40}, key)
        assert status == 200 and first["replayed"] is False
        for _ in range(2):
            status, again = await client.request("POST", "/accounts/alice/deposits", {"amount": 40}, key)
            assert status == 200 and again == {**first, "replayed": True}
        # Racing retries on one loop: one write in all, every answer the first one's events.
        key2 = {"Idempotency-Key": "deposit-9d04"}
        answers = await asyncio.gather(*(client.request("POST", "/accounts/bob/deposits", {"amount": 7}, key2)
                                         for _ in range(10)))
        assert {status for status, _ in answers} == {200}
        assert len({json.dumps(body["events"]) for _, body in answers}) == 1
        assert sorted(body["replayed"] for _, body in answers) == [False] + [True] * 9

        assert (await client.request("GET", "/accounts/alice"))[1]["balance"] == 40
        assert (await client.request("GET", "/accounts/bob"))[1]["balance"] == 7
        status, feed = await client.request("GET", "/events")
        assert [e["type"] for e in feed["events"]].count("bank.Deposited") == 2
        # The key names one request: used again for another, it is refused and writes nothing.
        status, reply = await client.request("POST", "/accounts/bob/deposits", {"amount": 40}, key)
        assert (status, reply["error"]) == (422, "IdempotencyKeyReused")
        status, reply = await client.request("POST", "/transfers", {"from": "alice", "to": "bob", "amount": 7}, key2)
        assert (status, reply["error"]) == (422, "IdempotencyKeyReused")
        assert len((await client.request("GET", "/events"))[1]["events"]) == len(feed["events"])

    run(make_app(), scenario)


def test_requests_cancelled_in_flight_and_retried_with_their_keys_write_once(make_app):
    """A server cancels the request of a client that went away; the client's retry with the same key
    settles whether the first attempt wrote: each deposit lands once, whenever the cancellation hit."""
    rng = random.Random(2)

    async def scenario(client, app):
        await _open(client, "alice")
        for n in range(20):
            key = {"Idempotency-Key": f"cancelled-{n}"}
            first = asyncio.ensure_future(client.request("POST", "/accounts/alice/deposits", {"amount": 1}, key))
            await asyncio.sleep(rng.random() * 0.003)
            first.cancel()
            try:
                await first
            except asyncio.CancelledError:
                pass
            status, body = await client.request("POST", "/accounts/alice/deposits", {"amount": 1}, key)
            assert status == 200, body
        return await client.request("GET", "/accounts/alice")

    assert run(make_app(), scenario) == (200, {"account": "alice", "balance": 20, "version": 21})


def test_fifty_concurrent_transfers_keep_the_money_whole(make_app):
    accounts = [f"a{k}" for k in range(8)]
    rng = random.Random(11)
    plan = [(*rng.sample(accounts, 2), rng.randint(1, 60)) for _ in range(50)]

    async def scenario(client, app):
        await _open(client, *accounts, deposit=100)
        answers = await asyncio.gather(*(
            client.request("POST", "/transfers", {"from": a, "to": b, "amount": n}) for a, b, n in plan))
        for status, body in answers:
            assert status == 200 or (status, body["error"]) == (409, "BusinessRuleViolation"), body
            assert status == 200 or body["message"].startswith("insufficient funds"), body
        balances = {}
        for account in accounts:
            status, body = await client.request("GET", f"/accounts/{account}")
            balances[account] = body["balance"]
        feed = (await client.request("GET", "/events?limit=1000"))[1]["events"]
        return answers, balances, feed

    answers, balances, feed = run(make_app(), scenario)
    assert sum(balances.values()) == 100 * len(accounts)
    assert min(balances.values()) >= 0
    moved = sum(1 for status, _ in answers if status == 200)
    assert 0 < moved < len(plan)  # some went through, some were refused
    # In feed order, no account is ever below zero, and every transfer wrote both of its events.
    running: dict[str, int] = {}
    for e in feed:
        delta = {"bank.Deposited": 1, "bank.Withdrawn": -1}.get(e["type"], 0) * e["data"].get("amount", 0)
        running[e["stream"]] = running.get(e["stream"], 0) + delta
        assert running[e["stream"]] >= 0, e
    assert {f"account-{a}": b for a, b in balances.items()} == running
    assert [e["type"] for e in feed].count("bank.Withdrawn") == moved


def test_the_store_opens_at_startup_and_closes_at_shutdown(make_app):
    app = make_app()
    seen = []

    async def scenario(client, app):
        seen.append(app.store)
        await _open(client, "alice")

    run(app, scenario)
    assert seen[0] is not None and seen[0].closed and app.store is None

    async def after_shutdown():
        return await Client(app).request("POST", "/accounts/bob", {"owner": "Bob"})

    status, reply = asyncio.run(after_shutdown())
    assert (status, reply["error"]) == (503, "NotStarted")


def test_the_store_url_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "from-env.db"
    monkeypatch.setenv(bank_asgi.STORE_URL_ENV, f"sqlite:///{path}")

    async def scenario(client, app):
        await _open(client, "alice", deposit=5)
        return app.store.url

    assert run(bank_asgi.BankApp(), scenario).endswith("from-env.db")
    with ec.connect(f"sqlite:///{path}") as store:  # a sync process reads what the service wrote
        assert [e.type for e in store.read_stream("account-alice")] == ["bank.AccountOpened", "bank.Deposited"]


def test_a_store_that_cannot_open_fails_the_startup():
    app = bank_asgi.BankApp("nosuch://x")

    async def main():
        client = Client(app)
        client._lifespan = asyncio.ensure_future(app({"type": "lifespan"}, client._to_app.get, client._from_app.put))
        reply = await client._lifespan_event("startup")
        await client._lifespan
        return reply

    reply = asyncio.run(main())
    assert reply["type"] == "lifespan.startup.failed"
    assert "ValidationError" in reply["message"] and "nosuch" in reply["message"]


def test_two_workers_on_one_store_keep_the_money_whole(make_shared_app):
    """Two apps on one database, as two worker processes of a server: their commands meet only in
    the store, whose version check makes the loser of each race retry on fresh state."""
    first, second = make_shared_app(), make_shared_app()
    accounts = [f"a{k}" for k in range(4)]
    rng = random.Random(5)
    plan = [(*rng.sample(accounts, 2), rng.randint(1, 30)) for _ in range(40)]

    async def main():
        async with Client(first) as one, Client(second) as two:
            await _open(one, *accounts, deposit=50)
            answers = await asyncio.gather(*(
                (one, two)[i % 2].request("POST", "/transfers", {"from": a, "to": b, "amount": n})
                for i, (a, b, n) in enumerate(plan)))
            balances = [(await two.request("GET", f"/accounts/{a}"))[1]["balance"] for a in accounts]
            return answers, balances

    answers, balances = asyncio.run(asyncio.wait_for(main(), 15))
    for status, body in answers:
        assert status == 200 or body["message"].startswith("insufficient funds"), body
    assert sum(balances) == 50 * len(accounts) and min(balances) >= 0


def test_a_scope_other_than_http_or_lifespan_is_refused():
    async def nothing():
        return {}

    async def ignore(message):
        pass

    with pytest.raises(NotImplementedError, match="websocket"):
        asyncio.run(bank_asgi.BankApp("memory://")({"type": "websocket"}, nothing, ignore))


def test_the_example_runs_its_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != bank_asgi.STORE_URL_ENV}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "bank_asgi.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[2:] for line in lines if "/deposits" in line] == [
        ["200", "wrote", "positions", "[3]"], ["200", "replayed", "positions", "[3]"]]
    transfers = sorted(" ".join(line.split()[2:]) for line in lines if line.startswith("POST /transfers"))
    assert transfers == ["200 wrote positions [4, 5]", "200 wrote positions [6, 7]", "200 wrote positions [8, 9]",
                         "409 BusinessRuleViolation: insufficient funds in account-alice"]
    assert "GET /accounts/alice 200 {'account': 'alice', 'balance': 10, 'version': 5}" in [" ".join(line.split())
                                                                                          for line in lines]
    assert list(tmp_path.iterdir()) == []  # the demo's store is in memory unless $BANK_STORE_URL names one


def test_a_sqlite_store_serves_commands_on_a_second_event_loop(tmp_path):
    """The stream locks commands wait on belong to the loop they wait on: a store whose commands
    contended on one loop serves contending commands on the next."""
    deposit = bank_asgi.Deposit(account=ec.StreamId("account-alice"), amount=1)

    async def contended(store):
        await asyncio.gather(*(eca.execute(store, deposit) for _ in range(4)))

    async def open_store():
        store = await eca.connect(f"sqlite:///{tmp_path / 'bank.db'}")
        await eca.execute(store, bank_asgi.OpenAccount(account=ec.StreamId("account-alice"), owner="Alice"))
        await contended(store)  # the commands wait for each other on the stream's lock: it is now this loop's
        return store

    store = asyncio.run(open_store())  # e.g. a script that opens its store in one asyncio.run, uses it in the next

    async def use_and_close():
        try:
            await contended(store)
            return len(await store.read_stream("account-alice"))
        finally:
            await store.aclose()

    assert asyncio.run(use_and_close()) == 9
