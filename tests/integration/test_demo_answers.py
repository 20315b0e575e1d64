"""The read commands answer about the demo's flow what they answered before task
records moved into the history stream (``demo_answers.json``, made by
``demo_answers.py`` at the commit before that change)."""

from __future__ import annotations

import json
from pathlib import Path

from rolebus.nats.server import EmbeddedServer

from .demo_answers import answers

BEFORE = json.loads((Path(__file__).parent / "demo_answers.json").read_text(encoding="utf-8"))


def test_tasks_show_rebuild_status_and_replay_answer_as_before(
    rolebus_server: EmbeddedServer,
) -> None:
    now = answers(rolebus_server.url)
    for command in BEFORE:
        assert now[command] == BEFORE[command], f"`rolebus {command}` answers differently"
