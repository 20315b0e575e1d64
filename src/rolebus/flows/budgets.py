"""The budget ledger: what each role spent per day (UTC) and per task, shared by
every replica on every machine through compare-and-set writes in KV.

A model call reserves its worst case before it is made (the prompt's size and
``max_tokens``) and settles to what it really cost afterwards; a reservation that
would pass a cap is refused with the :class:`~rolebus.team.budget.Breach`. Two
replicas racing for the last of a daily cap cannot both get it: each reservation is
a compare-and-set on the day's entry. A crash between the reservation and the settle
leaves the worst case counted: the ledger errs towards spent, never towards free.

Keys in ``rolebus_budgets``: ``<role>.caps`` (caps set at run time, over the role
file's), ``<role>.day.<YYYY-MM-DD>`` (spent that day, and what approvals raised its caps by),
``<role>.task.<task id>``; JSON values. An approval beyond the caps is noted on the
entry it applies to as its escalation's id (``granted``) and counted only as the
escalation record itself says (:func:`grant_of`): the entries are the role's to
write, and a role must not raise its own caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from rolebus.errors import RolebusError
from rolebus.flows.escalation_record import EscalationRecord
from rolebus.nats.connection import Connection
from rolebus.team.budget import (
    BUDGET_REASON,
    RAISE_DAILY_CAP,
    RAISE_TASK_ALLOWANCE,
    Breach,
    Budget,
)
from rolebus.team.roles import PERSON, RoleSpec
from rolebus.wire.subjects import BUDGETS_BUCKET

__all__ = ["BudgetLedger", "Spent", "TaskBudget", "grant_of"]

_FIELDS = ("usd_per_day", "tokens_per_day", "tokens_per_task")


@dataclass(frozen=True)
class Spent:
    tokens: int = 0
    usd: float = 0.0
    #: The approved escalations this entry claims (verified on read, see :func:`grant_of`).
    granted: tuple[str, ...] = ()
    #: What those approvals allow beyond the caps, once verified (0 until then).
    allowance_tokens: int = 0
    allowance_usd: float = 0.0

    @classmethod
    def from_json(cls, value: dict[str, Any], now: float | None = None) -> Spent:
        """What the entry says was spent: settled calls, and the reservations of calls
        under way that have not expired (a worker that died leaves one that does)."""
        granted = value.get("granted", [])
        held = _live(value, time.time() if now is None else now)
        return cls(
            tokens=int(value.get("tokens", 0)) + sum(int(r[0]) for r in held.values()),
            usd=float(value.get("usd", 0.0)) + sum(float(r[1]) for r in held.values()),
            granted=tuple(str(g) for g in granted) if isinstance(granted, list) else (),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "usd": round(self.usd, 6),
            "allowance_tokens": self.allowance_tokens,
            "allowance_usd": round(self.allowance_usd, 6),
        }


def _live(value: dict[str, Any], now: float) -> dict[str, list[Any]]:
    """An entry's reservations that have not expired: ``{id: [tokens, usd, expires]}``."""
    held = value.get("reserved", {})
    if not isinstance(held, dict):
        return {}
    live = {}
    for key, entry in held.items():
        with contextlib.suppress(TypeError, ValueError, IndexError):
            if float(entry[2]) > now:
                live[str(key)] = [int(entry[0]), float(entry[1]), float(entry[2])]
    return live


def grant_of(
    record: EscalationRecord, role: RoleSpec, *, task_id: str | None = None, day: str | None = None
) -> tuple[int, float]:
    """What one escalation allows ``role`` beyond its caps (for ``task_id``, or on
    ``day`` for a raised daily cap): nothing unless it is a budget approval this role
    asked, decided yes, and, above the role file's ``person_above_*``, by a person.
    The amounts are the options the approver saw; the record's steps are attributed
    to writers who may take them, so no role can forge one for itself."""
    if (
        record.reason != BUDGET_REASON
        or record.kind != "approval"
        or record.status != "decided"
        or record.approved is not True
        or record.asking_role != role.id
    ):
        return 0, 0.0
    daily = RAISE_DAILY_CAP in (record.decision or "")
    if task_id is not None and (daily or record.task_id != task_id):
        return 0, 0.0
    decided_on = record.decided_at.date().isoformat() if record.decided_at else None
    if day is not None and (not daily or decided_on != day):
        return 0, 0.0
    name = RAISE_DAILY_CAP if daily else RAISE_TASK_ALLOWANCE
    option = next((o for o in record.options if o.name == name), None)
    extra = (option.model_extra or {}) if option is not None else {}
    try:
        tokens, usd = max(0, int(extra.get("tokens", 0))), max(0.0, float(extra.get("usd", 0.0)))
    except (TypeError, ValueError):
        return 0, 0.0
    if daily:
        cap = extra.get("cap")
        tokens, usd = (
            (tokens if cap == "tokens_per_day" else 0),
            (usd if cap == "usd_per_day" else 0.0),
        )
    limits = role.budget
    above = (limits.person_above_tokens is not None and tokens > limits.person_above_tokens) or (
        limits.person_above_usd is not None and usd > limits.person_above_usd
    )
    if above and record.decided_by != PERSON:
        return 0, 0.0
    return tokens, usd


