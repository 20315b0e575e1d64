"""Recorded model calls: what an LLM role paid for, kept in JetStream (KV).

Key ``<role>.<task id>.g<generation>.c<number>`` (the handler's key, see
:func:`rolebus.handlers.llm.call_key`, under the role that made the call): a role
may write only its own, so no role can plant a "recorded" answer that another
role's redelivery would reuse; a task's calls are listed by their key prefix. The
record holds the request's fingerprint, the messages, the answer, the model, the
usage and the latency; never a key (keys are read from the environment at call time
and sent only in headers).
"""

from __future__ import annotations

import json
from typing import Any

from rolebus.nats.connection import Connection
from rolebus.wire.subjects import CALLS_BUCKET

__all__ = ["CallStore"]


class CallStore:
    """The worker's :class:`~rolebus.handlers.base.CallLog`, and what the dashboard reads."""

    def __init__(self, connection: Connection, *, role: str = "*", read_only: bool = False) -> None:
        """``role``: whose calls (``*``, every role's, only to read a task's calls)."""
        self._connection = connection
        self._role = role
        self._read_only = read_only or role == "*"

    async def get(self, key: str) -> dict[str, Any] | None:
        if self._role == "*":
            return None  # no role: nothing to answer a call from
        found = await self._connection.kv.get(CALLS_BUCKET, f"{self._role}.{key}")
        if found is None or not found[0]:
            return None
        value = json.loads(found[0])
        return value if isinstance(value, dict) else None

    async def put(self, key: str, record: dict[str, Any]) -> None:
        if self._read_only:
            return
        await self._connection.kv.put(
            CALLS_BUCKET, f"{self._role}.{key}", json.dumps(record).encode()
        )

    async def for_task(self, task_id: str) -> list[dict[str, Any]]:
        """Every recorded call of a task, in the order they were made."""
        calls = [
            json.loads(change.value)
            async for change in self._connection.kv.changes(
                CALLS_BUCKET, keys=f"{self._role}.{task_id}.>"
            )
            if change.value
        ]
        return sorted(calls, key=lambda call: (call.get("generation", 0), call.get("number", 0)))
