"""One connection to NATS: connecting, errors, core publish/subscribe, and the parts.

The only package that imports ``nats`` is :mod:`rolebus.nats`; domain code sees
:class:`Connection`, the types of :mod:`rolebus.nats.delivery` and rolebus errors.
nats-py's types and exceptions stop here (translated at the boundary, ``raise ...
from``). The connection is composed of one object per concern::

    connection.publish(...)          # publishing (rolebus.nats.publish)
    connection.kv.get(...)           # key/value buckets (rolebus.nats.kv)
    connection.streams.read(...)     # reading streams back (rolebus.nats.streams)
    connection.admin.provision(...)  # streams, buckets, consumers (rolebus.nats.admin)
    connection.puller(...)           # the pull loop (rolebus.nats.puller)
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from rolebus.config import Settings
from rolebus.errors import ConnectError
from rolebus.nats.admin import Admin
from rolebus.nats.delivery import InboundMessage, StoredMessage, Subscription
from rolebus.nats.groupcommit import GroupCommitStats
from rolebus.nats.kv import KeyValue
from rolebus.nats.lean import LeanClient
from rolebus.nats.protocol import PubAck
from rolebus.nats.publish import Item, PendingPublish, Publisher, writer_key
from rolebus.nats.puller import Puller
from rolebus.nats.streams import StreamReader
from rolebus.nats.translate import Denials

__all__ = ["Connection"]

log = structlog.get_logger("rolebus.nats")

_PING_INTERVAL = 3  # seconds: nats-py's default (120 s x 2) hides a frozen server for minutes
_MAX_OUTSTANDING_PINGS = 2
_WARN_EVERY = 10.0  # seconds between two identical connection warnings


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def _secret(settings: Settings) -> bytes | None:
    """What this client authenticates with (its Msg-Ids are signed with a key made
    from it); None on an open server."""
    for path in (settings.creds_file, settings.nkey_seed_file):
        if path is not None:
            with contextlib.suppress(OSError):
                return path.read_bytes()
    return settings.password.encode() if settings.password else None


class Connection:
    """One connection to NATS and its JetStream context. Open with :meth:`open`."""

    def __init__(self, client: Client, url: str) -> None:
        self._client = client
        # JetStream API calls time out after 3 s: a permission denial only shows as
        # a timeout (plus an async error), so this is how long it takes to report.
        self._js: JetStreamContext = client.jetstream(timeout=3.0)
        self.url = url
        self._denials = Denials()
        self._reconnect_listeners: list[Callable[[], Awaitable[None]]] = []
        self._closing = False
        self.publisher = Publisher(client, self._denials)
        self.streams = StreamReader(self, self._js, self._denials)
        self.kv = KeyValue(self._js, self.streams, self._denials)
        self.admin = Admin(self._js, self._denials, url)
        #: Where the server may have moved to (the embedded server's state file):
        #: read again while disconnected. None: the URL is fixed (NATS_URL).
        self._url_source: Callable[[], str | None] | None = None
        self._follow: asyncio.Task[None] | None = None
        self._warned: dict[str, float] = {}  # warning text -> when it was last logged

    # --- connecting ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        settings: Settings,
        url: str,
        *,
        name: str = "rolebus",
        inbox_prefix: str | None = None,
        connect_timeout: float = 3.0,
        url_source: Callable[[], str | None] | None = None,
    ) -> Connection:
        """Connect, or raise :class:`ConnectError` saying what to do. ``url_source``
        says where the server is now (an embedded server restarted on another port):
        while disconnected, the connection follows it."""
        connection: Connection | None = None
        connect_errors: list[str] = []

        # These run inside nats-py's read loop: an exception escaping them would
        # stop the loop (and with it reconnection), so none may escape.
        async def on_error(error: Exception) -> None:
            with contextlib.suppress(Exception):
                if connection is not None:
                    connection._on_error(error)
                else:  # still connecting: nats-py reports "no servers" and hides why
                    connect_errors.append(str(error))

        async def on_reconnected() -> None:
            if connection is None:
                return
            with contextlib.suppress(Exception):
                log.info("reconnected", url=str(connection._client.connected_url))
            for listener in list(connection._reconnect_listeners):
                try:
                    await listener()
                except Exception as error:
                    with contextlib.suppress(Exception):
                        log.warning("reconnect listener failed", error=repr(error))

        async def on_disconnected() -> None:
            with contextlib.suppress(Exception):
                if connection is not None and not connection._closing:
                    connection._warn("disconnected from NATS; reconnecting", url=url)
                    connection._follow_moves()

        options: dict[str, Any] = {
            "servers": url.split(","),
            "name": name,
            "error_cb": on_error,
            "reconnected_cb": on_reconnected,
            "disconnected_cb": on_disconnected,
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "ping_interval": _PING_INTERVAL,
            "max_outstanding_pings": _MAX_OUTSTANDING_PINGS,
            "tls": _ssl_context(settings),
            "user": settings.user,
            "password": settings.password,
            "user_credentials": str(settings.creds_file) if settings.creds_file else None,
            "nkeys_seed": str(settings.nkey_seed_file) if settings.nkey_seed_file else None,
        }
        if inbox_prefix is not None:
            options["inbox_prefix"] = inbox_prefix
        client = LeanClient()
        try:
            # nats-py retries the initial connect forever when reconnects are unlimited
            # (only for the first server in some versions): bound it ourselves.
            await asyncio.wait_for(
                client.connect(**{**options, "max_reconnect_attempts": 1}),
                timeout=connect_timeout * 2 + 2,
            )
        except (TimeoutError, OSError, nats.errors.Error) as error:
            with contextlib.suppress(Exception):
                await client.close()
            # The server's reason (say, an authorization violation) is among the errors
            # seen while connecting; nats-py's own exception only says "no servers".
            reasons = [text for text in connect_errors if "authoriz" in text.lower()]
            text = "; ".join([*reasons[:1], str(error) or type(error).__name__])
            if "authorization" in text.lower() or "authentication" in text.lower():
                raise ConnectError(
                    f"the NATS server at {url} refused our credentials: {text}",
                    hint="check NATS_USER/NATS_PASSWORD, NATS_CREDS or NATS_NKEY "
                    "(or --creds) for this server",
                ) from error
            raise ConnectError(
                f"no NATS server reachable at {url} ({text})",
                hint="start one with `rolebus server` in another terminal, or point "
                "NATS_URL at a running server",
            ) from error
        # Reconnects after a successful start are unlimited: a worker outlives restarts.
        client.options["max_reconnect_attempts"] = -1
        connection = cls(client, url)
        connection._url_source = url_source
        connection.publisher.id_key = writer_key(_secret(settings))
        return connection

    def _warn(self, message: str, **fields: Any) -> None:
        """Log a warning, but the same one at most every 10 s: a server that stays
        away must not flood the log with one line per reconnect attempt."""
        now = time.monotonic()
        if now - self._warned.get(message, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[message] = now
            log.warning(message, **fields)

    def _follow_moves(self) -> None:
        if self._url_source is None or (self._follow is not None and not self._follow.done()):
            return
        self._follow = asyncio.ensure_future(self._follow_url())

    async def _follow_url(self) -> None:
        """While disconnected, point the reconnects at where the server is now."""
        assert self._url_source is not None
        current = self.url
        while not self._closing and not self._client.is_connected:
            moved = await asyncio.to_thread(self._url_source)
            if moved and moved != current and not self._client.is_closed:
                log.info("the server moved; reconnecting there", was=current, now=moved)
                self._client.set_server_pool([moved])
                current = self.url = moved
            await asyncio.sleep(0.5)

    def _on_error(self, error: Exception) -> None:
        text = str(error)
        # Denials reach only this callback; remember them so the operation that
        # timed out can say why (Denials.explain_timeout).
        subject = self._denials.record(text)
        if subject is not None:
            log.error("permission denied", subject=subject, detail=text)
        elif not isinstance(error, nats.errors.SlowConsumerError):
            self._warn("nats error", error=text or type(error).__name__)

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._reconnect_listeners.append(listener)

    def off_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(ValueError):
            self._reconnect_listeners.remove(listener)

    @property
    def max_payload(self) -> int:
        return int(self._client.max_payload)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected)

    @property
    def group_commit(self) -> GroupCommitStats:
        """How this connection's bulk publishes were stored (batches, their messages, refusals)."""
        return self.publisher.group_commit

    def new_inbox(self) -> str:
        return str(self._client.new_inbox())

    async def close(self) -> None:
        self._closing = True
        if self._follow is not None:
            self._follow.cancel()
        await self.publisher.close()
        with contextlib.suppress(Exception):
            await self._client.drain()
        with contextlib.suppress(Exception):
            await self._client.close()

    async def flush(self, timeout: float = 5.0) -> None:
        await self._client.flush(timeout=int(max(1, timeout)))

    # --- publishing (see rolebus.nats.publish) ---------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 3.0,
        give_up_after: float = 30.0,
    ) -> PubAck:
        """Publish to JetStream and wait for its ack, retrying with the same Msg-Id."""
        return await self.publisher.publish(
            subject,
            data,
            msg_id=msg_id,
            headers=headers,
            timeout=timeout,
            give_up_after=give_up_after,
        )

    async def append(
        self, subject: str, data: bytes, *, msg_id: str, last_seq: int, on: str, batch: bool = False
    ) -> PubAck | None:
        """Compare-and-set append (see :meth:`Publisher.append`)."""
        return await self.publisher.append(
            subject, data, msg_id=msg_id, last_seq=last_seq, on=on, batch=batch
        )

    async def publish_start(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> PendingPublish:
        """Send now, wait for the ack later (``await pending.result()``)."""
        return await self.publisher.start(subject, data, msg_id=msg_id, headers=headers)

    def publish_batched(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> PendingPublish:
        """Like :meth:`publish_start`, through the stream's group commit."""
        return self.publisher.batched(subject, data, msg_id=msg_id, headers=headers)

    async def publish_many(self, items: list[Item], *, window: int = 1000) -> list[PubAck]:
        """Publish ``(subject, data, msg_id, headers)`` items as atomic batches."""
        return await self.publisher.many(items, window=window)

    # --- core NATS ---------------------------------------------------------------------

    async def publish_core(self, subject: str, data: bytes, *, reply: str = "") -> None:
        await self._client.publish(subject, data, reply=reply)

    async def request_core(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Msg:
        return await self._client.request(subject, data, timeout=timeout)

    async def subscribe_core(
        self, subject: str, callback: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """Low level: used by the pull loop and advisory listeners in this package."""
        subscription = await self._client.subscribe(
            subject, cb=callback, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        return Subscription(subscription)

    async def watch(
        self, subject: str, callback: Callable[[StoredMessage], Awaitable[None]]
    ) -> Subscription:
        """See messages on ``subject`` as they are published (core NATS, no replay,
        no acks): for live views. ``seq`` is 0; ``time`` is when it arrived."""

        async def on_message(msg: Msg) -> None:
            await callback(
                StoredMessage(
                    stream="",
                    seq=0,
                    subject=msg.subject,
                    time=datetime.now(UTC),
                    headers=msg.headers or {},
                    data=msg.data,
                )
            )

        return await self.subscribe_core(subject, on_message)

    # --- pulling (see rolebus.nats.puller) -----------------------------------------------

    def puller(
        self,
        stream: str,
        consumer: str,
        *,
        capacity: int,
        deliver: Callable[[InboundMessage], None],
        on_consumer_lost: Callable[[], Awaitable[None]] | None = None,
        expires: float = 5.0,
    ) -> Puller:
        return Puller(
            self,
            stream,
            consumer,
            capacity=capacity,
            deliver=deliver,
            on_consumer_lost=on_consumer_lost,
            expires=expires,
        )
