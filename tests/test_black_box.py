"""Black-box tests written from the README and the public API only (no internals), per area: the state
cache, resumable ingest, stores that must not be created or changed, PostgreSQL connection errors, and
execute()'s arguments (metadata, timeouts, idempotency keys, expected versions, RetryPolicy, hooks,
commands piped into `head`). The command line runs as a child process, as a user would run it."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import eventcore as ec
from domain import (Deposit, Deposited, LimitedWithdraw, LimitSet, Noted, OrderPlaced, SetLimit, StockAdded,
                    StockReserved, Transfer, Withdraw, Withdrawn, assert_decisions_saw_every_prior_event,
                    assert_gap_free, balance)

PY = sys.executable
TESTS = Path(__file__).parent


# -- helpers ---------------------------------------------------------------------------------------


def run_cli(*argv, timeout=120, stdin=None, env=None):
    """`python -m eventcore argv` in a child; returns (rc, stdout, stderr)."""
    proc = subprocess.run([PY, "-m", "eventcore", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, input=stdin, cwd=TESTS, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def snapshot(directory) -> dict:
    """Every entry under `directory`: its kind, and for files the sha256 of their bytes."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                out[os.path.relpath(p, directory)] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[os.path.relpath(p, directory)] = ("file", hashlib.sha256(Path(p).read_bytes()).hexdigest())
            else:
                out[os.path.relpath(p, directory)] = ("other", None)
    return out


def jline(i, stream="s"):
    return json.dumps({"stream": stream, "type": "test.Noted", "data": {"text": str(i)}})


def texts(url) -> list:
    with ec.connect(url, migrate=False) as s:
        return [e.data.text for e in s.read_all()]


def ingest(path, url, *extra) -> dict:
    rc, out, err = run_cli("ingest", path, "--dsn", url, "--json", "--no-progress", *extra)
    assert "Traceback" not in err, err
    summary = json.loads(out) if out.strip() else {}
    summary["rc"], summary["stderr"] = rc, err
    return summary


