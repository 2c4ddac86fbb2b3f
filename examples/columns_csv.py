"""A CSV of bank transactions loaded through store.ingest_columns, then daily totals per account from
store.read_columns, computed with numpy. Needs numpy: pip install 'pyeventcore[numpy]'.

    python examples/columns_csv.py                                  # writes transactions.csv, then loads it
    python examples/columns_csv.py sqlite:///bank.db --rows 100000
    python examples/columns_csv.py postgresql://app@db/bank --csv exported.csv   # an existing file

The load is resumable: run it again and the rows already committed are passed over (resume_key), so a
load killed half-way is finished by running it again, and a finished one writes nothing twice.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from pathlib import Path

import numpy as np

import eventcore as ec


class Deposited(ec.Event):
    __event_type__ = "example.csv.Deposited"
    amount: int  # cents
    currency: str
    at: dt.datetime


class Withdrawn(ec.Event):
    __event_type__ = "example.csv.Withdrawn"
    amount: int  # cents
    currency: str
    at: dt.datetime


KINDS = {"deposit": Deposited.__event_type__, "withdrawal": Withdrawn.__event_type__}


def write_csv(path: Path, rows: int, accounts: int = 20, days: int = 7, seed: int = 7) -> None:
    """A made-up export: time, account, kind, amount in cents, currency; in time order."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-05-01T00:00:00", "s")
    seconds = np.sort(rng.integers(0, days * 86_400, rows))
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["time", "account", "kind", "amount_cents", "currency"])
        for s, a, k, cents in zip(seconds.tolist(), rng.integers(0, accounts, rows).tolist(),
                                  rng.random(rows).tolist(), rng.integers(1, 50_000, rows).tolist()):
            out.writerow([str(start + s) + "Z", f"account-{a:03d}", "withdrawal" if k < 0.3 else "deposit",
                          cents, "EUR"])


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """The CSV's columns as arrays (a plain reader: the point is what happens after)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    columns = dict(zip(header, (list(c) for c in zip(*body)))) if body else {name: [] for name in header}
    return {
        "time": np.array([t.rstrip("Z") for t in columns["time"]], dtype="datetime64[us]"),
        "account": np.array(columns["account"], dtype=object),
        "type": np.array([KINDS[k] for k in columns["kind"]], dtype=object),
        "amount": np.array(columns["amount_cents"], dtype=np.int64),
        "currency": np.array(columns["currency"], dtype=object),
    }


def load(store: ec.EventStore, path: Path) -> ec.IngestResult:
    cols = read_csv(path)
    return store.ingest_columns(cols["account"], cols["type"],
                                {"amount": cols["amount"], "currency": cols["currency"], "at": cols["time"]},
                                batch_size=10_000, resume_key=f"csv:{path.resolve()}")


def daily_totals(store: ec.EventStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accounts, days, totals[account, day] in cents): deposits minus withdrawals, by the event's time."""
    cols = store.read_columns(types=[Deposited, Withdrawn], fields=["amount", "at"])
    signed = np.where(cols["type"] == Withdrawn.__event_type__, -1, 1) * cols["amount"].filled(0)
    accounts, account_of = np.unique(cols["stream_id"].astype(str), return_inverse=True)
    days, day_of = np.unique(cols["at"].filled(np.datetime64("NaT")).astype("datetime64[D]"), return_inverse=True)
    totals = np.zeros((len(accounts), len(days)), dtype=np.int64)
    np.add.at(totals, (account_of.reshape(-1), day_of.reshape(-1)), signed)
    return accounts, days, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load a CSV of transactions through ingest_columns; daily totals.")
    parser.add_argument("url", nargs="?", default="sqlite:///transactions.db")
    parser.add_argument("--csv", type=Path, default=None, help="load this file (default: write transactions.csv)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the generated CSV")
    args = parser.parse_args(argv)
    path = args.csv
    if path is None:
        path = Path("transactions.csv")
        if not path.exists():
            write_csv(path, args.rows)
    store = ec.connect(args.url)
    try:
        result = load(store, path)
        print(f"loaded {result.events:,} events from {path} ({result.skipped:,} committed before), "
              f"{result.events_per_s:,.0f} events/s")
        accounts, days, totals = daily_totals(store)
    finally:
        store.close()
    print("account," + ",".join(str(d) for d in days))
    for account, row in zip(accounts.tolist(), totals):
        print(account + "," + ",".join(f"{cents / 100:.2f}" for cents in row.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
