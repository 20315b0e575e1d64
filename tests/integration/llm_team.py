"""Helpers for LLM-role tests: a small team whose eng-be thinks (an llm handler)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats

from rolebus.bus import Bus
from rolebus.flows.state import StateStore
from rolebus.history.replay import read_events
from rolebus.team.roles import Team, load_team
from rolebus.testing import wait_for
from rolebus.wire.messages import Event
from rolebus.wire.subjects import CALLS_BUCKET
from rolebus.worker.runner import Crew

T = TypeVar("T")

KEY = "sk-test-0123456789-secret"
ENV = "ROLEBUS_TEST_LLM_KEY"

PERSONA = "You are the backend engineer. Reliability obsessed."


def write_llm_team(
    folder: Path,
    url: str,
    *,
    timeout: str = "5s",
    extra: str = "",
    budget: str = "",
    concurrency: int = 4,
    model: str = "test-model",
    max_repairs: int = 1,
    more: str = "",
) -> Team:
    """eng-be thinks (an llm handler); the others are scripted."""
    folder.mkdir(parents=True, exist_ok=True)
    scripted = '"builtin:scripted"'
    llm = (
        f'{{ llm = "{model}", base_url = "{url}", api_key_env = "{ENV}", '
        f'temperature = 0.2, timeout = "{timeout}", max_repairs = {max_repairs}{extra} }}'
    )
    roles = {
        "cto": (scripted, 'domains = ["budget"]', ""),
        "architect": (scripted, 'domains = ["architecture"]\nreports_to = "cto"', ""),
        "eng-be": (
            llm,
            'domains = ["backend"]\nreports_to = "cto"',
            """
[[never]]
what = "spend money without the CTO's approval"
kinds = ["spend"]
action = "approval"
to = "cto"

[[escalate]]
reason = "ambiguous-spec"
to = "architect"
timeout = "1h"
"""
            + (f"\n[budget]\n{budget}\n" if budget else "")
            + more,
        ),
        "eng-fe": (scripted, 'domains = ["frontend"]\nreports_to = "cto"', ""),
    }
    for role_id, (handler, head, tail) in roles.items():
        persona = PERSONA if role_id == "eng-be" else f"Persona of {role_id}."
        (folder / f"{role_id}.md").write_text(
            f'+++\nid = "{role_id}"\ntitle = "{role_id} title"\nhandler = {handler}\n'
            f'ack_wait = "5s"\nmax_deliver = 3\nbackoff = ["100ms"]\nconcurrency = {concurrency}\n'
            f"{head}\n{tail}\n+++\n"
            f"{persona}\n",
            encoding="utf-8",
        )
    return load_team(folder)


StartTeam = Callable[..., Awaitable[tuple[Team, Crew]]]


async def state_of(bus: Bus, task_id: str) -> str | None:
    found = await StateStore(bus.connection).get(task_id)
    return None if found is None else found.state.state


async def until(bus: Bus, task_id: str, state: str, timeout: float = 30) -> None:
    async def reached() -> bool:
        return await state_of(bus, task_id) == state

    await wait_for(reached, timeout=timeout)


async def event_of(bus: Bus, task_id: str, state: str, timeout: float = 20) -> Event:
    """The first ``state`` event of ``task_id``, once there is one."""

    async def found() -> list[Event]:
        events = await read_events(bus.connection, states=[state])
        return [event for event in events if event.task_id == task_id]

    async def there() -> bool:
        return bool(await found())

    await wait_for(there, timeout=timeout)
    return (await found())[0]


class WorkerProcess:
    """`rolebus worker ROLE` in a process of its own, as a user runs it, against the
    team in ``roles``: started, killed, started again."""

    def __init__(self, nats_url: str, roles: Path, home: Path, **env: str) -> None:
        self.nats_url = nats_url
        self.env = {
            **os.environ,
            "NATS_URL": nats_url,
            "ROLEBUS_ROLES": str(roles),
            "ROLEBUS_HOME": str(home),
            ENV: KEY,
            **env,
        }
        self.cwd = home.parent
        self.rolebus = str(Path(sys.executable).parent / "rolebus")

    def start(self, role: str = "eng-be") -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.rolebus, "worker", role], env=self.env, cwd=self.cwd, stderr=subprocess.DEVNULL
        )

    async def killed_once_recorded(
        self, publish: Callable[[], Awaitable[T]], *, key_part: str = "", timeout: float = 60
    ) -> T:
        """Start a worker, ``publish``, and SIGKILL the worker the moment a call record
        whose key holds ``key_part`` is written (before the ack); what ``publish`` gave."""
        client = await nats.connect(self.nats_url)
        recorded = asyncio.Event()

        async def on_record(message: Any) -> None:
            if key_part in message.subject:
                recorded.set()

        await client.subscribe(f"$KV.{CALLS_BUCKET}.>", cb=on_record)
        worker = self.start()
        try:
            published = await publish()
            await asyncio.wait_for(recorded.wait(), timeout=timeout)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
            await client.close()
        return published

    async def until(self, bus: Bus, task_id: str, states: set[str], timeout: float = 60) -> str:
        """Start a worker, wait until the task is in one of ``states``, stop it."""
        worker = self.start()
        try:

            async def settled() -> bool:
                return await state_of(bus, task_id) in states

            await wait_for(settled, timeout=timeout)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        return str(await state_of(bus, task_id))
