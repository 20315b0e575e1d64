"""Cancelling a task from anywhere: the request is a key in ``rolebus_cancels`` that
every worker follows, and the task's record says ``cancelled`` so that it sticks.

A queued task is skipped when it is delivered; a running one is stopped (a Python
handler is cancelled, a command gets SIGTERM then SIGKILL, an LLM call is aborted);
either way it ends ``cancelled`` and none of its follow-ups are published. With
``tree`` the tasks it caused are cancelled too (their ids are ``<task id>-<n>``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator

from rolebus.errors import NotFoundError
from rolebus.flows.record import State, TaskState
from rolebus.flows.state import StateStore, StoredState, published_tasks
from rolebus.nats.connection import Connection
from rolebus.team.roles import Team
from rolebus.wire.messages import utc_now
from rolebus.wire.subjects import CANCELS_BUCKET, TASK

__all__ = ["CANCELLED", "Cancellations", "cancel"]

CANCELLED = State.CANCELLED


class Cancellations:
    """The cancel requests: written by ``rolebus cancel``, followed by every worker."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def request(self, task_id: str, *, reason: str, by: str) -> None:
        record = {"reason": reason, "by": by, "at": utc_now().isoformat()}
        await self._connection.kv.put(CANCELS_BUCKET, task_id, json.dumps(record).encode())

    async def load(self) -> tuple[dict[str, str], int]:
        """Every request made so far (task id -> reason), and where to follow on from."""
        requests: dict[str, str] = {}
        last = 0
        async for change in self._connection.kv.changes(CANCELS_BUCKET):
            last = max(last, change.seq)
            if change.value:
                requests[change.key] = _reason(change.value)
        return requests, last + 1

    async def follow(self, from_seq: int) -> AsyncGenerator[tuple[str, str], None]:
        """Each request made from ``from_seq`` on, as it is made (for ever)."""
        changes = self._connection.kv.changes(CANCELS_BUCKET, from_seq=from_seq, follow=True)
        async with contextlib.aclosing(changes) as followed:
            async for change in followed:
                if change.value:
                    yield change.key, _reason(change.value)


async def _published(
    connection: Connection, task_id: str, team: Team | None
) -> dict[str, TaskState]:
    """Records for ``task_id`` and its descendants as published (no worker has
    recorded them yet)."""
    found: dict[str, TaskState] = {}
    async for task, stored in published_tasks(connection, task_id, descendants=True):
        domain = stored.subject.split(".")[1]
        owner = team.domain_owner.get(domain, "?") if team is not None else "?"
        found[task.id] = TaskState(
            task_id=task.id,
            state="queued",
            role=owner,
            subject=stored.subject,
            kind=task.kind,
            title=task.title,
            stream_seq=stored.seq,
            correlation_id=task.correlation_id,
            causation_id=task.causation_id,
            created_at=task.created_at,
        )
    return found


def _reason(value: bytes) -> str:
    record = json.loads(value)
    return str(record.get("reason", "")) if isinstance(record, dict) else ""


async def cancel(
    connection: Connection,
    task_id: str,
    *,
    reason: str,
    by: str = "person",
    tree: bool = False,
    team: Team | None = None,
) -> list[str]:
    """Cancel ``task_id`` (and with ``tree`` what it caused); the ids cancelled.

    A task no worker has finished has no record yet: it is looked up in the work
    stream (``team`` names the role that owns its domain)."""
    states = StateStore(connection)
    requests = Cancellations(connection)
    known = await states.get(task_id)
    published = await _published(connection, task_id, team)
    if known is None and not (published and task_id in published):
        raise NotFoundError(
            f"no task {task_id!r}", hint="`rolebus tasks` lists them; ids are case-sensitive"
        )
    wanted = [task_id]
    done: list[str] = []
    # With the tree: every record, read once (children are ``<id>-<n>``).
    every = [state async for state in states.all()] if tree else []
    while wanted:
        current = wanted.pop(0)
        if current in done:
            continue
        await requests.request(current, reason=reason, by=by)
        stored = await states.get(current)
        if stored is None and published and current in published:
            stored = StoredState(published[current], 0)
        if stored is not None:
            await _mark(connection, states, stored, reason=reason)
            if tree:
                wanted += [
                    str(entry["msg_id"])
                    for entry in stored.state.effects
                    if str(entry.get("subject", "")).startswith(f"{TASK}.")
                ]
        done.append(current)
        if tree:
            wanted += [
                state.task_id
                for state in every
                if state.task_id.startswith(f"{current}-") and state.task_id not in done
            ]
    return done


async def _mark(
    connection: Connection, states: StateStore, stored: StoredState, *, reason: str
) -> None:
    """The record says cancelled (unless it ended already)."""
    while not stored.state.terminal:
        changed = await states.change(
            stored, state=CANCELLED, error=f"cancelled: {reason}", effects=[]
        )
        if changed is not None:
            return  # its record is its `cancelled` event
        fresh = await states.get(stored.state.task_id, role=stored.state.role)
        if fresh is None:
            return
        stored = fresh
