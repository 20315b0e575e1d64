"""Role workers on a real server: effects once, retries, dead letters, replicas."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog.testing

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows import dlq
from rolebus.flows.state import StateStore
from rolebus.handlers.base import Handler, HandlerContext
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import wait_for
from rolebus.wire.messages import Outcome, Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM
from rolebus.worker.loop import Worker
from rolebus.worker.runner import Crew, start_workers

from ..team import write_team

StartWorkers = Callable[..., Awaitable[list[Worker]]]


@pytest.fixture
async def workers(rolebus_settings: Settings, tmp_path: Path) -> AsyncIterator[StartWorkers]:
    """Start workers for roles of a test team; all are stopped after the test."""
    started = Crew()

    async def start(
        role: str = "eng-be",
        *,
        handler: Handler | None = None,
        replicas: int = 1,
        claimed_after: float | None = None,
        **team_options: Any,
    ) -> list[Worker]:
        team = load_team(write_team(tmp_path / f"roles-{len(started.workers)}", **team_options))
        handlers = {role: handler} if handler else None
        crew = await start_workers(
            rolebus_settings.with_overrides(claimed_after=claimed_after),
            team,
            [team.role(role)],
            replicas=replicas,
            grace=2,
            handlers=handlers,
            supervise=False,
        )
        started.workers.extend(crew.workers)
        return crew.workers

    yield start
    await started.stop(grace=0)


async def completed_ids(bus: Bus) -> Counter[str]:
    return Counter(
        event.task_id for event in await read_events(bus.connection, states=["completed"])
    )


async def states_once_completed(bus: Bus, task_id: str) -> list[str]:
    """The task's event states, in order, once its one `completed` is stored."""

    async def done() -> bool:
        return (await completed_ids(bus))[task_id] == 1

    await wait_for(done)
    return [event.state for event in await read_events(bus.connection) if event.task_id == task_id]


async def dead_letters(bus: Bus) -> list[dlq.DeadLetter]:
    return [entry async for entry in dlq.list_dead_letters(bus.connection)]


