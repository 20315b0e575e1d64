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
``<role>.task.<task id>``; JSON values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rolebus.errors import RolebusError
from rolebus.nats.connection import Connection
from rolebus.team.budget import RAISE_DAILY_CAP, RAISE_TASK_ALLOWANCE, Breach, Budget
from rolebus.team.roles import RoleSpec
from rolebus.wire.subjects import BUDGETS_BUCKET

__all__ = ["BudgetLedger", "Spent", "TaskBudget"]

_FIELDS = ("usd_per_day", "tokens_per_day", "tokens_per_task")


@dataclass(frozen=True)
class Spent:
    tokens: int = 0
    usd: float = 0.0
    #: What approvals granted beyond the caps (this task's, or this day's).
    allowance_tokens: int = 0
    allowance_usd: float = 0.0

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Spent:
        return cls(
            tokens=int(value.get("tokens", 0)),
            usd=float(value.get("usd", 0.0)),
            allowance_tokens=int(value.get("allowance_tokens", 0)),
            allowance_usd=float(value.get("allowance_usd", 0.0)),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "usd": round(self.usd, 6),
            "allowance_tokens": self.allowance_tokens,
            "allowance_usd": round(self.allowance_usd, 6),
        }


def today() -> str:
    return datetime.now(UTC).date().isoformat()


