"""A what-if run as a picture (SVG): per input, the recorded attempt's tokens and the
rerun's side by side, the outcome's status on each, an input that no longer completes
in red. Pure: it draws the rows of :mod:`rolebus.history.whatif`; every text is
escaped."""

from __future__ import annotations

import html
from typing import Any

__all__ = ["render_whatif"]

_ROW = 26
_LEFT = 220
_WIDTH = 760
_BAR = 9


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_whatif(rows: list[dict[str, Any]], *, measure: str = "tokens") -> str:
    """Old (grey) against new (blue) ``measure`` per input; errors as a note."""
    values = [
        float((row[which] or {}).get(measure) or 0)
        for row in rows
        for which in ("old", "new")
        if row["error"] is None
    ]
    top = max(values, default=0.0) or 1.0
    span = _WIDTH - _LEFT - 140
    height = 40 + _ROW * max(1, len(rows))
    parts = [
        f'<svg class="chart whatif" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" '
        f'height="{height}" viewBox="0 0 {_WIDTH} {height}" role="img" '
        f'aria-label="{_e(measure)} per input, recorded against rerun">',
        f'<text class="title" x="8" y="16">{_e(measure)} per input: recorded '
        '<tspan fill="#9aa3b2">■</tspan> against rerun <tspan fill="#3b82f6">■</tspan></text>',
    ]
    for index, row in enumerate(rows):
        y = 30 + index * _ROW
        title = str(row.get("title") or row["task_id"])
        parts.append(f'<text x="8" y="{y + 12}">{_e(title[:34])}</text>')
        if row["error"] is not None:
            parts.append(
                f'<text x="{_LEFT}" y="{y + 12}" fill="#b45309">{_e(str(row["error"])[:80])}</text>'
            )
            continue
        old, new = row["old"], row["new"]
        lost = old.get("status") == "completed" and new.get("status") != "completed"
        for offset, which, color in ((0, old, "#9aa3b2"), (_BAR + 1, new, "#3b82f6")):
            value = float(which.get(measure) or 0)
            width = max(1.0, span * value / top)
            parts.append(
                f'<rect x="{_LEFT}" y="{y + offset}" width="{width:.1f}" height="{_BAR}" '
                f'fill="{color}" data-value="{value:g}"><title>{_e(measure)} {value:g}'
                "</title></rect>"
            )
        status = f"{old.get('status')} → {new.get('status')}"
        parts.append(
            f'<text x="{_WIDTH - 132}" y="{y + 12}" fill="{"#e03131" if lost else "#6b7280"}"'
            f' data-lost="{int(lost)}">{_e(status)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
