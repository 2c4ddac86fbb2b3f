"""The bank of examples/bank.py as an HTTP service: a plain ASGI application on eventcore.aio.

Run it with any ASGI server, from the repository's root (the store is opened at start-up, closed at shutdown):

    BANK_STORE_URL=sqlite:///bank.db uvicorn examples.bank_asgi:app

or `python examples/bank_asgi.py` for a short demo through an in-process client (no server, no network).

    POST /accounts/{id}            {"owner": "Alice"}                        open an account
    POST /accounts/{id}/deposits   {"amount": 100}                           deposit into an open account
    POST /transfers                {"from": "alice", "to": "bob", "amount": 30}   both accounts or neither
    GET  /accounts/{id}                                                      balance and version
    GET  /events?after=0&limit=100                                           the feed, in global order

The POSTs take an `Idempotency-Key` header: a request retried with the same key writes once and answers
as the first did ("replayed": true). Errors are JSON, {"error": ..., "message": ...}: 400 bad input,
404 unknown account or route, 409 a refused command (insufficient funds, already open) or a conflict
that outlasted the retries, 413 a body over 64 KiB, 422 an idempotency key used before for another
request, 503 the store unavailable or too slow ("maybe_committed": retry with the same key to find out).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec

import eventcore as ec
import eventcore.aio as eca

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bank.py is next to this file, however it is loaded
from bank import AccountOpened, Deposited, OpenAccount, Withdrawn  # noqa: E402

#: The store's URL, read when the application starts.
STORE_URL_ENV = "BANK_STORE_URL"
DEFAULT_STORE_URL = "sqlite:///bank.db"
#: Conflicts between processes writing one account are retried this many times before a 409.
RETRY = ec.RetryPolicy(max_retries=8)
#: Largest amount a request may move, and largest request body read.
MAX_AMOUNT = 10**12
MAX_BODY = 64 * 1024
FEED_LIMIT = 1000


def account_stream(account: str) -> ec.StreamId:
    return ec.StreamId(f"account-{account}")  # a ValidationError (400) for an id no stream may have


def fold(state: tuple[bool, int], event: ec.RecordedEvent) -> tuple[bool, int]:
    """An account as its events make it: (open, balance)."""
    is_open, balance = state
    data = event.data
    if isinstance(data, AccountOpened):
        return True, balance
    if isinstance(data, Deposited):
        return is_open, balance + data.amount
    if isinstance(data, Withdrawn):
        return is_open, balance - data.amount
    return state


class Deposit(ec.Command):
    """bank.py's deposit, into an account that is open."""

    account: ec.StreamId
    amount: int

    def initial_state(self):
        return False, 0

    def apply(self, state, event):
        return fold(state, event)

    def handle(self, state):
        ec.require(state[0], f"{self.account} is not open")
        return [ec.emit(self.account, Deposited(amount=self.amount))]


class Transfer(ec.Command):
    """bank.py's transfer between two open accounts: reads both, writes both, atomically."""

    source: ec.StreamId
    target: ec.StreamId
    amount: int

    def initial_state(self):
        return {}

    def apply(self, accounts, event):
        accounts[event.stream_id] = fold(accounts.get(event.stream_id, (False, 0)), event)
        return accounts

    def handle(self, accounts):
        for account in (self.source, self.target):
            ec.require(accounts.get(account, (False, 0))[0], f"{account} is not open")
        ec.require(accounts[self.source][1] >= self.amount, f"insufficient funds in {self.source}")
        return [
            ec.emit(self.source, Withdrawn(amount=self.amount)),
            ec.emit(self.target, Deposited(amount=self.amount)),
        ]


class HTTPError(Exception):
    """A failed request's status, error name and message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": error, "message": message}


def error_response(exc: Exception) -> tuple[int, dict]:
    """The status and JSON body of a failed request."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.body
    body = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ec.ValidationError):
        return 400, body
    if isinstance(exc, (ec.BusinessRuleViolation, ec.ConcurrencyError)):
        return 409, body
    if isinstance(exc, (ec.StoreUnavailableError, ec.CommandTimeoutError)):
        return 503, {**body, "maybe_committed": exc.maybe_committed}
    return 500, {"error": "InternalError", "message": "internal error"}


