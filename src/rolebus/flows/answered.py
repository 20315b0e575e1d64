"""What a handler's attempt can answer besides an outcome (pure data): the budget
gate's breach, with the approval the bus computed, and a cancel that stopped it."""

from __future__ import annotations

from dataclasses import dataclass

from rolebus.wire.messages import EscalationRequest, Usage

__all__ = ["BreachAsked", "CancelRequested"]


@dataclass(frozen=True)
class BreachAsked:
    """The budget gate refused a call: the task parks behind ``request``; ``usage``
    is what the attempt paid before the refused call."""

    request: EscalationRequest
    usage: Usage | None = None


@dataclass(frozen=True)
class CancelRequested:
    """``rolebus cancel`` stopped the attempt (``why``: its reason, as recorded)."""

    why: str