async def test_a_task_completes_once_and_its_follow_up_is_published_with_a_derived_id(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    await workers("eng-be")
    task, _ = await rolebus_bus.publish_task(
        "task.backend.implement",
        title="Orders API",
        payload={"then": [{"subject": "task.frontend.build", "title": "Orders page"}]},
    )

    async def done() -> bool:
        return (await completed_ids(rolebus_bus))[task.id] == 1

    await wait_for(done)
    state = await StateStore(rolebus_bus.connection).get(task.id)
    assert state is not None
    assert state.state.state == "completed"
    follow_up = await StateStore(rolebus_bus.connection).get(f"{task.id}-1")
    assert follow_up is None  # nobody runs eng-fe here: the follow-up waits, stored
    stored = await rolebus_bus.connection.streams.get(WORK_STREAM, 2)
    assert stored is not None
    assert stored.subject == "task.frontend.build.eng-be"  # sent under eng-be's own token
    assert stored.headers["Nats-Msg-Id"] == f"{task.id}-1"
    child = msgpack.unpackb(stored.data)
    assert child["causation_id"] == task.id
    assert child["correlation_id"] == task.id
    assert child["from_role"] == "eng-be"
    events = await read_events(rolebus_bus.connection)
    # Done well within ROLEBUS_CLAIMED_AFTER: no `claimed` event, one `completed`.
    assert [event.state for event in events if event.task_id == task.id] == ["completed"]


async def test_a_worker_with_a_backlog_stores_its_records_and_effects_in_atomic_batches(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    backlog = [
        (
            "task.backend.implement",
            Task(
                id=f"bl{n}",
                kind="implement",
                title=f"backlog {n}",
                payload={"then": [{"subject": "task.frontend.build", "title": f"page {n}"}]},
            ),
        )
        for n in range(60)
    ]
    await rolebus_bus.publish_many(backlog)
    [worker] = await workers("eng-be", concurrency=2)
    connection = worker.bus.connection

    async def all_done() -> bool:
        return len(await completed_ids(rolebus_bus)) == len(backlog)

    await wait_for(all_done)
    # Far more waiting than it holds: its records and follow-ups shared batches...
    batched = connection.group_commit.batched
    assert connection.group_commit.by_stream.get(EVENTS_STREAM, 0) > 0  # the records
    assert connection.group_commit.by_stream.get(WORK_STREAM, 0) > 0  # the follow-ups
    assert connection.group_commit.refused == 0
    assert set((await completed_ids(rolebus_bus)).values()) == {1}
    state = await rolebus_bus.connection.admin.stream_state(WORK_STREAM)
    assert state["messages"] == 2 * len(backlog)  # each follow-up stored once

    # ...while a worker keeping up sends a task's effects alone (no batch to wait for).
    lone, _ = await rolebus_bus.publish_task("task.backend.implement", title="lone")
    await states_once_completed(rolebus_bus, lone.id)
    assert connection.group_commit.batched == batched


async def test_a_completed_task_logs_at_debug_and_a_retry_at_info(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    async def handler(task: Task, context: HandlerContext) -> Outcome:
        if task.title == "flaky" and context.attempt == 1:
            return Outcome.failed("the upstream timed out", retryable=True)
        return Outcome(status="completed")

    # Loggers are bound when workers start: capture from before.
    with structlog.testing.capture_logs() as logs:
        await workers("eng-be", handler=handler)
        fine, _ = await rolebus_bus.publish_task("task.backend.implement", title="fine")
        flaky, _ = await rolebus_bus.publish_task("task.backend.implement", title="flaky")
        await states_once_completed(rolebus_bus, flaky.id)
        await states_once_completed(rolebus_bus, fine.id)

        # The worker logs once the task is acked, a moment after its record says so.
        def both_logged() -> bool:
            done = {entry.get("task_id") for entry in logs if entry["event"] == "task completed"}
            return {fine.id, flaky.id} <= done

        await wait_for(both_logged)
    levels = {(entry["event"], entry.get("task_id")): entry["log_level"] for entry in logs}
    assert levels[("task completed", fine.id)] == "debug"
    assert levels[("task completed", flaky.id)] == "debug"
    assert levels[("task failed; will retry", flaky.id)] == "info"


async def test_a_claimed_event_is_published_for_a_task_still_running_after_claimed_after(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    release = asyncio.Event()

    async def waits(task: Task, context: HandlerContext) -> Outcome:
        await release.wait()
        return Outcome.completed()

    await workers("eng-be", handler=waits, claimed_after=0.05)
    task, _ = await rolebus_bus.publish_task("task.backend.slow", title="long")

    async def claimed() -> bool:
        events = await read_events(rolebus_bus.connection, states=["claimed"])
        return [event.task_id for event in events] == [task.id]

    await wait_for(claimed)  # while the handler is still running
    release.set()
    assert await states_once_completed(rolebus_bus, task.id) == ["claimed", "completed"]


async def test_claimed_after_zero_publishes_a_claimed_event_for_every_task(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    await workers("eng-be", claimed_after=0)
    task, _ = await rolebus_bus.publish_task("task.backend.quick", title="quick")
    assert await states_once_completed(rolebus_bus, task.id) == ["claimed", "completed"]


async def test_a_handler_slower_than_ack_wait_is_not_run_twice_while_alive(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    calls: Counter[str] = Counter()

    async def slow(task: Task, context: HandlerContext) -> Outcome:
        calls[task.id] += 1
        await asyncio.sleep(3.5)  # the work itself: 3.5 x ack_wait
        return Outcome.completed()

    await workers("eng-be", handler=slow, ack_wait="1s")
    task, _ = await rolebus_bus.publish_task("task.backend.slow", title="long")

    async def done() -> bool:
        return (await completed_ids(rolebus_bus))[task.id] == 1

    await wait_for(done)
    assert calls[task.id] == 1
    state = await rolebus_bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-be")
    assert state["redelivered"] == 0


async def test_a_poison_task_is_dead_lettered_after_max_deliver_and_redrive_runs_it_again(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    healthy = asyncio.Event()
    attempts: Counter[str] = Counter()

    async def flaky(task: Task, context: HandlerContext) -> Outcome:
        attempts[task.id] += 1
        if not healthy.is_set():
            return Outcome.failed("database unreachable", retryable=True)
        return Outcome.completed("fixed")

    await workers("eng-be", handler=flaky, max_deliver=3)
    task, _ = await rolebus_bus.publish_task("task.backend.poison", title="poison")

    async def dead() -> bool:
        dead_events = await read_events(rolebus_bus.connection, states=["dead"])
        return len(dead_events) == 1 and len(await dead_letters(rolebus_bus)) == 1

    await wait_for(dead)
    [entry] = await dead_letters(rolebus_bus)
    assert (entry.reason, entry.attempts, entry.task_id) == ("max-deliver", 3, task.id)
    assert entry.error == "database unreachable"
    assert entry.subject == "task.backend.poison"
    assert attempts[task.id] == 3
    events = [e for e in await read_events(rolebus_bus.connection) if e.task_id == task.id]
    assert [e.state for e in events if e.record is not None] == ["retrying", "retrying", "dead"]
    # The last attempt the server allows left a note with the message (what buries
    # it if that attempt dies): a role may not read the work stream by sequence.
    assert [(e.state, e.attempt) for e in events if e.record is None] == [("last-try", 3)]

    healthy.set()
    await dlq.redrive(rolebus_bus.connection, entry)

    async def done() -> bool:
        return (await completed_ids(rolebus_bus))[task.id] == 1

    await wait_for(done)
    assert await dead_letters(rolebus_bus) == []


async def test_garbage_and_schema_invalid_messages_are_dead_lettered_and_work_goes_on(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, workers: StartWorkers
) -> None:
    import nats

    await workers("eng-be")
    client = await nats.connect(rolebus_server.url)
    try:
        js = client.jetstream()
        await js.publish("task.backend.x", b"\xc1\x00garbage", headers={"Nats-Msg-Id": "g1"})
        await js.publish(
            "task.backend.x", msgpack.packb({"title": 3}), headers={"Nats-Msg-Id": "g2"}
        )
    finally:
        await client.close()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="after the garbage")

    async def done() -> bool:
        return (await completed_ids(rolebus_bus))[task.id] == 1 and len(
            await dead_letters(rolebus_bus)
        ) == 2

    await wait_for(done)
    entries = {entry.reason: entry for entry in await dead_letters(rolebus_bus)}
    assert "is not msgpack" in entries["undecodable"].error
    assert "not a valid Task" in entries["invalid"].error
    assert "kind: Field required" in entries["invalid"].error
    assert entries["invalid"].original_seq == 2


async def test_a_handler_that_raises_is_a_retryable_failure_not_a_crash(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    calls = itertools.count(1)

    async def buggy(task: Task, context: HandlerContext) -> Outcome:
        if next(calls) == 1:
            raise KeyError("missing")
        return Outcome.completed()

    await workers("eng-be", handler=buggy)
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="x")

    async def done() -> bool:
        return (await completed_ids(rolebus_bus))[task.id] == 1

    await wait_for(done)
    retrying = await read_events(rolebus_bus.connection, states=["retrying"])
    assert retrying[0].error == "handler raised KeyError: 'missing'"


async def test_two_replicas_share_the_work_and_each_task_is_done_once(
    rolebus_bus: Bus, workers: StartWorkers
) -> None:
    async def quick(task: Task, context: HandlerContext) -> Outcome:
        await asyncio.sleep(0.01)
        return Outcome.completed()

    replicas = await workers("eng-be", handler=quick, replicas=2, concurrency=2)
    ids = []
    for number in range(200):
        task, _ = await rolebus_bus.publish_task("task.backend.x", title=f"t{number}")
        ids.append(task.id)

    async def done() -> bool:
        return len(await completed_ids(rolebus_bus)) == 200

    await wait_for(done, timeout=60)
    counts = await completed_ids(rolebus_bus)
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    assert all(worker.stats.completed > 0 for worker in replicas)
    assert sum(worker.stats.completed for worker in replicas) == 200


async def test_the_worker_reconnects_to_a_restarted_server_and_finishes_the_backlog(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, workers: StartWorkers
) -> None:
    async def slowish(task: Task, context: HandlerContext) -> Outcome:
        await asyncio.sleep(0.05)
        return Outcome.completed()

    await workers("eng-be", handler=slowish, concurrency=2)
    ids = [
        (await rolebus_bus.publish_task("task.backend.x", title=f"t{n}"))[0].id for n in range(60)
    ]

    async def some_done() -> bool:
        return len(await completed_ids(rolebus_bus)) >= 5

    await wait_for(some_done)
    rolebus_server.kill()
    rolebus_server.restart()

    async def all_done() -> bool:
        try:
            return len(await completed_ids(rolebus_bus)) == 60
        except Exception:
            return False  # still reconnecting

    await wait_for(all_done, timeout=60)
    counts = await completed_ids(rolebus_bus)
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
