"""Publishing to JetStream: one at a time with retries, pipelined, or in atomic batches.

Every publish carries a Msg-Id, so a retry after a timeout or a lost connection is
de-duplicated by the server: retrying is always safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from rolebus.errors import (
    ConnectError,
    PayloadTooLargeError,
    PermissionDeniedError,
    TransportError,
    UnavailableError,
)
from rolebus.nats.groupcommit import GroupCommit, GroupCommitStats, Write
from rolebus.nats.protocol import ErrorCode, PubAck, parse_pub_ack
from rolebus.nats.replies import Replies
from rolebus.nats.translate import Denials
from rolebus.wire.headers import CONTENT_TYPE_MSGPACK, Header
from rolebus.wire.subjects import group_commit_stream

__all__ = [
    "PendingPublish",
    "Publisher",
    "message_headers",
    "own_msg_id",
    "wait_all",
    "writer_key",
]

#: ``(subject, data, msg_id, headers)``: one message of a bulk publish.
Item = tuple[str, bytes, str, Mapping[str, str] | None]


def own_msg_id(msg_id: str, key: bytes | None) -> str:
    """The Msg-Id a writer with ``key`` sends for ``msg_id``: JetStream de-duplicates
    ids across a whole stream, so a plain id (``<task>-1``, predictable) could be taken
    first by any other writer and the message would vanish as a "duplicate". Signed
    with a key only this writer's credentials give, it cannot be; the same writer
    (any replica, any retry) always forms the same one."""
    if key is None or not msg_id:
        return msg_id
    return f"{msg_id}~{hmac.new(key, msg_id.encode(), hashlib.sha256).hexdigest()[:16]}"


def writer_key(secret: bytes | None) -> bytes | None:
    """The key a writer signs its Msg-Ids with, from the secret it authenticates with."""
    return None if not secret else hashlib.sha256(b"rolebus msg-id\x00" + secret).digest()


def message_headers(
    msg_id: str, extra: Mapping[str, str] | None = None, key: bytes | None = None
) -> dict[str, str]:
    """The headers every rolebus message carries, plus ``extra``. An empty ``msg_id``
    sends none: a write whose once-only rests on its compare-and-set (a task record)
    must not be de-duplicated by an id another writer could take first; ``key``
    signs the id (see :func:`own_msg_id`)."""
    headers = {Header.CONTENT_TYPE: CONTENT_TYPE_MSGPACK}
    if msg_id:
        headers[Header.MSG_ID] = own_msg_id(msg_id, key)
    if extra:
        headers.update(extra)
    return headers


class Publisher:
    """Publishes for one connection (see :class:`~rolebus.nats.connection.Connection`)."""

    def __init__(self, client: Client, denials: Denials, *, id_key: bytes | None = None) -> None:
        self._client = client
        self._denials = denials
        #: Signs this writer's Msg-Ids (None: an open server, where every client is
        #: trusted anyway): see :func:`own_msg_id`.
        self.id_key = id_key
        self._group_commit = GroupCommit(self._send_batch)
        self._replies = Replies(client)

    @property
    def denials(self) -> Denials:
        return self._denials

    @property
    def group_commit(self) -> GroupCommitStats:
        return self._group_commit.stats

    async def close(self) -> None:
        await self._group_commit.close()
        await self._replies.close()

    def check_size(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        limit = int(self._client.max_payload)
        size = len(data) + sum(len(key) + len(value) + 4 for key, value in headers.items()) + 12
        if size > limit:
            raise PayloadTooLargeError(size=size, limit=limit, subject=subject)

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
        """Publish and wait for the ack; retry with the same Msg-Id (the server
        de-duplicates) until ``give_up_after`` seconds have passed."""
        all_headers = message_headers(msg_id, headers, self.id_key)
        self.check_size(subject, data, all_headers)
        deadline = time.monotonic() + give_up_after
        delay = 0.05
        while True:
            try:
                with self._denials.guard("publish to", subject):
                    reply = await self._replies.request(
                        subject, data, timeout=timeout, headers=all_headers
                    )
                return parse_pub_ack(subject, reply.data)
            except nats.errors.NoRespondersError:
                failure: TransportError = UnavailableError(
                    f"no stream answered for {subject!r}",
                    subject=subject,
                    hint="the stream may be missing (run `rolebus provision`) or its "
                    "leader is being elected; check `rolebus status`",
                )
            except nats.errors.TimeoutError as error:
                failure = self._denials.explain_timeout(subject, error, "publish to")
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

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        last_seq: int,
        on: str,
        batch: bool = False,
    ) -> PubAck | None:
        """Compare-and-set append: stored only if the newest message on ``on`` (a
        subject pattern) is still at ``last_seq`` (0: there is none); None when
        another write came first. A duplicate ack (``duplicate``) means a message
        with this Msg-Id is stored already: the caller checks it is its own.

        With ``batch``, it first tries the stream's group commit (one fsync shared
        with the other writes of the moment); if that batch is refused (this very
        expectation failing, say), it is sent alone, for its own answer."""
        headers = {
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_seq),
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: on,
        }
        if batch:
            pending = self.batched(subject, data, msg_id=msg_id, headers=headers, guard=on)
            if pending.future is not None and pending.batched_in is not None:
                seq = await pending.future
                if seq is not None:
                    return PubAck(pending.batched_in, int(seq), False)
        try:
            return await self.publish(subject, data, msg_id=msg_id, headers=headers)
        except TransportError as error:
            if error.code == ErrorCode.STREAM_WRONG_LAST_SEQUENCE:
                return None
            raise

    async def start(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> PendingPublish:
        """Send now, wait for the ack later with ``await pending.result()``: lets
        several publishes share one round trip."""
        all_headers = message_headers(msg_id, headers, self.id_key)
        self.check_size(subject, data, all_headers)
        try:
            future = await self._replies.send(subject, data, headers=all_headers, timeout=5.0)
        except nats.errors.Error:
            future = None  # not sent: result() publishes with retries
        return PendingPublish(self, subject, data, msg_id, headers, future)

    def batched(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        guard: str | None = None,
    ) -> PendingPublish:
        """Like :meth:`start`, through the stream's group commit: the publishes
        queued in one event-loop turn are stored as atomic batches (one fsync
        each). For bulk publishing, and a worker with a backlog: a batch takes a
        while to start, so a lone publish is faster sent alone. ``guard``: what a
        compare-and-set's expectation is about (see groupcommit.py)."""
        all_headers = message_headers(msg_id, headers, self.id_key)
        self.check_size(subject, data, all_headers)
        stream = group_commit_stream(subject)
        if stream is None:
            future = None  # no batches for this stream: result() publishes alone
        else:
            write = self._group_commit.write(stream, subject, data, all_headers, guard=guard)
            future = write.stored
        return PendingPublish(self, subject, data, msg_id, headers, future, stream)

    async def many(self, items: list[Item], *, window: int = 1000) -> list[PubAck]:
        """Publish ``items``, up to ``window`` at once, as atomic batches (group
        commit); a batch the server refuses (a duplicate Msg-Id among them, say)
        is published again one by one."""
        for subject, data, msg_id, headers in items:
            self.check_size(subject, data, message_headers(msg_id, headers, self.id_key))
        acks: list[PubAck] = []
        for start in range(0, len(items), window):
            pending = [
                self.batched(subject, data, msg_id=msg_id, headers=headers)
                for subject, data, msg_id, headers in items[start : start + window]
            ]
            acks.extend(await wait_all(pending))
        return acks

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
        return parse_pub_ack(entry.subject, reply.data).seq


