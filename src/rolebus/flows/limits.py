"""Rate limits every worker of every role on every machine shares (KV), per model.

``rpm`` and ``tpm`` (requests and tokens a minute) are kept by spacing, not bursts: each
call takes the next free slot after the last one given out (a compare-and-set on the
model's entry), so no minute ever sees more than the limit, however many replicas run.
A 429 from the server moves every worker's next slot past its ``Retry-After``.

When calls wait, the worker gives its next slot to its most urgent one (escalations and
decisions first, then by task priority), not to the one that asked first: a process
takes one slot at a time, so background work queued behind urgent work waits.

The entry is shared by every role that uses the model, so nothing in it is trusted
further than it must be: a pause is capped (``max_pause``), a wait re-reads the entry
every second (a cleared pause ends it), and an entry that cannot be read, or that
names a time absurdly far ahead, is replaced with a warning: a limiter never fails a
task.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import json
import time
from typing import Any

import structlog

from rolebus.nats.connection import Connection
from rolebus.wire.subjects import LIMITS_BUCKET

__all__ = ["MAX_PAUSE", "RateLimiter"]

log = structlog.get_logger("rolebus.flows.limits")

#: The longest a server's Retry-After may pause every worker (seconds), by default.
MAX_PAUSE = 60.0
#: How often a waiting call looks at the entry again (a cleared pause wakes it).
_LOOK_AGAIN = 1.0


def _time(value: dict[str, Any], key: str, *, horizon: float) -> float:
    """A time in the entry, or 0 when it is not a number or lies past ``horizon``
    (garbage, or a pause no server asked for): such a value is not obeyed."""
    try:
        moment = float(value.get(key, 0.0))
    except (TypeError, ValueError):
        moment = 0.0
    if moment != moment or moment > horizon:  # NaN, or absurdly far
        log.warning("the shared rate-limit entry holds an unusable time; ignored", key=key)
        return 0.0
    return moment


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
        max_pause: float = MAX_PAUSE,
    ) -> None:
        self._connection = connection
        self._max_pause = max_pause
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
                while (wait := at - time.time()) > 0:
                    await asyncio.sleep(min(wait, _LOOK_AGAIN))
                    waited += min(wait, _LOOK_AGAIN)
            # Slots are handed out ahead of time: one taken before a 429 came must
            # wait out the pause, then take a fresh one. The pause is looked at again
            # every second: a cleared pause ends it.
            paused = False
            while (pause := await self._paused_until() - time.time()) > 0:
                paused = True
                await asyncio.sleep(min(pause, _LOOK_AGAIN))
                waited += min(pause, _LOOK_AGAIN)
            if not paused:
                return waited

    async def slow_down(self, seconds: float) -> None:
        """The server said wait (429 + Retry-After): nobody calls before then (at
        most ``max_pause`` seconds from now, whatever the server said)."""
        until = time.time() + min(seconds, self._max_pause)

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            horizon = self._horizon()
            value["next_at"] = max(_time(value, "next_at", horizon=horizon), until)
            value["paused_until"] = max(_time(value, "paused_until", horizon=horizon), until)
            return value

        await self._change(apply)

    def _horizon(self) -> float:
        """The latest time an entry may name: a pause, or a queue of a day's calls."""
        return time.time() + max(self._max_pause, 86400.0)

    async def _paused_until(self) -> float:
        try:
            found = await self._connection.kv.get(LIMITS_BUCKET, self._key)
            value = json.loads(found[0]) if found is not None and found[0] else {}
        except ValueError:
            log.warning("the shared rate-limit entry cannot be read; ignored", key=self._key)
            return 0.0
        if not isinstance(value, dict):
            return 0.0
        return min(
            _time(value, "paused_until", horizon=self._horizon()), time.time() + self._max_pause
        )

    async def _take(self, spacing: float) -> float:
        """The next free slot, and move it on by ``spacing``."""
        taken: list[float] = []

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            slot = max(time.time(), _time(value, "next_at", horizon=self._horizon()))
            taken[:] = [slot]
            value["next_at"] = slot + spacing
            return value

        await self._change(apply)
        return taken[0]

    async def _change(self, change: Any) -> None:
        await self._connection.kv.change_json(
            LIMITS_BUCKET, self._key, change, replace_unreadable=True
        )
