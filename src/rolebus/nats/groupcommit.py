"""Group commit: many messages to one stream, stored as one atomic batch.

Why: rolebus runs the server with ``sync_interval: always``, so every stored message
costs an fsync, and fsyncs are the server's scarcest resource. A JetStream atomic
batch (NATS 2.12+) is stored with one sync however many messages it holds: bulk
publishing (``Bus.publish_many``, ``rolebus publish-file``) goes several times
faster than pipelined single publishes.

Why not always: a batch is slow to start however small, much slower than one
publish, and it costs the server more CPU per message. A worker's writes (a few per
task, each awaited before the next step) measured slower end to end through batches
at a steady rate. So they go alone unless the worker has a backlog (more messages
waiting on the server than it holds, see ``Executor.has_backlog``): a saturated
worker shares fsyncs, one keeping up never waits for a batch (bench/README.md has
the figures).

How: each stream has a lane. The writes queued in one event-loop turn are sent as
one batch at its end (up to 1,000, the server's limit), at most ``in_flight``
batches per lane at a time; the rest wait for one to come back. Nothing here talks
to NATS: the connection hands in ``send``.

A compare-and-set append may share a batch too (a task's record, when its worker
has a backlog): the server checks each expectation when the batch commits, against
what is stored, and refuses the whole batch if one fails. It does not check one
message of a batch against an earlier one of the same batch: two records of one
task, both expecting "no record yet", would both be stored. So a write carries its
guard (the subjects its expectation is about), and a write whose guard is already
queued for the next batch goes alone instead.

A batch is all or nothing. When the server refuses one (a duplicate Msg-Id in it,
atomic publish disabled on that stream, a timeout) none of it was stored, and each
of its writes resolves to None: the caller then publishes that message alone, the
way it would without group commit, and gets its own answer.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from rolebus.errors import RolebusError

__all__ = ["ATOMIC_PUBLISH_DISABLED", "GroupCommit", "GroupCommitStats", "Write"]

log = structlog.get_logger(__name__)

#: JetStream's error code for a stream without ``allow_atomic``.
ATOMIC_PUBLISH_DISABLED = 10174
#: The server refuses batches of more than 1,000 messages.
MAX_BATCH = 1000


@dataclass(slots=True)
class Write:
    subject: str
    data: bytes
    headers: dict[str, str]
    #: The stored sequence, or None: not stored, send it alone.
    stored: asyncio.Future[int | None]
    #: What its expectation is about (a compare-and-set's subject pattern), or None.
    guard: str | None = None


@dataclass(slots=True)
class _Lane:
    stream: str
    queue: list[Write] = field(default_factory=list)
    #: The guards of the queued writes: at most one write per guard in a batch.
    guards: set[str] = field(default_factory=set)
    in_flight: int = 0
    flush_scheduled: bool = False
    enabled: bool = True


@dataclass(slots=True)
class GroupCommitStats:
    """Counts since the connection opened (tests and the benchmark read them)."""

    batches: int = 0  # atomic batches stored
    batched: int = 0  # writes stored in those batches
    refused: int = 0  # batches the server refused (their writes then went alone)
    by_stream: dict[str, int] = field(default_factory=dict)  # ``batched``, per stream


#: ``send(batch_id, writes)`` stores the writes as one atomic batch and returns the
#: sequence of the last one; it raises a RolebusError when the batch is refused.
Sender = Callable[[str, list[Write]], Awaitable[int]]


class GroupCommit:
    def __init__(self, send: Sender, *, in_flight: int = 4) -> None:
        self._send = send
        self._in_flight = in_flight
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Batch ids must be unique among the batches open on the server at once.
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)
        self.stats = GroupCommitStats()

    def _lane(self, stream: str) -> _Lane:
        lane = self._lanes.get(stream)
        if lane is None:
            lane = self._lanes[stream] = _Lane(stream)
        return lane

    def write(
        self,
        stream: str,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        *,
        guard: str | None = None,
    ) -> Write:
        """Queue a write; await ``write.stored`` for its sequence (None: send it
        alone). ``guard``: what a compare-and-set's expectation is about."""
        loop = asyncio.get_running_loop()
        entry = Write(subject, data, headers, loop.create_future(), guard)
        lane = self._lane(stream)
        if not lane.enabled or (guard is not None and guard in lane.guards):
            entry.stored.set_result(None)
            return entry
        if guard is not None:
            lane.guards.add(guard)
        lane.queue.append(entry)
        if lane.in_flight < self._in_flight and not lane.flush_scheduled:
            lane.flush_scheduled = True
            loop.call_soon(self._flush, lane)
        return entry

    async def close(self) -> None:
        """Wait for the batches being stored (their writers are waiting on them)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _flush(self, lane: _Lane) -> None:
        lane.flush_scheduled = False
        while lane.queue and lane.in_flight < self._in_flight:
            batch, lane.queue = lane.queue[:MAX_BATCH], lane.queue[MAX_BATCH:]
            lane.guards.difference_update(entry.guard for entry in batch if entry.guard)
            lane.in_flight += 1
            task = asyncio.create_task(self._commit(lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _commit(self, lane: _Lane, batch: list[Write]) -> None:
        last: int | None = None
        try:
            last = await self._send(f"{self._prefix}{next(self._counter):x}", batch)
            self.stats.batches += 1
            self.stats.batched += len(batch)
            by_stream = self.stats.by_stream
            by_stream[lane.stream] = by_stream.get(lane.stream, 0) + len(batch)
        except RolebusError as error:
            self.stats.refused += 1
            if getattr(error, "code", 0) == ATOMIC_PUBLISH_DISABLED:
                lane.enabled = False
                log.warning(
                    "atomic publish is off on this stream: writes go one by one",
                    stream=lane.stream,
                    hint="run `rolebus provision` to turn it on (allow_atomic)",
                )
            else:
                log.debug("batch refused, sending its writes alone", error=error.message)
        except Exception as error:  # never strand the writers waiting on this batch
            self.stats.refused += 1
            log.warning("batch failed, sending its writes alone", error=repr(error))
        finally:
            lane.in_flight -= 1
            first = None if last is None else last - len(batch) + 1
            for offset, entry in enumerate(batch):
                if not entry.stored.done():
                    entry.stored.set_result(None if first is None else first + offset)
            if not lane.enabled:
                queued, lane.queue = lane.queue, []
                lane.guards.clear()
                for entry in queued:
                    entry.stored.set_result(None)
            elif lane.queue and not lane.flush_scheduled:
                self._flush(lane)