@pytest.fixture(params=["sqlite", "postgres"])
def cli_url(request, tmp_path):
    """A store URL the command line can open: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


# == 1. StateCache ==================================================================================


class InPlaceDeposit(Deposit):
    """`apply` mutates the state in place (as the README's Transfer.apply does); `handle` is pure."""

    def initial_state(self):
        return {"b": 0}

    def apply(self, state, event):
        state["b"] += event.data.amount if isinstance(event.data, Deposited) else -event.data.amount
        return state

    def handle(self, state):
        return [ec.emit(self.account, Deposited(amount=self.amount, balance=state["b"] + self.amount))]


class InPlaceWithdraw(InPlaceDeposit):
    def handle(self, state):
        ec.require(state["b"] >= self.amount, f"insufficient {state['b']}")
        return [ec.emit(self.account, Withdrawn(amount=self.amount, balance=state["b"] - self.amount))]


def test_cache_with_in_place_apply_and_writes_behind_its_back(store):
    cache = ec.StateCache()
    a = ec.StreamId("inplace")
    ec.execute(store, InPlaceDeposit(a, 5), cache=cache)
    ec.execute(store, InPlaceDeposit(a, 5), cache=cache)
    store.append([ec.emit(a, Deposited(amount=100))])  # behind the cache's back
    ec.execute(store, InPlaceDeposit(a, 5), cache=cache)
    ec.execute(store, InPlaceWithdraw(a, 50), cache=cache)
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient 65"):
        ec.execute(store, InPlaceWithdraw(a, 200), cache=cache)
    ec.execute(store, InPlaceDeposit(a, 1), cache=cache)
    assert balance(store, a) == 66
    assert_decisions_saw_every_prior_event(store, a)


def test_cache_replay_beats_a_refusal_and_a_no_op_made_on_cached_state(store):
    cache = ec.StateCache()
    a = ec.StreamId("rk-a")
    store.append([ec.emit(a, Deposited(amount=50))])
    first = ec.execute(store, Withdraw(a, 50), idempotency_key="rk-1")
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Withdraw(a, 50), cache=cache)  # warms the cache: balance 0
    again = ec.execute(store, Withdraw(a, 50), cache=cache, idempotency_key="rk-1")
    assert again.replayed and [e.event_id for e in again.events] == [e.event_id for e in first.events]
    lim = ec.StreamId("rk-l")
    first = ec.execute(store, SetLimit(lim, 5), idempotency_key="rk-2")
    ec.execute(store, SetLimit(lim, 5), cache=cache)  # a no-op, cached
    again = ec.execute(store, SetLimit(lim, 5), cache=cache, idempotency_key="rk-2")
    assert again.replayed and [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert store.stream_version(lim) == 1 and balance(store, a) == 0


class Reserve(ec.Command):
    """Reads an order, discovers its product streams, reserves one of each (refused when out of stock)."""

    order: ec.StreamId

    def initial_state(self):
        return {"products": [], "stock": {}}

    def apply(self, state, event):
        d = event.data
        if isinstance(d, OrderPlaced):
            state["products"] = list(d.products)
        elif isinstance(d, StockAdded):
            state["stock"][event.stream_id] = state["stock"].get(event.stream_id, 0) + d.quantity
        elif isinstance(d, StockReserved):
            state["stock"][event.stream_id] = state["stock"].get(event.stream_id, 0) - d.quantity
        return state

    def discover(self, state):
        return [f"product-{p}" for p in state["products"]]

    def handle(self, state):
        ec.require(state["products"], "unknown order")
        out = []
        for p in state["products"]:
            sid = f"product-{p}"
            ec.require(state["stock"].get(sid, 0) >= 1, f"out of stock: {p}")
            out.append(ec.emit(sid, StockReserved(order=self.order, quantity=1)))
        return out


class Amend(ec.Command):
    order: ec.StreamId
    products: list[str]

    def handle(self, state):
        return [ec.emit(self.order, OrderPlaced(products=self.products))]


def test_cache_with_discover_answers_as_uncached(store):
    """The discovered set changes through the cache and behind its back; cached and uncached agree."""
    answers = {}
    for mode, cache in (("Xu", None), ("Xc", ec.StateCache())):
        o = ec.StreamId(f"order-{mode}")
        p = lambda n: f"{mode}{n}"  # noqa: E731
        store.append([ec.emit(f"product-{p(1)}", StockAdded(quantity=5)),
                      ec.emit(f"product-{p(2)}", StockAdded(quantity=5))])
        log = []

        def run(cmd):
            try:
                events = ec.execute(store, cmd, cache=cache).events
                log.append(sorted(e.stream_id.replace(mode, "") for e in events))
            except ec.BusinessRuleViolation as exc:
                log.append(str(exc).replace(mode, ""))

        run(Amend(o, [p(1)]))
        run(Reserve(o))
        run(Amend(o, [p(1), p(2)]))
        run(Reserve(o))
        run(Amend(o, [p(3)]))
        run(Reserve(o))
        store.append([ec.emit(f"product-{p(3)}", StockAdded(quantity=1))])  # behind the cache
        run(Reserve(o))
        run(Reserve(o))
        store.append([ec.emit(o, OrderPlaced(products=[p(2)]))])  # behind the cache: the order changes
        run(Reserve(o))
        answers[mode] = log
    assert answers["Xc"] == answers["Xu"]


def test_cache_random_commands_agree_with_an_uncached_twin_under_tiny_bounds():
    """Differential: the same random commands (and writes behind the cache) on two memory stores, one
    through a cache with tiny bounds: every answer (events or refusal) is the same."""
    for bounds in (dict(max_entries=1), dict(max_entries=2, max_stream_events=1), dict(max_stream_events=0),
                   dict(max_events=1), dict(max_entries=1, max_events=1, max_stream_events=1)):
        rng = random.Random(7)
        ref, st = ec.connect("memory://"), ec.connect("memory://")
        cache = ec.StateCache(**bounds)
        accts = [ec.StreamId(f"a{i}") for i in range(4)]
        for s in (ref, st):
            s.append([ec.emit(a, Deposited(amount=50)) for a in accts])
        for step in range(200):
            k, (a, b), amt = rng.random(), rng.sample(accts, 2), rng.randint(1, 60)
            if k >= 0.7:
                for s in (ref, st):
                    s.append([ec.emit(a, Deposited(amount=amt))])
                continue
            cmd = Transfer(a, b, amt) if k < 0.3 else Withdraw(a, amt) if k < 0.5 else Deposit(a, amt)
            outs = []
            for s, c in ((ref, None), (st, cache)):
                try:
                    outs.append([(e.stream_id, e.version, e.data) for e in ec.execute(s, cmd, cache=c).events])
                except ec.BusinessRuleViolation as exc:
                    outs.append(str(exc))
            assert outs[0] == outs[1], (bounds, step, cmd)


def test_cache_differential_with_a_second_store_object_writing_behind_its_back(tmp_path):
    """Two SQLite twins: A uncached; B cached, with another store object on B's file writing behind the
    cache. Refusals, no-ops, errors raised by handle, transfers: every answer is the same."""
    for seed in range(8):
        rng = random.Random(seed)
        a_store = ec.connect(f"sqlite:///{tmp_path / f'a{seed}.db'}")
        b_store = ec.connect(f"sqlite:///{tmp_path / f'b{seed}.db'}")
        behind = ec.connect(f"sqlite:///{tmp_path / f'b{seed}.db'}")
        cache = ec.StateCache(max_entries=rng.choice([1, 2, 100]), max_stream_events=rng.choice([0, 1, 1000]))
        accts = [ec.StreamId(f"a{i}") for i in range(3)]
        for st in (a_store, b_store):
            st.append([ec.emit(a, Deposited(amount=20)) for a in accts])
        for step in range(80):
            k, (a, b), amt = rng.random(), rng.sample(accts, 2), rng.randint(1, 30)
            if k < 0.25:
                ev = rng.choice([Deposited(amount=amt), Withdrawn(amount=amt), LimitSet(limit=rng.randint(1, 3))])
                a_store.append([ec.emit(a, ev)])
                behind.append([ec.emit(a, ev)])
                continue
            cmd = rng.choice([Transfer(a, b, amt), Withdraw(a, amt), Deposit(a, amt), SetLimit(a, rng.randint(1, 3)),
                              LimitedWithdraw(a)])
            outs = []
            for st, c in ((a_store, None), (b_store, cache)):
                try:
                    outs.append([(e.stream_id, e.version, e.data) for e in ec.execute(st, cmd, cache=c).events])
                except Exception as exc:  # refusals, handle's own errors, apply failing on a LimitSet
                    outs.append((type(exc).__name__, str(exc)))
            assert outs[0] == outs[1], (seed, step, cmd)
        for st in (a_store, b_store, behind):
            st.close()


def test_a_closed_memory_store_refuses_commands_and_its_cache_gains_no_entries():
    """A closed memory:// store keeps the contract of the other backends: execute() and append() raise
    StoreUnavailableError, and closing drops the store's cache entries, which no later execute re-adds."""
    cache = ec.StateCache()
    s = ec.connect("memory://")
    ec.execute(s, Deposit(ec.StreamId("a"), 5), cache=cache)
    s.close()
    assert len(cache) == 0
    with pytest.raises(ec.StoreUnavailableError):
        ec.execute(s, Deposit(ec.StreamId("a"), 5), cache=cache)
    assert len(cache) == 0
    with pytest.raises(ec.StoreUnavailableError):
        s.append([ec.emit("a", Deposited(amount=1))])


def test_execute_on_a_closed_store_is_typed_with_and_without_cache(tmp_path):
    s = ec.connect(f"sqlite:///{tmp_path / 'c.db'}")
    cache = ec.StateCache()
    ec.execute(s, Deposit(ec.StreamId("a"), 5), cache=cache)
    s.close()
    for c in (cache, None):
        with pytest.raises(ec.StoreUnavailableError, match="closed"):
            ec.execute(s, Deposit(ec.StreamId("a"), 5), cache=c)
    assert len(cache) == 0


def test_cache_shared_with_a_forked_child(tmp_path):
    """Parent warms a cache; a forked child writes through the inherited store and cache; the parent's
    cached commands then see the child's writes."""
    s = ec.connect(f"sqlite:///{tmp_path / 'f.db'}")
    cache = ec.StateCache()
    a = ec.StreamId("a")
    ec.execute(s, Deposit(a, 100), cache=cache)
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(s, Withdraw(a, 150), cache=cache)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ec.execute(s, Deposit(a, 100), cache=cache)
            ec.execute(s, Withdraw(a, 150), cache=cache)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(s, Withdraw(a, 51), cache=cache)
    ec.execute(s, Withdraw(a, 50), cache=cache)
    assert balance(s, a) == 0
    assert_decisions_saw_every_prior_event(s, a)
    s.close()


def test_state_cache_options_are_checked():
    for bad in (dict(max_entries=True), dict(max_entries=1.5), dict(max_entries="10"), dict(max_entries=None),
                dict(max_stream_events=-1), dict(max_stream_events=True)):
        with pytest.raises(ec.ValidationError):
            ec.StateCache(**bad)


# == 2. Resumable ingest ============================================================================


def test_cli_ingest_run_that_rejects_nothing_leaves_no_stale_rejects(tmp_path, cli_url):
    """Run 1 rejects lines 2 and 3; once they are fixed, run 2 writes them and rejects nothing, and no
    rejects file is left listing lines that are stored by now."""
    url, path = cli_url, tmp_path / "in.jsonl"
    rejects = Path(f"{path}.rejects.jsonl")
    path.write_text("\n".join([jline(0), "{b1", "{b2", jline(3)]) + "\n")
    first = ingest(path, url, "--skip-invalid")
    assert (first["events"], first["rejected"]) == (2, 2)
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [2, 3]
    path.write_text("\n".join(jline(i) for i in range(4)) + "\n")
    second = ingest(path, url, "--skip-invalid")
    assert (second["events"], second["skipped"], second["rejected"]) == (2, 2, 0)
    assert sorted(texts(url)) == ["0", "1", "2", "3"]
    stale = [json.loads(x)["line"] for x in rejects.read_text().splitlines()] if rejects.exists() else []
    assert stale == [], f"the rejects file still lists lines {stale}, all of them written by now"


def test_cli_ingest_rejects_file_is_rewritten_by_a_run_with_rejects(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    rejects = Path(f"{path}.rejects.jsonl")
    path.write_text("\n".join([jline(0), "{b1", "{b2", jline(3)]) + "\n")
    ingest(path, url, "--skip-invalid")
    path.write_text("\n".join([jline(0), jline(1), "{b2", jline(3)]) + "\n")
    second = ingest(path, url, "--skip-invalid")
    assert (second["events"], second["rejected"]) == (1, 1)
    records = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in records] == [(3, "{b2")] and records[0]["reason"]


@pytest.mark.parametrize("literal", ["1e400", "-1E+999", "[1, 2, 1e309]"])
def test_cli_ingest_rejects_a_number_that_overflows_to_infinity_and_the_store_stays_readable(tmp_path, literal):
    """A JSON number past a float's range (infinity to any JSON reader) is a rejected line, like
    infinity itself: nothing unreadable is stored, and the feed reads on past it."""
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_text('{"stream": "s", "type": "test.Opaque", "data": {"value": ' + literal + '}}\n'
                    + jline(1, "t") + "\n")
    summary = ingest(path, url, "--skip-invalid")
    assert (summary["events"], summary["rejected"]) == (1, 1)
    with ec.connect(url, migrate=False) as s:
        assert [e.data.text for e in s.read_all()] == ["1"]


def test_cli_ingest_crlf_file_that_grows_and_is_converted_keeps_its_key(tmp_path, cli_url):
    url, path = cli_url, tmp_path / "in.jsonl"
    path.write_bytes(("\r\n".join(jline(i) for i in range(3)) + "\r\n").encode())
    assert ingest(path, url)["events"] == 3
    with path.open("ab") as f:
        f.write((jline(3) + "\r\n").encode())
    assert (ingest(path, url)["events"], ingest(path, url)["skipped"]) == (1, 4)
    path.write_bytes(("\n".join(jline(i) for i in range(5)) + "\n").encode())  # dos2unix + one more line
    again = ingest(path, url)
    assert (again["events"], again["skipped"]) == (1, 4)
    assert texts(url) == [str(i) for i in range(5)]


def test_cli_ingest_bom_first_line_then_removed(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(jline(i) for i in range(3)) + "\n").encode())
    first = ingest(path, url, "--skip-invalid")
    assert (first["events"], first["rejected"]) == (2, 1)
    rejected = json.loads(Path(f"{path}.rejects.jsonl").read_text())
    assert rejected["line"] == 1 and "BOM" in rejected["reason"]
    path.write_bytes(("\n".join(jline(i) for i in range(4)) + "\n").encode())
    second = ingest(path, url, "--skip-invalid")
    assert (second["events"], second["skipped"]) == (2, 2)
    assert sorted(texts(url)) == ["0", "1", "2", "3"]
    rc, out, err = run_cli("ingest", path, "--dsn", f"sqlite:///{tmp_path / 'b.db'}", "--no-progress",
                           "--no-resume")
    assert rc == 0


