"""Group commit: appends from concurrent threads share one transaction (one WAL flush), and the
argument of the server function `append_group` that carries them (functions/append_group.sql).

A lone append never waits; appends that arrive while the connections are busy writing earlier
groups are carried by the next group. Members of one group never share a stream, so each is
checked on its own and one member's conflict never fails the others.
"""
from __future__ import annotations

import threading
from collections import deque

import msgspec

from ...events import RecordedEvent
from ..prepare import PreparedAppend

#: Most appends one group commit carries: enough to share a WAL flush widely, few enough
#: that the server function's per-member scans stay short.
MAX_GROUP = 64
#: Most events one group carries (one append alone may bring up to MAX_EVENTS_PER_APPEND):
#: a transaction numbers its events below 2**POSITION_SHIFT.
MAX_GROUP_EVENTS = 100_000
#: Group commits written at once (see _GroupCommitter).
GROUPS_IN_FLIGHT = 2


class _GroupCommitter:
    """Library-level group commit: appends issued meanwhile by other threads share one transaction.

    Leadership is a token; there are `in_flight` of them. An append that finds a
    token free takes it and goes out at once, carrying with it every append
    already queued (up to MAX_GROUP, and never two appends on one stream: a
    group's members are checked independently, so the second waits for the next
    group). An append that finds every token taken queues. When a leader's group
    is written, it hands its token to the oldest queued append, which leads the
    next group. A lone append therefore never waits, and with two tokens one
    group is being written while the next one's WAL flush is pending.
    """

    class _Request:
        __slots__ = ("prepared", "streams", "done", "result", "lead")

        def __init__(self, prepared: PreparedAppend) -> None:
            self.prepared = prepared
            self.streams = prepared.expected.keys()
            self.done = None  # a threading.Event, made only for an append that has to queue
            self.result = None
            self.lead = False

    def __init__(self, store, in_flight: int) -> None:
        """`store`: what writes a group (its `_append_group(list of PreparedAppend)`)."""
        self._store = store
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._free = in_flight
        #: Transactions written and appends carried, for measurement.
        self.groups = 0
        self.appends = 0

    def submit(self, prepared: PreparedAppend) -> list[RecordedEvent]:
        req = self._Request(prepared)
        with self._lock:
            lead = self._free > 0
            if lead:
                self._free -= 1
            else:
                req.done = threading.Event()
                self._queue.append(req)
        if not lead:
            req.done.wait()
            lead = req.lead
        if lead:
            self._lead(req)
        if isinstance(req.result, BaseException):
            raise req.result
        return req.result

    def _take(self, own: "_GroupCommitter._Request") -> list:
        """Own request plus queued ones on other streams, oldest first (call with the lock held)."""
        group = [own]
        if not self._queue:
            return group
        taken = set(own.streams)
        events = len(own.prepared)
        kept: deque = deque()
        queue = self._queue
        while queue and len(group) < MAX_GROUP:
            r = queue.popleft()
            if taken.isdisjoint(r.streams) and events + len(r.prepared) <= MAX_GROUP_EVENTS:
                taken.update(r.streams)
                events += len(r.prepared)
                group.append(r)
            else:
                kept.append(r)
        kept.extend(queue)
        self._queue = kept
        return group

    def _lead(self, own: "_GroupCommitter._Request") -> None:
        with self._lock:
            group = self._take(own)
        try:
            results = self._store._append_group([r.prepared for r in group])
        except BaseException as exc:  # noqa: BLE001 - every waiter must be released
            results = [exc] * len(group)
        self.groups += 1
        self.appends += len(group)
        for r, res in zip(group, results):
            r.result = res
            if r is not own:
                r.done.set()
        with self._lock:
            if not self._queue:
                self._free += 1
                return
            heir = self._queue.popleft()
        heir.lead = True  # it leads the next group, its own append first
        heir.done.set()


#: Stream ids are a str subclass, which msgspec hands to the hook: encoded as plain strings.
_encode_json = msgspec.json.Encoder(enc_hook=str).encode
_Raw = msgspec.Raw


#: An append_group argument with no members: what _warm_up sends.
_EMPTY_GROUP = '{"n": 0, "g": []}'
#: An append_one argument that writes nothing (one participant, any version, no event): what _warm_up
#: sends to have the server compile append_one. It takes two advisory locks, which its transaction ends.
_LONE_EMPTY_MEMBER = '{"n": 1, "g": [[[["eventcore warm-up", -1, 0]], []]]}'


def _encode_group(group: list) -> str:
    """The append_group argument: {"n": participants, "g": [[participants, events, key], ...]} (see
    functions/append_group.sql). Payloads and metadata are already JSON: embedded verbatim, never re-encoded.
    Events are numbered 1, 2, ... across the group: their positions are the base position + that."""
    members = []
    n = 0
    ordinal = 0
    for p in group:
        expected = p.expected
        written = set(p.stream_ids)
        n += len(expected)
        events = []
        for sid, eid, t, d, md, tv in zip(p.stream_ids, p.event_ids, p.types, p.payloads, p.metadatas,
                                          p.type_versions):
            ordinal += 1
            events.append((sid, eid.hex(), t, _Raw(d), None if md is None else _Raw(md), ordinal)
                          if tv == 1 else (sid, eid.hex(), t, _Raw(d), None if md is None else _Raw(md), ordinal, tv))
        participants = [(s, expected[s], 1 if s in written else 0) for s in sorted(expected)]
        members.append((participants, events) if p.key is None else (participants, events, p.key))
    return _encode_json({"n": n, "g": members}).decode()

