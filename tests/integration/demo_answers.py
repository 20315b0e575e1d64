"""What the read commands answer about the demo's flow, with its random ids and its
times taken out: ``python tests/integration/demo_answers.py NATS_URL`` plays the demo
against that server and prints the answers as JSON.

``demo_answers.json`` next to it holds what rolebus answered before task records
moved into the history stream (events schema version 1, made with this script at
that commit); ``test_demo_answers.py`` checks that today's answers are the same.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: Notes about running attempts come or not with timing (``claimed`` only past
#: 0.25 s): not part of the answer.
_TIMING = {"claimed", "progress"}


def _rolebus(url: str, *args: str) -> Any:
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES_DIR": str(REPO / "roles")}
    done = subprocess.run(
        [sys.executable, "-m", "rolebus", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rolebus {' '.join(args)} failed: {done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if args[0] == "replay":
        return [json.loads(line) for line in lines]
    return json.loads(done.stdout)


def _ids(root: str, value: Any) -> Any:
    """Every id derived from the flow's root as ``ROOT...``."""
    text = json.dumps(value)
    return json.loads(re.sub(re.escape(root), "ROOT", text))


def answers(url: str) -> dict[str, Any]:
    from rich.console import Console

    from rolebus.cli.demo import play
    from rolebus.config import Settings
    from rolebus.team.roles import load_team

    result = asyncio.run(
        play(
            Settings(nats_url=url),
            load_team(REPO / "roles"),
            console=Console(file=io.StringIO()),
            timeout=60,
        )
    )
    root = result.root.id
    tasks = _rolebus(url, "tasks", "--json")
    shown = _rolebus(url, "show", root, "--json")
    rebuilt = _rolebus(url, "rebuild", "--json")
    status = _rolebus(url, "status", "--json")
    replayed = _rolebus(url, "replay", "--correlation", root, "--json")
    events = sorted(
        (
            m["message"].get("entity"),
            m["message"]["state"],
            m["message"].get("role"),
            m["message"]["task_id"],
        )
        for m in replayed
        if m.get("message") and "state" in m["message"]
        if m["message"]["state"] not in _TIMING
    )
    answered: dict[str, Any] = _ids(
        root,
        {
            "tasks": sorted(
                (t["task_id"], t["state"], t["role"], t["subject"], t["kind"], t["title"])
                for t in tasks
            ),
            "show": {
                "task": [shown["task"]["state"], shown["task"]["role"]],
                "flow": sorted((s["task_id"], s["state"], s["role"]) for s in shown["flow"]),
                "escalations": sorted(
                    (e["id"], e["status"], e["holder"], e["reason"]) for e in shown["escalations"]
                ),
            },
            "rebuild": rebuilt,
            "status": sorted(
                (
                    row["role"],
                    row["completed"],
                    row["attempts"],
                    row["failures"],
                    row["backlog"],
                    row["in_flight"],
                    row["dead_letters"],
                )
                for row in status
            ),
            "replay": events,
        },
    )
    return answered


if __name__ == "__main__":
    print(json.dumps(answers(sys.argv[1]), indent=1))
