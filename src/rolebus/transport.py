"""Everything that talks to NATS. The only module that imports ``nats``.

Domain code sees :class:`Connection`, :class:`InboundMessage`,
:class:`StoredMessage` and rolebus errors; nats-py's types and exceptions stop
here (translated at the boundary, ``raise ... from``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from rolebus.config import Settings
from rolebus.errors import (
    ConnectError,
    IncompatibleStreamError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StreamFullError,
    TransportError,
    UnavailableError,
)
from rolebus.groupcommit import GroupCommit, GroupCommitStats, Write
from rolebus.subjects import (
    BUCKETS,
    CONTENT_TYPE_MSGPACK,
    STREAMS,
    Header,
    StreamSpec,
    group_commit_stream,
)

__all__ = [
    "Connection",
    "ConsumerSpec",
    "InboundMessage",
    "KvChange",
    "PendingPublish",
    "PubAck",
    "Puller",
    "StoredMessage",
    "StreamLimits",
    "Subscription",
    "wait_all",
]

log = structlog.get_logger("rolebus.transport")

_API = "$JS.API"
_PING_INTERVAL = 3  # seconds: nats-py's default (120 s x 2) hides a frozen server for minutes
_MAX_OUTSTANDING_PINGS = 2
_DAY = 86400.0


@dataclass(frozen=True)
class PubAck:
    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, kw_only=True)
class StreamLimits:
    """How big streams may grow. Work streams refuse new messages when full."""

    replicas: int = 1
    work_max_bytes: int = 1 << 30
    work_max_msgs: int = -1
    max_age: float = 30 * _DAY
    events_max_bytes: int = 4 << 30


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    """A role's durable pull consumer."""

    stream: str
    name: str
    filter_subjects: tuple[str, ...]
    ack_wait: float
    max_deliver: int
    max_ack_pending: int


