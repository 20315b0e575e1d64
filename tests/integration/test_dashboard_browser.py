"""The dashboard in a real browser: headless Chromium (Debian's, installed by .ci/run)
driven by Playwright. Nothing is downloaded: Playwright uses /usr/bin/chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.async_api import Dialog, async_playwright
from rich.console import Console

from rolebus.bus import Bus
from rolebus.cli.demo import play
from rolebus.config import Settings
from rolebus.flows.state import StateStore
from rolebus.history.flow import addressee
from rolebus.history.replay import ReplayFilter, replay
from rolebus.wire.messages import Event
from rolebus.wire.subjects import WORK_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import REPO
from .test_dashboard import SCRIPT, TEAM, ambiguous, serving

ROLES = REPO / "roles"
ROLEBUS = str(Path(sys.executable).parent / "rolebus")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags the machine's probe uses: no network chatter, no sandbox as root.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (.ci/run installs Debian's chromium package)",
)


async def test_the_board_updates_live_and_the_inbox_resumes_a_parked_task(
    rolebus_settings: Settings, rolebus_bus: Bus, tmp_path: Path
) -> None:
    shots = Path(os.environ.get("ROLEBUS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    crew = await start_workers(
        rolebus_settings, TEAM, [TEAM.role("eng-be")], handlers={"eng-be": ambiguous}, grace=1
    )
    dialogs: list[str] = []
    try:
        async with serving(rolebus_settings) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            board = await browser.new_page(viewport={"width": 1280, "height": 800})

            async def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            board.on("dialog", on_dialog)
            answer = await board.goto(base + "/")
            assert answer is not None
            assert answer.headers["x-frame-options"] == "DENY"  # and its script runs under
            assert "script-src 'self'" in answer.headers["content-security-policy"]  # the CSP
            await board.wait_for_selector('[data-role="eng-be"]')

            task, _ = await rolebus_bus.publish_task("task.backend.implement", title=SCRIPT)
            card = f'[data-task="{task.id}"]'
            # No reload: the card appears through the live updates.
            await board.wait_for_selector(f".state-input-required{card}", timeout=20_000)
            assert await board.inner_text(f"{card} a") == SCRIPT  # shown as text
            await board.screenshot(path=str(shots / "board-parked.png"))

            inbox = await browser.new_page(viewport={"width": 1280, "height": 800})
            await inbox.goto(base + "/escalations")
            form = f'[data-escalation="{task.id}-1"]'
            # The escalation's options are buttons, each with its trade-offs: one click.
            assert "stable; no page numbers" in await inbox.inner_text(
                f"{form} button.option[value=cursor]"
            )
            await inbox.screenshot(path=str(shots / "escalations.png"))
            await inbox.click(f"{form} button.option[value=cursor]")
            await inbox.wait_for_url(base + "/escalations")

            await board.wait_for_selector(f".state-completed{card}", timeout=20_000)
            stored = await StateStore(rolebus_bus.connection).get(task.id)
            assert stored is not None
            assert stored.state.result == {"used": "cursor"}  # the option picked
            await board.screenshot(path=str(shots / "board-resumed.png"))

            await inbox.goto(base + f"/tasks/{task.id}")
            await inbox.wait_for_selector("text=escalation.decided")
            await inbox.screenshot(path=str(shots / "task.png"))
            await inbox.goto(base + "/contracts")
            await inbox.screenshot(path=str(shots / "contracts.png"))
            await inbox.goto(base + "/stream?role=eng-be")
            assert "rolebus replay --role eng-be" in await inbox.inner_text("#command")
            await inbox.screenshot(path=str(shots / "stream.png"))
            await browser.close()
    finally:
        await crew.stop(grace=0)
    assert dialogs == []  # the script-titled task never ran as a script


async def test_the_demo_flow_is_a_picture_and_the_charts_are_the_status_points(
    rolebus_settings: Settings, rolebus_bus: Bus, tmp_path: Path
) -> None:
    """The demo's flow on the task page: a lane per role that took part, a box per
    message (counted against the history, as `rolebus replay --correlation` reads it);
    a role's chart draws the points `rolebus status --json` reports; at 1,280 px the
    board shows every column."""
    shots = Path(os.environ.get("ROLEBUS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    result = await play(rolebus_settings, TEAM, console=Console(file=io.StringIO()), timeout=60)
    flow = result.root.id
    messages = [
        item
        async for item in replay(
            rolebus_bus.connection, ReplayFilter(stream=WORK_STREAM, correlation=flow)
        )
    ]
    events = [
        item.message
        async for item in replay(rolebus_bus.connection, ReplayFilter(correlation=flow))
        if isinstance(item.message, Event)
    ]
    retries = [e for e in events if e.entity == "task" and e.state in ("retrying", "dead")]
    assert retries  # the demo retries once: its box is on the picture too
    lanes = {addressee(item.stored.subject, TEAM) for item in messages}
    status = subprocess.run(
        [ROLEBUS, "status", "--json"],
        env={**os.environ, "NATS_URL": str(rolebus_settings.nats_url), "ROLEBUS_ROLES": str(ROLES)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reported = {entry["role"]: entry for entry in json.loads(status.stdout)}

    async with serving(rolebus_settings) as base, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        view = await browser.new_page(viewport={"width": 1280, "height": 800})
        await view.goto(base + f"/tasks/{flow}")
        await view.wait_for_selector("svg.flow")
        drawn = await view.eval_on_selector_all(
            "svg.flow g.lane", "lanes => lanes.map(l => l.dataset.role)"
        )
        assert sorted(drawn) == sorted(lanes | {e.role for e in retries if e.role})
        kinds = await view.eval_on_selector_all(
            "svg.flow g.box", "boxes => boxes.map(b => b.dataset.kind)"
        )
        assert len(kinds) == len(messages) + len(retries)
        assert kinds.count("escalation") == 3
        assert kinds.count("decision") == 3
        await view.click(f'svg.flow g.box[data-id="{flow}"]')  # a click shows its details
        assert "Order history page" in await view.inner_text("#detail")
        await view.screenshot(path=str(shots / "flow.png"))

        await view.goto(base + "/")
        await view.wait_for_selector('[data-role="pm"] svg.chart-latency')
        edges = await view.eval_on_selector_all(
            "section.column", "columns => columns.map(c => c.getBoundingClientRect().right)"
        )
        assert len(edges) == len(TEAM.roles)
        assert max(edges) <= 1280
        await view.screenshot(path=str(shots / "board.png"))

        await view.goto(base + "/roles/eng-be")
        await view.wait_for_selector("svg.chart-latency circle.p99")
        points = await view.eval_on_selector_all(
            "svg.chart-latency circle.p99",
            "points => points.map(p => [p.dataset.at, Number(p.dataset.value)])",
        )
        expected = [[p["at"], p["p99_ms"]] for p in reported["eng-be"]["series"] if p["p99_ms"]]
        assert points == expected
        assert points
        bars = await view.eval_on_selector_all(
            "svg.chart-throughput rect.bar",
            "bars => bars.map(b => [b.dataset.at, Number(b.dataset.completed)])",
        )
        assert bars == [[p["at"], p["completed"]] for p in reported["eng-be"]["series"]]
        target = reported["eng-be"]["slo"]["p99_latency_ms"]["target"]
        line = await view.get_attribute("svg.chart-latency line.slo-p99", "data-target")
        assert line is not None
        assert float(line) == target
        marks = await view.eval_on_selector_all(
            "svg.chart-throughput line.mark", "marks => marks.map(m => m.dataset.at)"
        )
        assert marks == [m["at"] for m in reported["eng-be"]["marks"]]
        assert marks
        await view.screenshot(path=str(shots / "role.png"), full_page=True)
        await browser.close()
