"""A small team for worker tests, with short timings so failures show up fast."""

from __future__ import annotations

from pathlib import Path

ROLE = """+++
id = "{id}"
title = "{id}"
{reports_to}
domains = {domains}
handler = {handler}
concurrency = {concurrency}
ack_wait = "{ack_wait}"
max_deliver = {max_deliver}
backoff = ["100ms", "200ms"]
+++
Test persona of {id}.
"""


def write_team(
    folder: Path,
    *,
    handler: str = '"builtin:scripted"',
    ack_wait: str = "2s",
    max_deliver: int = 3,
    concurrency: int = 4,
) -> Path:
    """cto at the top; eng-be (backend) and eng-fe (frontend) report to it."""
    folder.mkdir(parents=True, exist_ok=True)
    for role_id, domains, reports_to in (
        ("cto", '["budget"]', ""),
        ("eng-be", '["backend"]', 'reports_to = "cto"'),
        ("eng-fe", '["frontend"]', 'reports_to = "cto"'),
    ):
        (folder / f"{role_id}.md").write_text(
            ROLE.format(
                id=role_id,
                domains=domains,
                reports_to=reports_to,
                handler=handler,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                concurrency=concurrency,
            ),
            encoding="utf-8",
        )
    return folder
