"""fault_worker.py's writer on the asyncio API, for tests/test_aio_faults.py: killed with SIGKILL mid-run.

    python aio_fault_worker.py STORE_URL PLAN_FILE ACK_FILE [--keys] [--tasks N]

The same plan, commands and acknowledgement lines as fault_worker.py (see there), run by N tasks
(default 4) on one event loop, each transfer one `await eventcore.aio.execute(...)`; a line is
written to ACK_FILE (one write(2)) only after the command returned.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

import eventcore as ec
import eventcore.aio as eca
from fault_worker import ack_line, transfer_command


async def main(argv: list[str]) -> int:
    url, plan_file, ack_file = argv[:3]
    keys = "--keys" in argv
    tasks = int(argv[argv.index("--tasks") + 1]) if "--tasks" in argv else 4
    with open(plan_file) as f:
        plan = json.load(f)
    store = await eca.connect(url)
    ack_fd = os.open(ack_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    next_index = iter(range(len(plan)))
    failures: list = []
    policy = ec.RetryPolicy(max_retries=100, max_delay=0.05)

    async def run() -> None:
        for i in next_index:  # shared by the tasks: each transfer is taken once
            item = plan[i]
            options = {"idempotency_key": item[0]} if keys else {}
            try:
                result = await eca.execute(store, transfer_command(item), retry=policy, timeout=120, **options)
            except Exception as exc:  # noqa: BLE001 - reported on stderr, the test fails on the exit code
                failures.append(f"{item[0]}: {type(exc).__name__}: {exc}")
                return
            os.write(ack_fd, ack_line(item[0], result))

    print("started", flush=True)
    await asyncio.gather(*(run() for _ in range(tasks)))
    os.close(ack_fd)
    await store.aclose()
    if failures:
        print("\n".join(failures), file=sys.stderr, flush=True)
        return 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
