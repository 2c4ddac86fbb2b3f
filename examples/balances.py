"""Account balances projected into a PostgreSQL table, live, exactly once.

Run it against the schema `eventcore bench` writes to, in two terminals:

    python examples/balances.py postgresql://app@db/bank eventcore_bench           # follows live; Ctrl-C stops it
    eventcore bench transfer --backend postgres --dsn postgresql://app@db/bank --concurrency 8
    python examples/balances.py postgresql://app@db/bank eventcore_bench --check   # the table == a full replay
"""
import sys

import psycopg
from psycopg import sql

import eventcore as ec
from eventcore.bench.workloads import AccountOpened, MoneyDeposited, MoneyWithdrawn
from eventcore.stores.postgres import PostgresStore


def amount(event: ec.RecordedEvent) -> int:
    data = event.data
    if isinstance(data, AccountOpened):
        return data.initial_balance
    return -data.amount if isinstance(data, MoneyWithdrawn) else data.amount


class Balances(ec.Projector):
    name = "account-balances"
    types = [AccountOpened, MoneyDeposited, MoneyWithdrawn]
    batch_size = 1000

    def table(self, ctx):  # next to the events, in the store's schema
        return sql.Identifier(ctx.store.schema, "account_balances")

    def setup(self, ctx):
        ctx.connection.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (account text PRIMARY KEY, balance bigint NOT NULL)"
        ).format(self.table(ctx)))

    def reset(self, ctx):  # rebuild: empty the table in the transaction that resets the checkpoint
        ctx.connection.execute(sql.SQL("TRUNCATE {}").format(self.table(ctx)))

    def handle_batch(self, events, ctx):
        # One statement per batch; it commits with the checkpoint, so each event counts exactly once.
        deltas = {}
        for e in events:
            deltas[e.stream_id] = deltas.get(e.stream_id, 0) + amount(e)
        ctx.connection.cursor().executemany(sql.SQL(
            "INSERT INTO {} AS b (account, balance) VALUES (%s, %s) "
            "ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance"
        ).format(self.table(ctx)), list(deltas.items()))


def check(store: PostgresStore, dsn: str) -> bool:
    """Compare the table with a full replay of the feed."""
    replay: dict[str, int] = {}
    for e in store.read_all(types=Balances.types):
        replay[e.stream_id] = replay.get(e.stream_id, 0) + amount(e)
    with psycopg.connect(dsn) as conn:
        table: dict[str, int] = dict(conn.execute(sql.SQL("SELECT account, balance FROM {}").format(
            sql.Identifier(store.schema, "account_balances"))).fetchall())
    (status,) = ec.projection_status(store, Balances.name)
    print(f"{len(table)} accounts, checkpoint {status.position}, lag {status.lag}, "
          f"{status.pending} events pending, state {status.state}")
    if table == replay:
        print("balances match a full replay")
        return True
    print("balances differ from a full replay")
    return False


if __name__ == "__main__":
    dsn, schema = sys.argv[1], sys.argv[2]
    store = ec.connect(dsn, schema=schema)
    assert isinstance(store, PostgresStore)   # what a postgresql:// URL opens
    if "--check" in sys.argv:
        sys.exit(0 if check(store, dsn) else 1)
    runner = ec.run_projection(store, Balances(), handle_signals=True, rebuild="--rebuild" in sys.argv)
    print(f"stopped at position {runner.position} after {runner.events_handled} events")
    store.close()
