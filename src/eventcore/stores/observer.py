"""What a store tells an observer about its operations, at no cost when nothing observes it.

A store holds at most one observer (`store.attach(observer)`); `ec.MetricsCollector` is the one
eventcore ships, and anything with these four methods will do. Each public store operation tests one
attribute (`store._observer`): with nothing attached it calls the backend at once, with no clock read
and no allocation; with an observer it goes through `observed()`, which brackets the call.

Operation names: "read" (read_stream, read_streams), "read_all" (one page), "append", "append_batch",
"ingest" (a whole run) and "ingest_batch" (one of its transactions).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

#: The EventStore reporting (Any here: the store module imports this one, never the reverse).
Store = Any


@runtime_checkable
class StoreObserver(Protocol):
    """Told about every operation of the stores it is attached to (by position: an implementation
    may name the parameters as it likes)."""

    def store_attached(self, store: Store, /) -> None:
        """`store` will report its operations here (called by `store.attach`)."""

    def store_detached(self, store: Store, /) -> None:
        """`store` reports no more operations here (called by `store.detach`)."""

    def operation_started(self, store: Store, operation: str, streams: Iterable[str] | None,
                          expected: dict[str, int] | None = None, /) -> Any:
        """An operation begins: its name, the streams it names (or None), their expected versions
        (appends). Returns a token given back to `operation_ended`."""

    def operation_ended(self, token: Any, events: int, error: BaseException | None,
                        versions: dict[str, int] | Callable[[], dict[str, int] | None] | None = None, /) -> None:
        """The operation ended: events written or read, the error it raised (None: it succeeded),
        and stream -> version after it (a dict, or a function returning one, or None)."""


def observed(observer: StoreObserver, store: Store, operation: str, streams: Iterable[str] | None,
             expected: dict[str, int] | None, call: Callable[..., Any], args: tuple[Any, ...],
             count: Callable[[Any], int] = len, versions: Callable[[Any], dict[str, int] | None] | None = None) -> Any:
    """`call(*args)` bracketed by `observer`: `count(result)` events, `versions(result)` asked for only
    if the observer wants it."""
    token = observer.operation_started(store, operation, streams, expected)
    try:
        result = call(*args)
    except BaseException as exc:
        observer.operation_ended(token, 0, exc)
        raise
    observer.operation_ended(token, count(result), None, None if versions is None else lambda: versions(result))
    return result
