"""Run role workers in this process until asked to stop (SIGINT/SIGTERM).

Each worker replica gets its own connection, as separate processes would, so
replicas of one role share its durable consumer exactly like a scaled-out
deployment does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.handlers.base import Handler
from rolebus.team.auth import inbox_prefix
from rolebus.team.roles import RoleSpec, Team
from rolebus.worker.loop import Worker, consumer_spec_for
from rolebus.worker.supervisor import SUPERVISOR_SPEC, Supervisor

__all__ = ["Crew", "provision_team", "start_workers", "stop_on_signals"]

log = structlog.get_logger("rolebus.worker.runner")


@dataclass
class Crew:
    """Workers running in this process, and the process's escalation supervisor."""

    workers: list[Worker] = field(default_factory=list)
    supervisor: Supervisor | None = None

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop every worker together (each finishes or naks its in-flight work),
        then the supervisor, then close the connections."""
        if self.supervisor is not None:
            await self.supervisor.stop()
        await asyncio.gather(
            *(worker.stop(grace) for worker in self.workers), return_exceptions=True
        )
        for worker in self.workers:
            await worker.bus.close()


async def start_workers(
    settings: Settings | Callable[[RoleSpec], Settings],
    team: Team,
    roles: Iterable[RoleSpec],
    *,
    replicas: int = 1,
    grace: float = 30.0,
    handlers: dict[str, Handler] | None = None,
    supervise: bool = True,
) -> Crew:
    """Connect and start ``replicas`` workers for each role (and a supervisor for
    escalation timeouts); stop them all if one fails to start. ``settings`` may be
    per role (each worker on its own role's user)."""
    crew = Crew()
    try:
        for role in roles:
            connect = settings(role) if callable(settings) else settings
            for replica in range(1, replicas + 1):
                bus = await Bus.connect(
                    connect,
                    name=f"rolebus-worker-{role.id}-{replica}",
                    provision=not (connect.user or connect.creds_file or connect.nkey_seed_file),
                    inbox_prefix=inbox_prefix(role.id),
                )
                handler = (handlers or {}).get(role.id)
                worker = Worker(bus, role, team, handler=handler, grace=grace, replica=replica)
                crew.workers.append(worker)
                await worker.start()
        if supervise and crew.workers:
            first = crew.workers[0]
            crew.supervisor = Supervisor(first.bus.connection, team, writer=first.role.id)
            await crew.supervisor.start()
    except BaseException:
        await crew.stop(grace=0)
        raise
    return crew


async def provision_team(bus: Bus, team: Team) -> None:
    """Create every role's consumer and the supervisor's (what an admin runs once,
    so that least-privilege worker users never need to create consumers)."""
    for role in team:
        await bus.connection.admin.ensure_consumer(consumer_spec_for(role))
    await bus.connection.admin.ensure_consumer(SUPERVISOR_SPEC)


def stop_on_signals(stop: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """Set ``stop`` on SIGINT or SIGTERM; returns a function restoring the defaults."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def restore() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)

    return restore
