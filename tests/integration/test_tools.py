"""Tools for LLM roles: a real MCP server over stdio and a Python function, each call
recorded before its result is used (never run twice), allowed per role, and ruled by
the role's card (a spend-tagged tool parks the task for approval)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.nats.server import EmbeddedServer
from rolebus.testing import LlmServer, Reply, wait_for

from ..conftest import CliRunner
from .llm_team import StartTeam, WorkerProcess, state_of, until, write_llm_team

SERVER = Path(__file__).parent / "tools" / "files_server.py"
FILES = f"""
[[tools]]
mcp = ["{sys.executable}", "{SERVER}"]
allow = ["append_line", "read_lines"]
idempotent = ["read_lines"]
"""
LEDGER = """
[[tools]]
python = "tests.integration.tools.ledger:buy_credits"
boundaries = { buy_credits = "spend" }
"""


def tool_messages(llm_server: LlmServer, request: int) -> list[str]:
    return [m["content"] for m in llm_server.requests[request].messages if m.get("role") == "tool"]


async def test_a_worker_killed_after_a_tool_result_is_recorded_does_not_run_it_again(
    rolebus_server: EmbeddedServer, llm_server: LlmServer, tmp_path: Path
) -> None:
    lines = tmp_path / "lines.txt"
    team_dir = tmp_path / "roles"
    write_llm_team(team_dir, llm_server.url, timeout="60s", more=FILES)
    llm_server.script(
        Reply.calling(("append_line", {"path": str(lines), "line": "written once"})),
        Reply.completed({"appended": True}),
    )
    workers = WorkerProcess(
        rolebus_server.url,
        team_dir,
        tmp_path / "home",
        PYTHONPATH=str(Path(__file__).parents[2]),
    )
    async with await Bus.connect(Settings(nats_url=rolebus_server.url)) as bus:
        task, _ = await workers.killed_once_recorded(
            lambda: bus.publish_task("task.backend.x", title="append a line"),
            key_part=".g0.t",  # a tool's record, not a model call's (.c)
        )
        assert await state_of(bus, task.id) != "completed"
        assert lines.read_text() == "written once\n"
        assert await workers.until(bus, task.id, {"completed"}) == "completed"
    assert lines.read_text() == "written once\n"  # the tool ran once
    assert llm_server.answered == 2  # the first call was answered from its record


async def test_a_tool_outside_the_allow_list_is_refused_with_a_reason_the_model_reads(
    rolebus_bus: Bus,
    rolebus_server: EmbeddedServer,
    llm_server: LlmServer,
    start_llm_team: StartTeam,
    tmp_path: Path,
    cli: CliRunner,
) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    team, _ = await start_llm_team(more=FILES, timeout="60s")
    llm_server.script(
        Reply.calling(
            ("delete_everything", {"path": str(victim)}),
            ("read_lines", {"path": str(victim)}),
        ),
        Reply.completed({"read": True}),
    )
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="tidy up")
    await until(rolebus_bus, task.id, "completed", timeout=60)
    refused, read = tool_messages(llm_server, 1)
    assert "refused: the tool 'delete_everything' is not allowed for role eng-be" in refused
    assert "append_line, read_lines" in refused
    assert read == "keep me\n"  # the allowed tool ran (both were asked at once)
    assert victim.exists()
    # The model was shown only the allowed tools (and the outcome's own function).
    shown = {tool["function"]["name"] for tool in llm_server.requests[0].body["tools"]}
    assert shown <= {"append_line", "read_lines", "submit_outcome"}
    assert {"append_line", "read_lines"} <= shown
    # `rolebus show` lists the tool call: name, arguments, time, outcome.
    env = {"NATS_URL": rolebus_server.url, "ROLEBUS_HOME": str(tmp_path / "home")}
    shown_task = await asyncio.to_thread(cli, "show", task.id, "--json", env=env)
    tools = [call for call in json.loads(shown_task.stdout)["calls"] if call["tool"]]
    assert [(call["tool"], call["result"]) for call in tools] == [("read_lines", "keep me\n")]
    # ...and so does the flow picture, in the task's box.
    from rolebus.history.flow import read_flow

    picture = await read_flow(rolebus_bus.connection, team, task.id)
    lines = [line for box in picture.boxes for line in box.details]
    assert any(line.startswith("tool read_lines(") for line in lines), lines


async def test_a_spend_tagged_tool_parks_the_task_until_approved_then_runs_once(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    team, _ = await start_llm_team(more=LEDGER)
    buy = Reply.calling(("buy_credits", {"ledger": str(ledger), "amount": 50}))
    llm_server.script(buy)
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="we need credits")
    await until(rolebus_bus, task.id, "input-required")
    assert not ledger.exists()  # asked first: nothing bought
    [record] = await EscalationStore(rolebus_bus.connection).all()
    assert (record.holder, record.reason, record.kind) == ("cto", "tool-spend", "approval")
    assert "buy_credits" in record.question
    assert '"amount": 50' in record.question

    llm_server.script(buy, Reply.completed({"bought": 50}))
    await resolve(rolebus_bus.connection, team, record.id, decision="yes", approved=True)
    await until(rolebus_bus, task.id, "completed")
    assert ledger.read_text() == "50\n"  # it ran once, after the approval
    [result] = tool_messages(llm_server, len(llm_server.requests) - 1)
    assert result == "bought 50 credits"


async def test_a_tool_a_never_rule_refuses_is_refused_with_the_rule_given_to_the_model(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    refuse = LEDGER.replace('"spend"', '"purchase"') + (
        '\n[[never]]\nwhat = "buy anything"\nkinds = ["purchase"]\naction = "refuse"\n'
    )
    await start_llm_team(more=refuse)
    llm_server.script(
        Reply.calling(("buy_credits", {"ledger": str(ledger), "amount": 5})),
        Reply.completed({"bought": 0}),
    )
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="buy a little")
    await until(rolebus_bus, task.id, "completed")
    [refused] = tool_messages(llm_server, 1)
    assert refused == "refused: eng-be must never buy anything (the tool 'buy_credits' is purchase)"
    assert not ledger.exists()


async def test_the_example_tool_team_shows_its_tools_and_keeps_paths_inside_the_repo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rolebus.handlers.tools import Toolbox
    from rolebus.team.roles import load_team

    from ..conftest import REPO

    example = REPO / "examples" / "tool-team"
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.chdir(REPO)
    role = load_team(example / "roles").role("eng-be")
    # "python" as a user writes it; here, this interpreter.
    mcp, python = role.tools
    assert mcp.mcp is not None
    role = role.model_copy(
        update={"tools": [mcp.model_copy(update={"mcp": [sys.executable, *mcp.mcp[1:]]}), python]}
    )
    toolbox = Toolbox(role)
    names = [d["function"]["name"] for d in await toolbox.definitions()]
    assert names == ["list_files", "read_file", "append_note", "buy_credits"]
    listed, failed = await toolbox.call("list_files", {})
    assert not failed
    assert "src/orders.py" in listed
    escaped, failed = await toolbox.call("read_file", {"path": "../../../pyproject.toml"})
    assert failed  # the server refused: nothing of the file came back
    assert "[project]" not in escaped
    assert toolbox.boundary("buy_credits") == "spend"


async def test_an_mcp_server_over_streamable_http_lists_and_runs_its_allowed_tools(
    tmp_path: Path,
) -> None:
    import socket

    from rolebus.handlers.tools import Toolbox
    from rolebus.team.roles import RoleSpec
    from rolebus.testing import wait_for

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "http", str(port)], stderr=subprocess.DEVNULL
    )
    try:

        def listening() -> bool:
            with socket.socket() as client:
                return client.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, timeout=30)
        role = RoleSpec.model_validate(
            {
                "id": "eng-be",
                "title": "Backend",
                "handler": {"llm": "m"},
                "tools": [{"url": f"http://127.0.0.1:{port}/mcp", "allow": ["append_line"]}],
            }
        )
        toolbox = Toolbox(role)
        assert [d["function"]["name"] for d in await toolbox.definitions()] == ["append_line"]
        lines = tmp_path / "lines.txt"
        said, failed = await toolbox.call("append_line", {"path": str(lines), "line": "over http"})
        assert not failed, said
        assert lines.read_text() == "over http\n"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_a_budget_approval_on_the_task_does_not_let_a_spending_tool_run(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam, tmp_path: Path
) -> None:
    """The attack: the task asks a budget raise (a yes it can get), then the model
    calls the spending tool on that yes. Only a decided `tool-spend` approval counts."""
    ledger = tmp_path / "ledger.txt"
    team, _ = await start_llm_team(more=LEDGER, budget='tokens_per_task = 500\napprover = "cto"')
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="raise, then buy")
    await until(rolebus_bus, task.id, "input-required")
    [budget] = await EscalationStore(rolebus_bus.connection).all()
    assert budget.reason == "budget"
    llm_server.script(Reply.calling(("buy_credits", {"ledger": str(ledger), "amount": 9})))
    await resolve(rolebus_bus.connection, team, budget.id, decision="ok", approved=True)

    async def asks_for_the_tool() -> bool:
        found = await EscalationStore(rolebus_bus.connection).all()
        return any(record.reason == "tool-spend" for record in found)

    await wait_for(asks_for_the_tool, timeout=30)
    assert await state_of(rolebus_bus, task.id) == "input-required"
    assert not ledger.exists()  # the budget's yes bought nothing
