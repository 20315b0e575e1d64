"""The dashboard's what-if pages: the runs kept by ``rolebus rerun``, and one run as
charts (tokens and model time per input, recorded against rerun) and a table."""

from __future__ import annotations

import json
from pathlib import Path

from rolebus.errors import NotFoundError
from rolebus.history.whatif import KeptRun, totals
from rolebus.web.pages import escape as _e
from rolebus.web.whatifsvg import render_whatif

__all__ = ["kept_run", "kept_runs"]


def kept_runs(home: Path) -> str:
    folder = home / "whatif"
    runs = sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else []
    items = "".join(
        f'<li><a href="/whatif/{_e(path.stem)}">{_e(path.stem)}</a></li>' for path in runs
    )
    return f"<ul>{items}</ul>" if items else "<p>No kept runs: `rolebus rerun` keeps one.</p>"


def kept_run(home: Path, run_id: str) -> str:
    try:
        kept = KeptRun.load(home, run_id)
    except NotFoundError as error:
        return f"<p>{_e(error.message)}</p>"
    summary = totals(kept.rows)
    rows = "".join(
        f"<tr><td>{_e(row['title'])}</td>"
        + (
            f"<td colspan=4>{_e(row['error'])}</td>"
            if row["error"] is not None
            else f"<td>{_e(row['old']['status'])} → {_e(row['new']['status'])}</td>"
            f"<td>{_e(row['old']['tokens'])} → {_e(row['new']['tokens'])}</td>"
            f"<td>{_e(row['old']['cost_usd'])} → {_e(row['new']['cost_usd'])}</td>"
            f"<td>{_e(row['old']['latency_ms'])} → {_e(row['new']['latency_ms'])} ms</td>"
        )
        + "</tr>"
        for row in kept.rows
    )
    return (
        f"<p>{_e(json.dumps(kept.settings))}: {summary['inputs']} input(s), "
        f"{summary['changed']} changed; completed {summary['completed']['old']} → "
        f"{summary['completed']['new']}</p>{render_whatif(kept.rows)}"
        f"{render_whatif(kept.rows, measure='latency_ms')}"
        "<table><tr><th>input</th><th>status</th><th>tokens</th><th>cost</th>"
        f"<th>model time</th></tr>{rows}</table>"
    )
