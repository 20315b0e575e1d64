"""A role's budget (the ``[budget]`` table of its role file) and what a breach is."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BUDGET_REASON",
    "RAISE_DAILY_CAP",
    "RAISE_TASK_ALLOWANCE",
    "Breach",
    "Budget",
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
    #: A breach asking for more than this goes to a person: no role decides it.
    person_above_usd: float | None = Field(default=None, ge=0)
    person_above_tokens: int | None = Field(default=None, ge=0)

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
