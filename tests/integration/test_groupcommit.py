"""Group commit: bulk publishes stored as atomic batches, on a real server; and the
lane logic on its own (a sender the test controls: no broker involved)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import TransportError
from rolebus.nats.groupcommit import ATOMIC_PUBLISH_DISABLED, MAX_BATCH, GroupCommit, Write
from rolebus.nats.server import EmbeddedServer
from rolebus.wire.messages import Event, Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM, record_subject, records_of


def tasks(count: int, prefix: str) -> list[tuple[str, Task]]:
    return [
        ("task.backend.bulk", Task(id=f"{prefix}{n}", kind="bulk", title=f"bulk {n}"))
        for n in range(count)
    ]


async def test_publish_many_stores_every_message_in_atomic_batches_with_the_right_sequences(
    rolebus_bus: Bus,
) -> None:
    count = 2 * MAX_BATCH + 500  # more than one batch holds
    events = [
        ("event.task.completed", Event(id=f"e{n}", state="completed", task_id=f"b{n}"))
        for n in range(300)
    ]
    acks = await rolebus_bus.publish_many([*tasks(count, "b"), *events], window=5000)

    stats = rolebus_bus.connection.group_commit
    assert stats.refused == 0
    assert stats.batched == count + len(events)
    assert 4 <= stats.batches < 20  # two streams, at most 1,000 a batch: not one per message
    work = [ack for ack in acks if ack.stream == WORK_STREAM]
    assert [ack.seq for ack in work] == list(range(1, count + 1))
    assert [ack.seq for ack in acks if ack.stream == EVENTS_STREAM] == list(range(1, 301))
    for seq in (1, MAX_BATCH, MAX_BATCH + 1, count):  # the batch edges
        stored = await rolebus_bus.connection.streams.get(WORK_STREAM, seq)
        assert stored is not None
        assert stored.headers["Nats-Msg-Id"] == f"b{seq - 1}"
    state = await rolebus_bus.connection.admin.stream_state(WORK_STREAM)
    assert state["messages"] == count


async def test_a_batch_with_an_already_stored_msg_id_is_published_again_one_by_one(
    rolebus_bus: Bus,
) -> None:
    await rolebus_bus.publish(*tasks(5, "d")[3])  # "d3" is already stored
    acks = await rolebus_bus.publish_many(tasks(5, "d"))

    stats = rolebus_bus.connection.group_commit
    assert stats.refused == 1  # the server refused the whole batch: nothing stored by it
    assert [ack.duplicate for ack in acks] == [False, False, False, True, False]
    assert acks[3].seq == 1
    state = await rolebus_bus.connection.admin.stream_state(WORK_STREAM)
    assert state["messages"] == 5  # each id once


async def test_batched_records_keep_their_compare_and_set_answers(rolebus_bus: Bus) -> None:
    connection = rolebus_bus.connection

    async def append(task_id: str, state: str, *, last_seq: int = 0, msg_id: str = "") -> Any:
        return await connection.append(
            record_subject(state, "eng-be", task_id),
            b"record",
            msg_id=msg_id or f"{task_id}_{state}_{last_seq}",
            last_seq=last_seq,
            on=records_of(task_id, "eng-be"),
            batch=True,
        )

    together = await asyncio.gather(*(append(f"r{n}", "completed") for n in range(5)))
    assert [ack.seq for ack in together] == [1, 2, 3, 4, 5]
    assert connection.group_commit.by_stream[EVENTS_STREAM] == 5  # one batch of five
    # A stale expectation (r1 has a record) refuses the whole batch; every write
    # then goes alone and gets its own answer. The same append again (r2's, as a
    # retry whose answer was lost) is refused the same way: the server checks the
    # expectation before the Msg-Id, and the worker then reads the record it wrote.
    stale, again, fresh = await asyncio.gather(
        append("r1", "failed"),
        append("r2", "completed"),
        append("r9", "completed"),
    )
    assert stale is None  # another record came first
    assert again is None
    assert fresh is not None
    assert (fresh.seq, fresh.duplicate) == (6, False)
    assert connection.group_commit.refused == 1
    state = await connection.admin.stream_state(EVENTS_STREAM)
    assert state["messages"] == 6


@pytest.fixture
async def js(rolebus_server: EmbeddedServer) -> AsyncIterator[JetStreamContext]:
    """Plain nats-py, to make a work stream by hand as someone did before group commit."""
    client = await nats.connect(rolebus_server.url)
    try:
        yield client.jetstream()
    finally:
        await client.close()


async def test_provisioning_turns_atomic_publish_on_for_streams_made_before_it(
    js: JetStreamContext, rolebus_settings: Settings
) -> None:
    await js.add_stream(
        name=WORK_STREAM,
        subjects=["task.>", "handoff.>", "escalation.>", "decision.>"],
        discard="new",
    )
    assert not (await js.stream_info(WORK_STREAM)).config.allow_atomic
    bus = await Bus.connect(rolebus_settings)
    await bus.close()
    assert (await js.stream_info(WORK_STREAM)).config.allow_atomic


async def test_without_atomic_publish_the_messages_go_one_by_one_and_all_are_stored(
    js: JetStreamContext, rolebus_settings: Settings
) -> None:
    await js.add_stream(name=WORK_STREAM, subjects=["task.>"], discard="new")
    bus = await Bus.connect(rolebus_settings, provision=False)  # a user who may not edit it
    try:
        first = await bus.publish_many(tasks(50, "n"))
        second = await bus.publish_many(tasks(50, "m"))
        stats = bus.connection.group_commit
        assert stats.refused == 1  # once: then that stream's lane stays off
        assert stats.batches == 0
        assert [ack.seq for ack in first + second] == list(range(1, 101))
    finally:
        await bus.close()


# --- the lanes alone --------------------------------------------------------------------


class Sender:
    """Stores batches in a list; can be told to refuse, and to hold batches."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.refuse: TransportError | None = None
        self.waiting = 0

    async def __call__(self, batch_id: str, writes: list[Write]) -> int:
        self.waiting += 1
        await self.open.wait()
        self.waiting -= 1
        if self.refuse is not None:
            raise self.refuse
        self.batches.append([write.subject for write in writes])
        return sum(len(batch) for batch in self.batches)


