"""Projections: read models kept up to date from the global feed, checkpointed, never skipping an event.

A `Projector` names a read model and handles events (one at a time, or a batch
for speed), optionally filtered by type and stream prefix. `run_projection`
(or `ProjectionRunner`) catches up from the projector's checkpoint, then
follows the feed live until asked to stop:

* **Cursor.** The checkpoint is the global position of the last event
  processed; the runner reads `position > checkpoint`. Positions are commit
  ordered on every backend (on PostgreSQL, readers see only positions below the
  oldest running transaction, see `pg_sql`), so resuming after a checkpoint never
  skips an event. Never a count of events. Past events a filtered projector's
  filters leave out, an in-memory read cursor moves ahead of the stored
  checkpoint (saved every `idle_checkpoint_interval` and when the run ends); on
  PostgreSQL a filtered page reads a bounded window of the feed at a time.
* **Batches.** Each batch is one transaction: the handler's read-model writes
  (on PostgreSQL and SQLite through `ctx.connection`) and the checkpoint commit
  together, so each event's effect happens exactly once across crashes and
  restarts. The checkpoint is a compare-and-set on the previous position: an
  instance that lost its leadership can never commit a batch twice.
* **One active instance per projector name.** PostgreSQL: a session advisory
  lock held by the connection that runs the batches (a killed process drops it
  at once); SQLite: an exclusive `flock` on a file next to the database; memory:
  a lock in the store. Other instances wait and take over from the checkpoint.
* **Errors.** `on_error="fatal"` (default): stop, record the error, raise
  `ProjectionError`. `"skip"`: write the event and the error to a dead-letter
  record in the same transaction as the checkpoint that passes it. `Retry(...)`:
  retry the event alone with exponential backoff, then `then` ("fatal" or
  "skip"). A failing batch is replayed one event per transaction to find the
  failing event. An event this process cannot decode is an error like any other:
  never dropped silently.
* **Live.** PostgreSQL: LISTEN/NOTIFY wake-ups (migration 3 notifies on every
  append while a listening projector's lease lasts: `listen_lease`, renewed as
  it runs, ended when it stops for any reason) plus a polling
  fallback every `poll_interval` seconds (for poolers that drop LISTEN); SQLite
  and memory: polling.
* **At-least-once elsewhere.** A read model outside the batch's transaction (not
  written through `ctx.connection`) may see a batch again: after a crash, and
  when a failing batch is replayed one event per transaction.

Each backend keeps checkpoints, dead letters and the leader lock in its projection storage
(eventcore.stores.projection_storage, implemented beside each store): this package never asks which
backend it talks to. Modules: projector (the model), runner, status (status and dead letters), tail
(the raw feed for `eventcore tail`); this one only gathers their public names.
"""
from __future__ import annotations

from .projector import DEFAULT_BATCH_SIZE, FATAL, SKIP, ProjectionContext, ProjectionError, Projector, Retry
from .runner import ProjectionRunner, run_projection
from .status import PENDING_CAP, DeadLetter, ProjectionStatus, dead_letters, projection_status
from .tail import follow_waiter, read_rows, row_json

__all__ = [
    "DEFAULT_BATCH_SIZE", "FATAL", "PENDING_CAP", "SKIP", "DeadLetter", "ProjectionContext", "ProjectionError",
    "ProjectionRunner", "ProjectionStatus", "Projector", "Retry", "dead_letters", "follow_waiter", "projection_status",
    "read_rows", "row_json", "run_projection",
]
