"""What the NATS side hands to domain code: deliveries, stored messages, KV changes."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from rolebus.nats.protocol import delivery_numbers
from rolebus.wire.codec import Origin
from rolebus.wire.headers import Header
from rolebus.wire.messages import from_nanoseconds

__all__ = ["InboundMessage", "KvChange", "StoredMessage", "Subscription"]


@dataclass(frozen=True, slots=True)
class KvChange:
    """One write to a KV bucket: ``value`` is None when the key was deleted."""

    seq: int
    key: str
    value: bytes | None
    #: When the server stored it.
    time: datetime


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from a stream (replay, DLQ, direct get)."""

    stream: str
    seq: int
    subject: str
    time: datetime
    headers: Mapping[str, str]
    data: bytes

    def origin(self) -> Origin:
        """Where it is stored (see :class:`~rolebus.wire.codec.Origin`)."""
        return Origin(self.seq, self.time, self.headers.get(Header.MSG_ID))


class InboundMessage:
    """A message delivered by a pull consumer, with its acks."""

    __slots__ = ("_msg", "delivered", "headers", "pending", "stream_seq", "subject", "time_ns")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.headers: Mapping[str, str] = msg.headers or {}
        self.delivered, self.stream_seq, self.time_ns, self.pending = delivery_numbers(msg.reply)

    @property
    def data(self) -> bytes:
        return self._msg.data

    def stored(self, stream: str) -> StoredMessage:
        """This delivery as the message ``stream`` stores (for a dead letter, a reader)."""
        return StoredMessage(
            stream=stream,
            seq=self.stream_seq,
            subject=self.subject,
            time=from_nanoseconds(self.time_ns),
            headers=self.headers,
            data=self.data,
        )

    def origin(self) -> Origin:
        """Where it is stored (see :class:`~rolebus.wire.codec.Origin`)."""
        return Origin(self.stream_seq, self.time_ns, self.headers.get(Header.MSG_ID))

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
