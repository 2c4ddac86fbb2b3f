"""eventcore: event sourcing with atomic multi-stream commands.

A command reads several streams, decides, and appends to several streams
atomically, with optimistic concurrency on every stream it read.

    import eventcore as ec
    store = ec.connect("sqlite:///bank.db")
    ec.execute(store, Deposit(account=ec.StreamId("account-1"), amount=10))
"""
from ._impl import IMPL as __impl__
from ._impl import PurePythonWarning
from .payloads import MAX_PAYLOAD_BYTES
from .commands import Command, require
from .errors import (
    BusinessRuleViolation,
    CommandTimeoutError,
    ConcurrencyError,
    DuplicateCommandError,
    EventCoreError,
    EventDefinitionError,
    EventVersionError,
    MissingDependencyError,
    NotAnEventStoreError,
    SchemaVersionError,
    SerializationError,
    StoreNotFoundError,
    StoreTimeoutError,
    StoreUnavailableError,
    UndeclaredStreamError,
    UnknownEventTypeError,
    UpcastError,
    ValidationError,
)
from .events import Event, EventToWrite, Metadata, RawEvent, RecordedEvent, emit, upcaster
from .evolution import check_chains
from .executor import ExecutionResult, RetryPolicy, StateCache, execute
from .metrics import CommandInfo, MetricsCollector, OperationInfo, RetryInfo
from .expected import ANY, NO_STREAM, STREAM_EXISTS, ExpectedVersion
from .projections import (
    DeadLetter,
    ProjectionContext,
    ProjectionError,
    ProjectionRunner,
    ProjectionStatus,
    Projector,
    Retry,
    dead_letters,
    projection_status,
    run_projection,
)
from .stores import connect
from .snapshots import SnapshotPolicy
from .stores.base import BatchResult, EventStore, SnapshotInfo, StoreHealth
from .stores.ingest import IngestError, IngestResult
from .streams import StreamId

__version__ = "0.1.0"

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "ANY",
    "BatchResult",
    "BusinessRuleViolation",
    "Command",
    "CommandInfo",
    "CommandTimeoutError",
    "ConcurrencyError",
    "DuplicateCommandError",
    "DeadLetter",
    "Event",
    "EventCoreError",
    "EventDefinitionError",
    "EventVersionError",
    "NotAnEventStoreError",
    "EventStore",
    "EventToWrite",
    "ExecutionResult",
    "ExpectedVersion",
    "IngestError",
    "MissingDependencyError",
    "IngestResult",
    "Metadata",
    "MetricsCollector",
    "NO_STREAM",
    "OperationInfo",
    "ProjectionContext",
    "ProjectionError",
    "ProjectionRunner",
    "ProjectionStatus",
    "Projector",
    "PurePythonWarning",
    "RawEvent",
    "RecordedEvent",
    "Retry",
    "RetryInfo",
    "RetryPolicy",
    "STREAM_EXISTS",
    "SchemaVersionError",
    "SnapshotInfo",
    "SnapshotPolicy",
    "SerializationError",
    "StateCache",
    "StoreHealth",
    "StoreNotFoundError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "StreamId",
    "UndeclaredStreamError",
    "UnknownEventTypeError",
    "UpcastError",
    "ValidationError",
    "__impl__",
    "check_chains",
    "connect",
    "dead_letters",
    "emit",
    "execute",
    "projection_status",
    "require",
    "run_projection",
    "upcaster",
]