class BudgetLedger:
    """Caps, spending and allowances of every role."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    # --- reading ----------------------------------------------------------------------

    async def _read(self, key: str) -> tuple[dict[str, Any], int]:
        found = await self._connection.kv.get(BUDGETS_BUCKET, key)
        if found is None or not found[0]:
            return {}, 0
        value = json.loads(found[0])
        return (value if isinstance(value, dict) else {}), found[1]

    async def caps(self, role: RoleSpec) -> Budget:
        """The role file's budget with the caps set at run time over it."""
        override, _ = await self._read(f"{role.id}.caps")
        changes = {name: override[name] for name in _FIELDS if name in override}
        return role.budget.model_copy(update=changes) if changes else role.budget

    async def spent_today(self, role_id: str) -> Spent:
        return Spent.from_json((await self._read(f"{role_id}.day.{today()}"))[0])

    async def spent_on(self, role_id: str, task_id: str) -> Spent:
        return Spent.from_json((await self._read(f"{role_id}.task.{task_id}"))[0])

    # --- writing (compare-and-set, retried) ------------------------------------------------

    async def _change(self, key: str, change: Any) -> dict[str, Any]:
        return await self._connection.kv.change_json(BUDGETS_BUCKET, key, change)

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

    async def grant(
        self, role_id: str, task_id: str, *, tokens: int, usd: float, because: str
    ) -> None:
        """Let one task go beyond the caps by this much (an approved breach). Once per
        ``because`` (the escalation): a redelivered decision grants nothing more."""
        await self._allow(f"{role_id}.task.{task_id}", tokens=tokens, usd=usd, because=because)

    async def raise_today(self, role_id: str, *, tokens: int, usd: float, because: str) -> None:
        """Raise the role's daily caps for today by this much (an approved breach that
        asked for it). Kept on the role's own day entry, which its user may write:
        the caps themselves are the operator's."""
        await self._allow(f"{role_id}.day.{today()}", tokens=tokens, usd=usd, because=because)

    async def _allow(self, key: str, *, tokens: int, usd: float, because: str) -> None:
        def apply(value: dict[str, Any]) -> dict[str, Any]:
            granted = list(value.get("granted", []))
            if because in granted:
                return value
            value["granted"] = [*granted, because]
            value["allowance_tokens"] = int(value.get("allowance_tokens", 0)) + tokens
            value["allowance_usd"] = float(value.get("allowance_usd", 0.0)) + usd
            return value

        await self._change(key, apply)

    async def approve(
        self, role: RoleSpec, task_id: str, *, escalation_id: str, options: list[Any], decision: str
    ) -> None:
        """What an approved budget escalation allows: the task's allowance (the
        default), or, when the decision names it, a higher daily cap for the role
        today."""
        amounts = {option.name: option for option in options if getattr(option, "name", None)}
        if RAISE_DAILY_CAP in decision and RAISE_DAILY_CAP in amounts:
            extra = amounts[RAISE_DAILY_CAP].model_extra or {}
            cap = extra.get("cap")
            if cap in ("usd_per_day", "tokens_per_day"):
                await self.raise_today(
                    role.id,
                    tokens=int(extra.get("tokens", 0)) if cap == "tokens_per_day" else 0,
                    usd=float(extra.get("usd", 0.0)) if cap == "usd_per_day" else 0.0,
                    because=escalation_id,
                )
                return
        option = amounts.get(RAISE_TASK_ALLOWANCE)
        extra = (option.model_extra or {}) if option is not None else {}
        await self.grant(
            role.id,
            task_id,
            tokens=int(extra.get("tokens", 0)),
            usd=float(extra.get("usd", 0.0)),
            because=escalation_id,
        )

    async def reserve(
        self, role: RoleSpec, task_id: str, *, tokens: int, usd: float | None
    ) -> Breach | None:
        """Count a call's worst case against the caps, or the breach it would be."""
        caps = await self.caps(role)
        task = await self.spent_on(role.id, task_id)
        if caps.tokens_per_task is not None:
            limit = caps.tokens_per_task + task.allowance_tokens
            if task.tokens + tokens > limit:
                return Breach("tokens_per_task", limit, task.tokens, tokens)
        breach: list[Breach] = []

        def take_day(value: dict[str, Any]) -> dict[str, Any]:
            spent = Spent.from_json(value)
            if caps.tokens_per_day is not None:
                limit = caps.tokens_per_day + task.allowance_tokens + spent.allowance_tokens
                if spent.tokens + tokens > limit:
                    breach.append(Breach("tokens_per_day", limit, spent.tokens, tokens))
                    raise _RefusedError
            if caps.usd_per_day is not None and usd is not None:
                limit_usd = caps.usd_per_day + task.allowance_usd + spent.allowance_usd
                if spent.usd + usd > limit_usd:
                    breach.append(Breach("usd_per_day", limit_usd, spent.usd, usd))
                    raise _RefusedError
            value["tokens"] = spent.tokens + tokens
            value["usd"] = spent.usd + (usd or 0.0)
            return value

        try:
            await self._change(f"{role.id}.day.{today()}", take_day)
        except _RefusedError:
            return breach[0]
        await self._add(f"{role.id}.task.{task_id}", tokens, usd or 0.0)
        return None

    async def settle(
        self,
        role_id: str,
        task_id: str,
        *,
        reserved: tuple[int, float],
        used: tuple[int, float],
    ) -> None:
        """Replace a reservation by what the call really cost."""
        tokens, usd = used[0] - reserved[0], used[1] - reserved[1]
        if tokens or usd:
            await self._add(f"{role_id}.day.{today()}", tokens, usd)
            await self._add(f"{role_id}.task.{task_id}", tokens, usd)

    async def _add(self, key: str, tokens: int, usd: float) -> None:
        def apply(value: dict[str, Any]) -> dict[str, Any]:
            value["tokens"] = max(0, int(value.get("tokens", 0)) + tokens)
            value["usd"] = max(0.0, float(value.get("usd", 0.0)) + usd)
            return value

        await self._change(key, apply)


class _RefusedError(RolebusError):
    def __init__(self) -> None:
        super().__init__("budget breach")


class TaskBudget:
    """One task's view of its role's ledger: what a handler's context carries
    (:class:`~rolebus.handlers.base.BudgetGate`)."""

    def __init__(self, ledger: BudgetLedger, role: RoleSpec, task_id: str) -> None:
        self._ledger = ledger
        self._role = role
        self._task_id = task_id

    async def reserve(self, tokens: int, usd: float | None) -> Breach | None:
        return await self._ledger.reserve(self._role, self._task_id, tokens=tokens, usd=usd)

    async def settle(self, reserved: tuple[int, float], used: tuple[int, float]) -> None:
        await self._ledger.settle(self._role.id, self._task_id, reserved=reserved, used=used)
