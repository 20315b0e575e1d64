"""The ``claimed`` note: "someone is on it", for the attempts people wait on.

Worth a write for a task still running after ``after`` seconds, not for the ones
done before anyone could look: a fast task is spared a fsynced write
(bench/README has what that buys); its record still records the attempt. One
sweep serves every running attempt: a timer per task would be a cost on the hot
path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from rolebus.nats.publish import PendingPublish

__all__ = ["ClaimedNotices"]

Publish = Callable[[], Awaitable[PendingPublish]]


class _Attempt:
    __slots__ = ("publish", "sent", "since")

    def __init__(self, publish: Publish, since: float) -> None:
        self.publish = publish
        self.since = since
        self.sent: asyncio.Task[PendingPublish] | None = None


class ClaimedNotices:
    """Publishes each running attempt's note once it has run ``after`` seconds
    (at once with ``after`` <= 0); :meth:`end` waits for it to be stored."""

    def __init__(self, after: float) -> None:
        self.after = after
        self._running: dict[object, _Attempt] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def begin(self, key: object, publish: Publish) -> None:
        attempt = self._running[key] = _Attempt(publish, time.monotonic())
        if self.after <= 0:
            attempt.sent = asyncio.ensure_future(publish())
        elif self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def end(self, key: object) -> None:
        attempt = self._running.pop(key, None)
        if attempt is not None and attempt.sent is not None:
            await (await attempt.sent).result()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        # Runs while attempts run: a note goes out between `after` and 1.5 x `after`.
        while self._running:
            await asyncio.sleep(self.after / 2)
            due = time.monotonic() - self.after
            for attempt in list(self._running.values()):
                if attempt.sent is None and attempt.since <= due:
                    attempt.sent = asyncio.ensure_future(attempt.publish())
