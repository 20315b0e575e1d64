"""What a handler's answer may ask, and what only the bus and the org chart decide.

A handler's outcome (a model's answer above all) is data from outside: it may ask a
question of anyone the role may reach, never open what only the bus opens (a budget
or brake approval, with amounts the bus computed), never name amounts an approval
would grant, never escalate to its own role. :func:`refusal` says why an outcome is
refused (an LLM role gets a repair turn with that reason; then the task is
dead-lettered with it). :func:`quoted` is how text from a task or a model reaches an
approver: as data, set apart from the instructions.
"""

from __future__ import annotations

import math
from typing import Final

from rolebus.team.budget import BUDGET_REASON, RAISE_DAILY_CAP, RAISE_TASK_ALLOWANCE, Breach
from rolebus.team.roles import PERSON, NeverRule, RoleSpec
from rolebus.wire.messages import EscalationOption, EscalationRequest, Outcome, Task

__all__ = [
    "AMOUNT_FIELDS",
    "BRAKE_REASON",
    "BUS_REASONS",
    "TOOL_REASON",
    "approver_for",
    "brake_request",
    "breach_request",
    "depth_in_flow",
    "model_refusal",
    "quoted",
    "refusal",
]

#: The escalation reason of a brake (a loop over its bound: escalation rounds).
BRAKE_REASON: Final = "brake"
#: Escalations only the bus opens.
BUS_REASONS: Final = frozenset({BUDGET_REASON, BRAKE_REASON})
#: Option fields an approval grants: only the bus's own requests carry them.
AMOUNT_FIELDS: Final = frozenset({"tokens", "usd", "cap"})
#: Where quoted text starts and ends (removed from inside it, so it cannot end early).
OPEN, CLOSE = "«", "»"


def refusal(outcome: Outcome, role: RoleSpec) -> str | None:
    """Why the bus refuses ``outcome`` from ``role``'s handler (None: it may stand)."""
    request = outcome.escalation
    if outcome.status != "escalate" or request is None:
        return None
    if request.reason in BUS_REASONS:
        return (
            f"an escalation with reason {request.reason!r} is opened by the bus alone, "
            "with amounts it computed: ask a question with another reason"
        )
    asked_first = {kind for rule in role.never if rule.action == "approval" for kind in rule.kinds}
    if request.approval and request.reason in asked_first:
        return (
            f"a {request.reason!r} approval is opened by the bus, for a task of that kind "
            "(the role's boundary): send that task instead"
        )
    if request.to == role.id:
        return f"{role.id} cannot escalate to itself: leave 'to' out, or name another role"
    for option in request.options:
        named = sorted(AMOUNT_FIELDS & set(option.model_extra or {}))
        if named:
            return (
                f"option {option.name!r} names {', '.join(named)}: what an approval grants "
                "is computed by the bus, not given in an answer"
            )
    return None


#: What a tool approval's reason starts with (handlers/llm.py opens them).
TOOL_REASON = "tool-"


def model_refusal(outcome: Outcome, role: RoleSpec) -> str | None:
    """Why the bus refuses ``outcome`` from a model: what it refuses from any
    handler, and an approval for a tool, which the LLM handler opens when the model
    calls the tool (a model that opened one could have an approver say yes to its own
    words, then call the tool on that yes)."""
    request = outcome.escalation
    if (
        outcome.status == "escalate"
        and request is not None
        and request.reason.startswith(TOOL_REASON)
    ):
        return (
            f"an escalation with reason {request.reason!r} is opened by the bus when "
            "you call the tool: call it instead"
        )
    return refusal(outcome, role)


def depth_in_flow(task: Task) -> int:
    """How many follow-up generations ``task`` is below its flow's root (the bus
    numbers a follow-up ``<cause>-<n>``; any other id counts as a root)."""
    root = task.flow_id
    if task.id == root or not task.id.startswith(f"{root}-"):
        return 0
    return task.id[len(root) :].count("-")


def approver_for(rule: NeverRule, task: Task) -> str | None:
    """Who approves a boundary for ``task``: the rule's ``to``, or a person when the
    amount the task claims is above the rule's ``person_above_usd`` (or unreadable:
    the task's own word is no reason to let a role decide)."""
    if rule.person_above_usd is None:
        return rule.to
    amount = task.payload.get("usd")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return PERSON
    return PERSON if amount > rule.person_above_usd else rule.to


def brake_request(role: RoleSpec, *, limit: str, value: int, asked: str) -> EscalationRequest:
    """The approval a brake asks: the bound by name and value, and what was asked (as
    data). Approving lets the task go as far again; rejecting ends it."""
    return EscalationRequest(
        reason=BRAKE_REASON,
        to=role.reports_to or PERSON,
        approval=True,
        question=f"{role.id} met its brake {limit} = {value}: {asked}. Approve to let it "
        "go as far again; reject to end the task.",
    )


def quoted(text: str, *, limit: int = 500) -> str:
    """``text`` as data for an approver: on one line, bounded, between « and »."""
    flat = " ".join(text.replace(OPEN, "").replace(CLOSE, "").split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return f"{OPEN}{flat}{CLOSE}"


def breach_request(role: RoleSpec, breach: Breach, *, usd: float | None) -> EscalationRequest:
    """The approval a breach asks for: who, why, and the options with their amounts
    (computed here, from the ledger: never taken from an answer)."""
    # What the call may need, not only the shortfall: the resumed task's prompt also
    # carries the decision, so it asks for a little more than the refused one.
    is_usd = breach.cap.startswith("usd")
    grant = max(breach.shortfall, breach.needs)
    tokens = 0 if is_usd else math.ceil(grant)
    dollars = round(grant, 6) if is_usd else 0.0
    amount = f"${dollars:.4f}" if is_usd else f"{tokens:,} tokens"
    cost = f" (this call: up to ${usd:.2f})" if usd is not None else ""
    limits = role.budget
    to = role.budget_approver
    if (limits.person_above_tokens is not None and tokens > limits.person_above_tokens) or (
        limits.person_above_usd is not None and max(dollars, usd or 0.0) > limits.person_above_usd
    ):
        to = PERSON  # the role file says: above this, a person decides, whatever a role says
    return EscalationRequest(
        reason=BUDGET_REASON,
        to=to,
        approval=True,
        question=f"{breach.describe(role.id)}{cost}. Approve to let the task go on.",
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
                    "tradeoffs": f"raise {role.id}'s {breach.cap} by {amount} for every task today "
                    "(decide with this option's name in the decision)",
                    "cap": breach.cap,
                    "tokens": tokens,
                    "usd": dollars,
                }
            ),
            EscalationOption(name="reject", tradeoffs="end the task rejected, nothing spent"),
        ],
    )
