"""Rate limits every worker of every role on every machine shares (KV), per model.

``rpm`` and ``tpm`` (requests and tokens a minute) are kept by spacing, not bursts: each
call takes the next free slot after the last one given out (a compare-and-set on the
model's entry), so no minute ever sees more than the limit, however many replicas run.
A 429 from the server moves every worker's next slot past its ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
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

    async def acquire(self, tokens: int) -> float:
        """Wait for this call's slot; the seconds waited."""
        spacing = 0.0  # without limits of its own, a 429's pause still holds
        if self._rpm:
            spacing = max(spacing, 60.0 / self._rpm)
        if self._tpm:
            spacing = max(spacing, 60.0 * tokens / self._tpm)
        waited = 0.0
        while True:
            paused = 0.0
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
        while True:
            found = await self._connection.kv.get(LIMITS_BUCKET, self._key)
            value, revision = (json.loads(found[0]), found[1]) if found and found[0] else ({}, 0)
            data = json.dumps(change(value)).encode()
            if revision == 0:
                written = await self._connection.kv.create(LIMITS_BUCKET, self._key, data)
            else:
                written = await self._connection.kv.update(LIMITS_BUCKET, self._key, data, revision)
            if written is not None:
                return
