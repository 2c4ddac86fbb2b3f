"""A real projection process for the kill and take-over tests (tests/test_projections.py).

    python projection_worker.py STORE_URL once|live

A transactional read model in the store's own database (PostgreSQL or SQLite):
every handled event inserts one row into `effects` and adds to `totals`, through
`ctx.connection`, so the writes commit with the checkpoint. HANG_AT=n makes the
handler stop forever in the middle of the batch holding the event with n, after
printing "hanging" (the test then kills the process with SIGKILL).
"""
from __future__ import annotations

import os
import sys
import time

import eventcore as ec


class Counted(ec.Event):
    __event_type__ = "projtest.Counted"
    n: int


class Totals(ec.Projector):
    name = "totals"
    types = [Counted]
    batch_size = 20

    def __init__(self, store, hang_at: int) -> None:
        super().__init__()
        self.hang_at = hang_at
        if store.scheme == "postgresql":
            schema = '"' + store.schema.replace('"', '""') + '"'
            self.effects, self.totals, self.ph = f"{schema}.effects", f"{schema}.totals", "%s"
        else:
            self.effects, self.totals, self.ph = "effects", "totals", "?"

    def setup(self, ctx):
        ctx.connection.execute(f"CREATE TABLE IF NOT EXISTS {self.effects} (position bigint, stream_id text, n int)")
        ctx.connection.execute(f"CREATE TABLE IF NOT EXISTS {self.totals} (stream_id text PRIMARY KEY, total bigint)")

    def handle_batch(self, events, ctx):
        ph = self.ph
        for e in events:
            if e.data.n == self.hang_at:
                print("hanging", flush=True)
                time.sleep(3600)
            ctx.connection.execute(f"INSERT INTO {self.effects} VALUES ({ph}, {ph}, {ph})",
                                   (e.position, e.stream_id, e.data.n))
            ctx.connection.execute(
                f"INSERT INTO {self.totals} AS t VALUES ({ph}, {ph}) "
                f"ON CONFLICT (stream_id) DO UPDATE SET total = t.total + excluded.total",
                (e.stream_id, e.data.n))


def main() -> int:
    url, mode = sys.argv[1], sys.argv[2]
    store = ec.connect(url)
    projector = Totals(store, int(os.environ.get("HANG_AT", "0")))
    print("started", flush=True)
    ec.run_projection(store, projector, until_caught_up=(mode == "once"), handle_signals=True,
                      poll_interval=0.1, lock_poll_interval=0.1)
    store.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
