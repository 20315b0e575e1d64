"""Live progress from a long handler, visible while it runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.progress import RATE
from rolebus.handlers.base import HandlerContext
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.wire.messages import Outcome, Task
from rolebus.worker.runner import start_workers

from ..team import write_team
from .llm_team import state_of, until

ROLEBUS = str(Path(sys.executable).parent / "rolebus")


async def test_a_commands_progress_lines_show_in_replay_follow_while_it_runs(
    rolebus_bus: Bus, rolebus_settings: Settings, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    script = tmp_path / "agent.py"
    script.write_text(
        "import json, os, sys, time\n"
        "json.load(sys.stdin)\n"
        "report = {'progress': 'cloned the repo', 'step': 1}\n"
        "print(json.dumps(report), file=sys.stderr, flush=True)\n"
        "print('an ordinary log line', file=sys.stderr, flush=True)\n"
        f"while not os.path.exists({str(release)!r}):\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps({'status': 'completed', 'result': {'done': True}}))\n"
    )
    handler = f'{{ command = ["{sys.executable}", "{script}"], timeout = "1m" }}'
    team = load_team(write_team(tmp_path / "roles", handler=handler))
    follower = subprocess.Popen(
        [ROLEBUS, "replay", "--follow", "--subject", "event.task.progress.>", "--json"],
        env={**os.environ, "NATS_URL": rolebus_server.url},
        stdout=subprocess.PIPE,
        text=True,
    )
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        task, _ = await rolebus_bus.publish_task("task.backend.x", title="a long job")
        assert follower.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(follower.stdout.readline), 30)
        progress = json.loads(line)["message"]
        assert progress["task_id"] == task.id
        assert progress["detail"] == {"text": "cloned the repo", "step": 1}
        assert await state_of(rolebus_bus, task.id) != "completed"  # it still runs
        release.write_text("go")
        await until(rolebus_bus, task.id, "completed")
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        if follower.stdout is not None:
            follower.stdout.close()
        await crew.stop(grace=0)
    [event] = await read_events(rolebus_bus.connection, states=["progress"])
    assert event.role == "eng-be"


async def test_progress_is_throttled_and_never_fails_the_task(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path
) -> None:
    async def chatty(task: Task, context: HandlerContext) -> Outcome:
        for step in range(200):
            await context.progress(f"step {step}", step=step)
        await context.progress("not JSON-able", value=object())  # dropped, not raised
        return Outcome.completed()

    team = load_team(write_team(tmp_path / "roles"))
    crew = await start_workers(
        rolebus_settings, team, [team.role("eng-be")], handlers={"eng-be": chatty}, grace=1
    )
    try:
        task, _ = await rolebus_bus.publish_task("task.backend.x", title="chatty")
        await until(rolebus_bus, task.id, "completed")
    finally:
        await crew.stop(grace=0)
    events = await read_events(rolebus_bus.connection, states=["progress"])
    assert 1 <= len(events) <= RATE * 2  # 200 reports in well under two seconds
    assert events[0].detail["text"] == "step 0"
