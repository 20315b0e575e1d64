"""What a recorded model call costs on disk: the example LLM team's calls through
the bus, their records and parts, against the raw JSON of each request and answer."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.harness import Results
from rolebus.config import Settings
from rolebus.nats.delivery import StoredMessage
from rolebus.team.roles import load_team
from rolebus.testing.llm import serve_llm
from rolebus.wire.subjects import CALLS_BUCKET, PARTS_BUCKET
from rolebus.worker.runner import start_workers

ROLES = Path(__file__).resolve().parent.parent / "examples" / "llm-team" / "roles"


async def _values(bus: Any, bucket: str) -> dict[str, bytes]:
    return {
        change.key: change.value
        async for change in bus.connection.kv.changes(bucket)
        if change.value is not None
    }


async def bench_calls_storage(url: str, results: Results, *, per_role: int) -> dict[str, Any]:
    """``per_role`` tasks for each role of the example team, one at a time (kind ``x``:
    no ``then`` route fires); after each, the bytes the call and parts buckets gained."""
    metric = results.metric(
        "stored bytes per recorded call, after a role's first (example LLM team)",
        "bytes/call",
        higher_is_better=False,
        baseline_name="raw JSON of request messages + answer",
        target=0.25,
        note="record + parts it added (before the server's s2 compression) against the "
        "request's messages and the answer as JSON",
    )
    from rolebus.bus import Bus

    team = load_team(ROLES)
    settings = Settings(nats_url=url)
    stored: list[int] = []
    raw: list[int] = []
    firsts: list[int] = []
    with serve_llm() as server:
        previous = os.environ.get("OPENAI_BASE_URL")
        os.environ["OPENAI_BASE_URL"] = server.url
        crew = await start_workers(settings, team, list(team), supervise=False)
        bus = await Bus.connect(settings)
        done: asyncio.Queue[StoredMessage] = asyncio.Queue()
        try:
            watch = await bus.connection.watch("event.task.completed.>", done.put)
            await bus.connection.flush()
            for role in team:
                for number in range(per_role):
                    before = {
                        **await _values(bus, CALLS_BUCKET),
                        **await _values(bus, PARTS_BUCKET),
                    }
                    asked = len(server.requests)
                    await bus.publish_task(
                        f"task.{role.domains[0]}.x", title=f"storage {role.id} {number}"
                    )
                    await asyncio.wait_for(done.get(), 30)
                    after = {
                        **await _values(bus, CALLS_BUCKET),
                        **await _values(bus, PARTS_BUCKET),
                    }
                    gained = sum(len(v) for k, v in after.items() if before.get(k) != v)
                    requests = server.requests[asked:]
                    answers = [
                        json.loads(v)["answer"]
                        for k, v in after.items()
                        if k not in before and k.count(".") == 3 and k.startswith(role.id)
                    ]
                    size = sum(len(json.dumps(r.body["messages"])) for r in requests)
                    size += sum(len(a) if isinstance(a, str) else 0 for a in answers)
                    size += sum(_part_size(a) for a in answers)
                    (firsts if number == 0 else stored).append(gained)
                    if number:
                        raw.append(size)
            await watch.close()
        finally:
            await bus.close()
            await crew.stop(grace=0)
            if previous is None:
                os.environ.pop("OPENAI_BASE_URL", None)
            else:
                os.environ["OPENAI_BASE_URL"] = previous
    metric.rolebus.append(sum(stored) / len(stored))
    metric.baseline.append(sum(raw) / len(raw))
    return {"calls_storage": {"first_call_bytes": sum(firsts) / len(firsts), "calls": len(stored)}}


def _part_size(answer: Any) -> int:
    return int(answer.get("bytes", 0)) if isinstance(answer, dict) else 0
