"""A real writer process for the fault tests (tests/test_faults.py), killed with SIGKILL mid-run.

    python fault_worker.py STORE_URL PLAN_FILE ACK_FILE [--keys] [--threads N]

PLAN_FILE is a JSON list of transfers `[transfer_id, source, target, amount]`. N threads
(default 4) take them in order and run each as one `Transfer` command (a debit on the
source and a credit on the target, written atomically). After `execute` returns, the
thread appends one acknowledgement line to ACK_FILE in a single write(2) and only then
takes the next transfer, so a line in the file proves the store acknowledged the command:

    {"t": transfer_id, "e": [[event_id_hex, stream_id, version, position], ...], "r": replayed}

With --keys each transfer is executed with its id as the idempotency key, so a second
process re-running the same plan applies each transfer at most once overall.
Prints "started" once the store is open and "done" when the plan is finished.
"""
from __future__ import annotations

import json
import os
import sys
import threading

import eventcore as ec


class Debited(ec.Event):
    __event_type__ = "faults.Debited"
    transfer: str
    amount: int


class Credited(ec.Event):
    __event_type__ = "faults.Credited"
    transfer: str
    amount: int


class Transfer(ec.Command):
    """Moves `amount` from source to target: two streams read, two streams written, atomically.

    No funds check: a refused transfer would make the outcome of a re-run depend on timing,
    and these tests are about what a killed writer leaves behind, not about business rules."""

    source: ec.StreamId
    target: ec.StreamId
    amount: int
    transfer: str

    def initial_state(self):
        return 0

    def apply(self, count, event):
        return count + 1

    def handle(self, count):
        return [
            ec.emit(self.source, Debited(transfer=self.transfer, amount=self.amount)),
            ec.emit(self.target, Credited(transfer=self.transfer, amount=self.amount)),
        ]


def transfer_command(item) -> Transfer:
    transfer_id, source, target, amount = item
    return Transfer(source=ec.StreamId(source), target=ec.StreamId(target), amount=amount, transfer=transfer_id)


def ack_line(transfer_id: str, result) -> bytes:
    events = [[e.event_id.hex, str(e.stream_id), e.version, e.position] for e in result.events]
    replayed = bool(getattr(result, "replayed", False))
    return (json.dumps({"t": transfer_id, "e": events, "r": replayed}) + "\n").encode()


def main(argv: list[str]) -> int:
    url, plan_file, ack_file = argv[:3]
    keys = "--keys" in argv
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 4
    with open(plan_file) as f:
        plan = json.load(f)
    store = ec.connect(url)
    # O_APPEND and one write(2) per line: lines of different threads never interleave.
    ack_fd = os.open(ack_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    next_index = iter(range(len(plan)))
    take = threading.Lock()
    failures: list = []
    # Conflicts between the threads are expected (shared accounts): retry them generously.
    policy = ec.RetryPolicy(max_retries=100, max_delay=0.05)

    def run() -> None:
        while True:
            with take:
                i = next(next_index, None)
            if i is None:
                return
            item = plan[i]
            options = {"idempotency_key": item[0]} if keys else {}
            try:
                result = ec.execute(store, transfer_command(item), retry=policy, timeout=120, **options)
            except Exception as exc:  # noqa: BLE001 - reported on stderr, the test fails on the exit code
                failures.append(f"{item[0]}: {type(exc).__name__}: {exc}")
                return
            os.write(ack_fd, ack_line(item[0], result))

    print("started", flush=True)
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.close(ack_fd)
    store.close()
    if failures:
        print("\n".join(failures), file=sys.stderr, flush=True)
        return 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
