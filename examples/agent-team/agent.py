#!/usr/bin/env python3
"""An example agent for rolebus's command protocol: how a coding-agent CLI plugs in.

rolebus runs this once per message for a role whose handler is
``{ command = ["python3", "examples/agent-team/agent.py"], timeout = "5m" }``:

- stdin: one JSON object: {"task": {...}, "role": {"id", "title", "persona"},
  "context": {"subject", "attempt", "decisions": [...], "contracts": {...}, "input"}}
- stdout: one JSON object: the outcome, {"status": "completed" | "failed" |
  "escalate" | "handoff", "result"?, "error"?, "retryable"?, "tasks"?,
  "escalation"?, "handoff"?}

With ROLEBUS_AGENT_CMD set (for example ``claude -p`` or any CLI that reads a
prompt on stdin), the prompt below goes to that program and its first JSON
object is the answer. Without it, the script answers from a small playbook so
the example runs offline, deterministically (the same story as ``rolebus demo``).
Standard library only: copy it next to your own agent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any

ORDERS = {
    "name": "orders-api",
    "description": "A customer's orders, for the order history page.",
    "operations": {
        "listOrders": {
            "method": "GET",
            "path": "/orders",
            "input": {"customer_id": {"type": "string", "required": True}},
            "output": {"orders": {"type": "array"}, "next_cursor": {"type": "string"}},
        },
        "getOrder": {
            "method": "GET",
            "path": "/orders/{id}",
            "input": {"id": {"type": "string", "required": True}},
            "output": {"id": {"type": "string"}, "status": {"type": "string"}},
        },
    },
}


def contract(version: str) -> dict[str, Any]:
    document = json.loads(json.dumps(ORDERS))
    document["version"] = version
    if version != "1.0.0":
        document["operations"]["listOrders"]["output"]["eta"] = {"type": "string"}
    return document


def prompt(request: dict[str, Any]) -> str:
    """What a model would be given: the persona, the task, the context, the protocol."""
    return (
        f"{request['role']['persona']}\n\n"
        f"Task ({request['task']['kind']}): {request['task']['title']}\n"
        f"Payload: {json.dumps(request['task']['payload'])}\n"
        f"Context: {json.dumps(request['context'])}\n\n"
        'Answer with one JSON object: {"status": "completed"|"failed"|"escalate"|'
        '"handoff", ...} as described by rolebus\'s command protocol.'
    )


def ask_model(command: str, request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        shlex.split(command), input=prompt(request), capture_output=True, text=True, check=True
    )
    match = re.search(r"\{.*\}", done.stdout, re.S)
    if match is None:
        raise SystemExit(f"the model answered no JSON: {done.stdout[:200]!r}")
    answer: dict[str, Any] = json.loads(match.group(0))
    return answer


def playbook(request: dict[str, Any]) -> dict[str, Any]:
    """The offline answers, by role and kind of input."""
    role = request["role"]["id"]
    task = request["task"]
    kind = task["kind"]
    context = request["context"]
    payload = task["payload"]
    decisions = context["decisions"]
    if kind == "escalation":
        if payload.get("approval"):
            cost = max(int(v) for v in re.findall(r"\$(\d+)", payload["question"]) or ["0"])
            return {
                "status": "completed",
                "result": {"approved": cost <= 500, "decision": f"${cost}/month: ok"},
            }
        return {
            "status": "completed",
            "result": {"decision": "cursor pagination, 50 orders a page"},
        }
    if role == "pm" and kind == "feature":
        return {
            "status": "completed",
            "result": {"priority": "P1"},
            "tasks": [
                {
                    "subject": "task.architecture.design",
                    "title": f"Design the API for: {task['title']}",
                }
            ],
        }
    if role == "architect" and kind == "design":
        return {
            "status": "handoff",
            "handoff": {
                "to": "eng-be",
                "contract": "orders-api",
                "version": "1.0.0",
                "document": contract("1.0.0"),
                "note": "implement this",
            },
        }
    if role == "eng-be" and kind == "handoff":
        if not decisions:
            return {
                "status": "escalate",
                "escalation": {
                    "reason": "ambiguous-spec",
                    "question": "GET /orders has no pagination: offset or cursor?",
                    "options": [
                        {"name": "offset", "tradeoffs": "simple; slow deep pages"},
                        {"name": "cursor", "tradeoffs": "fast; opaque"},
                    ],
                },
            }
        return {
            "status": "completed",
            "result": {"answer": "accepted"},
            "tasks": [
                {
                    "subject": "task.backend.spend",
                    "title": "Managed Postgres for order history ($50/month)",
                }
            ],
        }
    if role == "eng-be" and kind == "spend":
        return {
            "status": "completed",
            "result": {"provisioned": "postgres"},
            "tasks": [
                {
                    "subject": "task.backend.implement",
                    "title": "Implement orders-api 1.0.0",
                    "payload": {"contracts": ["orders-api@1.0.0"]},
                }
            ],
        }
    if role == "eng-be" and kind == "implement":
        if context["attempt"] == 1:
            return {"status": "failed", "error": "migration lock timeout", "retryable": True}
        return {
            "status": "handoff",
            "handoff": {
                "to": "eng-fe",
                "contract": "orders-api",
                "version": "1.0.0",
                "note": "here is the API contract you requested",
            },
            "tasks": [
                {
                    "subject": "task.performance.measure",
                    "title": "Load-test orders-api against eng-be's SLOs",
                }
            ],
        }
    if role == "eng-be" and kind == "handoff-answer" and payload["status"] == "changes-requested":
        return {
            "status": "handoff",
            "handoff": {
                "to": "eng-fe",
                "contract": "orders-api",
                "version": "1.1.0",
                "document": contract("1.1.0"),
                "note": "added eta",
            },
        }
    if role == "eng-fe" and kind == "handoff":
        output = context["contracts"]["orders-api"]["document"]["operations"]["listOrders"]
        if "eta" not in output["output"]:
            return {
                "status": "completed",
                "result": {"answer": "changes-requested", "reasons": ["add eta to listOrders"]},
            }
        return {"status": "completed", "result": {"answer": "accepted"}}
    if role == "perf-eng" and kind == "measure":
        return {
            "status": "completed",
            "result": {"p99_latency_ms": 41.0, "target_p99_ms": 100, "met": True},
        }
    return {"status": "completed", "result": {"noted": task["title"]}}


def main() -> None:
    request = json.load(sys.stdin)
    command = os.environ.get("ROLEBUS_AGENT_CMD")
    answer = ask_model(command, request) if command else playbook(request)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
