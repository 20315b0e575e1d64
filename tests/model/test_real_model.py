"""An LLM role on a real model server: llama-cpp-python's, with SmolLM2-135M-Instruct.

Run with ``make test-model`` (it builds the server's environment once). What the
loopback server in the fast tier only imitates is checked here against the real one:
the modes it honours, usage it does not report, a context it cannot hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.handlers.probe import check_server
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import Team
from rolebus.testing import wait_for
from rolebus.worker.runner import start_workers

from ..integration.llm_team import ENV, KEY, WorkerProcess, event_of, write_llm_team
from .proxy import counting_proxy
from .serve import MODEL


def real_team(folder: Path, url: str) -> Team:
    """The fast tier's LLM team, its thinking role on the real model."""
    team = write_llm_team(folder, url, timeout="60s")
    return Team.from_roles(
        [
            role.model_copy(update={"handler": role.handler.model_copy(update={"llm": MODEL})})
            if isinstance(role.handler, LlmHandler)
            else role
            for role in team
        ]
    )


async def test_llm_check_names_the_modes_the_real_server_honours(real_model_url: str) -> None:
    report = await check_server(LlmHandler(llm=MODEL, base_url=real_model_url), key="local")
    works = {f.probe: f.works for f in report.findings}
    assert works["json_schema"] is False  # llama-cpp-python knows json_object only
    assert works["json_object"] is True
    assert works["stream usage"] is False
    assert report.settings["mode"] == "json_object"


async def test_an_llm_role_completes_on_the_real_model_with_its_tokens_counted(
    rolebus_bus: Bus,
    rolebus_settings: Settings,
    real_model_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, KEY)
    team = real_team(tmp_path / "roles", real_model_url)
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        task, _ = await rolebus_bus.publish_task("task.backend.x", title="say you are done")

        async def settled() -> bool:
            events = await read_events(rolebus_bus.connection)
            ends = {"completed", "input-required", "dead", "retrying"}
            return any(e.task_id == task.id and e.state in ends for e in events)

        await wait_for(settled, timeout=120)
        [event, *_] = [
            e
            for e in await read_events(rolebus_bus.connection)
            if e.task_id == task.id
            and e.state in {"completed", "input-required", "retrying", "dead"}
        ]
        # Whatever the tiny model decided, it decided it in a form the bus took: no
        # protocol failure (mode, context, schema), and its tokens counted.
        assert event.state in {"completed", "input-required"}, event.error
        usage = event.detail["usage"]
        assert usage["prompt_tokens"] > 0
        assert usage["flags"] == ["estimated"]  # the server streams no usage
    finally:
        await crew.stop(grace=0)


async def test_a_prompt_the_real_context_cannot_hold_fails_retryable_naming_the_settings(
    rolebus_bus: Bus,
    rolebus_settings: Settings,
    real_model_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, KEY)
    team = real_team(tmp_path / "roles", real_model_url)
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        task, _ = await rolebus_bus.publish_task(
            "task.backend.x", title="far too long", payload={"spec": "word " * 12_000}
        )

        event = await event_of(rolebus_bus, task.id, "retrying", timeout=120)
        assert "does not fit the model's context window" in (event.error or "")
        assert "handler.max_tokens" in (event.error or "")
    finally:
        await crew.stop(grace=0)


async def test_a_worker_killed_after_the_recorded_call_does_not_pay_for_it_again(
    rolebus_server: EmbeddedServer,
    rolebus_bus: Bus,
    rolebus_settings: Settings,
    real_model_url: str,
    tmp_path: Path,
) -> None:
    """SIGKILL the moment the real model's answer is recorded; the restarted worker
    settles the task without asking the model that request again."""
    with counting_proxy(real_model_url) as proxy:
        write_llm_team(tmp_path / "roles", proxy.url, timeout="60s", model=MODEL)
        workers = WorkerProcess(rolebus_server.url, tmp_path / "roles", tmp_path / "home")
        task, _ = await workers.killed_once_recorded(
            lambda: rolebus_bus.publish_task("task.backend.x", title="say you are done"),
            timeout=120,
        )
        assert len(proxy.asked) >= 1
        ended = {"completed", "input-required", "handed-off", "dead", "rejected"}
        await workers.until(rolebus_bus, task.id, ended, timeout=180)
        # Every request went to the model once: the one recorded before the kill was
        # answered from its record, not asked again (a repair turn is a new request).
        bodies = [json.dumps(body, sort_keys=True) for body in proxy.asked]
        assert len(bodies) == len(set(bodies)), f"{len(bodies)} requests, some repeated"
