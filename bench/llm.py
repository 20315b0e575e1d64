"""The bus's overhead on an LLM task: a role with an llm handler against the test
kit's chat-completions server, against the openai client calling the same server
alone. The model's own time is the server's (near zero): what is left is ours."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import openai

from bench.cases import rss_mb
from bench.harness import Results, connect, perf
from rolebus.config import Settings
from rolebus.handlers.prompt import OUTCOME_SCHEMA
from rolebus.nats.delivery import StoredMessage
from rolebus.team.roles import load_team
from rolebus.testing.llm import Reply, serve_llm
from rolebus.wire.codec import decode
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


#: What the baselines ask: a request like the role's, answered in the outcome's schema.
REQUEST: dict[str, Any] = {
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


async def bench_llm(url: str, results: Results, *, count: int, run: int) -> None:
    metric = results.metric(
        "LLM task, one at a time (bus overhead on the model call)",
        "ms/task",
        higher_is_better=False,
        baseline_name="openai client alone",
        target=1.25,
        note="the test kit's server answers at once: the difference is the bus "
        "(prompt, recorded call, state, events, ack)",
    )
    same = results.metric(
        "LLM task, one at a time, vs the same guarantee",
        "ms/task",
        higher_is_better=False,
        baseline_name="raw nats-py + openai: pull, call, record the answer, record, ack",
        note="the least that pays a call once: its answer stored (fsynced) before the "
        "task's record and the ack",
    )
    with serve_llm() as server, tempfile.TemporaryDirectory() as folder:
        raw = await _client_alone(server.url, count)
        metric.baseline.append(raw)
        same.baseline.append(await _raw_same_guarantee(url, server.url, count, run))
        roles = Path(folder)
        (roles / "thinker.md").write_text(ROLE.format(url=server.url), encoding="utf-8")
        bus = await _through_the_bus(url, load_team(roles), count, run)
        metric.rolebus.append(bus)
        same.rolebus.append(bus)


SLOW_ROLE = """+++
id = "slowpoke"
title = "Slow thinker"
domains = ["slow"]
handler = {{ llm = "slow-model", base_url = "{url}", timeout = "60s" }}
concurrency = {concurrency}
ack_wait = "2s"
+++
You think slowly.
"""


async def bench_llm_slow(
    url: str, results: Results, *, count: int, seconds: float, run: int
) -> dict[str, Any]:
    """``count`` model calls of ``seconds`` each in flight at once on one worker, whose
    ack_wait (2 s) is shorter than a call: without heartbeats every task would be
    redelivered. Against the openai client making the same calls at once."""
    metric = results.metric(
        f"{count} concurrent {seconds:g} s model calls on one worker (wall time)",
        "s",
        higher_is_better=False,
        baseline_name="openai client alone, same calls at once",
        target=1.25,
        note="ack_wait 2 s: every call outlives it, so only heartbeats keep a task "
        "from being redelivered",
    )
    with serve_llm() as server, tempfile.TemporaryDirectory() as folder:
        server.default = Reply.with_outcome({"status": "completed", "result": "ok"}, delay=seconds)
        metric.baseline.append(await _client_at_once(server.url, count))
        roles = Path(folder)
        (roles / "slowpoke.md").write_text(
            SLOW_ROLE.format(url=server.url, concurrency=count), encoding="utf-8"
        )
        team = load_team(roles)
        settings = Settings(nats_url=url)
        crew = await start_workers(settings, team, [team.role("slowpoke")], supervise=False)
        from rolebus.bus import Bus

        bus = await Bus.connect(settings)
        finished: asyncio.Queue[StoredMessage] = asyncio.Queue()
        try:
            watch = await bus.connection.watch("event.task.completed.slowpoke.>", finished.put)
            await bus.connection.flush()
            rss_before = rss_mb(os.getpid())
            start = perf()
            for number in range(count):
                await bus.publish_task("task.slow.think", title=f"slow {run}-{number}")
            events = [
                await asyncio.wait_for(finished.get(), seconds * 10 + 60) for _ in range(count)
            ]
            metric.rolebus.append(perf() - start)
            rss_after = rss_mb(os.getpid())
            await watch.close()
        finally:
            await bus.close()
            await crew.stop(grace=0)
        asked = server.answered
    attempts = [getattr(decode(event.subject, event.data), "attempt", 0) for event in events]
    return {
        "llm_slow": {
            "calls": count,
            "seconds_each": seconds,
            "completed": len(events),
            "redelivered": sum(1 for attempt in attempts if attempt > 1),
            "model_calls": asked - count,  # the baseline's calls come first
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1),
        }
    }


async def _client_at_once(base_url: str, count: int) -> float:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
        start = perf()
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="slow-model",
                    messages=[{"role": "user", "content": "think"}],
                    max_tokens=64,
                )
                for _ in range(count)
            )
        )
        return perf() - start


async def _client_alone(base_url: str, count: int) -> float:
    request = REQUEST
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
        start = perf()
        for _ in range(count):
            await client.chat.completions.create(**request)
        return (perf() - start) / count * 1000


async def _raw_same_guarantee(url: str, base_url: str, count: int, run: int) -> float:
    """What a hand-written worker must do for "paid once": publish the task, pull it,
    look for a recorded answer, call the model, store the answer (fsynced), append the
    task's record (conditional on its subject), ack."""
    import nats.js.api
    import nats.js.errors

    client = await connect(url)
    js = client.jetstream()
    stream = f"RAW_LLM_{run}"
    await js.add_stream(
        name=stream, subjects=[f"rawllm{run}.>"], storage=nats.js.api.StorageType.FILE
    )
    answers = await js.create_key_value(bucket=f"RAW_LLM_CALLS_{run}", history=1)
    pulled = await js.pull_subscribe(f"rawllm{run}.task", durable=f"raw-llm-{run}", stream=stream)
    request = REQUEST
    try:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as llm:
            start = perf()
            for number in range(count):
                task_id = f"t{number}"
                await js.publish(f"rawllm{run}.task", task_id.encode())
                [message] = await pulled.fetch(1, timeout=10)
                try:
                    answer = (await answers.get(task_id)).value or b""
                except nats.js.errors.KeyNotFoundError:
                    response = await llm.chat.completions.create(**request)
                    answer = (response.choices[0].message.content or "").encode()
                    await answers.put(task_id, answer)
                await js.publish(
                    f"rawllm{run}.done.{task_id}",
                    answer,
                    headers={"Nats-Expected-Last-Subject-Sequence": "0"},
                )
                await message.ack()
            return (perf() - start) / count * 1000
    finally:
        await js.delete_stream(stream)
        await js.delete_key_value(f"RAW_LLM_CALLS_{run}")
        await client.close()


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
