"""The one drain loop: messages a puller delivered, run by a fixed number of slots.

The puller's ``deliver`` callback must not block, so it only queues; each slot takes
the next queued message and runs it to the end before taking another. The worker
runs ``concurrency`` slots, the supervisor one (timers in order).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from rolebus.nats.delivery import InboundMessage

__all__ = ["Slots"]


class Slots:
    """``count`` tasks that each run ``run(message)`` for one queued message at a time."""

    def __init__(
        self, name: str, count: int, run: Callable[[InboundMessage], Awaitable[None]]
    ) -> None:
        self._name = name
        self._count = count
        self._run = run
        self._queue: deque[InboundMessage] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"{self._name} slot {index}")
            for index in range(self._count)
        ]

    def put(self, message: InboundMessage) -> None:
        """Queue a message (never blocks: a puller's ``deliver`` callback)."""
        self._queue.append(message)
        self._ready.set()

    def close(self) -> list[InboundMessage]:
        """Take no more: idle slots end, running ones finish their message. The
        messages still queued are returned, for the caller to give back."""
        self._closed = True
        queued = list(self._queue)
        self._queue.clear()
        self._ready.set()
        return queued

    async def cancel(self, wait: float = 5.0) -> None:
        """Stop every slot now, running or not. A slot gets ``wait`` seconds to end:
        one stuck in its handler's cleanup must not hold the worker's stop."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # asyncio.wait, not wait_for: on a timeout wait_for waits for the task anyway.
            await asyncio.wait(self._tasks, timeout=wait)

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
                if self._closed:
                    return
            await self._run(self._queue.popleft())
