"""The dashboard in a real browser: headless Chromium (Debian's, installed by .ci/run)
driven by Playwright. Nothing is downloaded: Playwright uses /usr/bin/chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.async_api import Dialog, async_playwright

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.worker.runner import start_workers

from .test_dashboard import SCRIPT, TEAM, ambiguous, serving

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
            board = await browser.new_page(viewport={"width": 1400, "height": 800})

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
            await board.screenshot(path=str(shots / "board.png"))

            inbox = await browser.new_page(viewport={"width": 1400, "height": 800})
            await inbox.goto(base + "/escalations")
            form = f'[data-escalation="{task.id}-1"]'
            await inbox.screenshot(path=str(shots / "escalations.png"))
            await inbox.fill(f"{form} input[name=decision]", "cursor pagination")
            await inbox.click(f"{form} button[value=answer]")
            await inbox.wait_for_url(base + "/escalations")

            await board.wait_for_selector(f".state-completed{card}", timeout=20_000)
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
