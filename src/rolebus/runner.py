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

import structlog

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.handlers import Handler
from rolebus.roles import RoleSpec, Team
from rolebus.worker import Worker

__all__ = ["Team", "start_workers", "stop_on_signals", "stop_workers"]

log = structlog.get_logger("rolebus.runner")


async def start_workers(
    settings: Settings,
    team: Team,
    roles: Iterable[RoleSpec],
    *,
    replicas: int = 1,
    grace: float = 30.0,
    handlers: dict[str, Handler] | None = None,
) -> list[Worker]:
    """Connect and start ``replicas`` workers for each role; stop them all if one fails."""
    workers: list[Worker] = []
    try:
        for role in roles:
            for replica in range(1, replicas + 1):
                bus = await Bus.connect(settings, name=f"rolebus-worker-{role.id}-{replica}")
                handler = (handlers or {}).get(role.id)
                worker = Worker(bus, role, team, handler=handler, grace=grace, replica=replica)
                workers.append(worker)
                await worker.start()
    except BaseException:
        await stop_workers(workers, grace=0)
        raise
    return workers


async def stop_workers(workers: list[Worker], *, grace: float | None = None) -> None:
    """Stop all workers together (each finishes or naks its in-flight work), then
    close their connections."""
    await asyncio.gather(*(worker.stop(grace) for worker in workers), return_exceptions=True)
    for worker in workers:
        await worker.bus.close()


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
