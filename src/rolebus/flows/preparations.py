"""The writes a decision asks for before its input is stepped, as data.

Intake and answers are pure; what they decide may need a record other than the
task's written first (an escalation opened, climbed or decided, a contract version
registered, a review's answer recorded). Each is a conditional write: when another
writer came first, the shell reads the facts again and decides again.
"""

from __future__ import annotations

from dataclasses import dataclass

from rolebus.flows.contract_document import ContractVersion
from rolebus.flows.escalation_record import EscalationRecord, StoredEscalation
from rolebus.flows.inputs import Input
from rolebus.flows.outbox import Effect

__all__ = [
    "ClimbEscalation",
    "DecideEscalation",
    "OpenEscalation",
    "Preparation",
    "Prepared",
    "PublishContract",
    "RecordContractAnswer",
]


@dataclass(frozen=True)
class OpenEscalation:
    """Store a new escalation's first step."""

    record: EscalationRecord


@dataclass(frozen=True)
class ClimbEscalation:
    """Store the escalation's next step: a new holder one level up; then publish
    ``publish`` at once (an escalation that arrived before its climb was recorded:
    the climb's own messages are no task's outbox)."""

    stored: StoredEscalation
    climbed: EscalationRecord
    publish: tuple[Effect, ...] = ()


@dataclass(frozen=True)
class DecideEscalation:
    """Store the escalation's decision (its holder's answer)."""

    stored: StoredEscalation
    decided: EscalationRecord


@dataclass(frozen=True)
class PublishContract:
    """Register a contract version the compatibility rule let through."""

    version: ContractVersion


@dataclass(frozen=True)
class RecordContractAnswer:
    """Store a reviewer's answer to a contract version (its own key)."""

    contract: str
    version: str
    role: str
    accepted: bool
    reasons: tuple[str, ...]


Preparation = (
    OpenEscalation | ClimbEscalation | DecideEscalation | PublishContract | RecordContractAnswer
)


@dataclass(frozen=True)
class Prepared:
    """A decision: the input to step, once ``preparations`` are written in order."""

    given: Input
    preparations: tuple[Preparation, ...] = ()
