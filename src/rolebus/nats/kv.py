"""JetStream key/value buckets: reads, compare-and-set writes, scans."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext

from rolebus.errors import CodecError
from rolebus.nats.delivery import KvChange
from rolebus.nats.protocol import API, ErrorCode
from rolebus.nats.streams import StreamReader
from rolebus.nats.translate import Denials, translated
from rolebus.wire.headers import Header

__all__ = ["KeyValue"]

_DELETED = ("DEL", "PURGE")


class KeyValue:
    """The buckets of one connection, looked up once each."""

    def __init__(
        self, js: JetStreamContext, streams: StreamReader, denials: Denials | None = None
    ) -> None:
        self._js = js
        self._streams = streams
        self._denials = denials if denials is not None else Denials()
        self._buckets: dict[str, Any] = {}

    async def _bucket(self, bucket: str) -> Any:
        # Looking a bucket up costs a round trip (stream info): do it once.
        handle = self._buckets.get(bucket)
        if handle is None:
            with (
                translated(f"open bucket {bucket}"),
                self._denials.guard("look up", f"{API}.STREAM.INFO.KV_{bucket}"),
            ):
                handle = self._buckets[bucket] = await self._js.key_value(bucket)
        return handle

    async def get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or None when absent or deleted."""
        kv = await self._bucket(bucket)
        try:
            with (
                translated(f"read {bucket}/{key}"),
                self._denials.guard(
                    "read",
                    f"{API}.DIRECT.GET.KV_{bucket}.>",
                    f"{API}.DIRECT.GET.KV_{bucket}",
                    f"{API}.STREAM.MSG.GET.KV_{bucket}",
                ),
            ):
                entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"", int(entry.revision or 0))

    async def create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Create ``key`` only if absent; the new revision, or None if it exists."""
        return await self._write(bucket, key, value, 0)

    async def update(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set: write only if ``key`` is still at ``revision``."""
        return await self._write(bucket, key, value, revision)

    async def _write(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set (revision 0: create); the new revision, or None when the
        key moved on."""
        kv = await self._bucket(bucket)
        try:
            with (
                translated(f"write {bucket}/{key}"),
                self._denials.guard("write", f"$KV.{bucket}.{key}"),
            ):
                if revision == 0:
                    return int(await kv.create(key, value))
                return int(await kv.update(key, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except nats.js.errors.APIError as error:
            if error.err_code == ErrorCode.STREAM_WRONG_LAST_SEQUENCE:
                return None
            raise

    async def change_json(
        self,
        bucket: str,
        key: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        replace_unreadable: bool = False,
        known: tuple[bytes, int] | None = None,
    ) -> dict[str, Any]:
        """Read-modify-write a JSON object by compare-and-set, retried until it lands:
        ``change`` gets the current value (``{}`` when absent) and returns the new one
        (an exception from it leaves the entry as it was). The value written.
        A value that is not JSON raises :class:`CodecError`, or with
        ``replace_unreadable`` (shared state no one accounts by) counts as ``{}``.
        ``known``: the value and revision the caller read just now, tried first (one
        round trip fewer when nobody wrote meanwhile; ``(b"", 0)``: absent)."""
        while True:
            found, known = (
                (known, None) if known is not None else (await self.get(bucket, key), None)
            )
            if found is not None and found[1] == 0:
                found = None
            value: Any = {}
            revision = found[1] if found else 0
            if found and found[0]:
                try:
                    value = json.loads(found[0])
                except ValueError as error:
                    if not replace_unreadable:
                        raise CodecError(
                            f"{bucket}/{key} does not hold JSON", hint="the operator can fix it"
                        ) from error
            updated = change(dict(value) if isinstance(value, dict) else {})
            written = await self._write(bucket, key, json.dumps(updated).encode(), revision)
            if written is not None:
                return updated

    async def put(self, bucket: str, key: str, value: bytes) -> int:
        kv = await self._bucket(bucket)
        with (
            translated(f"write {bucket}/{key}"),
            self._denials.guard("write", f"$KV.{bucket}.{key}"),
        ):
            return int(await kv.put(key, value))

    async def items(self, bucket: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every live key and value of a bucket, streamed in one pass (the last
        value of each key; deleted keys are skipped)."""
        async for change in self.changes(bucket):
            if change.value is not None:
                yield change.key, change.value

    async def changes(
        self, bucket: str, *, from_seq: int | None = None, keys: str = ">", follow: bool = False
    ) -> AsyncGenerator[KvChange, None]:
        """A bucket's writes in order: without ``from_seq`` the last one of each key
        (deleted keys included, as deletions), from ``from_seq`` every write still
        stored from that stream sequence on. Pass the last ``seq`` + 1 to read only
        what changed since. ``keys``: a key pattern (``task1.>``: keys under task1).
        ``follow``: then go on with every write as it happens."""
        prefix = f"$KV.{bucket}."
        reading = self._streams.read(
            f"KV_{bucket}",
            filter_subjects=[f"{prefix}{keys}"],
            start_seq=from_seq,
            last_per_subject=from_seq is None,
            follow=follow,
        )
        # Closed with this generator (not left to the garbage collector), so that its
        # consumer and subscription go while the connection is still there.
        async with contextlib.aclosing(reading) as stored_messages:
            async for stored in stored_messages:
                deleted = stored.headers.get(Header.KV_OPERATION) in _DELETED
                yield KvChange(
                    seq=stored.seq,
                    key=stored.subject.removeprefix(prefix),
                    value=None if deleted else stored.data,
                    time=stored.time,
                )