async def test_writes_of_one_turn_share_a_batch_and_later_ones_wait_for_a_free_slot() -> None:
    sender = Sender()
    sender.open.clear()
    commit = GroupCommit(sender, in_flight=1)
    first = [commit.write("S", f"a.{n}", b"", {}) for n in range(3)]

    async def held() -> None:
        while sender.waiting != 1:
            await asyncio.sleep(0)

    await asyncio.wait_for(held(), 5)
    later = [commit.write("S", f"b.{n}", b"", {}) for n in range(2)]
    sender.open.set()
    stored = [await write.stored for write in first + later]
    assert sender.batches == [["a.0", "a.1", "a.2"], ["b.0", "b.1"]]
    assert stored == [1, 2, 3, 4, 5]
    assert (commit.stats.batches, commit.stats.batched) == (2, 5)


async def test_a_queue_longer_than_the_server_limit_is_split() -> None:
    sender = Sender()
    commit = GroupCommit(sender, in_flight=4)
    writes = [commit.write("S", "s", b"", {}) for _ in range(MAX_BATCH + 1)]
    stored = [await write.stored for write in writes]
    assert [len(batch) for batch in sender.batches] == [MAX_BATCH, 1]
    assert stored == list(range(1, MAX_BATCH + 2))


@pytest.mark.parametrize("code", [10201, ATOMIC_PUBLISH_DISABLED])
async def test_a_refused_batch_resolves_its_writes_to_none_so_they_are_sent_alone(
    code: int,
) -> None:
    sender = Sender()
    sender.refuse = TransportError("refused", code=code)
    commit = GroupCommit(sender)
    writes = [commit.write("S", "s", b"", {}) for _ in range(3)]
    assert [await write.stored for write in writes] == [None, None, None]
    after = commit.write("S", "s", b"", {})
    if code == ATOMIC_PUBLISH_DISABLED:  # the lane is off: no second refused batch
        assert after.stored.done()
        assert await after.stored is None
        assert commit.stats.refused == 1
    else:  # a duplicate id is about those messages only: the lane stays on
        sender.refuse = None
        assert await after.stored == 1


async def test_two_writes_with_one_guard_never_share_a_batch() -> None:
    # The server checks a batch's expectations against what is stored, not against
    # the batch's own earlier messages: two records of one task must not meet in one.
    sender = Sender()
    commit = GroupCommit(sender)
    first = commit.write("S", "event.task.completed.eng-be.t1", b"", {}, guard="t1")
    second = commit.write("S", "event.task.failed.eng-be.t1", b"", {}, guard="t1")
    other = commit.write("S", "event.task.completed.eng-be.t2", b"", {}, guard="t2")
    assert second.stored.done()
    assert await second.stored is None  # sent alone by its caller
    assert [await first.stored, await other.stored] == [1, 2]
    assert sender.batches == [["event.task.completed.eng-be.t1", "event.task.completed.eng-be.t2"]]
    # Once the first is in a batch, the guard is free for the next one.
    again = commit.write("S", "event.task.completed.eng-be.t1", b"", {}, guard="t1")
    assert await again.stored == 3
