"""The team's scripted agents (``builtin:pm``, ``builtin:eng-be``, ...).

Deterministic stand-ins for model-driven agents: no network, no model. Together
they play one feature through the team, which is what ``rolebus demo`` shows:

1. the PM files the feature and asks the architect for a design;
2. the architect hands the API contract (orders-api 1.0.0) to eng-be;
3. eng-be finds the spec ambiguous (no pagination) and escalates; the architect
   decides; eng-be accepts the contract and asks to spend money on a database;
4. the CTO approves the spend (a ``never`` rule of eng-be makes it ask);
5. eng-be implements (the first attempt hits a transient error and is retried)
   and hands the contract to eng-fe, "here is the API contract you requested";
6. eng-fe requests a change (an ``eta`` per order); eng-be publishes 1.1.0,
   which eng-fe accepts;
7. the performance engineer measures against eng-be's SLOs and reports.

Each function is an ordinary handler; any role can use any of them.
"""

from __future__ import annotations

import re
from typing import Any

from rolebus.handlers.base import BudgetBreachError, Handler, HandlerContext
from rolebus.handlers.scripted import scripted
from rolebus.team.authority import breach_request
from rolebus.wire.messages import (
    EscalationOption,
    EscalationRequest,
    FollowUp,
    HandoffRequest,
    Outcome,
    Task,
    Usage,
)

__all__ = ["ORDERS_API", "TEAM_AGENTS", "orders_api"]

_BUDGET_PER_MONTH = 500
# eng-be's simulated model call when it implements (what a real agent would spend).
_IMPLEMENT_TOKENS = 30_000
_IMPLEMENT_USD = 0.45
_IMPLEMENT_USAGE = Usage(
    model="scripted", calls=1, prompt_tokens=18_000, completion_tokens=6_000, cost_usd=0.33
)
_IMPLEMENT_COST = 0.33


def orders_api(version: str) -> dict[str, Any]:
    """The demo's contract: the orders API, with ``eta`` from 1.1.0 on."""
    output: dict[str, Any] = {
        "orders": {"type": "array"},
        "next_cursor": {"type": "string"},
    }
    if version != "1.0.0":
        output["eta"] = {"type": "string"}
    return {
        "name": "orders-api",
        "version": version,
        "description": "A customer's orders, for the order history page.",
        "operations": {
            "listOrders": {
                "method": "GET",
                "path": "/orders",
                "input": {"customer_id": {"type": "string", "required": True}},
                "output": output,
            },
            "getOrder": {
                "method": "GET",
                "path": "/orders/{id}",
                "input": {"id": {"type": "string", "required": True}},
                "output": {"id": {"type": "string"}, "status": {"type": "string"}},
            },
        },
    }


ORDERS_API = orders_api("1.0.0")


