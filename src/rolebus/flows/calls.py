"""Recorded model calls: what an LLM role paid for, kept in JetStream (KV).

Key ``<role>.<task id>.g<generation>.c<number>`` (the handler's key, see
:func:`rolebus.handlers.recorded.call_key`, under the role that made the call): a role
may write only its own, so no role can plant a "recorded" answer that another
role's redelivery would reuse; a task's calls are listed by their key prefix. The
record holds the request's fingerprint, the messages, the answer, the model, the
usage and the latency; never a key (keys are read from the environment at call time
and sent only in headers).

A message's content or an answer of :data:`PART_MIN` bytes or more is stored apart,
once, by its SHA-256 (``<role>.<hash>`` in the parts bucket; over :data:`CHUNK`
bytes as numbered chunks ``<role>.<hash>.<n>``), and the record holds
``{"$part": hash, "bytes": n, "chunks": k}`` in its place: the system prompt every
call of a role repeats costs its bytes once, and an answer of any size is recorded.
A part whose bytes do not hash to its name, or that expired, reads as no record at
all (the call is made again rather than answered wrongly). The formats are in
subjects.md ("Recorded model calls").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from rolebus.nats.connection import Connection
from rolebus.wire.subjects import CALLS_BUCKET, PARTS_BUCKET

__all__ = ["CHUNK", "PART_MIN", "CallStore", "call_summary"]

#: Text this long or longer is a part of its own.
PART_MIN = 512
#: The most a part's entry holds (under every server's max_payload).
CHUNK = 256 * 1024
#: Parts written by this process, remembered so as not to write them again.
_REMEMBERED = 4096
#: A part last written longer ago than this share of the calls' age is written again
#: (the parts bucket keeps a part for 1.25 times the age: see nats/admin.py).
_REFRESH_SHARE = 0.25


class _MissingPartError(Exception):
    """A part the record names is gone (expired) or is not what its hash says."""


class CallStore:
    """The worker's :class:`~rolebus.handlers.base.CallLog`, and what the dashboard reads."""

    def __init__(
        self,
        connection: Connection,
        *,
        role: str = "*",
        read_only: bool = False,
        max_age: float = 30 * 86400.0,
    ) -> None:
        """``role``: whose calls (``*``, every role's, only to read a task's calls);
        ``max_age``: how long the calls bucket keeps a record."""
        self._connection = connection
        self._role = role
        self._read_only = read_only or role == "*"
        self._refresh_after = max_age * _REFRESH_SHARE
        self._written: dict[str, float] = {}  # part hash -> when this process wrote it

    # --- reading ---------------------------------------------------------------------

    async def get(self, key: str) -> dict[str, Any] | None:
        """The whole record (its parts put back), or None: never made, expired, or
        a part missing."""
        if self._role == "*":
            return None  # no role: nothing to answer a call from
        found = await self._connection.kv.get(CALLS_BUCKET, f"{self._role}.{key}")
        if found is None or not found[0]:
            return None
        return await self._whole(self._role, found[0])

    async def _whole(self, role: str, stored: bytes) -> dict[str, Any] | None:
        try:
            value = json.loads(stored)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        try:
            return await self._joined(role, value)
        except _MissingPartError:
            return None

    async def _joined(self, role: str, record: dict[str, Any]) -> dict[str, Any]:
        whole = dict(record)
        messages = record.get("messages")
        if isinstance(messages, list):
            whole["messages"] = [
                {**message, "content": await self._text(role, message.get("content"))}
                if isinstance(message, dict)
                else message
                for message in messages
            ]
        if "answer" in record:
            whole["answer"] = await self._text(role, record["answer"])
        return whole

    async def _text(self, role: str, value: Any) -> Any:
        """``value``, or the text of the part it names."""
        if not (isinstance(value, dict) and isinstance(value.get("$part"), str)):
            return value
        digest, chunks = value["$part"], value.get("chunks", 0)
        if not isinstance(chunks, int) or chunks < 0:
            raise _MissingPartError(digest)
        keys = (
            [f"{role}.{digest}"]
            if chunks == 0
            else [f"{role}.{digest}.{index}" for index in range(chunks)]
        )
        pieces = await asyncio.gather(*(self._connection.kv.get(PARTS_BUCKET, key) for key in keys))
        if any(piece is None for piece in pieces):
            raise _MissingPartError(digest)
        data = b"".join(piece[0] for piece in pieces if piece is not None)
        if hashlib.sha256(data).hexdigest() != digest:
            raise _MissingPartError(digest)
        return data.decode()

    # --- writing ---------------------------------------------------------------------

    async def put(self, key: str, record: dict[str, Any]) -> None:
        """Store the record, its large texts as parts first (a record is never
        stored before the parts it names)."""
        if self._read_only:
            return
        stored = dict(record)
        messages = record.get("messages")
        if isinstance(messages, list):
            stored["messages"] = [
                {**message, "content": await self._part(message.get("content"))}
                if isinstance(message, dict)
                else message
                for message in messages
            ]
        if "answer" in record:
            stored["answer"] = await self._part(record["answer"])
        await self._connection.kv.put(
            CALLS_BUCKET, f"{self._role}.{key}", json.dumps(stored, separators=(",", ":")).encode()
        )

    async def _part(self, value: Any) -> Any:
        """``value`` as it goes in the record: short, as is; long, by reference."""
        if not isinstance(value, str) or len(value) < PART_MIN:
            return value
        data = value.encode()
        digest = hashlib.sha256(data).hexdigest()
        pieces = [data[start : start + CHUNK] for start in range(0, len(data), CHUNK)]
        chunks = 0 if len(pieces) == 1 else len(pieces)
        now = time.monotonic()
        written = self._written.get(digest)
        if written is None or now - written > self._refresh_after:
            if chunks == 0:
                await self._connection.kv.put(PARTS_BUCKET, f"{self._role}.{digest}", data)
            else:
                for index, piece in enumerate(pieces):
                    key = f"{self._role}.{digest}.{index}"
                    await self._connection.kv.put(PARTS_BUCKET, key, piece)
            self._written.pop(digest, None)
            self._written[digest] = now
            while len(self._written) > _REMEMBERED:
                self._written.pop(next(iter(self._written)))
        return {"$part": digest, "bytes": len(data), "chunks": chunks}

    # --- a task's calls ----------------------------------------------------------------

    async def for_task(self, task_id: str) -> list[dict[str, Any]]:
        """Every recorded call of a task, whole, in the order they were made (a call
        whose parts expired is shown with ``"expired": true`` and its texts left out)."""
        calls = []
        async for change in self._connection.kv.changes(
            CALLS_BUCKET, keys=f"{self._role}.{task_id}.>"
        ):
            if not change.value:
                continue
            role = change.key.split(".", 1)[0]
            whole = await self._whole(role, change.value)
            if whole is None:
                try:
                    stub = json.loads(change.value)
                except ValueError:
                    continue
                if not isinstance(stub, dict):
                    continue
                whole = {**stub, "messages": [], "answer": "", "expired": True}
            calls.append(whole)
        return sorted(calls, key=_order)


def _order(call: dict[str, Any]) -> tuple[int, int, int]:
    """Model calls in order, each tool call after the model call that asked for it."""

    def number(name: str) -> int:
        value = call.get(name, 0)
        return value if isinstance(value, int) else 0

    return number("generation"), number("number"), 1 if "tool" in call else 0


def call_summary(call: dict[str, Any]) -> dict[str, Any]:
    """A recorded call in a line: a tool's name, arguments, time and outcome, or a
    model call's model, tokens and time (the whole conversation is the record)."""
    usage = call.get("usage") or {}
    tool = call.get("tool")
    messages = call.get("messages") or [{}]
    arguments = messages[0].get("content") if tool and isinstance(messages[0], dict) else None
    return {
        "call": f"{call.get('generation')}.{call.get('number')}",
        "tool": tool,
        "arguments": _cut(arguments),
        "result": _cut(call.get("answer")),
        "error": bool(call.get("error")),
        "model": None if tool else call.get("model"),
        "tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "latency_ms": call.get("latency_ms"),
    }


def _cut(text: Any, limit: int = 200) -> str | None:
    if text is None:
        return None
    shown = str(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
