"""One release of an application whose events change shape, run as a child process by test_evolution.

    python evolution_worker.py RELEASE write URL STREAM N     append N deposits as this release writes them
    python evolution_worker.py RELEASE read URL               print every event, decoded, as JSON lines
    python evolution_worker.py RELEASE raw URL                print every event read with decode=False
    EVO_RELEASE=3 eventcore types --import evolution_worker   its classes and upcasters, for the command line

Release 1 stores `Deposited` (its class name) with `amount` in whole units. Release 2 renames the
type to "evo.Deposited" (the old name an alias), counts cents (version 2) and upcasts version 1.
Release 3 renames the field to `amount_cents` and adds `currency` (version 3), keeping the
upcaster of version 1 and adding the one of version 2. Each process knows only its own release.
"""
from __future__ import annotations

import json
import os
import sys

import msgspec

import eventcore as ec

RELEASE = int(os.environ.get("EVO_RELEASE") or sys.argv[1])  # the environment: when imported by --import

if RELEASE == 1:
    class Deposited(ec.Event):
        amount: int

    def make(i: int) -> ec.Event:
        return Deposited(amount=i)

elif RELEASE == 2:
    class Deposited(ec.Event):
        __event_type__ = "evo.Deposited"
        __event_version__ = 2
        __event_aliases__ = ("Deposited",)
        cents: int

    @ec.upcaster("evo.Deposited", from_version=1)
    def _deposited_v1(data: dict) -> dict:
        return {"cents": data["amount"] * 100}

    def make(i: int) -> ec.Event:
        return Deposited(cents=i * 100 + 1)

else:
    class Deposited(ec.Event):
        __event_type__ = "evo.Deposited"
        __event_version__ = 3
        __event_aliases__ = ("Deposited",)
        amount_cents: int
        currency: str

    @ec.upcaster("evo.Deposited", from_version=1)
    def _deposited_v1(data: dict) -> dict:
        return {"cents": data["amount"] * 100}

    @ec.upcaster("evo.Deposited", from_version=2)
    def _deposited_v2(data: dict) -> dict:
        return {"amount_cents": data["cents"], "currency": "EUR"}

    def make(i: int) -> ec.Event:
        return Deposited(amount_cents=i * 100 + 2, currency="USD")


def main() -> int:
    command, url = sys.argv[2], sys.argv[3]
    with ec.connect(url) as store:
        if command == "write":
            stream, n = sys.argv[4], int(sys.argv[5])
            store.append([ec.emit(stream, make(i)) for i in range(1, n + 1)])
            return 0
        try:
            events = list(store.read_all(decode=command != "raw"))
        except ec.SerializationError as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            return 1
        for e in events:
            data = e.data if command == "raw" else msgspec.structs.asdict(e.data)
            print(json.dumps({"stream": e.stream_id, "version": e.version, "type": e.type,
                              "type_version": e.type_version, "class": type(e.data).__name__, "data": data}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
