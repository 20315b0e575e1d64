"""The web dashboard served for real (uvicorn on a loopback port) over a real bus."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.state import StateStore
from rolebus.handlers.base import HandlerContext
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import wait_for
from rolebus.web.app import Board, create_app
from rolebus.wire.messages import EscalationOption, EscalationRequest, Outcome, Task
from rolebus.worker.runner import start_workers

from ..conftest import REPO

TEAM = load_team(REPO / "roles")
SCRIPT = "<script>alert(1)</script>"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def serving(settings: Settings, token: str | None = None) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, TEAM, token=token),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_for(started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def browser(base: str) -> httpx.AsyncClient:
    """What a browser sends from the dashboard's own pages: its cookies and Origin."""
    return httpx.AsyncClient(base_url=base, headers={"Origin": base})


async def ambiguous(task: Task, context: HandlerContext) -> Outcome:
    if not context.decisions:
        return Outcome(
            status="escalate",
            escalation=EscalationRequest(
                reason="ambiguous-spec",
                question="offset or cursor?",
                options=[
                    EscalationOption(name="offset", tradeoffs="simple; pages shift on inserts"),
                    EscalationOption(name="cursor", tradeoffs="stable; no page numbers"),
                ],
            ),
        )
    return Outcome.completed({"used": context.decisions[-1].decision})


def state_of(bus: Bus, task_id: str) -> Callable[[str], object]:
    async def reached(state: str) -> bool:
        stored = await StateStore(bus.connection).get(task_id)
        return stored is not None and stored.state.state == state

    return reached


