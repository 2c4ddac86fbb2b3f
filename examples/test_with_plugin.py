"""Testing and benchmarking your own commands on every backend with eventcore's pytest plugin.

The plugin comes with pyeventcore; the commands are the bank of examples/bank.py. Run:

    pip install 'pyeventcore[postgres]' pytest pytest-benchmark
    pytest examples/test_with_plugin.py                                   # memory, sqlite, postgres
    pytest examples/test_with_plugin.py --eventcore-backends=memory,sqlite
    pytest examples/test_with_plugin.py --benchmark-group-by=func         # one table per command

PostgreSQL: EVENTCORE_TEST_DSN, else a throwaway server from the installed PostgreSQL binaries.
"""
import eventcore as ec
import pytest

from bank import Deposit, OpenAccount, Transfer

ALICE, BOB = ec.StreamId("account-alice"), ec.StreamId("account-bob")


def open_accounts(store):
    ec.execute(store, OpenAccount(account=ALICE, owner="Alice"))
    ec.execute(store, OpenAccount(account=BOB, owner="Bob"))
    ec.execute(store, Deposit(account=ALICE, amount=100))


def transfer(store):
    return ec.execute(store, Transfer(source=ALICE, target=BOB, amount=30))


# Runs once per backend, each time on an empty store.
def test_a_transfer_writes_to_both_accounts(eventcore_store):
    open_accounts(eventcore_store)
    result = transfer(eventcore_store)
    assert result.stream_versions == {ALICE: 3, BOB: 2}
    assert [e.type for e in eventcore_store.read_stream(BOB)] == ["bank.AccountOpened", "bank.Deposited"]


def test_an_overdraft_is_refused_and_writes_nothing(eventcore_store):
    open_accounts(eventcore_store)
    with pytest.raises(ec.BusinessRuleViolation, match="insufficient funds"):
        ec.execute(eventcore_store, Transfer(source=BOB, target=ALICE, amount=1))
    assert eventcore_store.stream_version(BOB) == 1


# A test for some backends only: parametrize eventcore_backend yourself. The factory makes more stores.
@pytest.mark.parametrize("eventcore_backend", ["sqlite", "postgres"])
def test_each_store_starts_empty(eventcore_store_factory):
    first, second = eventcore_store_factory(), eventcore_store_factory()
    open_accounts(first)
    assert (first.stream_version(ALICE), second.stream_version(ALICE)) == (2, 0)


# A benchmark per backend: each round gets a fresh store, prepared by open_accounts (untimed),
# then runs one transfer (timed). pytest-benchmark prints the backends side by side.
def test_transfer_speed(benchmark, eventcore_store_factory):
    benchmark.pedantic(transfer, setup=eventcore_store_factory.pedantic_setup(open_accounts), rounds=20)
