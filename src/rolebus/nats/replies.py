"""Requests whose answers come back on one wildcard subscription, without a timer each.

Why not nats-py's ``request``: every task's record is one request, and that path
spends more per call than the rest of a task's bookkeeping: a task and a timer
per call (``asyncio.wait_for``), random bytes from the OS for each reply token.
Here a reply token is a counter, and one sweep a tenth of a second fails the
requests whose time is up, so a timeout is late by at most that much.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["Replies"]

#: How often the requests past their deadline are failed (seconds).
SWEEP = 0.1
#: The status of a reply that says nobody listens on the subject (no stream).
_NO_RESPONDERS = "503"


class Replies:
    """One connection's requests; answers on ``<inbox prefix>.<random>.<counter>``
    (under the connection's inbox prefix, the only one a role's user may listen on)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._prefix = ""
        self._tokens = itertools.count(1)
        #: token -> (the request's future, when it gives up: monotonic seconds)
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._ready: asyncio.Future[None] | None = None  # the subscription, made once
        self._sweeper: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._subscribe())
        try:
            await self._ready
        except BaseException:
            self._ready = None  # the next request tries again
            raise

    async def _subscribe(self) -> None:
        prefix = self._client.new_inbox()
        await self._client.subscribe(f"{prefix}.*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep(), name="rolebus replies sweep")
        self._prefix = prefix

    async def send(
        self, subject: str, data: bytes, *, headers: dict[str, str], timeout: float
    ) -> asyncio.Future[Msg]:
        """Send a request now; its answer later, from the returned future, which
        fails with ``nats.errors.TimeoutError`` once ``timeout`` has passed (or with
        ``NoRespondersError`` when no stream stores ``subject``)."""
        if not self._prefix:
            await self._start()
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + timeout)
        try:
            await self._client.publish(
                subject, data, reply=f"{self._prefix}.{token}", headers=headers
            )
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return future

    async def request(
        self, subject: str, data: bytes, *, headers: dict[str, str], timeout: float
    ) -> Msg:
        return await (await self.send(subject, data, headers=headers, timeout=timeout))

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        entry = self._waiting.pop(token, None)
        if entry is None or entry[0].done():
            return  # answered after its time was up (or cancelled)
        headers = msg.headers
        if headers and headers.get("Status") == _NO_RESPONDERS and not msg.data:
            entry[0].set_exception(nats.errors.NoRespondersError())
        else:
            entry[0].set_result(msg)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            late = [token for token, (_, deadline) in self._waiting.items() if deadline <= now]
            for token in late:
                future, _ = self._waiting.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
                future.exception()  # nobody may be waiting on it any more
        self._waiting.clear()
