"""eventcore for asyncio applications: the same commands, stores and guarantees, awaited.

    import eventcore as ec
    import eventcore.aio as eca

    async with await eca.connect("postgresql://...") as store:   # or "sqlite:///bank.db", "memory://"
        result = await eca.execute(store, Deposit(account=a, amount=10))
        async for event in store.read_all(after_position=0):
            ...

Commands, events, errors, `ec.RetryPolicy`, `ec.StateCache`, `ec.Metadata` and `ec.MetricsCollector`
are the sync API's own; a sync and an asyncio process share one store. PostgreSQL runs on psycopg's
async connections, pool and COPY; SQLite on a thread of the store's own; memory on the loop.

    store.py        AsyncEventStore: the store contract as coroutines
    executor.py     execute(): the sync executor's steps, awaited
    postgres.py     the native PostgreSQL store
    sqlite.py       SQLite on the store's own thread; memory.py: memory on the loop
    ingest.py       store.ingest from iterables and async iterables
    projections.py  run_projection(): catch-up, then live
"""
from __future__ import annotations

from typing import Any

from ..stores.observer import StoreObserver
from .executor import execute
from .projections import run_projection
from .store import AsyncEventStore

__all__ = ["AsyncEventStore", "connect", "execute", "run_projection"]


async def connect(url: str, *, metrics: StoreObserver | None = None, **options: Any) -> AsyncEventStore:
    """Open the store a URL names, for asyncio: `ec.connect`'s URLs, options and errors (see there).

    `async with await eca.connect(url) as store: ...` closes it at the end of the block."""
    from ..stores import backend_of_url

    scheme = backend_of_url(url)
    store: AsyncEventStore
    if scheme == "postgresql":
        from .postgres import AsyncPostgresStore

        store = await AsyncPostgresStore.open(url, **options)
    elif scheme == "sqlite":
        from .sqlite import AsyncSQLiteStore

        store = await AsyncSQLiteStore.open(url, **options)
    else:
        from ..stores import connect as connect_sync
        from .memory import AsyncMemoryStore

        store = AsyncMemoryStore(connect_sync(url, **options))  # type: ignore[arg-type]
    if metrics is not None:
        try:
            store.attach(metrics)
        except BaseException:
            await store.aclose()
            raise
    return store
