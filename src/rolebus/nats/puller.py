"""The one pull loop: a callback-driven pull consumer with bounded credit.

Workers, the supervisor and stream reads (replay, KV scans) all pull through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import nats.errors
import structlog
from nats.aio.msg import Msg

from rolebus.nats.delivery import InboundMessage, Subscription
from rolebus.nats.protocol import Status, consumer_next_subject
from rolebus.wire.headers import Header

__all__ = ["CoreNats", "Puller"]

log = structlog.get_logger("rolebus.nats")


class CoreNats(Protocol):
    """What the pull loop needs of a connection: core publish and subscribe."""

    def new_inbox(self) -> str: ...

    async def publish_core(self, subject: str, data: bytes, *, reply: str = "") -> None: ...

    async def request_core(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Msg: ...

    async def subscribe_core(
        self, subject: str, callback: Callable[[Msg], Awaitable[None]]
    ) -> Subscription: ...

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None: ...

    def off_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None: ...


class Puller:
    """A callback-driven pull consumer with bounded credit.

    It asks ``$JS.API.CONSUMER.MSG.NEXT`` for at most ``capacity`` messages that
    are not yet finished (requested + delivered - released), and asks for more
    once half the credit is free: messages arrive the moment they exist, without
    a ``fetch()`` round trip per batch, and never pile up beyond ``capacity``.
    ``deliver`` is called for each message (it must not block); the worker calls
    :meth:`release` when it is done with one.
    """

    def __init__(
        self,
        connection: CoreNats,
        stream: str,
        consumer: str,
        *,
        capacity: int,
        deliver: Callable[[InboundMessage], None],
        on_consumer_lost: Callable[[], Awaitable[None]] | None,
        expires: float,
    ) -> None:
        self._connection = connection
        self._subject = consumer_next_subject(stream, consumer)
        self._capacity = max(1, capacity)
        self._deliver = deliver
        self._on_consumer_lost = on_consumer_lost
        self._expires = expires
        self._requested = 0  # asked for, not yet arrived
        self._held = 0  # arrived, not yet released
        self._last_activity = time.monotonic()
        self._inbox = connection.new_inbox()
        self._subscription: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False
        self._pulling = asyncio.Lock()
        self._next_pull: asyncio.Future[None] | None = None
        self._retry: asyncio.Future[None] | None = None

    @property
    def held(self) -> int:
        return self._held

    @property
    def last_activity(self) -> float:
        """When a message or a status (heartbeats included) last came (monotonic)."""
        return self._last_activity

    async def start(self) -> None:
        self._subscription = await self._connection.subscribe_core(self._inbox, self._on_message)
        self._connection.on_reconnect(self._restart)
        self._watchdog = asyncio.create_task(self._watch(), name=f"watch {self._subject}")
        await self._pull()

    async def stop(self) -> None:
        """Stop asking for messages. Already requested ones may still arrive and are
        delivered (the worker naks what it will not handle)."""
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def close(self) -> None:
        await self.stop()
        self._connection.off_reconnect(self._restart)
        if self._subscription is not None:
            await self._subscription.close()

    def release(self) -> None:
        self._held -= 1
        free = self._capacity - self._requested - self._held
        if not self._stopped and free >= max(1, self._capacity // 2) and not self._pulling.locked():
            self._next_pull = asyncio.ensure_future(self._pull())

    async def _pull(self) -> None:
        async with self._pulling:
            free = self._capacity - self._requested - self._held
            if self._stopped or free < max(1, self._capacity // 2):
                return
            request = {
                "batch": free,
                "expires": int(self._expires * 1e9),
                "idle_heartbeat": int(self._expires / 2 * 1e9),
            }
            self._requested += free
            try:
                await self._connection.publish_core(
                    self._subject, json.dumps(request).encode(), reply=self._inbox
                )
            except nats.errors.Error as error:
                # Disconnected: the reconnect hook (or the watchdog) asks again.
                self._requested -= free
                log.debug("pull request not sent", subject=self._subject, error=str(error))

    async def _on_message(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        headers = msg.headers
        status = headers.get(Header.STATUS) if headers else None
        if status is None:
            self._requested = max(0, self._requested - 1)
            self._held += 1
            self._deliver(InboundMessage(msg))
            return
        if status == Status.IDLE_HEARTBEAT:
            return
        # 408 request expired, 409 terminated (leader change, max ack pending,
        # consumer deleted...): the rest of that request will never come.
        pending = headers.get(Header.PENDING_MESSAGES) if headers else None
        self._requested = max(0, self._requested - int(pending)) if pending else 0
        description = (headers or {}).get(Header.DESCRIPTION, "")
        if (
            status == Status.CONFLICT
            and "deleted" in description.lower()
            and self._on_consumer_lost
        ):
            log.warning("consumer deleted; re-creating it", subject=self._subject)
            await self._on_consumer_lost()
        elif status == Status.NO_RESPONDERS:
            # No consumer leader right now (an election, a node down): asking again
            # at once would spin; ask again shortly.
            if self._retry is None or self._retry.done():
                self._retry = asyncio.ensure_future(self._pull_after(0.5))
            return
        elif status not in (Status.REQUEST_TIMEOUT, Status.NOT_FOUND):
            log.debug("pull status", status=status, description=description)
        await self._pull()

    async def _pull_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._requested = 0
        await self._pull()

    async def _restart(self) -> None:
        # A reconnect loses every open pull request on the server side.
        self._requested = 0
        await self._pull()

    async def _watch(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._expires / 2)
            silent = time.monotonic() - self._last_activity
            if silent > self._expires * 2:
                # Neither messages nor heartbeats: the request died with a server.
                self._requested = 0
                self._last_activity = time.monotonic()
                await self._pull()
