"""Rate limits every worker of every role on every machine shares (KV), per model.

``rpm`` and ``tpm`` (requests and tokens a minute) are kept by spacing, not bursts: each
call takes the next free slot after the last one given out (a compare-and-set on the
model's entry), so no minute ever sees more than the limit, however many replicas run.
A 429 from the server moves every worker's next slot past its ``Retry-After``.

When calls wait, the worker gives its next slot to its most urgent one (escalations and
decisions first, then by task priority), not to the one that asked first: a process
takes one slot at a time, so background work queued behind urgent work waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import json
import time
from typing import Any

from rolebus.nats.connection import Connection
from rolebus.wire.subjects import LIMITS_BUCKET

__all__ = ["RateLimiter"]


class RateLimiter:
    """One model's shared limits (the worker's :class:`~rolebus.handlers.base.RateGate`)."""

    def __init__(
        self,
        connection: Connection,
        *,
        model: str,
        base_url: str | None,
        rpm: int | None,
        tpm: int | None,
    ) -> None:
        self._connection = connection
        self._rpm = rpm
        self._tpm = tpm
        where = f"{base_url or 'default'}|{model}".encode()
        self._key = hashlib.sha256(where).hexdigest()[:32]
        self._waiting: list[tuple[int, int, int, asyncio.Future[float]]] = []
        self._order = itertools.count()
        self._pump: asyncio.Task[None] | None = None

    async def acquire(self, tokens: int, priority: int = 0) -> float:
        """Wait for this call's slot (the most urgent waiting call goes first); the
        seconds waited."""
        started = time.monotonic()
        granted: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._order), tokens, granted))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._give_out(), name="rate limit")
        try:
            await granted
        except asyncio.CancelledError:
            if not granted.done():
                granted.cancel()
            raise
        return time.monotonic() - started

    async def _give_out(self) -> None:
        """Hand out slots one at a time, to the most urgent waiter each time."""
        while self._waiting:
            _, _, tokens, granted = heapq.heappop(self._waiting)
            if granted.done():  # given up (cancelled) meanwhile
                continue
            try:
                await self._wait_for_slot(tokens)
            except BaseException as error:
                if not granted.done():
                    granted.set_exception(error)
                raise
            if not granted.done():
                granted.set_result(0.0)

    async def _wait_for_slot(self, tokens: int) -> float:
        spacing = 0.0  # without limits of its own, a 429's pause still holds
        if self._rpm:
            spacing = max(spacing, 60.0 / self._rpm)
        if self._tpm:
            spacing = max(spacing, 60.0 * tokens / self._tpm)
        waited = 0.0
        while True:
            if spacing:
                at = await self._take(spacing)
                wait = max(0.0, at - time.time())
                if wait:
                    await asyncio.sleep(wait)
                    waited += wait
            # Slots are handed out ahead of time: one taken before a 429 came must
            # still wait out the pause (then take a fresh one).
            paused = await self._paused_until()
            if paused <= time.time():
                return waited
            pause = paused - time.time()
            await asyncio.sleep(pause)
            waited += pause

    async def slow_down(self, seconds: float) -> None:
        """The server said wait (429 + Retry-After): nobody calls before then."""
        until = time.time() + seconds

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            value["next_at"] = max(float(value.get("next_at", 0.0)), until)
            value["paused_until"] = max(float(value.get("paused_until", 0.0)), until)
            return value

        await self._change(apply)

    async def _paused_until(self) -> float:
        found = await self._connection.kv.get(LIMITS_BUCKET, self._key)
        if found is None or not found[0]:
            return 0.0
        return float(json.loads(found[0]).get("paused_until", 0.0))

    async def _take(self, spacing: float) -> float:
        """The next free slot, and move it on by ``spacing``."""
        taken: list[float] = []

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            slot = max(time.time(), float(value.get("next_at", 0.0)))
            taken[:] = [slot]
            value["next_at"] = slot + spacing
            return value

        await self._change(apply)
        return taken[0]

    async def _change(self, change: Any) -> None:
        await self._connection.kv.change_json(LIMITS_BUCKET, self._key, change)
