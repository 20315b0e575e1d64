"""LLM roles on a real nats-server, against the test kit's chat-completions server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import structlog

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows import dlq
from rolebus.flows.calls import CallStore
from rolebus.flows.escalation import EscalationStore
from rolebus.flows.state import StateStore
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.testing import LlmServer, Reply, wait_for
from rolebus.wire.subjects import CALLS_BUCKET, EVENTS_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import CliRunner
from .llm_team import (
    ENV,
    KEY,
    PERSONA,
    StartTeam,
    WorkerProcess,
    event_of,
    state_of,
    until,
    write_llm_team,
)
from .test_dashboard import serving


async def everything_stored(bus: Bus) -> bytes:
    """Every event (task records among them) and call record, as raw bytes."""
    chunks = [m.data async for m in bus.connection.streams.read(EVENTS_STREAM)]
    chunks += [value async for _, value in bus.connection.kv.items(CALLS_BUCKET)]
    return b"\n".join(chunks)


async def test_an_llm_role_completes_with_the_models_structured_result(
    rolebus_bus: Bus, rolebus_settings: Settings, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(Reply.completed({"implemented": "GET /orders", "tests": "12 passed"}))
    with structlog.testing.capture_logs() as logs:
        await start_llm_team()
        task, _ = await rolebus_bus.publish_task(
            "task.backend.implement", title="Orders API", payload={"endpoint": "/orders"}
        )
        await until(rolebus_bus, task.id, "completed")
    found = await StateStore(rolebus_bus.connection).get(task.id)
    assert found is not None
    assert found.state.result == {"implemented": "GET /orders", "tests": "12 passed"}
    [request] = llm_server.requests
    assert request.body["model"] == "test-model"
    assert request.body["temperature"] == 0.2
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert PERSONA in request.system
    for role in ("cto", "architect", "eng-be", "eng-fe"):
        assert f"| {role} |" in request.system  # the roster
    assert "spend money without the CTO's approval" in request.system
    assert "`ambiguous-spec`: `architect`" in request.system
    user = request.messages[1]["content"]
    assert "title: Orders API" in user
    assert '"endpoint": "/orders"' in user
    [completed] = await read_events(rolebus_bus.connection, states=["completed"])
    usage = completed.detail["usage"]
    assert usage["model"] == "test-model"
    assert usage["calls"] == 1
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage.get("cost_usd") is None  # no price for "test-model": tokens only
    # The key is read at call time and goes nowhere but the request's header.
    assert KEY.encode() not in await everything_stored(rolebus_bus)
    assert KEY not in json.dumps(logs, default=str)
    async with serving(rolebus_settings) as url, httpx.AsyncClient() as client:
        page = (await client.get(f"{url}/tasks/{task.id}")).text
    assert "Model calls" in page
    assert "test-model" in page
    assert "Orders API" in page
    assert KEY not in page
    [call] = await CallStore(rolebus_bus.connection).for_task(task.id)
    assert call["answer"] == json.dumps(
        {"status": "completed", "result": {"implemented": "GET /orders", "tests": "12 passed"}}
    )
    assert call["mode"] == "json_schema"


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "tool", "prompt"])
async def test_each_answer_mode_works_against_a_server_that_supports_only_it(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam, mode: str
) -> None:
    llm_server.supports = {mode}
    llm_server.script(Reply.completed({"via": mode}))
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="one")
    await until(rolebus_bus, task.id, "completed")
    found = await StateStore(rolebus_bus.connection).get(task.id)
    assert found is not None
    assert found.state.result == {"via": mode}
    assert [r.mode for r in llm_server.requests][-1] == mode
    assert llm_server.answered == 1
    # The mode that worked is kept: the next task goes straight to it.
    second, _ = await rolebus_bus.publish_task("task.backend.x", title="two")
    await until(rolebus_bus, second.id, "completed")
    assert llm_server.requests[-1].mode == mode
    assert (
        len(llm_server.requests)
        == [*["json_schema", "json_object", "tool", "prompt"]].index(mode) + 2
    )


async def test_an_invalid_answer_is_repaired_and_a_hopeless_one_fails_with_the_reason(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(
        Reply.plain("Sure! I implemented it."),
        Reply.completed({"repaired": True}),
    )
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="repairable")
    await until(rolebus_bus, task.id, "completed")
    assert llm_server.answered == 2
    first, repair = llm_server.requests[0].messages, llm_server.requests[1].messages
    # One note after the first request: the error and an excerpt, not the whole answer.
    assert repair[:-1] == first
    assert "not a valid outcome: it is not JSON" in repair[-1]["content"]
    assert "It began: «Sure! I implemented it.»" in repair[-1]["content"]
    [completed] = await read_events(rolebus_bus.connection, states=["completed"])
    assert completed.detail["usage"]["calls"] == 2

    llm_server.default = Reply.plain('{"status": "finished"}')
    hopeless, _ = await rolebus_bus.publish_task("task.backend.x", title="hopeless")

    async def retried() -> bool:
        events = await read_events(rolebus_bus.connection, states=["retrying"])
        return any(event.task_id == hopeless.id for event in events)

    await wait_for(retried, timeout=30)
    [retrying, *_] = [
        e
        for e in await read_events(rolebus_bus.connection, states=["retrying"])
        if e.task_id == hopeless.id
    ]
    assert "not a valid outcome after 1 repair turn(s)" in (retrying.error or "")
    assert "status" in (retrying.error or "")
    assert retrying.detail["usage"]["calls"] == 2


async def test_an_escalate_answer_parks_by_the_role_file_and_a_never_follow_up_asks_the_cto(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(
        Reply.with_outcome(
            {
                "status": "escalate",
                "escalation": {
                    "reason": "ambiguous-spec",
                    "question": "I don't know: offset or cursor pagination?",
                    "options": [{"name": "cursor", "tradeoffs": "stable under inserts"}],
                },
            }
        ),
        Reply.completed(
            {"designed": "schema"},
            tasks=[{"subject": "task.backend.spend", "title": "Managed Postgres ($50/month)"}],
        ),
    )
    await start_llm_team()
    asked, _ = await rolebus_bus.publish_task("task.backend.implement", title="list orders")
    await until(rolebus_bus, asked.id, "input-required")
    [record] = await EscalationStore(rolebus_bus.connection).all()
    assert (record.holder, record.reason) == ("architect", "ambiguous-spec")
    assert "I don't know" in record.question

    spender, _ = await rolebus_bus.publish_task("task.backend.design", title="orders schema")
    await until(rolebus_bus, spender.id, "completed")
    follow_up = f"{spender.id}-1"
    await until(rolebus_bus, follow_up, "input-required")
    holders = {r.task_id: r.holder for r in await EscalationStore(rolebus_bus.connection).all()}
    assert holders[follow_up] == "cto"
    assert llm_server.answered == 2  # the boundary held before any model call for it


async def test_429_is_retried_after_retry_after_and_401_dead_letters_naming_the_variable(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(Reply.failing(429, retry_after=1), Reply.completed({"ok": True}))
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="busy server")
    await until(rolebus_bus, task.id, "completed")
    first, second = llm_server.requests
    assert first.status == 429
    assert second.at - first.at >= 0.95

    llm_server.script(Reply.failing(401, error="invalid api key"))
    refused, _ = await rolebus_bus.publish_task("task.backend.x", title="bad key")
    await until(rolebus_bus, refused.id, "dead")
    entries = {e.task_id: e async for e in dlq.list_dead_letters(rolebus_bus.connection)}
    entry = entries[refused.id]
    assert entry.reason == "failed"  # not retried: another try cannot fix a key
    assert ENV in entry.error
    assert "refused the key (401)" in entry.error
    assert KEY not in entry.error


async def test_a_model_that_never_answers_frees_the_slot_after_the_timeout(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(Reply.with_outcome({"status": "completed"}, delay=8))
    await start_llm_team(timeout="1s")
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="slow model")

    async def timed_out() -> bool:
        events = await read_events(rolebus_bus.connection, states=["retrying"])
        return any(e.task_id == task.id for e in events)

    await wait_for(timed_out, timeout=10)
    [event, *_] = [
        e
        for e in await read_events(rolebus_bus.connection, states=["retrying"])
        if e.task_id == task.id
    ]
    assert "no answer from the model server at" in (event.error or "")
    assert "within 1s" in (event.error or "")
    await until(rolebus_bus, task.id, "completed")  # the retry gets the default answer


async def test_a_recorded_call_is_reused_after_a_dlq_redrive(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    # The model hands a contract to a role that does not exist: a permanent failure.
    llm_server.default = Reply.with_outcome(
        {
            "status": "handoff",
            "handoff": {"to": "nobody", "contract": "orders-api", "version": "1.0.0"},
        }
    )
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="hand it on")
    await until(rolebus_bus, task.id, "dead")
    assert llm_server.answered == 1
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    await dlq.redrive(rolebus_bus.connection, entry)

    async def dead_again() -> bool:
        return len([e async for e in dlq.list_dead_letters(rolebus_bus.connection)]) == 1

    await wait_for(dead_again, timeout=30)
    assert llm_server.answered == 1  # the recorded answer, not a second call


def test_a_worker_killed_after_the_model_answered_pays_once(
    rolebus_server: EmbeddedServer, llm_server: LlmServer, tmp_path: Path
) -> None:
    """SIGKILL between the recorded answer and the ack: the restarted worker finishes
    the task from the record. The model answers a handoff with its contract, so the
    worker has registry writes to do between the two (a window for the kill)."""
    import asyncio

    team_dir = tmp_path / "roles"
    write_llm_team(team_dir, llm_server.url)
    contract = {
        "name": "orders-api",
        "version": "1.0.0",
        "operations": {"listOrders": {"method": "GET", "path": "/orders"}},
    }
    workers = WorkerProcess(rolebus_server.url, team_dir, tmp_path / "home")
    settings = Settings(nats_url=rolebus_server.url)

    async def run_once(number: int) -> tuple[bool, str]:
        """Kill the worker the moment the call is recorded; (conclusive, task id)."""
        async with await Bus.connect(settings) as bus:
            llm_server.script(
                Reply.with_outcome(
                    {
                        "status": "handoff",
                        "handoff": {
                            "to": "eng-fe",
                            "contract": "orders-api",
                            "version": "1.0.0",
                            "document": contract,
                        },
                    }
                )
            )
            task, _ = await workers.killed_once_recorded(
                lambda: bus.publish_task("task.backend.x", title=f"contract {number}"),
                timeout=30,
            )
            conclusive = await state_of(bus, task.id) != "completed"
            return conclusive, task.id

    async def finish(task_ids: list[str]) -> None:
        worker = workers.start()
        try:
            async with await Bus.connect(settings) as bus:
                for task_id in task_ids:
                    await until(bus, task_id, "completed")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)

    async def scenario() -> None:
        conclusive_ids, all_ids = [], []
        for number in range(3):
            conclusive, task_id = await run_once(number)
            all_ids.append(task_id)
            if conclusive:
                conclusive_ids.append(task_id)
                break
        assert conclusive_ids, "the worker acked before it could be killed, three times"
        await finish(all_ids)
        assert llm_server.answered == len(all_ids)  # one call per task, none repeated

    asyncio.run(scenario())


async def test_status_and_metrics_show_tokens_and_cost_per_role(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam, tmp_path: Path
) -> None:
    from rolebus.history.status import collect, prometheus_text
    from rolebus.web.charts import spend_chart

    team, _ = await start_llm_team(prices="{ input_per_mtok = 1.0, output_per_mtok = 4.0 }")
    tasks = [(await rolebus_bus.publish_task("task.backend.x", title=f"t{n}"))[0] for n in range(2)]
    for task in tasks:
        await until(rolebus_bus, task.id, "completed")
    requests = llm_server.requests
    statuses = {s.role: s for s in await collect(rolebus_bus.connection, team)}
    spent = statuses["eng-be"].as_json()["usage"]
    assert spent["today"] == spent["total"]
    assert spent["total"]["calls"] == 2
    prompt = sum(len(json.dumps(r.body["messages"])) // 4 for r in requests)
    assert spent["total"]["prompt_tokens"] == prompt
    completion = spent["total"]["completion_tokens"]
    assert spent["total"]["cost_usd"] == pytest.approx((prompt * 1.0 + completion * 4.0) / 1e6)
    assert statuses["cto"].usage["total"]["calls"] == 0
    # The spend chart's points: the hours' tokens and dollars add up to the same totals.
    hours = statuses["eng-be"].spend_hours
    assert sum(hour["tokens"] for hour in hours) == spent["total"]["tokens"]
    assert sum(hour["cost_usd"] for hour in hours) == pytest.approx(spent["total"]["cost_usd"])
    chart = spend_chart(statuses["eng-be"], now=datetime.now(UTC), unit="tokens")
    assert all(f'data-value="{hour["tokens"]}"' in chart for hour in hours)
    text = prometheus_text(list(statuses.values()))
    assert 'rolebus_llm_calls_total{role="eng-be",model="test-model"} 2' in text
    assert (
        f'rolebus_llm_tokens_total{{role="eng-be",model="test-model",kind="prompt"}} {prompt}'
        in text
    )
    assert 'rolebus_llm_cost_usd_total{role="eng-be",model="test-model"}' in text


def test_prompt_prints_what_was_sent_and_rerun_reuses_calls_unless_live(
    cli: CliRunner,
    rolebus_server: EmbeddedServer,
    llm_server: LlmServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    monkeypatch.setenv(ENV, KEY)
    team_dir = tmp_path / "roles"
    team = write_llm_team(team_dir, llm_server.url)
    settings = Settings(nats_url=rolebus_server.url)
    llm_server.script(Reply.completed({"first": "answer"}))

    async def handle_one() -> str:
        async with await Bus.connect(settings) as bus:
            crew = await start_workers(settings, team, [team.role("eng-be")], grace=1)
            try:
                task, _ = await bus.publish_task(
                    "task.backend.x", title="prompted", payload={"spec": "v1"}
                )
                await until(bus, task.id, "completed")
            finally:
                await crew.stop(grace=0)
            return task.id

    task_id = asyncio.run(handle_one())
    env = {"NATS_URL": rolebus_server.url, "ROLEBUS_ROLES": str(team_dir)}
    printed = cli("prompt", "eng-be", task_id, "--json", env=env)
    assert printed.code == 0, printed.stderr
    assert json.loads(printed.stdout) == llm_server.requests[0].messages  # exactly what was sent
    text = cli("prompt", "eng-be", task_id, env=env)
    assert "--- system ---" in text.stdout
    assert PERSONA in text.stdout

    env["ROLEBUS_HOME"] = str(tmp_path / "home")
    reused = cli("rerun", "--role", "eng-be", "--json", env=env)
    assert reused.code == 0, reused.stdout + reused.stderr
    [result] = json.loads(reused.stdout)["rows"]
    assert result["changed"] is False
    assert llm_server.answered == 1  # answered from the record: nothing paid

    live = cli("rerun", "--role", "eng-be", "--live", "--json", env=env)
    assert llm_server.answered == 2
    [result] = json.loads(live.stdout)["rows"]
    assert result["changed"] is True  # the server's default answer differs
    assert result["outcome"]["result"] == {"done": True}
    assert live.code == 1


def test_demo_llm_plays_the_example_team_against_the_server_or_says_what_to_set(
    rolebus_server: EmbeddedServer, llm_server: LlmServer, tmp_path: Path
) -> None:
    from ..conftest import REPO

    rolebus = str(Path(sys.executable).parent / "rolebus")
    base = {key: value for key, value in os.environ.items() if key != "OPENAI_BASE_URL"}
    base.update(ROLEBUS_HOME=str(tmp_path / "home"), NATS_URL=rolebus_server.url)

    def demo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        # A process of its own, as a user runs it (the CLI configures logging).
        return subprocess.run(
            [rolebus, "demo", "--llm", *args],
            env={**base, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    missing = demo()
    assert missing.returncode == 1
    assert "needs OPENAI_BASE_URL" in missing.stderr
    assert "export OPENAI_BASE_URL=" in missing.stderr

    llm_server.script(
        Reply.completed(
            {"filed": "order history"},
            tasks=[{"subject": "task.architecture.design", "title": "Design the orders API"}],
        ),
        Reply.completed({"designed": "GET /orders with a cursor"}),
    )
    roles = str(REPO / "examples" / "llm-team" / "roles")
    played = demo(
        "--roles",
        roles,
        "--model",
        "test-model",
        OPENAI_BASE_URL=llm_server.url,
        OPENAI_API_KEY=KEY,
    )
    assert played.returncode == 0, played.stdout + played.stderr
    # The PM's own follow-up and the team's `then` routes: every role takes part,
    # though after the architect the model answers "done" and plans nothing.
    assert "6 work items" in played.stdout
    pm, architect, *rest = llm_server.requests
    assert pm.body["model"] == "test-model"
    assert "Product Manager" in pm.system
    assert "Design the orders API" in architect.messages[1]["content"]
    asked = {request.system.split("(role id `")[1].split("`")[0] for request in rest}
    assert asked == {"eng-be", "eng-fe", "perf-eng", "cto"}
    assert KEY not in played.stdout + played.stderr

    # A flow that dies is not a demo that worked: it says what died, and fails.
    llm_server.script(Reply.failing(401, error="invalid api key"))
    died = demo(
        "--roles",
        roles,
        "--model",
        "test-model",
        OPENAI_BASE_URL=llm_server.url,
        OPENAI_API_KEY=KEY,
    )
    assert died.returncode == 1, died.stdout + died.stderr
    assert "the flow did not finish: 1 task(s) dead" in died.stderr
    assert "refused the key (401)" in died.stderr


async def test_an_unreachable_model_server_is_a_retryable_failure_naming_its_url(
    rolebus_bus: Bus, rolebus_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    monkeypatch.setenv(ENV, KEY)
    team = write_llm_team(tmp_path / "roles", url)
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        task, _ = await rolebus_bus.publish_task("task.backend.x", title="nobody home")

        async def retried() -> bool:
            events = await read_events(rolebus_bus.connection, states=["retrying"])
            return any(e.task_id == task.id for e in events)

        await wait_for(retried, timeout=30)
    finally:
        await crew.stop(grace=0)
    [event, *_] = [
        e
        for e in await read_events(rolebus_bus.connection, states=["retrying"])
        if e.task_id == task.id
    ]
    assert f"cannot reach the model server at {url}" in (event.error or "")


async def test_a_streamed_answer_shows_as_progress_and_a_server_that_cannot_stream_still_works(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.chunk_delay = 0.05  # a slow writer: several progress updates
    llm_server.script(Reply.completed({"essay": "x" * 400}))
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="a long answer")
    await until(rolebus_bus, task.id, "completed")
    assert llm_server.requests[0].body["stream"] is True
    progress = [e for e in await read_events(rolebus_bus.connection, states=["progress"])]
    assert progress
    assert all(e.task_id == task.id for e in progress)
    assert progress[0].detail["text"] == "the model is answering"
    [completed] = await read_events(rolebus_bus.connection, states=["completed"])
    assert completed.detail["usage"]["completion_tokens"] > 0  # usage came with the stream

    llm_server.streams = False
    plain, _ = await rolebus_bus.publish_task("task.backend.x", title="no streaming here")
    await until(rolebus_bus, plain.id, "completed")
    assert [r.body.get("stream") for r in llm_server.requests[1:]] == [True, None]


# --- real servers as they are: modes, refusals, context ---------------------------------------


async def test_a_500_that_names_the_answer_mode_moves_to_the_next_mode_without_retrying(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    # llama-cpp-python answers a json_schema response_format it does not know with 500.
    llm_server.script(
        Reply.failing(500, error="Unrecognized response_format type: json_schema"),
        Reply.completed({"via": "json_object"}),
    )
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="one")
    await until(rolebus_bus, task.id, "completed")
    assert [(r.mode, r.status) for r in llm_server.requests] == [
        ("json_schema", 500),
        ("json_object", 200),
    ]
    assert llm_server.requests[1].body["response_format"]["schema"]["title"] == "Outcome"


async def test_a_context_overflow_is_never_taken_for_a_refused_mode(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    too_long = "This model's maximum context length is 4096 tokens; your request has 5000."
    llm_server.script(Reply.failing(400, error=too_long))
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="too long")

    event = await event_of(rolebus_bus, task.id, "retrying")
    assert "does not fit the model's context window" in (event.error or "")
    assert "handler.max_tokens" in (event.error or "")
    assert [r.mode for r in llm_server.requests][:1] == ["json_schema"]
    assert "json_object" not in [r.mode for r in llm_server.requests[:2]]  # no mode switch


async def test_a_handoff_answer_without_its_handoff_gets_a_repair_turn(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.script(
        Reply.with_outcome({"status": "handoff", "result": {"done": True}}),
        Reply.completed({"repaired": True}),
    )
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="hands off nothing")
    await until(rolebus_bus, task.id, "completed")
    note = llm_server.requests[1].messages[-1]["content"]
    assert "status 'handoff' needs 'handoff'" in note


async def test_a_context_window_shrinks_max_tokens_and_a_prompt_that_cannot_fit_is_not_sent(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    _, roomy = await start_llm_team(extra=", context_window = 4096, max_tokens = 4000")
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="fits, shorter")
    await until(rolebus_bus, task.id, "completed")
    asked = llm_server.requests[0].body["max_tokens"]
    assert 64 <= asked < 4000  # what the prompt leaves of the window
    await roomy.stop(grace=0)

    await start_llm_team(extra=", context_window = 256")
    sent = len(llm_server.requests)
    big, _ = await rolebus_bus.publish_task("task.backend.x", title="cannot fit")

    async def retrying() -> bool:
        events = await read_events(rolebus_bus.connection, states=["retrying"])
        return any(e.task_id == big.id for e in events)

    await wait_for(retrying, timeout=20)
    assert len(llm_server.requests) == sent  # it was never sent


async def test_a_role_file_mode_asks_only_that_way(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    llm_server.supports = {"json_schema", "prompt"}
    await start_llm_team(extra=', mode = "prompt"')
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="prompted")
    await until(rolebus_bus, task.id, "completed")
    assert {r.mode for r in llm_server.requests} == {"prompt"}


def test_llm_check_names_the_modes_a_server_honours_and_the_settings_to_use(
    llm_server: LlmServer, cli: CliRunner
) -> None:
    # As llama-cpp-python's server is: json_object with a schema, and a prompt; a stream
    # without a usage chunk.
    llm_server.supports = {"json_object", "prompt"}
    llm_server.stream_usage = False
    checked = cli("llm", "check", "--base-url", llm_server.url, "--model", "smollm2", "--json")
    assert checked.code == 0, checked.stderr
    report = json.loads(checked.stdout)
    works = {f["probe"]: f["works"] for f in report["findings"]}
    assert works == {
        "prompt": True,
        "json_schema": False,
        "json_object": True,
        "tool": False,
        "stream": True,
        "stream usage": False,
        "context window": None,
    }
    assert report["settings"] == {"mode": "json_object", "stream": True}
    assert {r.body["model"] for r in llm_server.requests} == {"smollm2"}

    unreachable = cli("llm", "check", "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert unreachable.code == 1
    assert "cannot reach the model server at http://127.0.0.1:9/v1" in unreachable.stderr


async def test_a_stream_that_breaks_off_is_asked_again_without_streaming(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    # llama-cpp-python streams nothing for a prompt over its context; unstreamed it says so.
    too_long = "This model's maximum context length is 4096 tokens (context_length_exceeded)"
    llm_server.script(Reply(stream_breaks=True), Reply.failing(400, error=too_long))
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="too long, streamed")

    event = await event_of(rolebus_bus, task.id, "retrying")
    assert "does not fit the model's context window" in (event.error or "")
    first, second = llm_server.requests[:2]
    assert first.body.get("stream") is True
    assert "stream" not in second.body
