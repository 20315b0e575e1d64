"""Workers as separate processes, the way they run in production: killed, stopped,
driving external command handlers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.testing import wait_for
from rolebus.wire.subjects import WORK_STREAM

from ..conftest import REPO
from ..team import write_team

ROLEBUS = str(Path(sys.executable).parent / "rolebus")


def spawn_worker(roles: Path, url: str, role: str = "eng-be", *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(roles)}
    return subprocess.Popen(
        [ROLEBUS, "--log-level", "info", "worker", role, *extra],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def events_by_state(bus: Bus, state: str) -> Counter[str]:
    return Counter(event.task_id for event in await read_events(bus.connection, states=[state]))


async def test_a_worker_killed_mid_batch_loses_nothing_and_does_nothing_twice(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    roles = write_team(tmp_path / "roles", ack_wait="1s", max_deliver=10)
    ids = []
    for number in range(40):
        task, _ = await rolebus_bus.publish_task(
            "task.backend.build",
            title=f"t{number}",
            payload={
                "sleep": 0.1,
                "then": [{"subject": "task.frontend.page", "title": f"page {number}"}],
            },
        )
        ids.append(task.id)
    for _ in range(2):  # kill it twice, each time mid-batch
        worker = spawn_worker(roles, rolebus_server.url)
        try:
            before = len(await events_by_state(rolebus_bus, "completed"))

            async def progressing(before: int = before) -> bool:
                return len(await events_by_state(rolebus_bus, "completed")) >= before + 4

            await wait_for(progressing, timeout=30)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.communicate(timeout=10)
    survivor = spawn_worker(roles, rolebus_server.url)
    try:

        async def all_done() -> bool:
            return len(await events_by_state(rolebus_bus, "completed")) == 40

        await wait_for(all_done, timeout=60)
    finally:
        survivor.terminate()
        survivor.communicate(timeout=30)
    completed = await events_by_state(rolebus_bus, "completed")
    assert set(completed) == set(ids)
    assert set(completed.values()) == {1}
    follow_ups: Counter[str] = Counter()
    async for stored in rolebus_bus.connection.streams.read(
        WORK_STREAM, filter_subjects=["task.frontend.>"]
    ):
        follow_ups[stored.headers["Nats-Msg-Id"]] += 1
    assert set(follow_ups) == {f"{task_id}-1" for task_id in ids}
    assert set(follow_ups.values()) == {1}


async def test_sigterm_lets_the_running_handler_finish_then_exits_zero(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    roles = write_team(tmp_path / "roles")
    worker = spawn_worker(roles, rolebus_server.url, "eng-be", "--grace", "20")
    try:
        task, _ = await rolebus_bus.publish_task(
            "task.backend.build", title="finish me", payload={"sleep": 1.5}
        )

        async def claimed() -> bool:
            return (await events_by_state(rolebus_bus, "claimed"))[task.id] == 1

        await wait_for(claimed)
        worker.send_signal(signal.SIGTERM)
        _, errors = await asyncio.to_thread(worker.communicate, timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, errors
    assert "Traceback" not in errors
    assert (await events_by_state(rolebus_bus, "completed"))[task.id] == 1
    state = await rolebus_bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-be")
    assert state["ack_pending"] == 0


async def test_command_handlers_fail_clearly_and_are_retried_or_dead_lettered_by_the_rules(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path
) -> None:
    from rolebus.flows import dlq
    from rolebus.team.roles import load_team
    from rolebus.worker.runner import start_workers

    script = REPO / "tests" / "scripts" / "agent.py"
    handler = f'{{ command = ["{sys.executable}", "{script}"], timeout = "1s" }}'
    team = load_team(write_team(tmp_path / "roles", handler=handler, max_deliver=2))
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    workers = crew.workers
    try:
        ids = {}
        for mode in ("ok", "exit1", "nonjson", "hang", "badoutcome"):
            task, _ = await rolebus_bus.publish_task(
                "task.backend.run", title=mode, payload={"mode": mode}
            )
            ids[mode] = task.id

        async def settled() -> bool:
            ended = await read_events(rolebus_bus.connection, states=["completed", "dead"])
            return {event.task_id for event in ended} == set(ids.values())

        await wait_for(settled, timeout=60)
        assert workers[0].stats.completed >= 1  # the worker kept going throughout
    finally:
        await crew.stop(grace=0)
    entries = {
        entry.task_id: entry async for entry in dlq.list_dead_letters(rolebus_bus.connection)
    }
    assert ids["ok"] not in entries
    exit1 = entries[ids["exit1"]]
    assert (exit1.reason, exit1.attempts) == ("max-deliver", 2)
    assert "exited with code 1" in exit1.error
    assert "the model API returned 500" in exit1.error  # stderr is kept
    nonjson = entries[ids["nonjson"]]
    assert (nonjson.reason, nonjson.attempts) == ("failed", 1)  # invalid output: no retry
    assert "not JSON" in nonjson.error
    assert "Sure! Here is" in nonjson.error
    hang = entries[ids["hang"]]
    assert (hang.reason, hang.attempts) == ("max-deliver", 2)
    assert "timed out after 1s and was killed" in hang.error
    bad = entries[ids["badoutcome"]]
    assert "invalid outcome" in bad.error
    assert "status" in bad.error
    retrying = await read_events(rolebus_bus.connection, states=["retrying"])
    assert any("exited with code 1" in (event.error or "") for event in retrying)
    [ok] = [e for e in await read_events(rolebus_bus.connection, states=["completed"])]
    assert ok.result == {"role": "eng-be", "attempt": 1, "persona_seen": True}
    assert ok.detail["follow_ups"] == [f"{ids['ok']}-1"]


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may never reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_a_killed_workers_command_dies_with_it_and_never_runs_beside_its_redelivery(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    script = REPO / "tests" / "scripts" / "long_agent.py"
    handler = f'{{ command = ["{sys.executable}", "{script}"], timeout = "60s" }}'
    roles = write_team(tmp_path / "roles", handler=handler, ack_wait="1s", max_deliver=5)
    pids = tmp_path / "pids"
    env = {
        **os.environ,
        "NATS_URL": rolebus_server.url,
        "ROLEBUS_ROLES": str(roles),
        "ROLEBUS_HOME": str(tmp_path / "home"),
    }

    def spawn() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [ROLEBUS, "worker", "eng-be"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    task, _ = await rolebus_bus.publish_task(
        "task.backend.agent", title="long", payload={"dir": str(pids), "seconds": 40}
    )
    worker = spawn()
    try:
        await wait_for(lambda: (pids / "child-1").exists(), timeout=30)
        parent = int((pids / "parent-1").read_text())
        child = int((pids / "child-1").read_text())
        assert running(parent)
        assert running(child)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        # The kernel kills the command itself with its worker (parent-death signal).
        await wait_for(lambda: not running(parent), timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    # Its own child is out of that signal's reach: the next worker kills its group
    # before it runs anything, so the redelivery never runs beside it.
    worker = spawn()
    try:
        await wait_for(lambda: (pids / "child-2").exists(), timeout=30)
        assert not running(child)

        async def completed() -> bool:
            return (await events_by_state(rolebus_bus, "completed"))[task.id] == 1

        await wait_for(completed, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert not list((tmp_path / "home" / "runs" / "eng-be").glob("*.json"))
    assert sorted(path.name for path in pids.iterdir()) == [
        "child-1",
        "child-2",
        "parent-1",
        "parent-2",
    ]
