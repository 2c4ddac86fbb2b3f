"""Changing events: a type renamed, a field renamed twice, one version chain across three releases.

Run it: python examples/evolution.py   (creates evolution.db in the current directory)

Release 1 stored `Deposited` (its class name) as {"amount": 12}, in whole euros.
Release 2 renamed the type to "bank.Deposited" and counted cents: {"cents": 1250} (version 2).
Release 3, this code, names the field amount_cents and adds the currency (version 3).
"""
import eventcore as ec


class Deposited(ec.Event):
    __event_type__ = "bank.Deposited"
    __event_version__ = 3                  # stored with every event written
    __event_aliases__ = ("Deposited",)     # the name release 1 stored
    amount_cents: int
    currency: str = "EUR"


@ec.upcaster("bank.Deposited", from_version=1)
def _deposited_v1(data: dict) -> dict:     # release 1's payload -> release 2's
    return {"cents": data["amount"] * 100}


@ec.upcaster("bank.Deposited", from_version=2)
def _deposited_v2(data: dict) -> dict:     # release 2's payload -> release 3's
    return {"amount_cents": data["cents"], "currency": "EUR"}


if __name__ == "__main__":
    ec.check_chains()                      # at start-up: every step from version 1 is there
    store = ec.connect("sqlite:///evolution.db")
    if store.head_position() == 0:
        # What releases 1 and 2 wrote, in their stored form (a RawEvent names its type version).
        store.append([
            ec.emit("account-1", ec.RawEvent("Deposited", b'{"amount": 12}', version=1)),
            ec.emit("account-1", ec.RawEvent("bank.Deposited", b'{"cents": 1250}', version=2)),
        ])
        store.append([ec.emit("account-1", Deposited(amount_cents=99, currency="USD"))])

    for e in store.read_stream("account-1"):                  # every event as release 3's class
        print(e.version, e.type, e.type_version, e.data)
    for e in store.read_all(decode=False):                    # as stored, no class needed
        print(e.position, e.type, e.type_version, e.data)
    store.close()