class PendingPublish:
    """A publish in flight; :meth:`result` waits for its ack (bounded), and on
    a timeout or error publishes again with the same Msg-Id (de-duplicated)."""

    __slots__ = ("_batched", "_data", "_headers", "_msg_id", "_publisher", "_subject", "future")

    def __init__(
        self,
        publisher: Publisher,
        subject: str,
        data: bytes,
        msg_id: str,
        headers: Mapping[str, str] | None,
        future: asyncio.Future[Any] | None,
        batched: str | None = None,
    ) -> None:
        self._publisher = publisher
        self._subject = subject
        self._data = data
        self._msg_id = msg_id
        self._headers = headers
        #: The server's answer, when it was sent (None: not sent, result() sends it).
        self.future = future
        # The stream, when ``future`` is a group commit's (a sequence, or None: not
        # stored, publish alone). That future always resolves: no timer needed.
        self._batched = batched

    @property
    def batched_in(self) -> str | None:
        """The stream whose group commit has it (``future`` is then its sequence,
        or None: not stored, send it alone); None when it was sent alone."""
        return self._batched

    async def result(self, timeout: float = 5.0) -> PubAck:
        future = self.future
        if future is not None and self._batched is not None:
            seq = future.result() if future.done() else await future
            if seq is not None:
                return PubAck(self._batched, int(seq), False)
        elif future is not None:
            try:
                # Usually the ack is already here; else its request's own deadline
                # ends the wait (no timer here).
                if future.done():
                    reply = future.result()
                else:
                    with self._publisher.denials.guard("publish to", self._subject):
                        reply = await future
                return parse_pub_ack(self._subject, reply.data)
            except UnavailableError:
                pass  # an election, say: publish again (de-duplicated), with retries
            except nats.errors.Error:
                pass  # timed out or not sent: the same
        return await self._publisher.publish(
            self._subject, self._data, msg_id=self._msg_id, headers=self._headers
        )


async def wait_all(pending: list[PendingPublish], timeout: float = 5.0) -> list[PubAck]:
    """Wait for several publishes at once (one timer, not one per publish)."""
    unfinished = [p.future for p in pending if p.future is not None and not p.future.done()]
    if unfinished:
        await asyncio.wait(unfinished, timeout=timeout)
    return [await publish.result(timeout) for publish in pending]