def today() -> str:
    return datetime.now(UTC).date().isoformat()


class BudgetLedger:
    """Caps, spending and allowances of every role."""

    def __init__(
        self,
        connection: Connection,
        *,
        escalations: Callable[[str], Awaitable[EscalationRecord | None]] | None = None,
    ) -> None:
        self._connection = connection
        #: Reads an escalation's record (None: no grant is ever counted, caps hold).
        self._escalations = escalations
        self._decided: dict[str, EscalationRecord] = {}  # decided: never changes again

    # --- reading ----------------------------------------------------------------------

    async def _read(self, key: str) -> tuple[dict[str, Any], int]:
        value, revision = await self._read_raw(key)
        return _parsed(value), revision

    async def _read_raw(self, key: str) -> tuple[bytes, int]:
        found = await self._connection.kv.get(BUDGETS_BUCKET, key)
        return found if found is not None else (b"", 0)

    async def caps(self, role: RoleSpec) -> Budget:
        """The role file's budget with the caps set at run time over it."""
        return self._over(role, (await self._read(f"{role.id}.caps"))[0])

    @staticmethod
    def _over(role: RoleSpec, override: dict[str, Any]) -> Budget:
        changes = {name: override[name] for name in _FIELDS if name in override}
        return role.budget.model_copy(update=changes) if changes else role.budget

    async def spent_today(self, role_id: str) -> Spent:
        return Spent.from_json((await self._read(f"{role_id}.day.{today()}"))[0])

    async def spent_on(self, role_id: str, task_id: str) -> Spent:
        return Spent.from_json((await self._read(f"{role_id}.task.{task_id}"))[0])

    async def allowed_today(self, role: RoleSpec) -> Spent:
        """Today's spending with the allowances its verified approvals give."""
        return await self._verified(role, await self.spent_today(role.id), day=today())

    async def allowed_on(self, role: RoleSpec, task_id: str) -> Spent:
        """A task's spending with the allowances its verified approvals give."""
        return await self._verified(role, await self.spent_on(role.id, task_id), task_id=task_id)

    # --- writing (compare-and-set, retried) ------------------------------------------------

    async def _change(
        self, key: str, change: Any, known: tuple[bytes, int] | None = None
    ) -> dict[str, Any]:
        return await self._connection.kv.change_json(BUDGETS_BUCKET, key, change, known=known)

    async def set_caps(self, role_id: str, **caps: float | int | None) -> dict[str, Any]:
        """Change caps at run time (None: back to the role file's)."""

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            for name, cap in caps.items():
                if cap is None:
                    value.pop(name, None)
                else:
                    value[name] = cap
            return value

        return await self._change(f"{role_id}.caps", apply)

    async def _claim(self, key: str, because: str) -> None:
        """Note an approved escalation on an entry (counted once verified: the entry
        is the role's to write, the approval is not)."""

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            granted = list(value.get("granted", []))
            if because not in granted:
                value["granted"] = [*granted, because]
            return value

        await self._change(key, apply)

    async def _verified(
        self, role: RoleSpec, spent: Spent, *, task_id: str | None = None, day: str | None = None
    ) -> Spent:
        """``spent`` with the allowances its verified grants give."""
        tokens, usd = 0, 0.0
        for escalation_id in dict.fromkeys(spent.granted):
            record = self._decided.get(escalation_id)
            if record is None and self._escalations is not None:
                with contextlib.suppress(RolebusError):
                    record = await self._escalations(escalation_id)
                if record is not None and record.status == "decided":
                    self._decided[escalation_id] = record
            if record is not None:
                more = grant_of(record, role, task_id=task_id, day=day)
                tokens, usd = tokens + more[0], usd + more[1]
        return replace(spent, allowance_tokens=tokens, allowance_usd=usd)

    async def approve(self, role: RoleSpec, task_id: str, *, escalation_id: str) -> None:
        """An approved budget escalation resumes its task: note it where it applies
        (the task's entry, or today's for a decision that names raise-daily-cap).
        What it allows is read from the escalation itself (:func:`grant_of`)."""
        record = self._escalations and await self._escalations(escalation_id)
        daily = record is not None and RAISE_DAILY_CAP in (record.decision or "")
        key = f"{role.id}.day.{today()}" if daily else f"{role.id}.task.{task_id}"
        await self._claim(key, escalation_id)

    async def reserve(
        self,
        role: RoleSpec,
        task_id: str,
        *,
        tokens: int,
        usd: float | None,
        reservation: str,
        expires_in: float,
        flow_tokens: int | None = None,
        flow_usd: float | None = None,
    ) -> Breach | None:
        """Count a call's worst case against the caps, or the breach it would be. The
        reservation holds for ``expires_in`` seconds unless settled first: a worker
        that dies mid-call does not keep its worst case counted for the day."""
        task_key, day_key = f"{role.id}.task.{task_id}", f"{role.id}.day.{today()}"
        # Read together; the entries read are the first compare-and-set's base.
        overrides, task_entry, day_entry = await asyncio.gather(
            self._read(f"{role.id}.caps"), self._read_raw(task_key), self._read_raw(day_key)
        )
        caps = self._over(role, overrides[0])
        task = await self._verified(role, Spent.from_json(_parsed(task_entry[0])), task_id=task_id)
        day = await self._verified(role, Spent.from_json(_parsed(day_entry[0])), day=today())
        if caps.tokens_per_task is not None:
            limit = caps.tokens_per_task + task.allowance_tokens
            if task.tokens + tokens > limit:
                return Breach("tokens_per_task", limit, task.tokens, tokens)
        if flow_tokens is not None and task.tokens + tokens > flow_tokens + task.allowance_tokens:
            limit = flow_tokens + task.allowance_tokens
            return Breach("tokens_per_flow", limit, task.tokens, tokens)
        if (
            flow_usd is not None
            and usd is not None
            and task.usd + usd > flow_usd + task.allowance_usd
        ):
            return Breach("usd_per_flow", flow_usd + task.allowance_usd, task.usd, usd)
        breach: list[Breach] = []
        now = time.time()
        held = [tokens, usd or 0.0, now + expires_in]

        def take_day(value: dict[str, Any]) -> dict[str, Any]:
            spent = Spent.from_json(value, now)
            if caps.tokens_per_day is not None:
                limit = caps.tokens_per_day + task.allowance_tokens + day.allowance_tokens
                if spent.tokens + tokens > limit:
                    breach.append(Breach("tokens_per_day", limit, spent.tokens, tokens))
                    raise _RefusedError
            if caps.usd_per_day is not None and usd is not None:
                limit_usd = caps.usd_per_day + task.allowance_usd + day.allowance_usd
                if spent.usd + usd > limit_usd:
                    breach.append(Breach("usd_per_day", limit_usd, spent.usd, usd))
                    raise _RefusedError
            return {**value, "reserved": {**_live(value, now), reservation: held}}

        # Only a day cap needs the worst case held: the day is shared by concurrent
        # tasks. A task's own calls come one after another (checked above, against
        # what it settled), so its entry is written once, when the call settles.
        if caps.tokens_per_day is None and (caps.usd_per_day is None or usd is None):
            return None
        try:
            await self._change(day_key, take_day, day_entry)
        except _RefusedError:
            return breach[0]
        return None

    async def settle(
        self,
        role_id: str,
        task_id: str,
        *,
        reservation: str,
        used: tuple[int, float],
        day: str | None = None,
    ) -> None:
        """Replace a reservation by what the call really cost (on the day it was made)."""

        def apply(value: dict[str, Any]) -> dict[str, Any]:
            held = _live(value, time.time())
            held.pop(reservation, None)
            value["tokens"] = max(0, int(value.get("tokens", 0)) + used[0])
            value["usd"] = max(0.0, float(value.get("usd", 0.0)) + used[1])
            return {**value, "reserved": held}

        await asyncio.gather(
            self._change(f"{role_id}.day.{day or today()}", apply),
            self._change(f"{role_id}.task.{task_id}", apply),
        )


