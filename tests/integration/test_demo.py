"""The main job: the demo's feature flow, checked against the history it leaves."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from rich.console import Console

from rolebus.bus import Bus
from rolebus.cli.demo import play
from rolebus.config import Settings
from rolebus.flows import dlq
from rolebus.flows.contracts import ContractRegistry
from rolebus.history.replay import read_events
from rolebus.team.roles import load_team
from rolebus.wire.messages import Event

from ..conftest import REPO, user_environment


def position(events: list[Event], what: str, **match: object) -> int:
    """Index of the first event ``entity.state`` whose fields/detail match."""
    entity, state = what.split(".")
    for index, event in enumerate(events):
        if (event.entity, event.state) != (entity, state):
            continue
        values = {**event.detail, "role": event.role, "attempt": event.attempt}
        if isinstance(event.result, dict):
            values.update(event.result)
        if all(values.get(key) == value for key, value in match.items()):
            return index
    raise AssertionError(f"no {what} {match} in the history")


async def test_the_demo_plays_every_step_in_causal_order_and_loses_nothing(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    team = load_team(REPO / "roles")
    output = io.StringIO()
    result = await play(rolebus_settings, team, console=Console(file=output, width=200), timeout=60)
    flow = result.root.id
    events = [
        e
        for e in await read_events(rolebus_bus.connection)
        if flow in (e.correlation_id, e.task_id)
    ]
    steps = [
        position(events, "task.completed", role="pm"),
        position(events, "handoff.offered", role="architect", to="eng-be", version="1.0.0"),
        position(events, "escalation.opened", reason="ambiguous-spec", to="architect"),
        position(events, "escalation.decided", decided_by="architect"),
        position(events, "task.resumed", role="eng-be"),
        position(events, "handoff.accepted", role="eng-be", version="1.0.0"),
        position(events, "escalation.opened", reason="spend", to="cto", kind="approval"),
        position(events, "escalation.decided", decided_by="cto", approved=True),
        position(events, "task.retrying", role="eng-be", attempt=1),
        # Implementing needs more than eng-be's per-task budget: the CTO is asked first.
        position(events, "escalation.opened", reason="budget", to="cto", kind="approval"),
        position(events, "escalation.decided", decided_by="cto", approved=True, reason="budget"),
        position(events, "handoff.offered", role="eng-be", to="eng-fe", version="1.0.0"),
        position(events, "handoff.changes-requested", role="eng-fe", version="1.0.0"),
        position(events, "handoff.offered", role="eng-be", to="eng-fe", version="1.1.0"),
        position(events, "handoff.accepted", role="eng-fe", version="1.1.0"),
    ]
    assert steps == sorted(steps), "the steps happened out of causal order"
    position(events, "task.completed", role="perf-eng", met=True)
    assert not [e for e in events if e.state == "dead"]
    assert [entry async for entry in dlq.list_dead_letters(rolebus_bus.connection)] == []
    assert all(state.terminal for state in result.states)
    registry = ContractRegistry(rolebus_bus.connection)
    assert (await registry.get("orders-api", "1.1.0")).accepted_by == ["eng-fe"]
    text = output.getvalue()
    assert "eng-be -> cto" in text
    assert f"rolebus replay --correlation {flow}" in text
    assert "p99" in text


def test_make_demo_runs_twice_and_its_replay_command_reproduces_the_flow(tmp_path: Path) -> None:
    """What a new user does: run the demo (twice), then the replay command it printed."""
    binary = str(Path(sys.executable).parent / "rolebus")
    env = user_environment(tmp_path / "home", COLUMNS="200")
    roots = []
    for _ in range(2):
        demo = subprocess.run(
            [binary, "demo"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "Traceback" not in demo.stderr
        [command] = [
            line.split("#")[0].split()
            for line in demo.stdout.splitlines()
            if "rolebus replay --correlation" in line and "--json" not in line
        ]
        roots.append(command[-1])
    assert roots[0] != roots[1]
    # The demo's server stopped with it; replay needs one on the same state folder.
    server = subprocess.Popen(
        [binary, "server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert "listening" in server.stdout.readline()
        for root in roots:  # the history keeps both runs
            replayed = subprocess.run(
                [binary, "replay", "--correlation", root, "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert replayed.returncode == 0, replayed.stderr
            lines = [json.loads(line) for line in replayed.stdout.splitlines()]
            states = [(m["message"]["entity"], m["message"]["state"]) for m in lines]
            assert states[0] == ("task", "completed")  # the PM's: it files the feature
            assert ("escalation", "decided") in states
            assert ("handoff", "accepted") in states
            timeline = subprocess.run(
                [binary, "replay", "--correlation", root],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert f"{len(lines)} message(s) from ROLEBUS_EVENTS" in timeline.stdout
        # The picture a person pastes into a review: a box per message of the flow
        # (the work stream's, and the retry), a lane per role that took part.
        picture = tmp_path / "flow.svg"
        shown = subprocess.run(
            [binary, "show", roots[-1], "--svg", str(picture)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        work = subprocess.run(
            [binary, "replay", "--stream", "work", "--correlation", roots[-1], "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
        svg = ElementTree.parse(picture).getroot()
        ns = "{http://www.w3.org/2000/svg}"
        boxes = [g for g in svg.iter(f"{ns}g") if g.get("data-kind")]
        lanes = {g.get("data-role") for g in svg.iter(f"{ns}g") if g.get("class") == "lane"}
        assert len(boxes) == len(work) + 1  # and the one retry
        assert lanes == {"pm", "architect", "eng-be", "eng-fe", "cto", "perf-eng"}
        assert f"{len(boxes)} boxes" in shown.stderr
    finally:
        server.terminate()
        server.communicate(timeout=30)


async def test_the_example_team_plays_the_same_story_through_command_handlers(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    team = load_team(REPO / "examples" / "agent-team" / "roles")
    assert all(not isinstance(role.handler, str) for role in team)
    result = await play(rolebus_settings, team, console=Console(file=io.StringIO()), timeout=90)
    events = [
        e
        for e in await read_events(rolebus_bus.connection)
        if result.root.id in (e.correlation_id, e.task_id)
    ]
    position(events, "escalation.decided", decided_by="architect")
    position(events, "escalation.decided", decided_by="cto", approved=True)
    position(events, "handoff.accepted", role="eng-fe", version="1.1.0")
    position(events, "task.completed", role="perf-eng", met=True)
    assert not [e for e in events if e.state == "dead"]
