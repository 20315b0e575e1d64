"""What-if on a recorded flow: another model, compared per input with tokens, cost
and model time; kept runs compared again without a model; a gate for CI."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.nats.server import EmbeddedServer
from rolebus.testing import LlmServer, Reply

from ..conftest import CliRunner
from .llm_team import ENV, KEY, StartTeam, until
from .test_dashboard import serving

PRICES = "{ input_per_mtok = 1.0, output_per_mtok = 4.0 }"


async def test_another_model_is_compared_per_input_and_kept_runs_compare_without_a_model(
    rolebus_bus: Bus,
    rolebus_server: EmbeddedServer,
    rolebus_settings: Settings,
    llm_server: LlmServer,
    start_llm_team: StartTeam,
    tmp_path: Path,
    cli: CliRunner,
) -> None:
    llm_server.per_model = {
        "model-a": Reply.completed({"answer": "A"}),
        "model-b": Reply.completed({"answer": "B", "notes": "longer " * 40}),
        "model-c": Reply.with_outcome({"status": "failed", "error": "cannot", "retryable": False}),
    }
    await start_llm_team(model="model-a", prices=PRICES)
    for number in range(3):
        task, _ = await rolebus_bus.publish_task("task.backend.x", title=f"input {number}")
        await until(rolebus_bus, task.id, "completed")
    assert llm_server.answered == 3
    env = {
        "NATS_URL": rolebus_server.url,
        "ROLEBUS_ROLES": str(tmp_path / "roles0"),
        "ROLEBUS_HOME": str(tmp_path / "home"),
        ENV: KEY,
    }

    async def rerun(*args: str) -> tuple[int, dict[str, Any]]:
        done = await asyncio.to_thread(cli, "rerun", "--role", "eng-be", "--json", *args, env=env)
        return done.code, json.loads(done.stdout)

    # The recorded model: every call answered from its record, nothing asked.
    code, same = await rerun("--model", "model-a")
    assert code == 0, same
    assert llm_server.answered == 3
    assert same["totals"]["asked"]["new"] == 0

    code, other = await rerun("--model", "model-b")
    assert llm_server.answered == 6  # one call per input: the ones the change touched
    assert code == 1  # outcomes differ (no --fail-on: any difference fails)
    assert len(other["rows"]) == 3
    for row in other["rows"]:
        assert row["changed"] is True
        assert row["old"]["status"] == row["new"]["status"] == "completed"
        assert row["old"]["model"] == "model-a"
        assert row["new"]["model"] == "model-b"
        assert row["new"]["tokens"] > row["old"]["tokens"] > 0  # B says more
        assert row["new"]["cost_usd"] > row["old"]["cost_usd"] > 0
        assert row["old"]["latency_ms"] is not None
        assert row["new"]["latency_ms"] is not None
        assert row["new"]["valid_first_try"] is True
        assert row["new"]["asked"] == 1
    assert other["totals"]["changed_share"] == 1.0

    # Kept: compared again later without asking any model.
    code, later = await rerun("--model", "model-b", "--live")
    asked = llm_server.answered
    code, compared = await rerun("--compare", other["run"], later["run"])
    assert llm_server.answered == asked
    assert code == 0
    assert len(compared["rows"]) == 3
    assert all(row["changed"] is False for row in compared["rows"])  # B answers B again

    # Samples: each input asked again per sample, a row each.
    asked = llm_server.answered
    code, sampled = await rerun("--model", "model-b", "--samples", "2")
    assert llm_server.answered == asked + 6
    assert sorted(row["sample"] for row in sampled["rows"]) == [1, 1, 1, 2, 2, 2]
    refused = await asyncio.to_thread(
        cli, "rerun", "--role", "eng-be", "--samples", "2", env=env
    )  # from the records every sample is the same: refused, nothing asked
    assert refused.code == 1
    assert "--samples 2" in refused.stderr
    assert llm_server.answered == asked + 6

    # As a gate: a model that fails what the recorded one completed is worse.
    code, worse = await rerun("--model", "model-c", "--fail-on", "worse")
    assert code == 1
    assert "no longer complete" in worse["gate"]
    code, fine = await rerun("--model", "model-a", "--fail-on", "worse")
    assert code == 0
    assert fine["gate"] is None

    # The dashboard shows a kept run as a chart: the input model C lost, in red.
    settings = replace(rolebus_settings, home=tmp_path / "home")
    async with serving(settings) as url, httpx.AsyncClient() as client:
        runs = (await client.get(f"{url}/whatif")).text
        assert worse["run"] in runs
        shown = (await client.get(f"{url}/whatif/{worse['run']}")).text
    assert shown.count('data-lost="1"') == 6  # 3 inputs, in the tokens and time charts
    assert "completed → failed" in shown