def _parsed(value: bytes) -> dict[str, Any]:
    parsed = json.loads(value) if value else {}
    return parsed if isinstance(parsed, dict) else {}


class _RefusedError(RolebusError):
    def __init__(self) -> None:
        super().__init__("budget breach")


class TaskBudget:
    """One task's view of its role's ledger: what a handler's context carries
    (:class:`~rolebus.handlers.base.BudgetGate`)."""

    def __init__(
        self,
        ledger: BudgetLedger,
        role: RoleSpec,
        task_id: str,
        *,
        flow_tokens: int | None = None,
        flow_usd: float | None = None,
    ) -> None:
        self._ledger = ledger
        self._role = role
        self._task_id = task_id
        self._flow_tokens = flow_tokens
        self._flow_usd = flow_usd
        #: The reservations made and not settled yet: (id, amounts, day).
        self._open: list[tuple[str, tuple[int, float], str]] = []
        handler = role.handler
        # Long enough for the call and its retries; then a dead worker's is let go.
        calls = getattr(handler, "timeout", 0.0) * (getattr(handler, "max_retries", 0) + 1)
        self._expires_in = max(600.0, calls + 60.0)

    async def reserve(self, tokens: int, usd: float | None) -> Breach | None:
        reservation = uuid.uuid4().hex
        breach = await self._ledger.reserve(
            self._role,
            self._task_id,
            tokens=tokens,
            usd=usd,
            reservation=reservation,
            expires_in=self._expires_in,
            flow_tokens=self._flow_tokens,
            flow_usd=self._flow_usd,
        )
        if breach is None:
            self._open.append((reservation, (tokens, usd or 0.0), today()))
        return breach

    async def settle(self, reserved: tuple[int, float], used: tuple[int, float]) -> None:
        found = next((entry for entry in self._open if entry[1] == reserved), None)
        if found is None:
            return  # nothing reserved for it (refused, or settled already)
        self._open.remove(found)
        await self._ledger.settle(
            self._role.id, self._task_id, reservation=found[0], used=used, day=found[2]
        )
