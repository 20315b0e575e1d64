"""The bus's overhead on an LLM task: a role with an llm handler against the test
kit's chat-completions server, against the openai client calling the same server
alone. The model's own time is the server's (near zero): what is left is ours."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import openai

from bench.harness import Results, connect, perf
from rolebus.config import Settings
from rolebus.handlers.prompt import OUTCOME_SCHEMA
from rolebus.nats.delivery import StoredMessage
from rolebus.team.roles import load_team
from rolebus.testing.llm import serve_llm
from rolebus.worker.runner import start_workers

ROLE = """+++
id = "thinker"
title = "Thinker"
domains = ["llm"]
handler = {{ llm = "bench-model", base_url = "{url}", api_key_env = "ROLEBUS_BENCH_KEY" }}
concurrency = 1
+++
You think.
"""


async def bench_llm(url: str, results: Results, *, count: int, run: int) -> None:
    metric = results.metric(
        "LLM task, one at a time (bus overhead on the model call)",
        "ms/task",
        higher_is_better=False,
        baseline_name="openai client alone",
        note="the test kit's server answers at once: the difference is the bus "
        "(prompt, recorded call, state, events, ack)",
    )
    with serve_llm() as server, tempfile.TemporaryDirectory() as folder:
        raw = await _client_alone(server.url, count)
        metric.baseline.append(raw)
        roles = Path(folder)
        (roles / "thinker.md").write_text(ROLE.format(url=server.url), encoding="utf-8")
        metric.rolebus.append(await _through_the_bus(url, load_team(roles), count, run))


async def _client_alone(base_url: str, count: int) -> float:
    request: dict[str, Any] = {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You think."},
            {"role": "user", "content": "title: a task"},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "outcome", "schema": OUTCOME_SCHEMA},
        },
        "max_tokens": 2000,
    }
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
        start = perf()
        for _ in range(count):
            await client.chat.completions.create(**request)
        return (perf() - start) / count * 1000


async def _through_the_bus(url: str, team: Any, count: int, run: int) -> float:
    """Tasks one after another (each published when the previous completed)."""
    settings = Settings(nats_url=url)
    crew = await start_workers(settings, team, [team.role("thinker")], supervise=False)
    client = await connect(url)
    from rolebus.bus import Bus

    done: asyncio.Queue[StoredMessage] = asyncio.Queue()
    bus = await Bus.connect(settings)
    try:
        watch = await bus.connection.watch("event.task.completed.>", done.put)
        await bus.connection.flush()
        start = perf()
        for number in range(count):
            await bus.publish_task("task.llm.think", title=f"thought {run}-{number}")
            await asyncio.wait_for(done.get(), 60)
        elapsed = perf() - start
        await watch.close()
    finally:
        await bus.close()
        await client.close()
        await crew.stop(grace=0)
    return elapsed / count * 1000
