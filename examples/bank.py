"""A complete banking example: deposits and an atomic two-account transfer.

Run it: python examples/bank.py   (creates bank.db in the current directory)
"""
import eventcore as ec


class AccountOpened(ec.Event):
    __event_type__ = "bank.AccountOpened"   # the stored name: stable even if the class moves
    owner: str


class Deposited(ec.Event):
    __event_type__ = "bank.Deposited"
    amount: int


class Withdrawn(ec.Event):
    __event_type__ = "bank.Withdrawn"
    amount: int


def balance(state: int, event: ec.RecordedEvent) -> int:
    if isinstance(event.data, Deposited):
        return state + event.data.amount
    if isinstance(event.data, Withdrawn):
        return state - event.data.amount
    return state


class OpenAccount(ec.Command):
    account: ec.StreamId
    owner: str

    def initial_state(self):
        return False                      # does the account exist?

    def apply(self, state, event):
        return True

    def handle(self, exists):
        ec.require(not exists, f"{self.account} is already open")
        return [ec.emit(self.account, AccountOpened(owner=self.owner))]


class Deposit(ec.Command):
    account: ec.StreamId
    amount: int

    def initial_state(self):
        return 0

    def apply(self, state, event):
        return balance(state, event)

    def handle(self, state):
        ec.require(self.amount > 0, "amount must be positive")
        return [ec.emit(self.account, Deposited(amount=self.amount))]


class Transfer(ec.Command):
    """Reads two streams, writes two streams, atomically: both events or neither."""

    source: ec.StreamId
    target: ec.StreamId
    amount: int

    def initial_state(self):
        return {}

    def apply(self, balances, event):
        balances[event.stream_id] = balance(balances.get(event.stream_id, 0), event)
        return balances

    def handle(self, balances):
        ec.require(self.amount > 0, "amount must be positive")
        ec.require(balances.get(self.source, 0) >= self.amount, f"insufficient funds in {self.source}")
        return [
            ec.emit(self.source, Withdrawn(amount=self.amount)),
            ec.emit(self.target, Deposited(amount=self.amount)),
        ]


if __name__ == "__main__":
    store = ec.connect("sqlite:///bank.db")
    alice, bob = ec.StreamId("account-alice"), ec.StreamId("account-bob")
    who = ec.Metadata(user_id="teller-7", correlation_id="session-42")

    for account, owner in ((alice, "Alice"), (bob, "Bob")):
        try:
            ec.execute(store, OpenAccount(account=account, owner=owner), metadata=who)
        except ec.BusinessRuleViolation:
            pass                          # already open from an earlier run

    ec.execute(store, Deposit(account=alice, amount=100), metadata=who)
    result = ec.execute(
        store,
        Transfer(source=alice, target=bob, amount=30),
        retry=ec.RetryPolicy(max_retries=4),
        metadata=who,
    )
    print(f"transfer wrote {len(result.events)} events in {result.attempts} attempt(s): {result.stream_versions}")

    try:
        ec.execute(store, Transfer(source=bob, target=alice, amount=1_000_000))
    except ec.BusinessRuleViolation as refused:
        print("refused:", refused)        # nothing was written

    for e in store.read_stream(alice):
        print(e.version, e.type, e.data, e.metadata.user_id)
    for e in store.read_all(after_position=0, types=[Deposited]):
        print(e.position, e.stream_id, e.data.amount)
    store.close()
