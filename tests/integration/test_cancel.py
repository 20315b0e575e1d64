"""rolebus cancel: queued tasks skipped, running ones stopped, from another process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.cancels import cancel
from rolebus.flows.state import StateStore
from rolebus.handlers.base import HandlerContext
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import LlmServer, Reply, wait_for
from rolebus.wire.messages import FollowUp, Outcome, Task
from rolebus.wire.subjects import WORK_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import REPO
from ..team import write_team
from .llm_team import StartTeam, state_of, until

ROLEBUS = str(Path(sys.executable).parent / "rolebus")


def cancel_from_another_process(url: str, roles: Path, *args: str) -> str:
    done = subprocess.run(
        [ROLEBUS, "cancel", *args],
        env={**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(roles)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_queued_task_is_skipped_and_a_running_one_is_stopped_without_follow_ups(
    rolebus_bus: Bus, rolebus_settings: Settings, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    roles = write_team(tmp_path / "roles")
    team = load_team(roles)
    ran: list[str] = []

    async def slow(task: Task, context: HandlerContext) -> Outcome:
        ran.append(task.title)
        await asyncio.sleep(60)
        return Outcome.completed(tasks=[FollowUp(subject="task.frontend.page", title="page")])

    queued, _ = await rolebus_bus.publish_task("task.backend.x", title="queued")
    await asyncio.to_thread(
        cancel_from_another_process, rolebus_server.url, roles, queued.id, "--reason", "not needed"
    )
    crew = await start_workers(
        rolebus_settings, team, [team.role("eng-be")], handlers={"eng-be": slow}, grace=1
    )
    try:
        await until(rolebus_bus, queued.id, "cancelled")
        running, _ = await rolebus_bus.publish_task("task.backend.x", title="running")
        await wait_for(lambda: "running" in ran, timeout=30)
        started = asyncio.get_running_loop().time()
        output = await asyncio.to_thread(
            cancel_from_another_process, rolebus_server.url, roles, running.id
        )
        assert f"cancelled {running.id}" in output
        await until(rolebus_bus, running.id, "cancelled")
        assert asyncio.get_running_loop().time() - started < 10
        assert crew.workers[0].in_flight == 0  # the slot is free again
    finally:
        await crew.stop(grace=0)
    assert ran == ["running"]  # the queued one never reached its handler
    stored = await StateStore(rolebus_bus.connection).get(queued.id)
    assert stored is not None
    assert stored.state.error == "cancelled: not needed"
    cancelled = await read_events(rolebus_bus.connection, states=["cancelled"])
    assert {e.task_id for e in cancelled} == {queued.id, running.id}
    assert await read_events(rolebus_bus.connection, states=["completed"]) == []
    assert await state_of(rolebus_bus, f"{running.id}-1") is None  # no follow-up


async def test_a_running_command_gets_sigterm_and_ends_cancelled(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    marker = tmp_path / "terminated"
    script.write_text(
        "import json, signal, sys, time\n"
        "json.load(sys.stdin)\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('bye'), "
        "sys.exit(0)))\n"
        "print('started', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    handler = f'{{ command = ["{sys.executable}", "{script}"], timeout = "2m" }}'
    roles = write_team(tmp_path / "roles", handler=handler)
    env = {
        **os.environ,
        "NATS_URL": rolebus_server.url,
        "ROLEBUS_ROLES": str(roles),
        "ROLEBUS_HOME": str(tmp_path / "home"),
    }
    worker = subprocess.Popen(
        [ROLEBUS, "worker", "eng-be"], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL
    )
    try:
        task, _ = await rolebus_bus.publish_task("task.backend.x", title="long agent")
        runs = tmp_path / "home" / "runs" / "eng-be"
        await wait_for(lambda: runs.is_dir() and any(runs.glob("*.json")), timeout=30)
        await asyncio.to_thread(cancel_from_another_process, rolebus_server.url, roles, task.id)
        await until(rolebus_bus, task.id, "cancelled", timeout=15)
        await wait_for(marker.exists, timeout=10)  # it had its SIGTERM, and cleaned up
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_a_running_llm_call_is_aborted_and_nothing_more_is_spent(
    rolebus_bus: Bus,
    rolebus_server: EmbeddedServer,
    llm_server: LlmServer,
    start_llm_team: StartTeam,
    tmp_path: Path,
) -> None:
    llm_server.script(Reply.with_outcome({"status": "completed"}, delay=20))
    await start_llm_team(timeout="1m")
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="a long thought")
    await wait_for(lambda: len(llm_server.requests) == 1, timeout=30)
    await cancel(rolebus_bus.connection, task.id, reason="too slow")
    await until(rolebus_bus, task.id, "cancelled", timeout=10)
    assert len(llm_server.requests) == 1
    assert llm_server.answered == 1  # the request got no further (the answer never came)


async def test_cancel_tree_cancels_the_queued_follow_ups_of_a_finished_task(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path
) -> None:
    roles = write_team(tmp_path / "roles")
    team = load_team(roles)
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        parent, _ = await rolebus_bus.publish_task(
            "task.backend.x",
            title="parent",
            payload={"then": [{"subject": "task.frontend.page", "title": "its page"}]},
        )
        await until(rolebus_bus, parent.id, "completed")
    finally:
        await crew.stop(grace=0)
    cancelled = await cancel(rolebus_bus.connection, parent.id, reason="scope cut", tree=True)
    assert cancelled == [parent.id, f"{parent.id}-1"]
    assert await state_of(rolebus_bus, parent.id) == "completed"  # done stays done
    assert await state_of(rolebus_bus, f"{parent.id}-1") == "cancelled"
    # The follow-up's role starts later: it skips it (its handler never runs).
    ran: list[str] = []

    async def page(task: Task, context: HandlerContext) -> Outcome:
        ran.append(task.id)
        return Outcome.completed()

    crew = await start_workers(
        rolebus_settings, team, [team.role("eng-fe")], handlers={"eng-fe": page}, grace=1
    )
    try:

        async def handled() -> bool:
            state = await rolebus_bus.connection.admin.consumer_state(WORK_STREAM, "worker-eng-fe")
            return state["pending"] == 0 and state["ack_pending"] == 0

        await wait_for(handled, timeout=30)
    finally:
        await crew.stop(grace=0)
    assert ran == []
    assert await state_of(rolebus_bus, f"{parent.id}-1") == "cancelled"


def test_cancel_of_an_unknown_task_is_a_clear_error(
    cli: object, rolebus_server: EmbeddedServer
) -> None:
    done = subprocess.run(
        [ROLEBUS, "cancel", "nope"],
        env={**os.environ, "NATS_URL": rolebus_server.url, "ROLEBUS_ROLES": str(REPO / "roles")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no task 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


pytestmark = pytest.mark.timeout(120)


async def test_a_cancel_mid_stream_closes_the_model_connection(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    """A streaming server generates until its client goes away: the cancel must close
    the connection, not only stop reading it."""
    llm_server.chunk_delay = 0.2  # a long answer: 8 characters every 0.2 s
    llm_server.script(Reply.completed({"essay": "word " * 400}))
    await start_llm_team(timeout="1m")
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="a long essay")
    await wait_for(lambda: len(llm_server.requests) == 1, timeout=30)
    await cancel(rolebus_bus.connection, task.id, reason="too long")
    await until(rolebus_bus, task.id, "cancelled", timeout=10)
    await wait_for(lambda: llm_server.broken_off == 1, timeout=10)