async def pm(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "feature":
        return Outcome.completed(
            {"filed": task.title, "priority": "P1", "success": "order history loads < 1 s"},
            tasks=[
                FollowUp(
                    subject="task.architecture.design",
                    title=f"Design the API for: {task.title}",
                    payload={"feature": task.title},
                )
            ],
        )
    if task.kind == "escalation":
        return Outcome.completed({"decision": "consistency first; we can tune p99 later"})
    return await scripted(task, context)


async def architect(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "design":
        return Outcome(
            status="handoff",
            result={"designed": "orders-api 1.0.0"},
            handoff=HandoffRequest(
                to="eng-be",
                contract="orders-api",
                version="1.0.0",
                document=ORDERS_API,
                note="implement this for the order history page",
            ),
        )
    if task.kind == "escalation":
        return Outcome.completed(
            {"decision": "cursor pagination, 50 orders a page; the cursor is opaque"}
        )
    if task.kind == "handoff-answer":
        return Outcome.completed({"noted": task.payload["status"]})
    return await scripted(task, context)


async def eng_be(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "handoff":  # the architect's contract, to implement
        if not context.decisions:
            return Outcome(
                status="escalate",
                escalation=EscalationRequest(
                    reason="ambiguous-spec",
                    question="GET /orders returns a list but the spec has no pagination: "
                    "offset or cursor?",
                    options=[
                        EscalationOption(name="offset", tradeoffs="simple; slow deep pages"),
                        EscalationOption(name="cursor", tradeoffs="fast at any depth; opaque"),
                    ],
                ),
            )
        contract = task.payload["contract"]
        version = task.payload["version"]
        return Outcome.completed(
            {"answer": "accepted", "pagination": context.decisions[-1].decision},
            tasks=[
                FollowUp(
                    subject="task.backend.spend",
                    title="Managed Postgres for order history ($50/month)",
                    payload={"amount_per_month": 50, "contract": f"{contract}@{version}"},
                )
            ],
        )
    if task.kind == "spend":  # runs only once the CTO approved it
        return Outcome.completed(
            {"provisioned": "managed Postgres, 2 vCPU"},
            tasks=[
                FollowUp(
                    subject="task.backend.implement",
                    title="Implement orders-api 1.0.0",
                    payload={"contracts": ["orders-api@1.0.0"]},
                )
            ],
        )
    if task.kind == "implement":
        if context.attempt == 1 and not context.decisions:
            return Outcome.failed("migration lock timeout (transient)", retryable=True)
        # Implementing takes a (simulated) model call bigger than the role's per-task
        # budget: the first time, the bus makes it ask the CTO.
        if context.budget is not None:
            breach = await context.budget.reserve(_IMPLEMENT_TOKENS, _IMPLEMENT_USD)
            if breach is not None:
                raise BudgetBreachError(breach_request(context.role, breach, usd=_IMPLEMENT_USD))
            await context.budget.settle(
                (_IMPLEMENT_TOKENS, _IMPLEMENT_USD), (_IMPLEMENT_USAGE.tokens, _IMPLEMENT_COST)
            )
        return Outcome(
            status="handoff",
            usage=_IMPLEMENT_USAGE,
            result={"implemented": "orders-api 1.0.0", "tests": "42 passed"},
            handoff=HandoffRequest(
                to="eng-fe",
                contract="orders-api",
                version="1.0.0",
                # The architect registered it in the demo (then this is a no-op); a task
                # published by hand (the README's quick start) registers it here.
                document=ORDERS_API,
                note="here is the API contract you requested",
            ),
            tasks=[
                FollowUp(
                    subject="task.performance.measure",
                    title="Load-test orders-api against eng-be's SLOs",
                    payload={"contract": "orders-api@1.0.0"},
                )
            ],
        )
    if task.kind == "handoff-answer":
        if task.payload["status"] == "changes-requested" and task.payload["version"] == "1.0.0":
            return Outcome(
                status="handoff",
                result={"revised": "orders-api 1.1.0", "because": task.payload["reasons"]},
                handoff=HandoffRequest(
                    to="eng-fe",
                    contract="orders-api",
                    version="1.1.0",
                    document=orders_api("1.1.0"),
                    note="added eta, as you asked",
                ),
            )
        return Outcome.completed({"noted": task.payload["status"]})
    return await scripted(task, context)


async def eng_fe(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "handoff":
        output = context.contracts["orders-api"]["document"]["operations"]["listOrders"]["output"]
        if "eta" not in output:
            return Outcome.completed(
                {
                    "answer": "changes-requested",
                    "reasons": ["the order history page shows an ETA: add eta to listOrders"],
                }
            )
        return Outcome.completed({"answer": "accepted"})
    return await scripted(task, context)


async def cto(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "escalation" and task.payload.get("approval"):
        amounts = [int(value) for value in re.findall(r"\$(\d+)", task.payload["question"])]
        if amounts and max(amounts) <= _BUDGET_PER_MONTH:
            return Outcome.completed(
                {
                    "approved": True,
                    "decision": f"within the ${_BUDGET_PER_MONTH}/month infrastructure budget",
                }
            )
        return Outcome.completed({"approved": False, "decision": "over budget: find a cheaper way"})
    if task.kind == "escalation":
        return Outcome.completed({"decision": "take the simpler option; revisit next quarter"})
    return await scripted(task, context)


async def perf_eng(task: Task, context: HandlerContext) -> Outcome:
    if task.kind == "measure":
        return Outcome.completed(
            {
                "p99_latency_ms": 38.0,
                "target_p99_ms": 100,
                "error_rate": 0.0004,
                "target_error_rate": 0.001,
                "met": True,
            }
        )
    return await scripted(task, context)


TEAM_AGENTS: dict[str, Handler] = {
    "pm": pm,
    "architect": architect,
    "eng-be": eng_be,
    "eng-fe": eng_fe,
    "cto": cto,
    "perf-eng": perf_eng,
}