async def test_board_escapes_titles_and_the_inbox_resumes_a_parked_task(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    crew = await start_workers(
        rolebus_settings, TEAM, [TEAM.role("eng-be")], handlers={"eng-be": ambiguous}, grace=1
    )
    try:
        async with serving(rolebus_settings) as base, browser(base) as web:
            board = await web.get("/")
            assert board.status_code == 200
            for role in TEAM:
                assert f'data-role="{role.id}"' in board.text
            assert "cdn" not in board.text.lower()
            task, _ = await rolebus_bus.publish_task("task.backend.implement", title=SCRIPT)
            reached = state_of(rolebus_bus, task.id)
            await wait_for(lambda: reached("input-required"))  # type: ignore[arg-type, return-value]

            # The board refreshes in the background after events: wait for it.
            fragment = ""

            async def board_shows(pattern: str) -> bool:
                nonlocal fragment
                fragment = (await web.get("/?fragment=1")).text
                return re.search(pattern, fragment) is not None

            await wait_for(lambda: board_shows(f'data-task="{task.id}"'))
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment
            assert SCRIPT not in fragment

            inbox = (await web.get("/escalations")).text
            escalation_id = f"{task.id}-1"
            assert f'data-escalation="{escalation_id}"' in inbox
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', inbox)
            assert csrf is not None
            forged = await web.post(
                f"/escalations/{escalation_id}/resolve",
                data={"decision": "offset", "verdict": "answer"},
            )
            assert forged.status_code == 403
            answered = await web.post(
                f"/escalations/{escalation_id}/resolve",
                data={"decision": "cursor", "verdict": "answer", "csrf": csrf.group(1)},
            )
            assert answered.status_code == 303
            await wait_for(lambda: reached("completed"))  # type: ignore[arg-type, return-value]
            await wait_for(
                lambda: board_shows(f'class="card state-completed" data-task="{task.id}"')
            )
            page = (await web.get(f"/tasks/{task.id}")).text
            assert "task.input-required" in page
            assert "escalation.decided" in page
            assert "&lt;script&gt;" in page
            assert SCRIPT not in page
    finally:
        await crew.stop(grace=0)


async def test_event_stream_pages_and_live_notices(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    async with serving(rolebus_settings) as base, httpx.AsyncClient(base_url=base) as web:
        stream = (await web.get("/stream", params={"role": "eng-be"})).text
        assert "rolebus replay --role eng-be" in stream
        from rolebus.flows.contracts import ContractRegistry, document_from
        from rolebus.handlers.team import orders_api

        registry = ContractRegistry(rolebus_bus.connection)
        for version in ("1.0.0", "1.1.0"):
            document = document_from(orders_api(version), source="test")
            await registry.publish(document, author="architect")
        contracts = await web.get(
            "/contracts", params={"name": "orders-api", "from": "1.0.0", "to": "1.1.0"}
        )
        assert 'data-diff="orders-api"' in contracts.text
        assert "+ listOrders.output.eta (string) added" in contracts.text
        async with web.stream("GET", "/events", timeout=30) as events:
            lines = events.aiter_lines()
            assert await anext(lines) == ": connected"
            await rolebus_bus.publish_task("task.backend.x", title="x")
            from rolebus.wire.messages import Event

            await rolebus_bus.publish(
                "event.task.claimed", Event(state="claimed", task_id="t", role="eng-be")
            )

            async def notice() -> str:
                async for line in lines:
                    if line.startswith("data:"):
                        return line
                return ""

            assert (await asyncio.wait_for(notice(), timeout=20)).startswith("data: ")


async def test_a_token_is_required_when_one_is_set(rolebus_settings: Settings) -> None:
    async with (
        serving(rolebus_settings, token="s3cret") as base,
        httpx.AsyncClient(base_url=base) as web,
    ):
        assert (await web.get("/")).status_code == 401
        assert (await web.get("/", params={"token": "wrong"})).status_code == 401
        login = await web.get("/", params={"token": "s3cret"})
        assert login.status_code == 307
        assert "rolebus_token" in login.headers["set-cookie"]
        assert (await web.get("/")).status_code == 200  # the cookie carries it now


async def test_the_board_refreshes_once_per_burst_of_events_and_never_per_view() -> None:
    loads = 0
    release = asyncio.Event()

    async def load() -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        return loads

    board = Board(load)
    refresher = asyncio.create_task(board.run())
    try:
        release.set()
        assert await board.current() == 1
        release.clear()
        for _ in range(1000):  # a burst: one refresh, maybe one more after it
            await board.on_event(None)  # type: ignore[arg-type]

        async def refreshing() -> bool:
            return loads == 2

        await wait_for(refreshing)
        for _ in range(100):  # views read the snapshot
            assert await board.current() == 1
        release.set()

        async def refreshed() -> bool:
            return board.version == 2

        await wait_for(refreshed)
        assert await board.current() == 2
        assert loads == 2
    finally:
        refresher.cancel()


async def test_the_task_page_cancels_a_parked_task_with_its_csrf_token_only(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    crew = await start_workers(
        rolebus_settings, TEAM, [TEAM.role("eng-be")], handlers={"eng-be": ambiguous}, grace=1
    )
    try:
        async with serving(rolebus_settings) as base, browser(base) as web:
            task, _ = await rolebus_bus.publish_task("task.backend.implement", title="parked")
            reached = state_of(rolebus_bus, task.id)
            await wait_for(lambda: reached("input-required"))  # type: ignore[arg-type, return-value]
            page = (await web.get(f"/tasks/{task.id}")).text
            assert f'action="/tasks/{task.id}/cancel"' in page
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
            assert csrf is not None
            forged = await web.post(f"/tasks/{task.id}/cancel", data={"reason": "x"})
            assert forged.status_code == 403
            states = StateStore(rolebus_bus.connection)
            stored = await states.get(task.id)
            assert stored is not None
            assert stored.state.state == "input-required"
            done = await web.post(
                f"/tasks/{task.id}/cancel", data={"reason": "scope cut", "csrf": csrf.group(1)}
            )
            assert done.status_code == 303
            stored = await states.get(task.id)
            assert stored is not None
            assert stored.state.state == "cancelled"
            page = (await web.get(f"/tasks/{task.id}")).text
            assert f'action="/tasks/{task.id}/cancel"' not in page  # nothing left to cancel
    finally:
        await crew.stop(grace=0)


async def test_the_dashboard_refuses_other_origins_other_hosts_and_other_browsers_tokens(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    async with serving(rolebus_settings) as base:
        async with browser(base) as web:
            page = await web.get("/escalations")
            assert page.status_code == 200
            assert page.headers["x-frame-options"] == "DENY"
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert (
                "'unsafe-inline'"
                not in page.headers["content-security-policy"].split("script-src")[1].split(";")[0]
            )
            assert page.headers["referrer-policy"] == "same-origin"
            assert "<script>" not in page.text  # no inline script
            assert web.cookies.get("rolebus_csrf")
            token = web.cookies["rolebus_csrf"]

            # Another site's page posting here: refused, whatever it sends.
            evil = await web.post(
                "/escalations/e1/resolve",
                data={"decision": "approved", "csrf": token},
                headers={"Origin": "http://evil.example"},
            )
            assert evil.status_code == 403
            assert "cross-origin" in evil.text
            async with httpx.AsyncClient(base_url=base) as bare:
                no_origin = await bare.post(
                    "/escalations/e1/resolve", data={"decision": "x", "csrf": token}
                )
            assert no_origin.status_code == 403

        # Another browser (its own cookie) cannot use this one's token.
        async with browser(base) as other:
            await other.get("/")
            stolen = await other.post(
                "/escalations/e1/resolve", data={"decision": "approved", "csrf": token}
            )
            assert stolen.status_code == 403
            assert "CSRF" in stolen.text

        # A name that is not this host's (DNS rebinding): no page, no token.
        async with httpx.AsyncClient(base_url=base) as rebinding:
            foreign = await rebinding.get("/", headers={"Host": "attacker.example"})
            assert foreign.status_code == 400
            assert "unknown host" in foreign.text
            assert "csrf" not in foreign.text


async def test_the_dashboard_stops_even_when_its_refresh_will_not(
    rolebus_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresh that loses its cancel (as asyncio.wait_for could on 3.11, when the
    # cancel met a message) must not hold the server's stop forever.
    running, stopped = asyncio.Event(), asyncio.Event()

    async def stubborn(self: Board) -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await stopped.wait()  # the lost cancel: it goes on as if nothing happened

    monkeypatch.setattr(Board, "run", stubborn)
    app = create_app(rolebus_settings, TEAM)

    async def serve_and_stop() -> None:
        async with app.router.lifespan_context(app):
            await running.wait()

    stop = asyncio.create_task(serve_and_stop())
    try:
        await wait_for(stop.done, timeout=30)  # its bound is 5 s; without one, never
    finally:
        stopped.set()
        await stop


def test_the_dashboard_on_a_port_in_use_says_so_and_which_option_to_change(
    rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ended = subprocess.run(
            [str(Path(sys.executable).parent / "rolebus"), "dashboard", "--port", str(port)],
            env={**os.environ, "NATS_URL": rolebus_server.url, "ROLEBUS_HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert ended.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in ended.stderr
    assert "--port" in ended.stderr
    assert "Traceback" not in ended.stderr