def text(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ec.ValidationError(f"{name} must be a non-empty string, got {value!r}")
    return value


def amount_of(body: dict) -> int:
    amount = body.get("amount")
    if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
        raise ec.ValidationError(f"amount must be an integer from 1 to {MAX_AMOUNT}, got {amount!r}")
    return amount


def written(result: ec.ExecutionResult) -> dict:
    return {
        "replayed": result.replayed,
        "events": [{"stream": str(e.stream_id), "version": e.version, "position": e.position, "type": e.type,
                    "event_id": str(e.event_id)} for e in result.events],
    }


def same_request(result: ec.ExecutionResult, expected: list[tuple[str, ec.Event]]) -> None:
    """A replayed result must be that of the same request: a key reused for another one is refused."""
    if result.replayed and [(e.stream_id, e.data) for e in result.events] != expected:
        raise HTTPError(422, "IdempotencyKeyReused", "this Idempotency-Key was used for another request")


class BankApp:
    """The ASGI application. `url` names the store (None: $BANK_STORE_URL, else sqlite:///bank.db);
    `options` are `eca.connect`'s (a PostgreSQL schema=, pool_size=, ...)."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self.url, self.options = url, options
        self.store: eca.AsyncEventStore | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)
        else:  # as the ASGI specification asks of a scope the application does not know
            raise NotImplementedError(f"this application serves HTTP only, not {scope['type']!r}")

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.store = await eca.connect(self.url or os.environ.get(STORE_URL_ENV, DEFAULT_STORE_URL),
                                                   **self.options)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.store is not None:
                    store, self.store = self.store, None
                    await store.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            status, body = await self.route(scope, receive)
        except Exception as exc:  # noqa: BLE001 - every failure is a JSON response
            status, body = error_response(exc)
            if status == 500:
                logging.getLogger(__name__).exception("%s %s failed", scope["method"], scope["path"])
        payload = msgspec.json.encode(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def route(self, scope: dict, receive: Any) -> tuple[int, dict]:
        store = self.store
        if store is None:
            raise HTTPError(503, "NotStarted", "the store is not open: run the application with lifespan events")
        key = dict(scope.get("headers", ())).get(b"idempotency-key")
        if key is not None:
            key = key.decode("latin-1")
        match scope["method"], scope["path"].strip("/").split("/"):
            case "GET", ["accounts", account]:
                return 200, await self.account(store, account)
            case "GET", ["events"]:
                return 200, await self.feed(store, scope.get("query_string", b"").decode("latin-1"))
            case "POST", ["accounts", account]:
                body = await read_json(receive)
                stream = account_stream(account)
                opened = AccountOpened(owner=text(body, "owner"))
                result = await eca.execute(store, OpenAccount(account=stream, owner=opened.owner), retry=RETRY,
                                           idempotency_key=key)
                same_request(result, [(stream, opened)])
                return 201, written(result)
            case "POST", ["accounts", account, "deposits"]:
                body = await read_json(receive)
                stream, amount = account_stream(account), amount_of(body)
                result = await eca.execute(store, Deposit(account=stream, amount=amount), retry=RETRY,
                                           idempotency_key=key)
                same_request(result, [(stream, Deposited(amount=amount))])
                return 200, written(result)
            case "POST", ["transfers"]:
                body = await read_json(receive)
                source, target = account_stream(text(body, "from")), account_stream(text(body, "to"))
                if source == target:
                    raise ec.ValidationError("from and to must be two different accounts")
                amount = amount_of(body)
                result = await eca.execute(store, Transfer(source=source, target=target, amount=amount),
                                           retry=RETRY, idempotency_key=key)
                same_request(result, [(source, Withdrawn(amount=amount)), (target, Deposited(amount=amount))])
                return 200, written(result)
        raise HTTPError(404, "NotFound", f"no route for {scope['method']} {scope['path']}")

    async def account(self, store: eca.AsyncEventStore, account: str) -> dict:
        events = await store.read_stream(account_stream(account))
        state = (False, 0)
        for event in events:
            state = fold(state, event)
        if not state[0]:
            raise HTTPError(404, "NotFound", f"account {account!r} is not open")
        return {"account": account, "balance": state[1], "version": events[-1].version}

    async def feed(self, store: eca.AsyncEventStore, query: str) -> dict:
        params = parse_qs(query)
        after, limit = (params.get(name, [default])[-1] for name, default in (("after", "0"), ("limit", "100")))
        if not (after.isdigit() and limit.isdigit() and 1 <= int(limit) <= FEED_LIMIT):
            raise ec.ValidationError(f"after must be a position (>= 0) and limit in 1..{FEED_LIMIT}")
        events = [{"position": e.position, "stream": str(e.stream_id), "version": e.version, "type": e.type,
                   "data": e.data, "recorded_at": e.recorded_at}
                  async for e in store.read_all(after_position=int(after), limit=int(limit), decode=False)]
        return {"events": events, "last_position": events[-1]["position"] if events else int(after)}


async def read_json(receive: Any) -> dict:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "Disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, "TooLarge", f"the request body is over {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = msgspec.json.decode(b"".join(chunks) or b"{}")
    except msgspec.DecodeError as exc:
        raise ec.ValidationError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ec.ValidationError("the request body must be a JSON object")
    return body


app = BankApp()


async def request(app: Any, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
    """One HTTP request through the app in this process: what an ASGI server would do with it."""
    path, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path, "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict] = []
    incoming = [{"type": "http.request", "body": b"" if body is None else msgspec.json.encode(body)}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], msgspec.json.decode(b"".join(m.get("body", b"") for m in sent[1:]))


def show(what: str, response: tuple[int, Any]) -> None:
    status, body = response
    if isinstance(body, dict) and "events" in body and "replayed" in body:
        body = f"{'replayed' if body['replayed'] else 'wrote'} positions {[e['position'] for e in body['events']]}"
    elif isinstance(body, dict) and "error" in body:
        body = f"{body['error']}: {body['message']}"
    print(f"{what:<30} {status} {body}")


async def demo(app: BankApp) -> None:
    """Start the app as a server would (lifespan), send it requests, shut it down."""
    to_app: asyncio.Queue = asyncio.Queue()
    from_app: asyncio.Queue = asyncio.Queue()
    running = asyncio.ensure_future(app({"type": "lifespan"}, to_app.get, from_app.put))

    async def lifespan(event: str) -> None:
        await to_app.put({"type": f"lifespan.{event}"})
        reply = await from_app.get()
        if not reply["type"].endswith(".complete"):
            raise RuntimeError(reply.get("message", reply["type"]))

    await lifespan("startup")
    try:
        for account, owner in (("alice", "Alice"), ("bob", "Bob")):
            show(f"POST /accounts/{account}", await request(app, "POST", f"/accounts/{account}", {"owner": owner}))
        for _ in range(2):  # a client retrying: one key, one deposit
            show("POST /accounts/alice/deposits", await request(
                app, "POST", "/accounts/alice/deposits", {"amount": 100}, {"Idempotency-Key": "deposit-7f3a"}))
        transfers = [request(app, "POST", "/transfers", {"from": "alice", "to": "bob", "amount": 30}) for _ in range(4)]
        for response in await asyncio.gather(*transfers):  # concurrent: three fit in 100, one is refused
            show("POST /transfers", response)
        for account in ("alice", "bob"):
            show(f"GET /accounts/{account}", await request(app, "GET", f"/accounts/{account}"))
        status, feed = await request(app, "GET", "/events?after=2&limit=3")
        show("GET /events?after=2&limit=3", (status, [(e["position"], e["stream"], e["type"], e["data"])
                                                      for e in feed["events"]]))
    finally:
        await lifespan("shutdown")
        await running


if __name__ == "__main__":
    # A fresh in-memory store unless $BANK_STORE_URL names one: the demo prints the same every time.
    asyncio.run(demo(BankApp(os.environ.get(STORE_URL_ENV, "memory://"))))
