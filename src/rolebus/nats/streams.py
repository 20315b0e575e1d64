"""Reading streams back: in order through an ephemeral consumer, or one message by sequence."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from rolebus.errors import TransportError
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.nats.protocol import API, parse_time_stamp
from rolebus.nats.puller import CoreNats, Puller
from rolebus.nats.translate import TIMEOUTS, Denials, translated
from rolebus.wire.headers import Header

__all__ = ["StreamReader"]

#: A pull request lives this long; with its heartbeats, silence past ``_SILENCE``
#: means the consumer or its server is gone.
_EXPIRES = 5.0
_SILENCE = 8.0
_STREAMS_HINT = "streams: ROLEBUS_WORK, ROLEBUS_EVENTS, ROLEBUS_DLQ, ROLEBUS_TIMERS"


def _where(
    start_seq: int | None, start_time: datetime | None, last_per_subject: bool
) -> dict[str, Any]:
    if start_seq is not None:
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
    if start_time is not None:
        at = start_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": at}
    if last_per_subject:
        return {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
    return {"deliver_policy": DeliverPolicy.ALL}


class StreamReader:
    """Reads the streams of one connection without disturbing any worker."""

    def __init__(
        self, connection: CoreNats, js: JetStreamContext, denials: Denials | None = None
    ) -> None:
        self._connection = connection
        self._js = js
        self._denials = denials if denials is not None else Denials()

    async def get(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at ``seq`` (a direct get), or None when there is none."""
        try:
            with self._denials.guard(
                "read", f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>"
            ):
                raw = await self._js.get_msg(stream, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return StoredMessage(
            stream=stream,
            seq=int(raw.seq or seq),
            subject=str(raw.subject),
            time=parse_time_stamp(raw.headers.get(Header.TIME_STAMP) if raw.headers else None),
            headers=dict(raw.headers or {}),
            data=raw.data or b"",
        )

    async def last(self, stream: str, subject: str) -> StoredMessage | None:
        """The newest message on ``subject`` (a pattern: it may hold wildcards), or
        None (a direct get: one round trip, answered by any replica)."""
        # The subject goes in the request's subject, not its body: so a user's
        # permissions can say which subjects it may read this way.
        api = f"{API}.DIRECT.GET.{stream}.{subject}"
        with (
            translated(f"read the last {subject} of {stream}"),
            self._denials.guard("read", api),
        ):
            reply = await self._connection.request_core(api, b"")
        headers = dict(reply.headers or {})
        status = headers.get(Header.STATUS)
        if status == "404":
            return None
        if status:
            raise TransportError(
                f"reading the last {subject} of {stream} failed: {status} "
                f"{headers.get(Header.DESCRIPTION, '')}".strip(),
                subject=subject,
            )
        return StoredMessage(
            stream=stream,
            seq=int(headers.get(Header.SEQUENCE) or 0),
            subject=str(headers.get(Header.SUBJECT) or subject),
            time=parse_time_stamp(headers.get(Header.TIME_STAMP)),
            headers=headers,
            data=reply.data or b"",
        )

    async def delete(self, stream: str, seq: int) -> None:
        with (
            contextlib.suppress(nats.js.errors.NotFoundError),
            translated(f"delete message {seq} of {stream}"),
            self._denials.guard("delete from", f"{API}.STREAM.MSG.DELETE.{stream}"),
        ):
            await self._js.delete_msg(stream, seq)

    async def read(
        self,
        stream: str,
        *,
        filter_subjects: list[str] | None = None,
        start_seq: int | None = None,
        start_time: datetime | None = None,
        follow: bool = False,
        batch: int = 1000,
        last_per_subject: bool = False,
    ) -> AsyncGenerator[StoredMessage, None]:
        """Read a stream in order through an ephemeral no-ack consumer, which no
        worker's durable consumer notices. Stops at the end unless ``follow``.

        If the consumer goes quiet (its server died, a leader changed), it is
        made again from the sequence after the last one read: nothing is
        skipped or read twice."""
        where = _where(start_seq, start_time, last_per_subject)
        last_seq: int | None = None
        while True:
            if last_seq is not None:
                where = _where(last_seq + 1, None, False)
            info = await self._open(stream, filter_subjects, where)
            try:
                if not follow and not info.num_pending:
                    return
                async with contextlib.aclosing(self._pull(stream, info.name, batch)) as pulled:
                    async for message in pulled:
                        last_seq = message.stream_seq
                        yield message.stored(stream)
                        if message.pending == 0 and not follow:
                            return
            finally:
                await self._delete_consumer(stream, info.name)

    async def _pull(
        self, stream: str, consumer: str, batch: int
    ) -> AsyncGenerator[InboundMessage, None]:
        """The consumer's messages until it goes quiet (then the caller makes it again)."""
        queue: asyncio.Queue[InboundMessage | None] = asyncio.Queue()

        async def lost() -> None:
            queue.put_nowait(None)

        puller = Puller(
            self._connection,
            stream,
            consumer,
            capacity=batch,
            deliver=queue.put_nowait,
            on_consumer_lost=lost,
            expires=_EXPIRES,
        )
        await puller.start()
        try:
            while True:
                try:
                    # Usually a message is waiting: take it without a timer (a large
                    # share of replay's time otherwise). Else asyncio.timeout, not
                    # wait_for: on 3.11, wait_for can swallow a cancel that arrives
                    # as the message does, and the reader would not stop.
                    if not queue.empty():
                        message = queue.get_nowait()
                    else:
                        async with asyncio.timeout(_SILENCE):
                            message = await queue.get()
                except TimeoutError:
                    if time.monotonic() - puller.last_activity < _SILENCE:
                        continue  # idle, but its heartbeats come: nothing new yet
                    return
                if message is None:
                    return
                puller.release()
                yield message
        finally:
            await puller.close()

    async def _open(
        self, stream: str, filter_subjects: list[str] | None, where: dict[str, Any]
    ) -> Any:
        config = ConsumerConfig(
            # Named, so that it is created on CONSUMER.CREATE.<stream>.<name>...: a role's
            # user is allowed that (its permissions cannot match the unnamed form).
            name=f"rolebus-read-{secrets.token_hex(8)}",
            ack_policy=AckPolicy.NONE,
            filter_subjects=filter_subjects or None,
            inactive_threshold=60.0,
            mem_storage=True,
            **where,
        )
        try:
            subject = f"{API}.CONSUMER.CREATE.{stream}.{config.name}"
            with translated(f"read {stream}"), self._denials.guard("read", subject, f"{subject}.>"):
                try:
                    return await self._js.add_consumer(stream, config)
                except TIMEOUTS as error:
                    # A denial the guard missed shows only as a timeout: say which it was.
                    raise self._denials.explain_timeout(subject, error, "read") from error
        except nats.js.errors.NotFoundError:
            raise TransportError(f"stream {stream!r} does not exist", hint=_STREAMS_HINT) from None

    async def _delete_consumer(self, stream: str, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._js.delete_consumer(stream, name)
