"""What the worker does when the lifecycle decides: the actions of a
:class:`Transition`, as data (see :mod:`rolebus.flows.lifecycle`).

Each action carries everything its carrying out needs (whether its writes may share
an atomic batch, whether it is a repeat), so the shell that does them never reads
the name of the rule that made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rolebus.flows.record import TaskState
from rolebus.team.roles import NeverRule

__all__ = [
    "Ack",
    "Action",
    "AskBoundary",
    "DeadLetter",
    "GiveBack",
    "GrantBudget",
    "Ignore",
    "KeepLastTry",
    "Message",
    "Nak",
    "Publish",
    "Run",
    "Transition",
]

Message = dict[str, Any]  # an outbox entry: {"subject", "msg_id", "message", "headers"?}


@dataclass(frozen=True)
class Run:
    """Run the handler on the claimed item; its answer is the next input."""


@dataclass(frozen=True)
class AskBoundary:
    """The role must never do this alone: the worker prepares what its rule asks
    (an approval opened, the task moved, a refusal) as the next input."""

    rule: NeverRule


@dataclass(frozen=True)
class Publish:
    """Publish the record's outbox (the same Msg-Ids every time: de-duplicated).
    ``again``: a delivery of work done before (counted as such); ``shares_batch``:
    the messages may share an atomic batch when the worker has a backlog (a first
    end's messages are new ids; one stored already would refuse a whole batch)."""

    again: bool = False
    shares_batch: bool = False


@dataclass(frozen=True)
class Ack:
    """Acknowledge the delivery: it is done with."""


@dataclass(frozen=True)
class Nak:
    """Hand the delivery back, to come again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Copy the message to ``dlq.>`` with its reason (before the record says dead)."""

    reason: str
    error: str
    attempts: int


@dataclass(frozen=True)
class KeepLastTry:
    """Before the last attempt the server allows, keep a copy of the message where
    the worker that buries it can read it (see :mod:`rolebus.flows.last_try`)."""

    task_id: str


@dataclass(frozen=True)
class GrantBudget:
    """A budget approval resumes the task: the ledger grants what was approved."""

    escalation_id: str


@dataclass(frozen=True)
class Ignore:
    """Nothing to do for this message: say why (the ack follows)."""

    why: str


@dataclass(frozen=True)
class GiveBack:
    """This delivery cannot be finished now: a newer record this attempt did not
    read, or a write the server could not take. Give it back (the role's retry
    delay), to be read afresh when it comes again; ``why`` names the reason."""

    why: str


Action = (
    Run
    | AskBoundary
    | Publish
    | Ack
    | Nak
    | DeadLetter
    | KeepLastTry
    | GrantBudget
    | Ignore
    | GiveBack
)


@dataclass(frozen=True, kw_only=True)
class Transition:
    """What one input does to a task: the record after it (None: still none), whether
    to append it, and the actions around that write: ``before`` it (a dead letter
    exists before the record says dead) and ``after`` it. ``rule`` names the
    outcome of the rule that decided (the transition coverage counts them)."""

    record: TaskState | None
    write: bool = False
    #: The append may share an atomic batch (a saturated worker's): set for ends.
    shares_batch: bool = False
    before: tuple[Action, ...] = ()
    after: tuple[Action, ...] = ()
    rule: str = ""

    @property
    def runs(self) -> bool:
        return any(isinstance(action, Run) for action in self.after)
