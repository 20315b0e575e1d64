"""The dashboard's HTML: one page frame (style, navigation, the live-update
script) and the small pieces the pages repeat. Every value shown is escaped here."""

from __future__ import annotations

import html
from typing import Any

from starlette.responses import HTMLResponse

from rolebus.flows.contracts import ContractVersion
from rolebus.flows.record import TaskState

__all__ = ["escape", "page", "slo_cell", "task_card", "version_row"]


_STYLE = """
body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
nav{background:#1d2330;padding:8px 16px}nav a{color:#fff;margin-right:16px;text-decoration:none}
main{padding:16px}.board{display:grid;gap:12px;align-items:start;
grid-template-columns:repeat(auto-fill,minmax(190px,1fr))}
.column{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px;min-width:0;
overflow-wrap:anywhere}.flow-wrap{overflow-x:auto;border:1px solid #dde1e7;background:#fff}
#detail{white-space:pre-wrap;margin:8px 0}.box:focus rect{stroke-width:4}
.options{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}.options button{text-align:left}
.chart{display:block;margin:4px 0}
.card{border:1px solid #e4e7ec;border-radius:4px;padding:6px;margin:6px 0;background:#fbfcfd}
.state-completed{border-left:4px solid #2f9e44}
.state-dead,.state-rejected{border-left:4px solid #e03131}
.state-input-required{border-left:4px solid #f59f00}
.state-claimed,.state-retrying{border-left:4px solid #1c7ed6}
.met{color:#2f9e44}.missed{color:#e03131}.muted{color:#6b7280;font-size:12px}
table{border-collapse:collapse}td,th{border:1px solid #dde1e7;padding:4px 8px;text-align:left}
"""

#: The dashboard's one script, served as /static/live.js (no inline script: the
#: Content-Security-Policy allows scripts from the dashboard only).
LIVE_JS = """
const source = new EventSource("/events");
let pending = false;
source.onmessage = () => {
  if (pending) return;
  pending = true;
  setTimeout(async () => {
    pending = false;
    const target = document.getElementById("live");
    if (!target || !document.body.dataset.live) return;
    const query = location.search.replace("?", "&");
    const response = await fetch(location.pathname + "?fragment=1" + query);
    if (response.ok) target.innerHTML = await response.text();
  }, 250);
};
document.addEventListener("click", (event) => {
  const box = event.target.closest("[data-detail]");
  const panel = document.getElementById("detail");
  if (box && panel) {
    panel.replaceChildren();
    for (const line of box.dataset.detail.split("\\n")) {
      const row = document.createElement("div");
      row.textContent = line;
      panel.appendChild(row);
    }
    if (box.dataset.task) {
      const link = document.createElement("a");
      link.href = "/tasks/" + encodeURIComponent(box.dataset.task);
      link.textContent = "open " + box.dataset.task;
      panel.appendChild(link);
    }
    panel.dataset.shown = box.dataset.id;
    return;
  }
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (source) navigator.clipboard.writeText(source.textContent);
});
"""


def escape(value: object) -> str:
    """Any value as HTML text (user-supplied strings included)."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, live: bool = False) -> HTMLResponse:
    """A whole page: ``body`` (already escaped) in the frame; ``live`` refreshes it
    on the dashboard's notices."""
    nav = "".join(
        f'<a href="{href}">{label}</a>'
        for href, label in (
            ("/", "Team"),
            ("/escalations", "Escalations"),
            ("/contracts", "Contracts"),
            ("/stream", "Event stream"),
            ("/whatif", "What-if"),
        )
    )
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} - rolebus"
        f"</title><style>{_STYLE}</style><script src='/static/live.js' defer></script></head>"
        f"<body{' data-live=1' if live else ''}><nav>{nav}</nav><main>"
        f"<h1>{escape(title)}</h1><div id='live'>{body}</div></main></body></html>"
    )
    return HTMLResponse(document)


def task_card(state: TaskState) -> str:
    """A task on the board."""
    return (
        f'<div class="card state-{escape(state.state)}" data-task="{escape(state.task_id)}">'
        f'<a href="/tasks/{escape(state.task_id)}">{escape(state.title or state.task_id)}</a>'
        f'<div class="muted">{escape(state.state)}'
        f"{' (effects pending)' if state.effects_pending else ''} · {escape(state.kind)}"
        f"{' · attempt ' + escape(state.attempt) if state.attempt > 1 else ''}</div></div>"
    )


def model_calls(calls: list[dict[str, Any]]) -> str:
    """A task's recorded model calls: model, tokens, cost, latency, and the messages
    (a record never holds a key)."""
    rows = []
    for call in calls:
        usage = call.get("usage", {})
        cost = usage.get("cost_usd")
        messages = "".join(
            f"<details><summary>{escape(m.get('role'))}</summary>"
            f"<pre>{escape(m.get('content'))}</pre></details>"
            for m in call.get("messages", [])
        )
        rows.append(
            f"<tr><td>{escape(call.get('generation'))}.{escape(call.get('number'))}</td>"
            f"<td>{escape(call.get('model'))}</td><td>{escape(call.get('mode'))}</td>"
            f"<td>{escape(usage.get('prompt_tokens'))} + "
            f"{escape(usage.get('completion_tokens'))}</td>"
            f"<td>{escape(f'${cost:.4f}' if cost is not None else 'unknown')}</td>"
            f"<td>{escape(call.get('latency_ms'))} ms</td>"
            f"<td>{messages}<details><summary>answer</summary>"
            f"<pre>{escape(call.get('answer'))}</pre></details></td></tr>"
        )
    return (
        "<table class='calls'><tr><th>call</th><th>model</th><th>mode</th><th>tokens</th>"
        "<th>cost</th><th>latency</th><th>messages</th></tr>" + "".join(rows) + "</table>"
    )


def slo_cell(check: dict[str, Any]) -> str:
    if check["met"] is None:
        return '<span class="muted">no data</span>'
    css, word = ("met", "met") if check["met"] else ("missed", "not met")
    return f'<span class="{css}">{word}</span>'


def version_row(version: ContractVersion) -> str:
    asked = "; ".join(f"{role}: {' '.join(why)}" for role, why in version.changes_requested.items())
    return (
        f"<tr><td>{escape(version.document.version)}</td><td>{escape(version.author)}</td>"
        f"<td>{escape(', '.join(version.accepted_by) or '-')}</td>"
        f"<td>{escape(asked or '-')}</td></tr>"
    )
