"""A role's budget (the ``[budget]`` table of its role file) and what a breach is."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from rolebus.wire.messages import EscalationOption, EscalationRequest

__all__ = [
    "BUDGET_REASON",
    "RAISE_DAILY_CAP",
    "RAISE_TASK_ALLOWANCE",
    "Breach",
    "Budget",
    "breach_request",
]

#: The escalation reason of a budget breach (``escalation.<approver>.budget``).
BUDGET_REASON = "budget"
#: A budget escalation's options (``tokens``, ``usd`` and ``cap`` ride along on each).
RAISE_TASK_ALLOWANCE = "raise-task-allowance"
RAISE_DAILY_CAP = "raise-daily-cap"


class Budget(BaseModel):
    """What a role may spend on model calls; a call that would exceed a cap does not
    happen: the task parks and asks ``approver``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_day: float | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    #: One task's calls together, retries included.
    tokens_per_task: int | None = Field(default=None, ge=0)
    #: Who approves a breach (default: the target of the role's spend rule, else reports_to).
    approver: str | None = None

    @property
    def capped(self) -> bool:
        return any(
            cap is not None for cap in (self.usd_per_day, self.tokens_per_day, self.tokens_per_task)
        )


@dataclass(frozen=True)
class Breach:
    """A call that would take a role past a cap: which cap, and by how much."""

    cap: str  # tokens_per_task | tokens_per_day | usd_per_day
    limit: float
    spent: float
    needs: float

    @property
    def shortfall(self) -> float:
        """How much more the cap would need to allow this call."""
        return max(0.0, self.spent + self.needs - self.limit)

    def describe(self, role: str) -> str:
        def amount(value: float) -> str:
            return f"${value:.4f}" if self.cap.startswith("usd") else f"{value:,.0f}"

        return (
            f"{role} would pass its {self.cap} cap of {amount(self.limit)}: it spent "
            f"{amount(self.spent)}, this call needs up to {amount(self.needs)}"
        )


def breach_request(
    role: str, approver: str | None, breach: Breach, *, usd: float | None
) -> EscalationRequest:
    """The approval a breach asks for: who, why, and the options with their amounts."""
    # What the call may need, not only the shortfall: the resumed task's prompt also
    # carries the decision, so it asks for a little more than the refused one.
    is_usd = breach.cap.startswith("usd")
    grant = max(breach.shortfall, breach.needs)
    tokens = 0 if is_usd else math.ceil(grant)
    dollars = round(grant, 6) if is_usd else 0.0
    amount = f"${dollars:.4f}" if is_usd else f"{tokens:,} tokens"
    cost = f" (this call: up to ${usd:.2f})" if usd is not None else ""
    return EscalationRequest(
        reason=BUDGET_REASON,
        to=approver,
        approval=True,
        question=f"{breach.describe(role)}{cost}. Approve to let the task go on.",
        options=[
            EscalationOption.model_validate(
                {
                    "name": RAISE_TASK_ALLOWANCE,
                    "tradeoffs": f"this task may spend {amount} more; the caps stay",
                    "tokens": tokens,
                    "usd": dollars,
                }
            ),
            EscalationOption.model_validate(
                {
                    "name": RAISE_DAILY_CAP,
                    "tradeoffs": f"raise {role}'s {breach.cap} by {amount} for every task today "
                    "(decide with this option's name in the decision)",
                    "cap": breach.cap,
                    "tokens": tokens,
                    "usd": dollars,
                }
            ),
            EscalationOption(name="reject", tradeoffs="end the task rejected, nothing spent"),
        ],
    )
