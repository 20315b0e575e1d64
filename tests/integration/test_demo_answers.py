"""The read commands answer about the demo's flow what they answered before task
records moved into the history stream (``demo_answers.json``, made by
``demo_answers.py`` at the commit before that change).

Two differences are deliberate. Since then a role sends under its own token
(``task.architecture.design.pm``; subjects.md, "Who sent it"), so the subjects
``rolebus tasks`` lists carry their sender: taken out before comparing. And a
boundary's approval question quotes the task's title as data (``the task titled
«...»``: the model is untrusted, README), which demo_answers.json was updated for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rolebus.nats.server import EmbeddedServer
from rolebus.wire.subjects import sender_of

from .demo_answers import answers

BEFORE = json.loads((Path(__file__).parent / "demo_answers.json").read_text(encoding="utf-8"))


def _without_senders(rows: list[list[Any]]) -> tuple[list[list[Any]], set[str]]:
    """The ``tasks`` rows with their subjects' sender tokens taken out, and the senders."""
    senders = set()
    plain = []
    for task_id, state, role, subject, *rest in rows:
        sender = sender_of(subject)
        if sender is not None:
            senders.add(sender)
            subject = subject.rsplit(".", 1)[0]
        plain.append([task_id, state, role, subject, *rest])
    return plain, senders


def test_tasks_show_rebuild_status_and_replay_answer_as_before(
    rolebus_server: EmbeddedServer,
) -> None:
    now = answers(rolebus_server.url)
    now["tasks"], senders = _without_senders(now["tasks"])
    # The person's root task has none; each follow-up names the role that sent it.
    assert senders == {"pm", "architect", "eng-be", "eng-fe"}
    for command in BEFORE:
        assert now[command] == BEFORE[command], f"`rolebus {command}` answers differently"
