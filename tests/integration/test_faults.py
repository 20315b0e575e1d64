"""The fault suite: inject a fault, then check the whole history with the test kit's
history checker: everything acknowledged is there, nothing happened twice.

Each test records what it injected; `pytest` prints the table at the end
(docs/faults.md keeps the latest one). The longer tier is marked `slow`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import RoleError, StreamFullError
from rolebus.flows.state import StateStore
from rolebus.history.replay import read_events
from rolebus.nats.admin import StreamLimits
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team, parse_role
from rolebus.testing import HistoryReport, check_history, wait_for
from rolebus.wire.messages import Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import REPO, FaultLog
from ..team import write_team

ROLEBUS = str(Path(sys.executable).parent / "rolebus")


def spawn_worker(roles: Path, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(roles)}
    return subprocess.Popen(
        [ROLEBUS, "worker", "eng-be"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def publish(bus: Bus, count: int, **payload: object) -> list[str]:
    return [
        (
            await bus.publish_task(
                "task.backend.build",
                title=f"t{number}",
                payload={
                    **payload,
                    "then": [{"subject": "task.frontend.page", "title": f"page {number}"}],
                },
            )
        )[0].id
        for number in range(count)
    ]


async def kill_while_working(bus: Bus, roles: Path, url: str, *, kills: int, every: int) -> int:
    """Start a worker, let it record ``every`` events, SIGKILL it; ``kills`` times."""
    for _ in range(kills):
        victim = spawn_worker(roles, url)
        before = await event_count(bus)

        async def progressing(before: int = before) -> bool:
            return await event_count(bus) >= before + every

        await wait_for(progressing, timeout=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    return kills


async def settled(bus: Bus, ids: list[str], timeout: float = 90) -> HistoryReport:
    async def done() -> bool:
        return not (await check_history(bus.connection, ids)).lost

    try:
        await wait_for(done, timeout=timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{await why_lost(bus, ids)}") from None
    report = await check_history(bus.connection, ids)
    report.assert_ok()
    return report


async def why_lost(bus: Bus, ids: list[str]) -> str:
    """What the bus knows of the tasks not yet ended: their records, their events,
    and the work consumer (a failed fault test must say where a task stopped)."""
    lost = (await check_history(bus.connection, ids)).lost
    lines = [f"not ended: {lost}"]
    states = StateStore(bus.connection)
    for task_id in lost:
        stored = await states.get(task_id)
        lines.append(f"record {task_id}: {stored.state if stored else None}")
        events = [e for e in await read_events(bus.connection) if e.task_id == task_id]
        lines.append(f"events {task_id}: {[(e.state, e.attempt) for e in events]}")
    consumer = await bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-be")
    lines.append(f"consumer: {consumer}")
    return "\n".join(lines)


async def event_count(bus: Bus) -> int:
    """How many events are stored: progress, whatever their state."""
    return (await bus.connection.admin.stream_state(EVENTS_STREAM))["messages"]


def test_the_history_checker_finds_planted_losses_duplicates_and_gaps(
    rolebus_server: EmbeddedServer, rolebus_settings: Settings
) -> None:
    async def plant() -> HistoryReport:
        async with await Bus.connect(rolebus_settings) as bus:
            done, _ = await bus.publish_task("task.backend.x", title="done")
            lost, _ = await bus.publish_task("task.backend.x", title="never handled")
            from rolebus.wire.messages import Event

            for copy in ("a", "b"):  # the same task completed twice
                await bus.publish(
                    f"event.task.completed.eng-be.{done.id}",
                    Event(id=f"{done.id}_{copy}", state="completed", task_id=done.id, record={}),
                )
            twice = Task(id="dup-1", kind="x", title="follow-up stored twice")
            for msg_id in ("m1", "m2"):  # beyond the dedup window: two Msg-Ids
                await bus.connection.publish(
                    "task.backend.x", msgpack.packb(twice.model_dump(mode="json")), msg_id=msg_id
                )
            await bus.publish_task("task.backend.x", title="deleted later")
            await bus.publish_task("task.backend.x", title="after the gap")
            await bus.connection.streams.delete(WORK_STREAM, 5)  # the filler: a gap
            return await check_history(bus.connection, [done.id, lost.id])

    report = asyncio.run(plant())
    assert not report.ok
    assert len(report.lost) == 1
    assert list(report.duplicate_completed.values()) == [2]
    assert report.duplicate_messages == {"dup-1": 2}
    assert report.gaps == [(WORK_STREAM, 4, 1)]
    with pytest.raises(AssertionError, match="history check failed"):
        report.assert_ok()


async def test_worker_sigkill_mid_batch_repeatedly(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path, fault_log: FaultLog
) -> None:
    roles = write_team(tmp_path / "roles", ack_wait="1s", max_deliver=20)
    ids = await publish(rolebus_bus, 60, sleep=0.05)
    kills = await kill_while_working(rolebus_bus, roles, rolebus_server.url, kills=3, every=8)
    survivor = spawn_worker(roles, rolebus_server.url)
    try:
        report = await settled(rolebus_bus, ids)
    finally:
        survivor.terminate()
        survivor.wait(timeout=30)
    fault_log.record("worker SIGKILL mid-batch", kills, report)


async def test_worker_sigstop_past_ack_wait_then_sigcont_doubles_nothing(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path, fault_log: FaultLog
) -> None:
    roles = write_team(tmp_path / "roles", ack_wait="1s", max_deliver=20)
    ids = await publish(rolebus_bus, 30, sleep=0.3)
    frozen = spawn_worker(roles, rolebus_server.url)
    other: subprocess.Popen[bytes] | None = None
    try:

        async def claimed() -> bool:
            return await event_count(rolebus_bus) >= 4

        await wait_for(claimed, timeout=30)
        frozen.send_signal(signal.SIGSTOP)  # holds messages, stops heartbeating
        other = spawn_worker(roles, rolebus_server.url)

        async def redelivered() -> bool:  # the frozen worker's messages went to the other
            state = await rolebus_bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-be")
            return state["redelivered"] > 0

        await wait_for(redelivered, timeout=30)
        frozen.send_signal(signal.SIGCONT)  # its late results and acks arrive now
        report = await settled(rolebus_bus, ids)
    finally:
        frozen.send_signal(signal.SIGCONT)
        for process in (frozen, other):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    fault_log.record("worker SIGSTOP past ack_wait, then SIGCONT", 1, report)


async def test_server_sigkill_and_restart_under_load(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path, fault_log: FaultLog
) -> None:
    roles = write_team(tmp_path / "roles", ack_wait="2s", max_deliver=20)
    team = load_team(roles)
    settings = Settings(nats_url=rolebus_server.url)
    crew = await start_workers(settings, team, [team.role("eng-be")], grace=1)
    ids = await publish(rolebus_bus, 30, sleep=0.02)
    try:
        rolebus_server.kill()
        rolebus_server.restart()
        ids += await publish(rolebus_bus, 30, sleep=0.02)  # retried until the server is back
        report = await settled(rolebus_bus, ids)
    finally:
        await crew.stop(grace=0)
    fault_log.record("nats-server SIGKILL + restart on the same store", 1, report)


async def test_duplicate_publishes_inside_the_dedup_window_are_stored_once(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path, fault_log: FaultLog
) -> None:
    team = load_team(write_team(tmp_path / "roles"))
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        tasks = [Task(kind="build", title=f"t{n}") for n in range(20)]
        for _ in range(3):
            for task in tasks:
                await rolebus_bus.publish("task.backend.build", task)
        report = await settled(rolebus_bus, [task.id for task in tasks])
    finally:
        await crew.stop(grace=0)
    assert (await rolebus_bus.connection.admin.stream_state(WORK_STREAM))["messages"] == 20
    fault_log.record("duplicate publishes in the dedup window", 40, report)


async def test_a_slow_consumer_with_a_large_backlog_holds_a_bounded_number_of_messages(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path, fault_log: FaultLog
) -> None:
    team = load_team(write_team(tmp_path / "roles", concurrency=2))
    ids = [task.id for task in [Task(kind="build", title=f"t{n}") for n in range(2000)]]
    await rolebus_bus.publish_many(
        [("task.backend.build", Task(id=task_id, kind="build", title="slow")) for task_id in ids]
    )
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    worker = crew.workers[0]
    most = 0
    try:
        while (await rolebus_bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-be"))[
            "pending"
        ] > 1000:
            assert worker._puller is not None
            most = max(most, worker._puller.held)
            await asyncio.sleep(0.01)
        report = await settled(rolebus_bus, ids, timeout=120)
    finally:
        await crew.stop(grace=0)
    assert 0 < most <= 2 * 2 * 2  # capacity 2 x concurrency, twice for a watchdog re-pull
    fault_log.record("slow consumer, 2,000-task backlog", 1, report)


async def test_a_full_stream_refuses_loudly_and_drops_nothing(
    rolebus_server: EmbeddedServer, fault_log: FaultLog
) -> None:
    settings = Settings(nats_url=rolebus_server.url)
    async with await Bus.connect(settings, limits=StreamLimits(work_max_msgs=10)) as bus:
        kept = [(await bus.publish_task("task.backend.x", title=f"t{n}"))[0].id for n in range(10)]
        with pytest.raises(StreamFullError) as caught:
            await bus.publish_task("task.backend.x", title="one too many")
        assert "maximum messages" in caught.value.message
        assert "discard: new" in caught.value.hint
        stored = [m async for m in bus.connection.streams.read(WORK_STREAM)]
        assert [Task.model_validate(msgpack.unpackb(m.data)).id for m in stored] == kept
    fault_log.record("full stream (discard: new)", 1, HistoryReport(published=10))


async def test_a_task_whose_follow_up_cannot_be_stored_says_so_until_it_is(
    rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    import nats

    from rolebus.flows.state import StateStore
    from rolebus.history.status import collect

    settings = Settings(nats_url=rolebus_server.url)
    team = load_team(write_team(tmp_path / "roles"))
    async with await Bus.connect(settings, limits=StreamLimits(work_max_msgs=2)) as bus:
        parent, _ = await bus.publish_task(
            "task.backend.x",
            title="parent",
            payload={"then": [{"subject": "task.frontend.page", "title": "its page"}]},
        )
        await bus.publish_task("task.frontend.filler", title="fills the stream")
        crew = await start_workers(settings, team, [team.role("eng-be")], grace=1)
        states = StateStore(bus.connection)
        try:

            async def pending() -> bool:
                found = await states.get(parent.id)
                return found is not None and found.state.effects_pending is not None

            await wait_for(pending, timeout=30)
            found = await states.get(parent.id)
            assert found is not None
            assert found.state.state == "completed"
            assert "maximum messages" in (found.state.effects_pending or "")
            [eng_be] = [s for s in await collect(bus.connection, team) if s.role == "eng-be"]
            assert eng_be.effects_pending == 1
            # Room again: the retried delivery stores the follow-up and says so.
            client = await nats.connect(rolebus_server.url)
            try:
                js = client.jetstream()
                config = (await js.stream_info(WORK_STREAM)).config
                config.max_msgs = -1
                await js.update_stream(config)
            finally:
                await client.close()

            async def settled() -> bool:
                found = await states.get(parent.id)
                return found is not None and found.state.effects_pending is None

            await wait_for(settled, timeout=30)
        finally:
            await crew.stop(grace=0)
        [eng_be] = [s for s in await collect(bus.connection, team) if s.role == "eng-be"]
        assert eng_be.effects_pending == 0
        assert eng_be.completed == 1  # counted once, not again when its effects landed
        stored = [m async for m in bus.connection.streams.read(WORK_STREAM)]
        assert f"{parent.id}-1" in [Task.model_validate(msgpack.unpackb(m.data)).id for m in stored]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_any_role_file_text_gives_a_role_or_a_clean_error(text: str) -> None:
    problem = ""
    try:
        parse_role(text, file="fuzz.md")
    except RoleError as error:
        problem = error.message or "(empty)"
    assert problem != "(empty)"


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "title",
                "handler",
                "domains",
                "concurrency",
                "ack_wait",
                "never",
                "reports_to",
                "slo",
            ]
        ),
        st.one_of(
            st.text(max_size=20),
            st.integers(),
            st.lists(st.text(max_size=5), max_size=3),
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_any_front_matter_values_give_a_role_or_a_clean_error(values: dict[str, object]) -> None:
    import json

    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    where = "fuzz.md"
    try:
        parse_role(f"+++\n{lines}\n+++\n", file="fuzz.md")
    except RoleError as error:
        where = error.file or error.message
    assert "fuzz.md" in where


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_slow_tier_many_kills_of_worker_replicas_under_a_long_stream_of_work(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path, fault_log: FaultLog
) -> None:
    """`make test-slow`: two worker processes, one of them killed 20 times while 2,000
    tasks flow; bounded in count (20 kills) and time (each wait has a deadline)."""
    roles = write_team(tmp_path / "roles", ack_wait="1s", max_deliver=50)
    ids = await publish(rolebus_bus, 2000, sleep=0.02)
    steady = spawn_worker(roles, rolebus_server.url)
    try:
        kills = await kill_while_working(rolebus_bus, roles, rolebus_server.url, kills=20, every=40)
        report = await settled(rolebus_bus, ids, timeout=300)
    finally:
        steady.terminate()
        steady.wait(timeout=30)
    fault_log.record("slow tier: worker replica SIGKILL x20 under 2,000 tasks", kills, report)


async def test_a_first_delivery_that_meets_a_finished_record_stores_its_missing_event(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path
) -> None:
    """What a SIGKILLed server leaves when its consumer state rolls back: the record
    says completed (its writer's answer was lost with the server), no event exists,
    and the task comes again as a first delivery. The worker must not just ack it:
    the record's follow-up and its `completed` event are stored, once."""
    from rolebus.flows.record import TaskState
    from rolebus.flows.state import StateStore

    team = load_team(write_team(tmp_path / "roles"))
    task = Task(kind="build", title="finished, its event lost")
    follow_up = Task(id=f"{task.id}-1", kind="page", title="page", causation_id=task.id)
    await StateStore(rolebus_bus.connection).put(
        TaskState(
            task_id=task.id,
            state="completed",
            role="eng-be",
            subject="task.backend.build",
            kind="build",
            title=task.title,
            attempt=1,
            result={"done": True},
            effects=[
                {
                    "subject": "task.frontend.page",
                    "msg_id": follow_up.id,
                    "message": follow_up.model_dump(mode="json"),
                }
            ],
        )
    )
    await rolebus_bus.publish("task.backend.build", task)
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        report = await settled(rolebus_bus, [task.id])
    finally:
        await crew.stop(grace=0)
    assert report.duplicate_completed == {}
    stored = [m async for m in rolebus_bus.connection.streams.read(WORK_STREAM)]
    assert [m.subject for m in stored] == ["task.backend.build", "task.frontend.page"]
