"""The reference report's workloads as eventcore commands: banking and e-commerce.

Used by `eventcore bench` and the benchmark suite; also a worked example of
single-stream, two-stream and variable-stream (order lines) commands. Event
type names are namespaced ("bench.*") so they never clash with an application's.
"""
from __future__ import annotations

import random

from ..commands import Command, require
from ..events import Event, EventToWrite, RecordedEvent, emit
from ..streams import StreamId


class AccountOpened(Event):
    __event_type__ = "bench.AccountOpened"
    initial_balance: int


class MoneyDeposited(Event):
    __event_type__ = "bench.MoneyDeposited"
    amount: int


class MoneyWithdrawn(Event):
    __event_type__ = "bench.MoneyWithdrawn"
    amount: int


class ProductStocked(Event):
    __event_type__ = "bench.ProductStocked"
    quantity: int


class StockReserved(Event):
    __event_type__ = "bench.StockReserved"
    order_id: str
    quantity: int


class OrderPlaced(Event):
    __event_type__ = "bench.OrderPlaced"
    order_id: str
    lines: list[tuple[str, int]]


def _balance(state: int, event: RecordedEvent) -> int:
    data = event.data
    if type(data) is MoneyWithdrawn:
        return state - data.amount
    if type(data) is AccountOpened:
        return state + data.initial_balance
    return state + data.amount


class DepositMoney(Command):
    """Single stream: the report's 'financial transaction' command."""

    account: StreamId
    amount: int

    def initial_state(self) -> int:
        return 0

    def apply(self, state: int, event: RecordedEvent, /) -> int:
        return _balance(state, event)

    def handle(self, state: int, /) -> list[EventToWrite]:
        require(self.amount > 0, "amount must be positive")
        return [emit(self.account, MoneyDeposited(self.amount))]


class TransferMoney(Command):
    """Two streams, both written: debit one account, credit another, atomically."""

    source: StreamId
    target: StreamId
    amount: int

    def initial_state(self) -> dict[str, int]:
        return {}

    def apply(self, state: dict[str, int], event: RecordedEvent, /) -> dict[str, int]:
        state[event.stream_id] = _balance(state.get(event.stream_id, 0), event)
        return state

    def handle(self, state: dict[str, int], /) -> list[EventToWrite]:
        require(self.amount > 0, "amount must be positive")
        require(self.source != self.target, "cannot transfer to the same account")
        require(state.get(self.source, 0) >= self.amount, f"insufficient funds in {self.source}")
        return [emit(self.source, MoneyWithdrawn(self.amount)), emit(self.target, MoneyDeposited(self.amount))]


class PlaceOrder(Command):
    """A customer stream plus 1–5 product inventory streams (variable, listed by `streams()`)."""

    customer: StreamId
    order_id: str
    lines: list[tuple[str, int]]

    def streams(self) -> list[str]:
        return [product for product, _ in self.lines]

    def initial_state(self) -> dict[str, int]:
        return {}

    def apply(self, state: dict[str, int], event: RecordedEvent, /) -> dict[str, int]:
        data = event.data
        if type(data) is ProductStocked:
            state[event.stream_id] = state.get(event.stream_id, 0) + data.quantity
        elif type(data) is StockReserved:
            state[event.stream_id] = state.get(event.stream_id, 0) - data.quantity
        return state

    def handle(self, state: dict[str, int], /) -> list[EventToWrite]:
        require(self.lines, "an order needs at least one line")
        events = [emit(self.customer, OrderPlaced(self.order_id, self.lines))]
        for product, quantity in self.lines:
            require(quantity > 0, "quantities must be positive")
            require(state.get(product, 0) >= quantity, f"{product} is out of stock")
            events.append(emit(product, StockReserved(self.order_id, quantity)))
        return events


def random_order(rng: random.Random, customer: str, products: list[str], order_id: str) -> PlaceOrder:
    chosen = rng.sample(products, rng.randint(1, 5))
    return PlaceOrder(StreamId(customer), order_id, [(p, rng.randint(1, 3)) for p in chosen])
