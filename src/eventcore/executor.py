"""The command executor: read every stream, fold, decide, append with every version checked.

One attempt is: one `read_streams` round trip for the declared streams (plus
one per discovery round), a fold in global-position order, the command's pure
`handle`, and one atomic `append` whose expected versions cover every stream
read, written or not. No store lock or transaction is held while user code
runs; a conflict means someone wrote in between, so the attempt is repeated on
fresh state after an exponential, jittered, bounded backoff.
"""
from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from typing import Any

import msgspec

from .commands import Command, declared_streams
from .errors import (
    BusinessRuleViolation,
    CommandTimeoutError,
    ConcurrencyError,
    StoreUnavailableError,
    UndeclaredStreamError,
    ValidationError,
)
from .events import EventToWrite, Metadata, RecordedEvent
from .streams import stream_id as _stream_id

#: Discovery rounds per attempt before the command is declared unbounded.
#: A real resolver needs one or two (order -> product lines); 8 is generous.
MAX_DISCOVERY_ROUNDS = 8

#: Default overall timeout of `execute`, seconds (the original EventCore's default too).
DEFAULT_TIMEOUT = 30.0


class RetryPolicy(msgspec.Struct, frozen=True):
    """How `execute` retries after a version conflict (or a store error that provably wrote nothing).

    Delay before retry n (1-based): uniform in [0, min(max_delay, base_delay * 2**(n-1))]
    ("full jitter"), which spreads racing writers apart fastest.
    """

    max_retries: int = 5
    #: 2 ms: a competing writer's commit takes about one WAL flush (0.25–0.4 ms on
    #: PostgreSQL, a few ms for SQLite's fsync), so the first retry waits a few flushes.
    base_delay: float = 0.002
    #: 200 ms cap keeps a hot stream's losers retrying rather than sleeping.
    max_delay: float = 0.2
    jitter: bool = True

    def __post_init__(self) -> None:
        if type(self.max_retries) is not int or self.max_retries < 0:
            raise ValidationError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if not (self.base_delay >= 0 and self.max_delay >= 0):
            raise ValidationError("base_delay and max_delay must be >= 0")

    def delay(self, retry: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return random.uniform(0, ceiling) if self.jitter else ceiling


NO_RETRY = RetryPolicy(max_retries=0)
DEFAULT_RETRY = RetryPolicy()


class ExecutionResult(msgspec.Struct, frozen=True):
    """What `execute` did: the events it wrote, attempts made, and the version of every stream read."""

    events: list[RecordedEvent]
    attempts: int
    stream_versions: dict[str, int]

    @property
    def position(self) -> int | None:
        """Global position of the last event written, or None if the command emitted nothing."""
        return self.events[-1].position if self.events else None


def _fold(command: Command, by_stream: dict, streams: list) -> Any:
    if len(streams) == 1:
        events = by_stream[streams[0]]
    else:
        events = [e for sid in streams for e in by_stream[sid]]
        events.sort(key=_position)
    state = command.initial_state()
    apply = command.apply
    for e in events:
        state = apply(state, e)
    return state


def _position(e: RecordedEvent) -> int:
    return e.position


def _read_and_fold(store, command: Command, streams: list) -> tuple[Any, dict]:
    """Read the streams (one round trip, plus one per discovery round) and fold them.

    Returns (state, versions of every stream read)."""
    by_stream = store.read_streams(streams)
    state = _fold(command, by_stream, streams)
    for _ in range(MAX_DISCOVERY_ROUNDS):
        found = command.discover(state)
        new = [s for s in dict.fromkeys(_stream_id(x) for x in found) if s not in by_stream] if found else []
        if not new:
            break
        by_stream.update(store.read_streams(new))
        streams = streams + new
        state = _fold(command, by_stream, streams)
    else:
        raise ValidationError(
            f"{type(command).__name__}.discover() still found new streams after "
            f"{MAX_DISCOVERY_ROUNDS} rounds; discovery must converge"
        )
    return state, {sid: (evs[-1].version if evs else 0) for sid, evs in by_stream.items()}


def _handle(command: Command, state: Any, versions: dict) -> list:
    """The command's decision, checked: emit() items, to streams it read."""
    emitted = command.handle(state)
    out = list(emitted) if emitted is not None else []
    for item in out:
        if type(item) is not EventToWrite:
            raise ValidationError(
                f"{type(command).__name__}.handle() must return ec.emit(stream, event) items, "
                f"got {type(item).__name__}: {item!r}"
            )
        if item.stream_id not in versions:
            raise UndeclaredStreamError(item.stream_id, type(command).__name__, list(versions))
    return out


class _CacheEntry:
    __slots__ = ("lock", "state", "versions", "valid")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: Any = None
        self.versions: dict = {}
        self.valid = False


class StateCache:
    """Opt-in, bounded, in-process cache of folded command state: `execute(..., cache=cache)`.

    An entry holds, per store, command type and declared streams, the state
    folded so far and the version of every stream it covers. A command on warm
    streams skips the read and goes straight to the version-checked append: one
    round trip in all. If anyone else wrote to one of those streams meanwhile,
    the append's expected versions no longer match, nothing is written, and the
    command runs again on state read afresh (that retry is not counted against
    the retry policy). So a decision made on stale state can never commit.

    Commands of one type on the same streams run one at a time in this process
    (they would conflict anyway). The cache assumes that `initial_state()` and
    `apply()` depend only on the events, not on the command's other fields.
    At most `max_entries` entries are kept, least recently used evicted first.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValidationError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        #: Commands served from the cache, read afresh, and cache hits that proved stale.
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _entry(self, key) -> _CacheEntry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _CacheEntry()
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            return entry


def _remember(entry: _CacheEntry, command: Command, state: Any, recorded: list, versions: dict) -> None:
    """Cache the state after a successful append: it succeeded at exactly the versions
    folded, so folding what it wrote gives the state as stored now."""
    entry.valid = False
    try:
        for e in recorded:
            state = command.apply(state, e)
    except Exception:  # noqa: BLE001 - the events are committed; only the cache entry is lost
        return
    entry.state, entry.versions, entry.valid = state, dict(versions), True


def execute(
    store,
    command: Command,
    *,
    retry: RetryPolicy | None = None,
    metadata: Metadata | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    cache: StateCache | None = None,
) -> ExecutionResult:
    """Run a command against a store and return what it wrote.

    Raises BusinessRuleViolation (from `require`, never retried),
    ConcurrencyError (conflicts outlasted `retry.max_retries`),
    UndeclaredStreamError, ValidationError, SerializationError,
    StoreUnavailableError and CommandTimeoutError (`timeout` seconds overall; None for no limit).
    `cache`: an opt-in `StateCache` (see there).
    """
    policy = DEFAULT_RETRY if retry is None else retry
    if metadata is not None and not isinstance(metadata, Metadata):
        raise ValidationError(f"metadata must be an ec.Metadata, got {type(metadata).__name__}")
    if cache is not None and not isinstance(cache, StateCache):
        raise ValidationError(f"cache must be an ec.StateCache, got {type(cache).__name__}")
    streams = declared_streams(command)
    if cache is None:
        return _run(store, command, streams, policy, metadata, timeout, None, None)
    entry = cache._entry((id(store), type(command), tuple(streams)))
    with entry.lock:
        return _run(store, command, streams, policy, metadata, timeout, entry, cache)


def _run(store, command, streams, policy, metadata, timeout, entry, cache) -> ExecutionResult:
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    free_retry_used = False
    while True:
        attempt += 1
        from_cache = entry is not None and entry.valid
        try:
            if from_cache:
                state, versions = entry.state, dict(entry.versions)
                found = command.discover(state)
                if found and any(_stream_id(x) not in versions for x in found):
                    entry.valid = from_cache = False  # discovery moved on: read afresh
            if not from_cache:
                state, versions = _read_and_fold(store, command, streams)
                if entry is not None:  # fresh state is worth keeping even if handle() refuses
                    cache.misses += 1
                    entry.state, entry.versions, entry.valid = state, dict(versions), True
            else:
                cache.hits += 1
            events = _handle(command, state, versions)
            if not events:
                return ExecutionResult([], attempt, versions)
            if deadline is not None and time.monotonic() > deadline:
                raise CommandTimeoutError(
                    f"{type(command).__name__} timed out after {timeout}s ({attempt} attempt(s)); nothing was written"
                )
            recorded = store.append(events, versions, metadata=metadata)
            for e in recorded:
                versions[e.stream_id] = e.version
            if entry is not None:
                _remember(entry, command, state, recorded, versions)
            return ExecutionResult(recorded, attempt, versions)
        except ConcurrencyError as exc:
            failure: Exception = exc
            if entry is not None:
                entry.valid = False
            if from_cache and not free_retry_used:
                # The cached state was stale: read afresh at once, not counted as a retry.
                cache.stale += 1
                free_retry_used = True
                attempt -= 1
                continue
        except StoreUnavailableError as exc:
            if entry is not None:
                entry.valid = False
            if exc.maybe_committed:
                raise
            failure = exc
        except BusinessRuleViolation:
            raise  # handle() is pure: the cached state is still good
        except BaseException:
            if entry is not None:
                entry.valid = False
            raise
        if attempt > policy.max_retries:
            raise failure
        pause = policy.delay(attempt)
        if deadline is not None and time.monotonic() + pause > deadline:
            raise CommandTimeoutError(
                f"{type(command).__name__} timed out after {timeout}s ({attempt} attempt(s)); "
                f"last failure: {failure}"
            ) from failure
        time.sleep(pause)
