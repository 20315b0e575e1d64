"""The handler port: what every kind of handler is, gets and answers.

A handler is ``async def handle(task: Task, context: HandlerContext) -> Outcome``.
This module is a leaf of the wing: the kinds (``python``, ``command``, ``llm``,
``scripted``, ``team``) import it, and :mod:`~rolebus.handlers.loader` composes
them from a role file's ``handler``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from rolebus.errors import RolebusError
from rolebus.team.budget import Breach
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Decision, EscalationRequest, Outcome, Task, Usage

__all__ = [
    "BudgetBreachError",
    "BudgetGate",
    "CallLog",
    "Handler",
    "HandlerContext",
    "NeedsLiveError",
    "ProgressSink",
    "RateGate",
    "close_handler",
    "outcome_from_json",
    "start_handler",
]


class CallLog(Protocol):
    """Where a handler records what it paid for (model calls), keyed by task, so
    that a redelivery, a redrive or a rerun reuses an answer instead of paying for
    it again. The worker's is :class:`rolebus.flows.calls.CallStore`."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, record: dict[str, Any]) -> None: ...


class BudgetBreachError(RolebusError):
    """The budget gate refused a call: the task parks behind ``request``, an approval
    whose amounts the bus computed. A handler raises it (never answers it as an
    outcome: an outcome that claims a budget escalation is refused); ``usage`` is
    what the attempt paid before the refused call."""

    def __init__(self, request: EscalationRequest, usage: Usage | None = None) -> None:
        super().__init__(request.question)
        self.request = request
        self.usage = usage


class NeedsLiveError(RolebusError):
    """A call with no usable record while only records may answer (a rerun without
    ``--live``): never made, or expired."""

    def __init__(self, number: int) -> None:
        super().__init__(
            f"no recorded answer for call {number} of this task (never made, or expired)",
            hint="needs --live: `rolebus rerun --live` asks the model",
        )


class BudgetGate(Protocol):
    """A task's share of its role's budget: reserve a call's worst case before making
    it (a :class:`~rolebus.team.budget.Breach` when a cap would be passed: then the
    call must not happen), settle to what it cost after."""

    async def reserve(self, tokens: int, usd: float | None) -> Breach | None: ...

    async def settle(self, reserved: tuple[int, float], used: tuple[int, float]) -> None: ...


class RateGate(Protocol):
    """A model's shared rate limit: wait for a call's slot; slow everyone on a 429."""

    async def acquire(self, tokens: int, priority: int = 0) -> float: ...

    async def slow_down(self, seconds: float) -> None: ...


class ProgressSink(Protocol):
    async def __call__(self, text: str, fields: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class HandlerContext:
    """What a handler knows besides the task."""

    role: RoleSpec
    subject: str
    attempt: int
    decisions: list[Decision] = field(default_factory=list)
    contracts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The whole team (who else there is to hand work to), when the worker knows it.
    team: Team | None = None
    #: Why the previous attempt failed (a retry after a failed outcome).
    previous_error: str | None = None
    #: How many failed outcomes came before: a retry after one is a new generation
    #: (new model calls); a redelivery after a crash is the same (reused calls).
    generation: int = 0
    #: Recorded calls (None: nothing is recorded or reused).
    calls: CallLog | None = None
    #: The role's budget for this task (None: the role has no caps).
    budget: BudgetGate | None = None
    #: The model's shared rate limit (None: no limit).
    limiter: RateGate | None = None
    #: Where progress goes (the worker's: ``event.task.progress``).
    progress_sink: ProgressSink | None = None

    async def progress(self, text: str, **fields: Any) -> None:
        """Say how a long task is getting on (throttled by the worker; a no-op when
        nobody listens, as in a rerun)."""
        if self.progress_sink is not None:
            await self.progress_sink(text, fields)

    def as_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "attempt": self.attempt,
            "decisions": [decision.model_dump(mode="json") for decision in self.decisions],
            "contracts": self.contracts,
            **self.extra,
        }


class Handler(Protocol):
    """A handler. It may also have ``async def start(self)`` (the worker calls it
    before the first delivery) and ``async def aclose(self)`` (when it stops):
    a command handler reaps the runs a killed worker left, an LLM handler closes its
    HTTP pool."""

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome: ...


async def start_handler(handler: Handler) -> None:
    """Call the handler's ``start()``, if it has one."""
    start = getattr(handler, "start", None)
    if start is not None:
        await start()


async def close_handler(handler: Handler) -> None:
    """Call the handler's ``aclose()``, if it has one."""
    close = getattr(handler, "aclose", None)
    if close is not None:
        await close()


def outcome_from_json(value: Any, *, source: str) -> Outcome:
    """Validate a handler's JSON answer, or a non-retryable failure saying what is wrong."""
    if not isinstance(value, dict):
        return Outcome.failed(
            f"{source} returned a JSON {type(value).__name__}, not an object with 'status'",
            retryable=False,
        )
    try:
        return Outcome.model_validate(value)
    except ValidationError as error:
        problems = validation_problems(error)
        return Outcome.failed(f"{source} returned an invalid outcome: {problems}", retryable=False)