def test_cli_ingest_empty_blank_and_all_bad_files_then_filled(tmp_path):
    for start in (b"", b"\n\n\n", b"{bad\n{bad2\n"):
        d = tmp_path / hashlib.sha1(start).hexdigest()[:8]
        d.mkdir()
        url, path = f"sqlite:///{d / 's.db'}", d / "in.jsonl"
        path.write_bytes(start)
        first = ingest(path, url, "--skip-invalid")
        assert first["rc"] == 0 and first["events"] == 0
        path.write_text("\n".join(jline(i) for i in range(3)) + "\n")
        assert ingest(path, url, "--skip-invalid")["events"] == 3
        assert ingest(path, url, "--skip-invalid")["events"] == 0
        assert texts(url) == ["0", "1", "2"]


def test_cli_ingest_non_utf8_line_is_rejected_then_written_once_fixed(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_bytes(f"{jline(0)}\n".encode() + b'{"stream":"s","type":"test.Noted","data":{"text":"caf\xe9"}}\n'
                     + f"{jline(2)}\n".encode())
    first = ingest(path, url, "--skip-invalid")
    assert (first["events"], first["rejected"]) == (2, 1)
    record = json.loads(Path(f"{path}.rejects.jsonl").read_text())
    assert record["line"] == 2 and "UTF-8" in record["reason"]
    path.write_text("\n".join(jline(i) for i in range(3)) + "\n")
    assert ingest(path, url, "--skip-invalid")["events"] == 1
    assert sorted(texts(url)) == ["0", "1", "2"]


def test_cli_ingest_binary_garbage_is_rejected_line_by_line(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    summary = ingest(path, url, "--skip-invalid")
    assert summary["rc"] == 0 and summary["events"] == 0 and summary["rejected"] == 5
    for line in Path(f"{path}.rejects.jsonl").read_text().splitlines():
        json.loads(line)


def test_cli_ingest_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    lines = [json.dumps({"stream": "s", "type": "test.Noted", "data": {"text": f"a{sep}b"}}, ensure_ascii=False)
             for sep in ("\u2028", "\u0085", "\u2029")]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"stream":"s",\r"type":"test.Noted","data":{"text":"cr"}}\n')
    summary = ingest(path, url)
    assert (summary["events"], summary["rejected"]) == (4, 0)
    assert texts(url) == ["a\u2028b", "a\u0085b", "a\u2029b", "cr"]


def test_cli_ingest_huge_lines(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    big = json.dumps({"stream": "s", "type": "test.Noted", "data": {"text": "x" * (17 * 2**20)}})
    ok = json.dumps({"stream": "s", "type": "test.Noted", "data": {"text": "y" * (15 * 2**20)}})
    path.write_text("\n".join([jline(0), big, ok, jline(3)]) + "\n")
    summary = ingest(path, url, "--skip-invalid")
    assert (summary["events"], summary["rejected"]) == (3, 1)
    record = json.loads(Path(f"{path}.rejects.jsonl").read_text())
    assert record["line"] == 2 and "16 MiB" in record["reason"]
    assert [len(t) for t in texts(url)] == [1, 15 * 2**20, 1]


def test_cli_ingest_gzip_that_grows_by_a_member_or_is_recompressed(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl.gz"
    lines = [jline(i, f"s{i % 3}") for i in range(10)]
    with gzip.open(path, "wt") as g:
        g.write("\n".join(lines[:5]) + "\n")
    assert ingest(path, url)["events"] == 5
    with gzip.open(path, "at") as g:  # a second gzip member
        g.write("\n".join(lines[5:8]) + "\n")
    assert (ingest(path, url)["events"]) == 3
    with gzip.open(path, "wt") as g:
        g.write("\n".join(lines) + "\n")
    again = ingest(path, url)
    assert (again["events"], again["skipped"]) == (2, 8)
    assert sorted(texts(url), key=int) == [str(i) for i in range(10)]


def test_cli_ingest_truncated_gzip_then_complete(tmp_path):
    import io

    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "t.jsonl.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write(("\n".join(jline(i) for i in range(50)) + "\n").encode())
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3])
    first = ingest(path, url, "--skip-invalid")
    assert first["rc"] == 1 and "Traceback" not in first["stderr"]
    path.write_bytes(data)
    ingest(path, url, "--skip-invalid")
    assert sorted(texts(url), key=int) == [str(i) for i in range(50)]


def test_cli_ingest_rotated_file_whose_first_line_was_bad(tmp_path):
    """File A's first line was rejected (anchor: line 2); a rotated file B at the same path is ingested
    whole, and A's anchor never matches it."""
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "app.jsonl"
    path.write_text("\n".join(["{bad", jline(1), jline(2)]) + "\n")
    assert ingest(path, url, "--skip-invalid")["events"] == 2
    path.write_text("\n".join(jline(i) for i in range(100, 104)) + "\n")
    rotated = ingest(path, url, "--skip-invalid")
    assert (rotated["events"], rotated["skipped"]) == (4, 0)
    assert sorted(texts(url), key=int) == ["1", "2", "100", "101", "102", "103"]


def test_cli_ingest_middle_line_blanked_then_restored_is_written_once(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    lines = [jline(i) for i in range(4)]
    for variant in (lines[:3], [lines[0], "", lines[2], lines[3]], lines):
        path.write_text("\n".join(variant) + "\n")
        assert ingest(path, url, "--skip-invalid")["rc"] == 0
    assert texts(url) == ["0", "1", "2", "3"]


def test_cli_ingest_another_parallel_on_resume_is_one_line(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_text("\n".join(jline(i, f"s{i % 3}") for i in range(10)) + "\n")
    assert ingest(path, url, "--parallel", "2")["events"] == 10
    rc, out, err = run_cli("ingest", path, "--dsn", url, "--no-progress", "--parallel", "3")
    assert rc == 2 and "parallel=2" in err and err.count("\n") == 1 and "Traceback" not in err
    assert len(texts(url)) == 10


def test_cli_ingest_no_resume_with_a_resume_key_is_a_usage_error(tmp_path):
    """`--no-resume --resume-key K` contradict each other: a usage error (exit 2), and nothing is written
    again under the key an earlier run recorded."""
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_text("\n".join(jline(i) for i in range(3)) + "\n")
    assert ingest(path, url, "--resume-key", "k")["events"] == 3
    rc, out, err = run_cli("ingest", path, "--dsn", url, "--no-progress", "--no-resume", "--resume-key", "k")
    assert rc == 2, (rc, out, err)
    assert texts(url) == ["0", "1", "2"]


def test_ingest_api_none_items_with_parallel_and_changed_batch_size(store):
    items = [(f"s{i % 3}", Noted(text=str(i))) for i in range(12)]
    holes = [None if i in (0, 5, 6, 11) else x for i, x in enumerate(items)]
    first = store.ingest(holes, batch_size=2, resume_key="p", parallel=2)
    assert (first.events, first.skipped) == (8, 0)
    second = store.ingest(items, batch_size=3, resume_key="p", parallel=2)
    assert (second.events, second.skipped) == (4, 8)
    assert sorted(int(e.data.text) for e in store.read_all()) == list(range(12))
    assert store.ingest(items, batch_size=5, resume_key="p", parallel=2).events == 0
    assert_gap_free(store)


def test_ingest_api_only_none_items_then_filled(store):
    assert store.ingest([None] * 5, resume_key="n").events == 0
    again = store.ingest([("n", Noted(text=str(i))) for i in range(5)], resume_key="n")
    assert (again.events, again.skipped) == (5, 0)


def test_ingest_api_expected_on_a_stream_first_met_in_a_hole_is_checked_on_resume(store):
    store.ingest([("a", Noted(text="0")), None], resume_key="k", expected={"e": ec.NO_STREAM})
    store.append([ec.emit("e", Noted(text="intruder"))])
    with pytest.raises(ec.IngestError, match="version conflict on stream 'e'"):
        store.ingest([("a", Noted(text="0")), ("e", Noted(text="1"))], resume_key="k", expected={"e": ec.NO_STREAM})
    assert [e.data.text for e in store.read_stream("e")] == ["intruder"]


def test_ingest_one_lane_writes_an_item_passed_over_after_commit_once(store):
    """One lane (parallel=1), resumed three times: item 0 committed; then passed over (None) while an
    item is appended; then back. Item 0 is stored once."""
    runs = [[("a", Noted(text="0"))], [None, ("b", Noted(text="1"))], [("a", Noted(text="0")), ("b", Noted(text="1"))]]
    for items in runs:
        store.ingest(items, batch_size=1, resume_key="blank", parallel=1)
    assert sorted(e.data.text for e in store.read_all()) == ["0", "1"]


def test_ingest_random_holes_fixed_over_runs_write_each_item_once():
    """Differential over 150 random runs: holes fixed, new items appended, batch sizes and streams
    varying, parallel 1-3; committed items never change. Every item is stored exactly once."""
    for seed in range(150):
        rng = random.Random(seed)
        s = ec.connect("memory://")
        parallel, state, committed = rng.choice([1, 2, 3]), [], set()
        streams = [f"s{k}" for k in range(rng.randint(1, 7))]
        stream_of: dict = {}
        for run in range(rng.randint(2, 6)):
            for i in range(len(state)):
                if i not in committed and rng.random() < 0.5:
                    state[i] = rng.choice(["ok", "hole"])
            state += [rng.choice(["ok", "ok", "hole"]) for _ in range(rng.randint(0, 10))]
            items = [(stream_of.setdefault(i, rng.choice(streams)), Noted(text=str(i))) if k == "ok" else None
                     for i, k in enumerate(state)]
            s.ingest(items, batch_size=rng.randint(1, 5), resume_key="k", parallel=parallel)
            committed |= {i for i, k in enumerate(state) if k == "ok"}
            assert sorted(int(e.data.text) for e in s.read_all()) == sorted(committed), (seed, run)


# == 3. Stores that must not be created or changed ==================================================


def _connect_attempt(url, migrate):
    """The error ec.connect raised, or None when it opened a store (closed again at once)."""
    try:
        ec.connect(url, migrate=migrate).close()
    except ec.EventCoreError as exc:
        return exc
    return None


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink to a directory", "symlink to a foreign db",
                                  "/dev/null", "/dev/zero", "file as a directory", "empty file",
                                  "foreign WAL db with uncommitted writer", "foreign db, exclusive lock"])
def test_read_only_commands_on_odd_paths_create_and_change_nothing(tmp_path, kind):
    """status, tail and projections fail (typed, no traceback) and ec.connect raises an EventCoreError;
    nothing under tmp_path changes, and nothing appears beside a device."""
    held = None
    target = tmp_path / "x.db"
    if kind == "dangling symlink":
        os.symlink(tmp_path / "nowhere.db", target)
    elif kind == "symlink to a directory":
        (tmp_path / "sub").mkdir()
        os.symlink(tmp_path / "sub", target)
    elif kind == "symlink to a foreign db":
        c = sqlite3.connect(tmp_path / "app.db")
        c.execute("create table t(x)")
        c.commit()
        c.close()
        os.symlink(tmp_path / "app.db", target)
    elif kind == "/dev/null":
        target = Path("/dev/null")
    elif kind == "/dev/zero":
        target = Path("/dev/zero")
    elif kind == "file as a directory":
        (tmp_path / "f").write_text("hello")
        target = tmp_path / "f" / "x.db"
    elif kind == "empty file":
        target.write_bytes(b"")
    elif kind == "foreign WAL db with uncommitted writer":
        held = sqlite3.connect(target, isolation_level=None)
        held.execute("PRAGMA journal_mode=WAL")
        held.execute("create table t(x)")
        held.execute("BEGIN IMMEDIATE")
        held.execute("insert into t values (1)")
    elif kind == "foreign db, exclusive lock":
        held = sqlite3.connect(target, isolation_level=None)
        held.execute("create table t(x)")
        held.execute("PRAGMA locking_mode=EXCLUSIVE")
        held.execute("BEGIN EXCLUSIVE")
        held.execute("insert into t values (1)")
    url = f"sqlite:///{target}"
    beside = [Path(f"{target}{suffix}") for suffix in ("-journal", "-wal", "-shm")] if target.is_char_device() else []
    there = {p for p in beside if p.exists()}
    appeared = []
    try:
        before = snapshot(tmp_path)
        migrates = (False,) if kind in ("dangling symlink", "/dev/null", "empty file") or target.is_char_device() \
            else (False, True)
        # Concurrently: on a locked file each attempt waits out SQLite's busy timeout before it fails.
        with ThreadPoolExecutor(max_workers=5) as pool:
            commands = {c: pool.submit(run_cli, c, "--dsn", url, timeout=60) for c in ("status", "tail", "projections")}
            connects = {m: pool.submit(_connect_attempt, url, m) for m in migrates}
            for command, future in commands.items():
                rc, out, err = future.result()
                assert rc != 0 and "Traceback" not in err, (command, out, err)
            for migrate, future in connects.items():
                assert isinstance(future.result(), ec.EventCoreError), migrate
        after = snapshot(tmp_path)
        for shm in [k for k in before if k.endswith("-shm")]:  # SQLite's shared memory: readers write it
            before[shm] = after.get(shm, before[shm])
        assert after == before
    finally:
        if held is not None:
            held.close()
        appeared = [p for p in beside if p.exists() and p not in there]
        for p in appeared:
            p.unlink()
    assert appeared == []


def test_read_only_commands_through_a_symlink_to_a_store_work_and_change_nothing(tmp_path):
    with ec.connect(f"sqlite:///{tmp_path / 'real.db'}") as s:
        s.append([ec.emit("s", Noted(text="x"))])
    os.symlink(tmp_path / "real.db", tmp_path / "link.db")
    before = snapshot(tmp_path)
    for command in ("status", "tail", "projections"):
        rc, out, err = run_cli(command, "--dsn", f"sqlite:///{tmp_path / 'link.db'}")
        assert rc == 0, (out, err)
    assert snapshot(tmp_path) == before


def test_read_only_commands_see_events_a_live_writer_left_in_the_wal(tmp_path):
    """A store another process keeps open, its events still in the -wal file: tail and status see them."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    writer = subprocess.Popen([PY, "-c", (
        "import sys, time\nimport eventcore as ec\nfrom domain import Noted\n"
        f"s = ec.connect({url!r})\n"
        "for i in range(5): s.append([ec.emit('s', Noted(text=str(i)))])\n"
        "print('ready', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True, cwd=TESTS)
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert (tmp_path / "s.db-wal").stat().st_size > 0
        rc, out, _ = run_cli("tail", "--dsn", url)
        assert rc == 0 and [json.loads(x)["data"]["text"] for x in out.splitlines()] == list("01234")
        rc, out, _ = run_cli("status", "--dsn", url, "--json")
        assert rc == 0 and json.loads(out)["head_position"] == 5
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()


def test_connect_with_migrate_on_a_dangling_symlink_and_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("hello")
    before = snapshot(tmp_path)
    with pytest.raises(ec.StoreUnavailableError):
        ec.connect(f"sqlite:///{tmp_path / 'f' / 'x.db'}")
    assert snapshot(tmp_path) == before


# -- PostgreSQL schemas that are not eventcore's, or not there --------------------------------------


def _pg_url(pg_dsn, schema):
    return f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={schema}"


def _pg_objects(pg_dsn, schema):
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        return (conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone(),
                conn.execute("SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                             " WHERE n.nspname = %s ORDER BY 1", (schema,)).fetchall(),
                conn.execute("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                             " WHERE n.nspname = %s ORDER BY 1", (schema,)).fetchall())


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE {s}.streams (id text PRIMARY KEY, version int)",
    "CREATE TABLE {s}.command_keys (k text PRIMARY KEY)",
    "CREATE TABLE {s}.ingest_progress (k text PRIMARY KEY)",
    "CREATE TABLE {s}.projection_checkpoints (name text PRIMARY KEY)",
    "CREATE VIEW {s}.events AS SELECT 1 AS id",
    "CREATE TABLE {s}.schema_migrations (version text PRIMARY KEY, applied timestamptz)",
    "CREATE SEQUENCE {s}.events",
], ids=["streams", "command_keys", "ingest_progress", "projection_checkpoints", "events-view",
        "schema_migrations", "events-sequence"])
def test_pg_schema_of_another_application_is_refused_and_left_alone(pg_dsn, pg_schema, ddl):
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
        conn.execute(ddl.format(s=sql.Identifier(pg_schema).as_string(conn)))
    before = _pg_objects(pg_dsn, pg_schema)
    for migrate in (False, True):
        with pytest.raises(ec.EventCoreError) as info:  # refused, or a migration that failed whole
            ec.connect(pg_dsn, schema=pg_schema, migrate=migrate)
        assert "\n" not in str(info.value)
    for command in ("status", "tail", "projections"):
        rc, out, err = run_cli(command, "--dsn", _pg_url(pg_dsn, pg_schema))
        assert rc != 0 and "Traceback" not in err
    assert _pg_objects(pg_dsn, pg_schema) == before


def test_pg_empty_schema_is_missing_without_migrate_and_a_store_with_it(pg_dsn, pg_schema):
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
    before = _pg_objects(pg_dsn, pg_schema)
    with pytest.raises(ec.StoreNotFoundError):
        ec.connect(pg_dsn, schema=pg_schema, migrate=False)
    rc, out, _ = run_cli("status", "--dsn", _pg_url(pg_dsn, pg_schema))
    assert rc == 1 and "missing" in out
    assert _pg_objects(pg_dsn, pg_schema) == before
    with ec.connect(pg_dsn, schema=pg_schema) as s:
        s.append([ec.emit("s", Noted(text="x"))])


def test_pg_closed_store_is_typed_with_a_cache(pg_dsn, pg_schema):
    s = ec.connect(pg_dsn, schema=pg_schema)
    cache = ec.StateCache()
    ec.execute(s, Deposit(ec.StreamId("a"), 1), cache=cache)
    s.close()
    for c in (cache, None):
        with pytest.raises(ec.StoreUnavailableError):
            ec.execute(s, Deposit(ec.StreamId("a"), 1), cache=c)
    assert len(cache) == 0


# == 4. PostgreSQL connection errors: no password anywhere ==========================================


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "TopSecretPw"


@pytest.mark.parametrize("sep", ["/", "#", "?", "@"])
def test_a_password_with_an_unencoded_url_character_is_refused_unshown(sep):
    """A password holding an unencoded '/', '#', '?' or '@' (a malformed URL, but a common one): connect()
    refuses it with a ValidationError that says to percent-encode, every command fails saying the URL is
    malformed, and no part of the password appears anywhere (status --json included)."""
    password = f"{SECRET}{sep}{SECRET}" if sep != "@" else f"x@{SECRET}"
    dsn = f"postgresql://app:{password}@127.0.0.1:{_free_port()}/db"
    with pytest.raises(ec.ValidationError, match="percent-encode") as info:
        ec.connect(dsn, connect_timeout=3)
    said = [f"{info.value!r} {info.value}"]
    for argv in (["status"], ["status", "--json"], ["tail"], ["migrate"]):
        rc, out, err = run_cli(*argv, "--dsn", dsn)
        assert rc != 0 and "malformed" in out + err and "Traceback" not in err, (argv, out, err)
        said.append(out + err)
    leaks = [s for s in said if SECRET in s]
    assert not leaks, leaks


def test_status_of_a_url_with_a_bracket_says_malformed_on_one_line():
    """An unclosed '[' (in the host or the password): status and status --json exit 1 and say the URL is
    malformed, without a traceback."""
    for dsn in ("postgresql://app@[bad/db", "postgresql://app:pw[x@127.0.0.1:1/db"):
        for argv in (["status"], ["status", "--json"]):
            rc, out, err = run_cli(*argv, "--dsn", dsn)
            assert rc == 1 and "Traceback" not in err and "malformed" in out, (out, err)


@pytest.mark.parametrize("password", ["Séc🔑Unixyz", "Sec Space xyz", "Sec'Quote\"xyz", "Sec%25pct"])
def test_odd_but_encodable_passwords_are_never_shown(password):
    from urllib.parse import quote

    port = _free_port()
    for dsn in (f"postgresql://app:{quote(password, safe='')}@127.0.0.1:{port}/db",
                f"postgresql://app@127.0.0.1:{port}/db?password={quote(password, safe='')}"):
        with pytest.raises(ec.StoreUnavailableError) as info:
            ec.connect(dsn, connect_timeout=3)
        shown = f"{info.value} {info.value!r}"
        rc, out, err = run_cli("status", "--dsn", dsn, "--json")
        shown += out + err
        for fragment in (password, quote(password, safe=""), "xyz", "Unixyz"):
            assert fragment not in shown, (fragment, shown)


def test_unreachable_host_with_connect_timeout_is_fast_and_one_line():
    started = time.monotonic()
    rc, out, err = run_cli("tail", "--dsn", "postgresql://app:pw@10.255.255.1:5432/db?connect_timeout=2",
                           timeout=60)
    took = time.monotonic() - started
    assert rc == 2 and err.count("\n") == 1 and "pw@" not in err and took < 20, (took, err)


# == 5. execute() arguments, expected versions, RetryPolicy, hooks, pipes ===========================


@pytest.mark.parametrize("fields", [
    dict(custom="x"), dict(custom=[1]), dict(custom=None), dict(user_id=5), dict(causation_id=7),
], ids=["custom-str", "custom-list", "custom-None", "user_id-int", "causation_id-int"])
def test_metadata_of_the_wrong_type_is_refused_naming_the_field(store, fields):
    """A Metadata whose fields hold the wrong types is a ValidationError naming the field, before anything
    is written: the stream stays empty and usable."""
    name = next(iter(fields))
    acct = ec.StreamId("poisoned")
    with pytest.raises(ec.ValidationError, match=rf"Metadata\.{name} "):
        ec.execute(store, Deposit(acct, 1), metadata=ec.Metadata(**fields))
    assert store.stream_version(acct) == 0
    ec.execute(store, Deposit(acct, 1))  # the account still works
    assert [e.data.amount for e in store.read_stream(acct)] == [1]


def test_metadata_values_json_cannot_hold_are_refused(store):
    for md in (ec.Metadata(custom={"x": float("nan")}), ec.Metadata(correlation_id="a\x00")):
        with pytest.raises(ec.SerializationError):
            ec.execute(store, Deposit(ec.StreamId("m"), 1), metadata=md)
    assert store.head_position() == 0


def test_timeouts_that_are_odd_but_valid_or_invalid(store):
    import decimal

    with pytest.raises(ec.CommandTimeoutError):
        ec.execute(store, Deposit(ec.StreamId("t"), 1), timeout=5e-324)
    for bad in (decimal.Decimal("NaN"), 1j, -0.0):
        with pytest.raises(ec.ValidationError, match="timeout"):
            ec.execute(store, Deposit(ec.StreamId("t"), 1), timeout=bad)
    ec.execute(store, Deposit(ec.StreamId("t"), 1), timeout=9e9)
    assert store.stream_version("t") == 1


def test_idempotency_keys_odd_but_valid(store):
    class StrSub(str):
        pass

    for key in (StrSub("k1"), " ", "é" * 255, uuid.UUID(int=5)):
        first = ec.execute(store, Deposit(ec.StreamId("k"), 1), idempotency_key=key)
        assert ec.execute(store, Deposit(ec.StreamId("k"), 1), idempotency_key=key).replayed
        assert not first.replayed
    for bad in ("a\x00b", "a\ud800", "a\nb"):
        with pytest.raises(ec.ValidationError, match="idempotency key"):
            ec.execute(store, Deposit(ec.StreamId("k"), 1), idempotency_key=bad)
    assert store.stream_version("k") == 4


def test_expected_versions_at_and_past_int64(store):
    M = 2**63 - 1
    store.append([ec.emit("x", Noted())])
    for how in ("append", "read-only", "batch"):
        with pytest.raises(ec.ConcurrencyError) as info:
            if how == "append":
                store.append([ec.emit("x", Noted())], {"x": M})
            elif how == "read-only":
                store.append([ec.emit("y", Noted())], {"x": M, "y": ec.ANY})
            else:
                store.append_batch([ec.emit("x", Noted())], {"x": M})
        assert (info.value.expected, info.value.actual) == (M, 1) and str(M) in str(info.value)
    with pytest.raises(ec.IngestError, match="version conflict"):
        store.ingest([("x", Noted())], expected={"x": M})
    for bad in (M + 1, 2**64, -2**63, -3, True, False, 1.0, "1", None):
        for write in (lambda e: store.append([ec.emit("x", Noted())], {"x": e}),
                      lambda e: store.append_batch([ec.emit("x", Noted())], {"x": e}),
                      lambda e: store.ingest([("x", Noted())], expected={"x": e})):
            with pytest.raises(ec.ValidationError):
                write(bad)
    assert store.read_stream("x", from_version=M) == [] and list(store.read_all(after_position=M)) == []
    with pytest.raises(ec.ValidationError):
        store.read_stream("x", from_version=M + 1)
    assert store.stream_version("x") == 1 and store.stream_version("y") == 0


def test_retry_policy_odd_values():
    for bad in (dict(max_retries="3"), dict(max_retries=2.5), dict(max_retries=True), dict(base_delay=float("nan")),
                dict(base_delay=float("inf")), dict(base_delay=-1), dict(max_delay=float("nan")), dict(jitter="no"),
                dict(jitter=None), dict(base_delay="0.1"), dict(max_delay=10**400)):
        with pytest.raises(ec.ValidationError):
            ec.RetryPolicy(**bad)
    huge = ec.RetryPolicy(max_retries=10**30)
    assert 0 <= huge.delay(10**6) <= huge.max_delay
    inverted = ec.RetryPolicy(base_delay=1, max_delay=0.5)
    assert all(0 <= inverted.delay(n) <= 0.5 for n in (1, 2, 50))
    assert ec.RetryPolicy(base_delay=0, max_delay=0).delay(3) == 0


def test_on_command_complete_for_replayed_commands_with_and_without_cache(store):
    for cache in (None, ec.StateCache()):
        collector = ec.MetricsCollector()
        store.attach(collector)
        infos = []
        collector.on_command_complete(infos.append)
        acct = ec.StreamId(f"hook-{cache is None}")
        store.append([ec.emit(acct, Deposited(amount=10))])
        key = f"hk-{uuid.uuid4()}"
        ec.execute(store, Withdraw(acct, 10), idempotency_key=key, cache=cache)
        ec.execute(store, Withdraw(acct, 10), idempotency_key=key, cache=cache)  # would now be refused
        other, other_infos = ec.MetricsCollector(), []
        other.on_command_complete(other_infos.append)
        ec.execute(store, Withdraw(acct, 10), idempotency_key=key, cache=cache, metrics=other)
        got = [(i.outcome, i.replayed, i.events_written, i.stream_versions) for i in infos + other_infos]
        assert got == [("succeeded", False, 1, {acct: 2}), ("succeeded", True, 0, {acct: 2}),
                       ("succeeded", True, 0, {acct: 2})]


@pytest.mark.parametrize("argv", [["tail"], ["tail", "--follow"], ["status"], ["status", "--json"], ["projections"]])
def test_read_commands_piped_into_head(tmp_path, argv):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with ec.connect(url) as s:
        s.ingest([(f"s{i % 10}", Noted(text="x" * 200)) for i in range(5000)])
    proc = subprocess.run(f"{PY} -m eventcore {' '.join(argv)} --dsn {url} | head -c 1 >/dev/null; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, timeout=60, cwd=TESTS)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_ingest_piped_into_head_commits_everything_once(tmp_path):
    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "in.jsonl"
    path.write_text("\n".join(jline(i) for i in range(3000)) + "\n")
    proc = subprocess.run(f"{PY} -m eventcore ingest {path} --dsn {url} --json --no-progress | head -c 1 "
                          ">/dev/null; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=60, cwd=TESTS)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert len(texts(url)) == 3000
    assert ingest(path, url)["events"] == 0