@dataclass(frozen=True, slots=True)
class KvChange:
    """One write to a KV bucket: ``value`` is None when the key was deleted."""

    seq: int
    key: str
    value: bytes | None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from a stream (replay, DLQ, direct get)."""

    stream: str
    seq: int
    subject: str
    time: datetime
    headers: Mapping[str, str]
    data: bytes


class InboundMessage:
    """A message delivered to a worker by a pull consumer, with its acks."""

    __slots__ = ("_msg", "delivered", "headers", "pending", "stream_seq", "subject", "time_ns")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.headers: Mapping[str, str] = msg.headers or {}
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>
        # (older servers) or with a domain and account hash prepended (newer ones):
        # the last six tokens have the same meaning in both.
        tokens = (msg.reply or "").split(".")
        self.delivered = int(tokens[-5])
        self.stream_seq = int(tokens[-4])
        self.time_ns = int(tokens[-2])
        self.pending = int(tokens[-1])

    @property
    def data(self) -> bytes:
        return self._msg.data

    async def ack(self) -> None:
        await self._msg.ack()

    async def ack_sync(self, timeout: float = 5.0) -> None:
        """Ack and wait for the server to confirm (for acks that must not be lost)."""
        await self._msg.ack_sync(timeout=timeout)

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()


class Subscription:
    """A core NATS subscription; ``close`` stops it."""

    def __init__(self, subscription: Any) -> None:
        self._subscription = subscription

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self._subscription.unsubscribe()


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


class Connection:
    """One connection to NATS and its JetStream context. Open with :meth:`open`."""

    def __init__(self, client: Client, url: str) -> None:
        self._client = client
        # JetStream API calls time out after 3 s: a permission denial only shows as
        # a timeout (plus an async error), so this is how long it takes to report.
        self._js: JetStreamContext = client.jetstream(timeout=3.0)
        self.url = url
        self._denials: dict[str, float] = {}  # subject -> when the server said no
        self._reconnect_listeners: list[Callable[[], Awaitable[None]]] = []
        self._closing = False
        self._buckets: dict[str, Any] = {}
        self._group_commit = GroupCommit(self._send_batch)

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
    ) -> Connection:
        """Connect, or raise :class:`ConnectError` saying what to do."""
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
                    log.warning("disconnected from NATS; reconnecting", url=url)

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
        client = Client()
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
        return connection

    def _on_error(self, error: Exception) -> None:
        text = str(error)
        if "permissions violation" in text.lower():
            # Denials reach only this callback; remember them so the operation that
            # timed out can say why (see _explain_timeout).
            # nats-py lowercases the server's message: compare subjects in lower case.
            subject = text.rsplit(" ", 1)[-1].strip("\"'").lower()
            self._denials[subject] = time.monotonic()
            log.error("permission denied", subject=subject, detail=text)
        elif not isinstance(error, nats.errors.SlowConsumerError):
            log.warning("nats error", error=text or type(error).__name__)

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._reconnect_listeners.append(listener)

    @property
    def max_payload(self) -> int:
        return int(self._client.max_payload)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected)

    @property
    def group_commit(self) -> GroupCommitStats:
        """How this connection's bulk publishes were stored (batches, their messages, refusals)."""
        return self._group_commit.stats

    def new_inbox(self) -> str:
        return str(self._client.new_inbox())

    async def close(self) -> None:
        self._closing = True
        await self._group_commit.close()
        with contextlib.suppress(Exception):
            await self._client.drain()
        with contextlib.suppress(Exception):
            await self._client.close()

    async def flush(self, timeout: float = 5.0) -> None:
        await self._client.flush(timeout=int(max(1, timeout)))

    def _denied(self, subject: str) -> bool:
        subject = subject.lower()
        return any(pattern == subject or _matches(pattern, subject) for pattern in self._denials)

    def _explain_timeout(self, subject: str, error: Exception, what: str) -> TransportError:
        if self._denied(subject):
            return PermissionDeniedError(
                f"permission denied: this user may not {what} {subject!r}",
                subject=subject,
                hint="the role's NATS user lacks this permission; see `rolebus auth`",
            )
        return UnavailableError(
            f"JetStream did not answer in time to {what} {subject!r} ({type(error).__name__})",
            subject=subject,
            hint="the server may be restarting or without quorum; it retries by itself "
            "once the server is back (`rolebus status` shows health)",
        )

    # --- publishing ------------------------------------------------------------------

    def check_size(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        size = len(data) + sum(len(key) + len(value) + 4 for key, value in headers.items()) + 12
        if size > self.max_payload:
            raise PayloadTooLargeError(size=size, limit=self.max_payload, subject=subject)

    @staticmethod
    def message_headers(msg_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {Header.MSG_ID: msg_id, Header.CONTENT_TYPE: CONTENT_TYPE_MSGPACK}
        if extra:
            headers.update(extra)
        return headers

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
        """Publish to JetStream and wait for its ack; retry with the same Msg-Id
        (the server de-duplicates) until ``give_up_after`` seconds have passed."""
        all_headers = self.message_headers(msg_id, headers)
        self.check_size(subject, data, all_headers)
        deadline = time.monotonic() + give_up_after
        delay = 0.05
        while True:
            try:
                reply = await self._client.request(
                    subject, data, timeout=timeout, headers=all_headers
                )
                return self._pub_ack(subject, reply.data)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
                failure: TransportError = self._explain_timeout(subject, error, "publish to")
                if isinstance(error, nats.errors.NoRespondersError):
                    failure = UnavailableError(
                        f"no stream answered for {subject!r}",
                        subject=subject,
                        hint="the stream may be missing (run `rolebus provision`) or its "
                        "leader is being elected; check `rolebus status`",
                    )
            except UnavailableError as error:
                failure = error
            except (nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError) as e:
                failure = UnavailableError(f"connection lost publishing to {subject!r}: {e}")
            except nats.errors.ConnectionClosedError as error:
                raise ConnectError(f"connection closed publishing to {subject!r}") from error
            if isinstance(failure, PermissionDeniedError) or time.monotonic() + delay > deadline:
                raise failure
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _pub_ack(self, subject: str, body: bytes) -> PubAck:
        response: dict[str, Any] = json.loads(body)
        error = response.get("error")
        if error:
            description = str(error.get("description", ""))
            code = int(error.get("code", 0))
            if "maximum" in description or "resource" in description:
                raise StreamFullError(
                    f"the stream refused {subject!r}: {description}",
                    subject=subject,
                    hint="the stream is full (discard: new refuses rather than dropping "
                    "old work): let workers catch up, purge handled history, or raise "
                    "its limits",
                )
            if code == 503 or "in process" in description:
                # "duplicate message id is in process": our own retry met the first
                # attempt still being stored; retrying is right.
                raise UnavailableError(
                    f"JetStream unavailable for {subject!r}: {description}", subject=subject
                )
            raise TransportError(
                f"JetStream refused {subject!r}: {description}",
                subject=subject,
                code=int(error.get("err_code", 0)),
            )
        return PubAck(
            stream=str(response["stream"]),
            seq=int(response["seq"]),
            duplicate=bool(response.get("duplicate", False)),
        )

    async def publish_start(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> PendingPublish:
        """Send now, wait for the ack later with ``await pending.result()``: lets
        several publishes share one round trip."""
        all_headers = self.message_headers(msg_id, headers)
        self.check_size(subject, data, all_headers)
        try:
            future = await self._js.publish_async(subject, data, headers=all_headers)
        except nats.errors.Error:
            future = None  # not sent: result() publishes with retries
        return PendingPublish(self, subject, data, msg_id, headers, future)

    def publish_batched(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> PendingPublish:
        """Like :meth:`publish_start`, through the stream's group commit: the
        publishes queued in one event-loop turn are stored as atomic batches (one
        fsync each). For bulk publishing, and a worker with a backlog: a batch
        takes ~2.5 ms to start, so a lone publish is faster sent alone."""
        all_headers = self.message_headers(msg_id, headers)
        self.check_size(subject, data, all_headers)
        stream = group_commit_stream(subject)
        if stream is None:
            future = None  # no batches for this stream: result() publishes alone
        else:
            future = self._group_commit.write(stream, subject, data, all_headers).stored
        return PendingPublish(self, subject, data, msg_id, headers, future, stream)

    async def _send_batch(self, batch_id: str, writes: list[Write]) -> int:
        """Store ``writes`` as one atomic batch (see groupcommit.py); the sequence
        of the last one. Only the commit asks for an ack."""
        last = len(writes)
        headers: dict[str, str] = {}
        try:
            for number, entry in enumerate(writes, start=1):
                headers = {
                    **entry.headers,
                    Header.BATCH_ID: batch_id,
                    Header.BATCH_SEQUENCE: str(number),
                }
                if number < last:
                    await self._client.publish(entry.subject, entry.data, headers=headers)
            headers[Header.BATCH_COMMIT] = "1"
            reply = await self._client.request(
                entry.subject, entry.data, timeout=5.0, headers=headers
            )
        except nats.errors.Error as error:
            raise UnavailableError(
                f"batch of {last} to {entry.subject!r} not acknowledged: {type(error).__name__}"
            ) from error
        return self._pub_ack(entry.subject, reply.data).seq

    async def publish_many(
        self,
        items: list[tuple[str, bytes, str, Mapping[str, str] | None]],
        *,
        window: int = 1000,
    ) -> list[PubAck]:
        """Publish ``(subject, data, msg_id, headers)`` items, up to ``window`` at
        once, as atomic batches (group commit); a batch the server refuses (a
        duplicate Msg-Id among them, say) is published again one by one."""
        for subject, data, msg_id, headers in items:
            self.check_size(subject, data, self.message_headers(msg_id, headers))
        acks: list[PubAck] = []
        for start in range(0, len(items), window):
            pending = [
                self.publish_batched(subject, data, msg_id=msg_id, headers=headers)
                for subject, data, msg_id, headers in items[start : start + window]
            ]
            acks.extend(await wait_all(pending))
        return acks

    async def publish_core(self, subject: str, data: bytes, *, reply: str = "") -> None:
        await self._client.publish(subject, data, reply=reply)

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

    # --- provisioning ------------------------------------------------------------------

    async def provision(self, limits: StreamLimits | None = None) -> None:
        """Create rolebus's streams and KV buckets when missing; never replace a
        different existing configuration, report it instead."""
        limits = limits or StreamLimits()
        for spec in STREAMS:
            await self._ensure_stream(spec, limits)
        for bucket in BUCKETS:
            await self._ensure_bucket(bucket, limits)

    def _stream_config(self, spec: StreamSpec, limits: StreamLimits) -> StreamConfig:
        return StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW if spec.work else DiscardPolicy.OLD,
            max_bytes=limits.work_max_bytes if spec.work else limits.events_max_bytes,
            max_msgs=limits.work_max_msgs if spec.work else -1,
            max_age=limits.max_age,
            num_replicas=limits.replicas,
            duplicate_window=120.0,
            allow_direct=True,
            # Escalation timeouts are scheduled messages the server keeps (NATS 2.12+).
            allow_msg_schedules=True if spec.schedules else None,
            # Group commit (groupcommit.py); scheduled messages are not batched.
            allow_atomic=None if spec.schedules else True,
        )

    async def _ensure_stream(self, spec: StreamSpec, limits: StreamLimits) -> None:
        wanted = self._stream_config(spec, limits)
        try:
            info = await self._js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            info = None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise self._no_jetstream(error) from error
        if info is None:
            try:
                await self._js.add_stream(wanted)
            except nats.js.errors.APIError as error:
                raise self._translate_api(error, f"create stream {spec.name}") from error
            log.info("stream created", stream=spec.name)
            return
        have = info.config
        problems = []
        if sorted(have.subjects or []) != sorted(spec.subjects):
            problems.append(f"subjects are {have.subjects}, rolebus needs {list(spec.subjects)}")
        if have.retention != RetentionPolicy.LIMITS:
            problems.append(f"retention is {have.retention}, rolebus needs limits")
        if spec.work and have.discard != DiscardPolicy.NEW:
            problems.append("discard is 'old': a full stream would drop work silently")
        if wanted.allow_msg_schedules and not have.allow_msg_schedules:
            problems.append("message schedules are off: escalation timeouts need them")
        if problems:
            raise IncompatibleStreamError(
                f"stream {spec.name} exists with an incompatible configuration: "
                + "; ".join(problems),
                hint="rolebus does not replace it for you: fix it with `nats stream edit`, "
                "or delete it if its content is not needed",
            )
        if wanted.allow_atomic and not have.allow_atomic:
            await self._allow_atomic(have)

    async def _allow_atomic(self, config: StreamConfig) -> None:
        """Turn atomic batches on for a stream made before group commit (an additive
        change). A user who may not edit streams keeps writing one by one."""
        config.allow_atomic = True
        try:
            await self._js.update_stream(config)
        except (nats.errors.Error, nats.js.errors.Error) as error:
            log.warning(
                "cannot turn on atomic publish: writes go one by one",
                stream=config.name,
                error=type(error).__name__,
                hint="run `rolebus provision` as a user allowed to edit streams",
            )
            return
        log.info("atomic publish turned on", stream=config.name)

    async def _ensure_bucket(self, bucket: str, limits: StreamLimits) -> None:
        try:
            await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await self._js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=64,
                    storage=StorageType.FILE,
                    replicas=limits.replicas,
                )
            )
            log.info("bucket created", bucket=bucket)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise self._no_jetstream(error) from error

    def _no_jetstream(self, error: Exception) -> TransportError:
        if self._denied(f"{_API}.STREAM.INFO.>") or self._denials:
            return PermissionDeniedError(
                "permission denied using the JetStream API",
                hint="provisioning needs the admin user; run it once as admin",
            )
        return UnavailableError(
            f"JetStream is not answering on {self.url} ({type(error).__name__})",
            hint="the server must run with JetStream enabled (`rolebus server` does); "
            "in a cluster, a majority of nodes must be up",
        )

    def _translate_api(self, error: nats.js.errors.APIError, what: str) -> TransportError:
        description = error.description or str(error)
        if isinstance(error, nats.js.errors.ServiceUnavailableError):
            return UnavailableError(f"cannot {what}: JetStream unavailable ({description})")
        return TransportError(f"cannot {what}: {description} (code {error.err_code})")

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create or update a role's durable pull consumer (it is ours to adjust)."""
        config = ConsumerConfig(
            durable_name=spec.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            filter_subjects=list(spec.filter_subjects),
            max_waiting=512,
        )
        try:
            await self._js.add_consumer(spec.stream, config)
        except nats.js.errors.APIError as error:
            raise self._translate_api(error, f"create consumer {spec.name}") from error
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise self._explain_timeout(
                f"{_API}.CONSUMER.CREATE.{spec.stream}.{spec.name}", error, "create consumer"
            ) from error

    async def consumer_matches(self, spec: ConsumerSpec) -> bool:
        """True if the consumer exists with the configuration ``spec`` asks for
        (then a worker need not, and with least-privilege credentials may not,
        create it)."""
        subject = f"{_API}.CONSUMER.INFO.{spec.stream}.{spec.name}"
        try:
            info = await self._js.consumer_info(spec.stream, spec.name)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise self._explain_timeout(subject, error, "look up consumer") from error
        config = info.config
        return (
            sorted(config.filter_subjects or [config.filter_subject or ""])
            == sorted(spec.filter_subjects)
            and abs(float(config.ack_wait or 0) - spec.ack_wait) < 0.001
            and config.max_deliver == spec.max_deliver
        )

    async def delete_stream(self, name: str) -> None:
        """Delete a stream (admin only; others get PermissionDeniedError)."""
        try:
            await self._js.delete_stream(name)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise self._explain_timeout(
                f"{_API}.STREAM.DELETE.{name}", error, "delete stream"
            ) from error

    async def consumer_state(self, stream: str, consumer: str) -> dict[str, int]:
        """Backlog and in-flight counts of one consumer."""
        try:
            info = await self._js.consumer_info(stream, consumer)
        except nats.js.errors.NotFoundError:
            return {"pending": 0, "ack_pending": 0, "redelivered": 0, "waiting": 0}
        return {
            "pending": int(info.num_pending or 0),
            "ack_pending": int(info.num_ack_pending or 0),
            "redelivered": int(info.num_redelivered or 0),
            "waiting": int(info.num_waiting or 0),
        }

    async def stream_state(self, stream: str) -> dict[str, int]:
        try:
            info = await self._js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise TransportError(
                f"stream {stream!r} does not exist",
                hint="streams: ROLEBUS_WORK, ROLEBUS_EVENTS, ROLEBUS_DLQ "
                "(created by the first command that needs them)",
            ) from None
        state = info.state
        return {
            "messages": int(state.messages),
            "bytes": int(state.bytes),
            "first_seq": int(state.first_seq),
            "last_seq": int(state.last_seq),
        }

    # --- pulling ------------------------------------------------------------------------

    def next_request_subject(self, stream: str, consumer: str) -> str:
        return f"{_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"

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

    # --- key/value ------------------------------------------------------------------------

    async def _bucket(self, bucket: str) -> Any:
        # Looking a bucket up costs a round trip (stream info): do it once.
        handle = self._buckets.get(bucket)
        if handle is None:
            with self._translated(f"open bucket {bucket}"):
                handle = self._buckets[bucket] = await self._js.key_value(bucket)
        return handle

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """nats-py's timeouts and connection errors as rolebus errors."""
        try:
            yield
        except nats.js.errors.ServiceUnavailableError as error:
            raise UnavailableError(f"cannot {what}: JetStream unavailable") from error
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.errors.ConnectionClosedError,
        ) as error:
            raise UnavailableError(
                f"cannot {what}: {type(error).__name__}",
                hint="the server is unreachable or restarting; this is retried",
            ) from error

    async def kv_get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or None when absent or deleted."""
        kv = await self._bucket(bucket)
        try:
            with self._translated(f"read {bucket}/{key}"):
                entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"", int(entry.revision or 0))

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Create ``key`` only if absent; the new revision, or None if it exists."""
        return await self._kv_write(bucket, key, value, 0)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set: write only if ``key`` is still at ``revision``."""
        return await self._kv_write(bucket, key, value, revision)

    async def _kv_write(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set (revision 0: create); the new revision, or None when the
        key moved on."""
        kv = await self._bucket(bucket)
        try:
            with self._translated(f"write {bucket}/{key}"):
                if revision == 0:
                    return int(await kv.create(key, value))
                return int(await kv.update(key, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except nats.js.errors.APIError as error:
            if error.err_code == 10071:  # wrong last sequence
                return None
            raise

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        kv = await self._bucket(bucket)
        with self._translated(f"write {bucket}/{key}"):
            return int(await kv.put(key, value))

    async def kv_items(self, bucket: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every live key and value of a bucket, streamed in one pass (the last
        value of each key; deleted keys are skipped)."""
        async for change in self.kv_changes(bucket):
            if change.value is not None:
                yield change.key, change.value

    async def kv_changes(
        self, bucket: str, *, from_seq: int | None = None
    ) -> AsyncIterator[KvChange]:
        """A bucket's writes in order: without ``from_seq`` the last one of each key
        (deleted keys included, as deletions), from ``from_seq`` every write still
        stored from that stream sequence on. Pass the last ``seq`` + 1 to read only
        what changed since."""
        prefix = f"$KV.{bucket}."
        async for stored in self.read_stream(
            f"KV_{bucket}",
            filter_subjects=[f"{prefix}>"],
            start_seq=from_seq,
            last_per_subject=from_seq is None,
        ):
            deleted = stored.headers.get("KV-Operation") in ("DEL", "PURGE")
            yield KvChange(
                seq=stored.seq,
                key=stored.subject.removeprefix(prefix),
                value=None if deleted else stored.data,
            )

    # --- reading streams --------------------------------------------------------------

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        try:
            raw = await self._js.get_msg(stream, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return StoredMessage(
            stream=stream,
            seq=int(raw.seq or seq),
            subject=str(raw.subject),
            time=_parse_time(raw.headers.get("Nats-Time-Stamp") if raw.headers else None),
            headers=dict(raw.headers or {}),
            data=raw.data or b"",
        )

    async def delete_message(self, stream: str, seq: int) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_msg(stream, seq)

    async def read_stream(
        self,
        stream: str,
        *,
        filter_subjects: list[str] | None = None,
        start_seq: int | None = None,
        start_time: datetime | None = None,
        follow: bool = False,
        batch: int = 1000,
        last_per_subject: bool = False,
    ) -> AsyncIterator[StoredMessage]:
        """Read a stream in order through an ephemeral no-ack consumer, which no
        worker's durable consumer notices. Stops at the end unless ``follow``.

        If the consumer goes quiet (its server died, a leader changed), it is
        made again from the sequence after the last one read: nothing is
        skipped or read twice."""
        deliver: dict[str, Any]
        if start_seq is not None:
            deliver = {
                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": start_seq,
            }
        elif start_time is not None:
            deliver = {
                "deliver_policy": DeliverPolicy.BY_START_TIME,
                "opt_start_time": start_time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            }
        elif last_per_subject:
            deliver = {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
        else:
            deliver = {"deliver_policy": DeliverPolicy.ALL}

        async def open_consumer(where: dict[str, Any]) -> Any:
            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                filter_subjects=filter_subjects or None,
                inactive_threshold=60.0,
                mem_storage=True,
                **where,
            )
            try:
                with self._translated(f"read {stream}"):
                    return await self._js.add_consumer(stream, config)
            except nats.js.errors.NotFoundError:
                raise TransportError(
                    f"stream {stream!r} does not exist",
                    hint="streams: ROLEBUS_WORK, ROLEBUS_EVENTS, ROLEBUS_DLQ, ROLEBUS_TIMERS",
                ) from None

        info = await open_consumer(deliver)
        if not follow and not info.num_pending:
            await self._delete_consumer(stream, info.name)
            return
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            queue.put_nowait(msg)

        inbox = self.new_inbox()
        subscription = await self.subscribe_core(inbox, on_message)
        request = json.dumps({"batch": batch, "expires": int(5e9)}).encode()
        outstanding = 0
        last_seq: int | None = None
        try:
            while True:
                if outstanding <= batch // 2:
                    subject = self.next_request_subject(stream, info.name)
                    with contextlib.suppress(nats.errors.Error):
                        await self.publish_core(subject, request, reply=inbox)
                    outstanding += batch
                try:
                    # Usually a message is waiting: take it without wait_for's task
                    # and timer (a third of replay's time went there). Requests
                    # expire every 5 s with a 408: silence past 8 s means the
                    # consumer or its server is gone.
                    msg = (
                        queue.get_nowait()
                        if not queue.empty()
                        else await asyncio.wait_for(queue.get(), timeout=8.0)
                    )
                except TimeoutError:
                    await self._delete_consumer(stream, info.name)
                    if last_seq is not None:
                        info = await open_consumer(
                            {
                                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                                "opt_start_seq": last_seq + 1,
                            }
                        )
                    else:
                        info = await open_consumer(deliver)
                    outstanding = 0
                    if not follow and not info.num_pending:
                        return
                    continue
                status = msg.headers.get("Status") if msg.headers else None
                if status is not None:
                    if status in ("408", "409", "503"):
                        outstanding = 0
                    continue
                outstanding -= 1
                tokens = (msg.reply or "").split(".")
                pending = int(tokens[-1])
                last_seq = int(tokens[-4])
                yield StoredMessage(
                    stream=stream,
                    seq=last_seq,
                    subject=msg.subject,
                    time=datetime.fromtimestamp(int(tokens[-2]) / 1e9, UTC),
                    headers=msg.headers or {},
                    data=msg.data,
                )
                if pending == 0 and not follow:
                    return
        finally:
            await subscription.close()
            await self._delete_consumer(stream, info.name)

    async def _delete_consumer(self, stream: str, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._js.delete_consumer(stream, name)


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
        connection: Connection,
        stream: str,
        consumer: str,
        *,
        capacity: int,
        deliver: Callable[[InboundMessage], None],
        on_consumer_lost: Callable[[], Awaitable[None]] | None,
        expires: float,
    ) -> None:
        self._connection = connection
        self._subject = connection.next_request_subject(stream, consumer)
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
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._requested = max(0, self._requested - 1)
            self._held += 1
            self._deliver(InboundMessage(msg))
            return
        if status == "100":  # idle heartbeat: the request is alive
            return
        # 408 request expired, 409 terminated (leader change, max ack pending,
        # consumer deleted...): the rest of that request will never come.
        pending = msg.headers.get("Nats-Pending-Messages") if msg.headers else None
        self._requested = max(0, self._requested - int(pending)) if pending else 0
        description = (msg.headers or {}).get("Description", "")
        if status == "409" and "deleted" in description.lower() and self._on_consumer_lost:
            log.warning("consumer deleted; re-creating it", subject=self._subject)
            await self._on_consumer_lost()
        elif status == "503":
            # No consumer leader right now (an election, a node down): asking again
            # at once would spin; ask again shortly.
            if self._retry is None or self._retry.done():
                self._retry = asyncio.ensure_future(self._pull_after(0.5))
            return
        elif status not in ("408", "404"):
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


class PendingPublish:
    """A publish in flight; :meth:`result` waits for its ack (bounded), and on
    a timeout or error publishes again with the same Msg-Id (de-duplicated)."""

    __slots__ = ("_batched", "_connection", "_data", "_future", "_headers", "_msg_id", "_subject")

    def __init__(
        self,
        connection: Connection,
        subject: str,
        data: bytes,
        msg_id: str,
        headers: Mapping[str, str] | None,
        future: asyncio.Future[Any] | None,
        batched: str | None = None,
    ) -> None:
        self._connection = connection
        self._subject = subject
        self._data = data
        self._msg_id = msg_id
        self._headers = headers
        self._future = future
        # The stream, when ``future`` is a group commit's (a sequence, or None: not
        # stored, publish alone). That future always resolves: no timer needed.
        self._batched = batched

    async def result(self, timeout: float = 5.0) -> PubAck:
        future = self._future
        if future is not None and self._batched is not None:
            seq = future.result() if future.done() else await future
            if seq is not None:
                return PubAck(self._batched, int(seq), False)
        elif future is not None:
            try:
                # Usually the ack is already here: skip wait_for and its timer.
                ack = future.result() if future.done() else await asyncio.wait_for(future, timeout)
                return PubAck(str(ack.stream), int(ack.seq), bool(ack.duplicate))
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as error:
                if isinstance(error, nats.js.errors.APIError) and error.code != 503:
                    raise self._connection._translate_api(
                        error, f"publish {self._subject}"
                    ) from error
        return await self._connection.publish(
            self._subject, self._data, msg_id=self._msg_id, headers=self._headers
        )


async def wait_all(pending: list[PendingPublish], timeout: float = 5.0) -> list[PubAck]:
    """Wait for several publishes at once (one timer, not one per publish)."""
    futures = [publish._future for publish in pending if publish._future is not None]
    unfinished = [future for future in futures if not future.done()]
    if unfinished:
        await asyncio.wait(unfinished, timeout=timeout)
    return [await publish.result(timeout) for publish in pending]


def _matches(pattern: str, subject: str) -> bool:
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens) or token not in ("*", subject_tokens[index]):
            return False
    return len(pattern_tokens) == len(subject_tokens)


def _parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.fromtimestamp(0, UTC)
    with contextlib.suppress(ValueError):
        # Nanosecond precision does not fit datetime: cut to microseconds.
        head, _, tail = value.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(tail + '000000')[:6]}+00:00")
    return datetime.fromtimestamp(0, UTC)
