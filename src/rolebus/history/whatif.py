"""What-if runs compared: per input, what the recorded attempt and the rerun did
(status, valid on the first try, repair turns, calls, tokens, cost, model time), the
totals, whether the change made things worse, and runs kept to compare again later.

Pure but for the kept runs' files (``<home>/whatif/<run id>.json``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rolebus.errors import NotFoundError
from rolebus.history.rerun import RerunResult

__all__ = ["FailOn", "KeptRun", "compare", "failed_gate", "rows_of", "side", "totals"]

FailOn = Literal["changed", "worse"]


def side(outcome: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """One side of an input: what it ended as, and what it cost."""
    usage = usage or {}
    calls = int(usage.get("calls", 0)) + int(usage.get("reused_calls", 0))
    status = (outcome or {}).get("status")
    return {
        "status": status,
        "valid_first_try": calls == 1 if calls else None,
        "repairs": max(0, calls - 1),
        "calls": calls,
        "asked": int(usage.get("calls", 0)),  # paid for in this run (the rest reused)
        "tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "cost_usd": usage.get("cost_usd"),
        "latency_ms": usage.get("latency_ms"),
        "model": usage.get("model"),
    }


def rows_of(results: list[RerunResult]) -> list[dict[str, Any]]:
    """A row per input: both sides, whether the outcome changed, or why it could not
    be run (never shown as a difference)."""
    rows = []
    for result in results:
        old = side(result.recorded, result.recorded_usage)
        old["state"] = result.recorded_state
        row: dict[str, Any] = {
            "task_id": result.task_id,
            "title": result.title,
            "old": old,
            "new": None if result.error else side(result.new, result.new_usage),
            "changed": None if result.error else not result.same,
            "error": result.error,
            "recorded": result.recorded,
            "outcome": None if result.error else result.new,
        }
        rows.append(row)
    return rows


def _sum(rows: list[dict[str, Any]], which: str, field: str) -> float:
    return sum(float(row[which][field] or 0) for row in rows if row[which] is not None)


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run in a few figures (errors left out of both sides' sums)."""
    ran = [row for row in rows if row["error"] is None]
    changed = sum(1 for row in ran if row["changed"])
    completed = {
        which: sum(1 for row in ran if (row[which] or {}).get("status") == "completed")
        for which in ("old", "new")
    }
    return {
        "inputs": len(rows),
        "errors": len(rows) - len(ran),
        "changed": changed,
        "changed_share": changed / len(ran) if ran else 0.0,
        "completed": completed,
        **{
            f"{field}": {which: _sum(ran, which, field) for which in ("old", "new")}
            for field in ("tokens", "cost_usd", "latency_ms", "asked", "repairs")
        },
    }


def failed_gate(rows: list[dict[str, Any]], fail_on: FailOn | None, cost_share: float) -> str:
    """Why the gate refuses the change ("" when it does not). ``worse``: an input
    that completed no longer does, or the cost grew by more than ``cost_share``."""
    if fail_on is None:
        return ""
    ran = [row for row in rows if row["error"] is None]
    if fail_on == "changed":
        changed = [row["task_id"] for row in ran if row["changed"]]
        return f"{len(changed)} input(s) changed: {', '.join(changed[:5])}" if changed else ""
    lost = [
        row["task_id"]
        for row in ran
        if row["old"]["status"] == "completed" and row["new"]["status"] != "completed"
    ]
    if lost:
        return f"{len(lost)} input(s) no longer complete: {', '.join(lost[:5])}"
    summed = totals(rows)["cost_usd"]
    if summed["old"] and summed["new"] > summed["old"] * (1 + cost_share):
        return (
            f"the cost grew from ${summed['old']:.6f} to ${summed['new']:.6f} "
            f"(more than {cost_share:.0%})"
        )
    return ""


@dataclass(frozen=True)
class KeptRun:
    """A what-if run as kept: its settings and rows."""

    id: str
    at: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def new(cls, settings: dict[str, Any], rows: list[dict[str, Any]]) -> KeptRun:
        at = datetime.now(UTC)
        return cls(f"{at:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}", at.isoformat(), settings, rows)

    def save(self, home: Path) -> Path:
        folder = home / "whatif"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.id}.json"
        path.write_text(json.dumps(self.as_json(), indent=1, default=str), encoding="utf-8")
        return path

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "settings": self.settings, "rows": self.rows}

    @classmethod
    def load(cls, home: Path, run_id: str) -> KeptRun:
        path = home / "whatif" / f"{run_id}.json"
        if "/" in run_id or not path.is_file():
            kept = sorted(p.stem for p in (home / "whatif").glob("*.json"))
            raise NotFoundError(
                f"no kept what-if run {run_id!r} in {home / 'whatif'}",
                hint=f"kept runs: {', '.join(kept[-5:])}" if kept else "run `rolebus rerun` first",
            )
        value = json.loads(path.read_text(encoding="utf-8"))
        return cls(value["id"], value["at"], value["settings"], value["rows"])


def compare(first: KeptRun, second: KeptRun) -> list[dict[str, Any]]:
    """Two kept runs of the same inputs, side by side: the first run's new side is
    the old side here (no model is asked)."""
    by_task = {row["task_id"]: row for row in first.rows}
    rows = []
    for row in second.rows:
        before = by_task.get(row["task_id"])
        if before is None:
            continue
        error = before["error"] or row["error"]
        rows.append(
            {
                "task_id": row["task_id"],
                "title": row["title"],
                "old": before["new"] if before["new"] is not None else before["old"],
                "new": row["new"],
                "changed": None if error else before["outcome"] != row["outcome"],
                "error": error,
                "recorded": before["outcome"],
                "outcome": row["outcome"],
            }
        )
    return rows
