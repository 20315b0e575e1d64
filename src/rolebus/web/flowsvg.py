"""A flow drawn as swimlanes (SVG): one lane per role, a box per message at its time,
arrows from cause to effect, bars for the time work took or waited.

Pure: it draws a :class:`~rolebus.history.flow.Flow` and reads nothing. The same
picture is the task page's and ``rolebus show ID --svg``'s (standalone: hover a box
for its details; on the dashboard a click shows them). Every text is escaped.
"""

from __future__ import annotations

import bisect
import html
from datetime import datetime

from rolebus.history.flow import Box, Flow

__all__ = ["render_flow"]

_LEFT = 110  # room for the lane names
_TOP = 30  # room for the time axis
_LANE = 70
_BOX_W = 136
_BOX_H = 34
_GAP = 16
_WIDTH = 900  # what a flow's whole duration spans before boxes push it wider
_LABEL = 20  # characters of a box's label

_COLOURS = {
    "task": "#1c7ed6",
    "follow-up": "#4dabf7",
    "handoff": "#7048e8",
    "escalation": "#f59f00",
    "decision": "#2f9e44",
    "retry": "#e8590c",
    "dead-letter": "#e03131",
}
_SPANS = {"working": "#adb5bd", "waiting": "#f59f00", "queued": "#74c0fc"}

_STYLE = """
.lane-bg{fill:#f8f9fa}.lane-bg.odd{fill:#eef1f4}.lane-name{font:600 13px system-ui,sans-serif}
.box rect{fill:#fff;stroke-width:2}.box{cursor:pointer}.box text{font:11px system-ui,sans-serif}
.box .kind{font-weight:600}.axis{font:11px system-ui,sans-serif;fill:#6b7280}
.arrow{fill:none;stroke:#495057;stroke-width:1.2;marker-end:url(#head)}
.arrow.retry{stroke-dasharray:4 3}.legend{font:11px system-ui,sans-serif}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _LABEL else text[: _LABEL - 1] + "…"


class _Axis:
    """Time to x: in time order, at the flow's own scale, but a box never overlaps
    the one before it on its lane, and never starts before its cause ends (a burst
    of messages in a millisecond stays readable, and every arrow points forward)."""

    def __init__(self, boxes: list[Box], start: datetime, end: datetime) -> None:
        duration = max((end - start).total_seconds(), 1e-3)
        self.scale = _WIDTH / duration  # px per second
        self.start = start
        self.times: list[float] = []
        self.xs: list[float] = []
        lane_free: dict[str, float] = {}
        placed: dict[str, float] = {}
        x = float(_LEFT + _GAP)
        for box in boxes:
            seconds = (box.at - start).total_seconds()
            x = max(
                x,
                _LEFT + _GAP + seconds * self.scale,
                lane_free.get(box.lane, 0.0),
                placed[box.cause] + _BOX_W + _GAP if box.cause in placed else 0.0,
            )
            self.times.append(seconds)
            self.xs.append(x)
            placed[box.id] = x
            lane_free[box.lane] = x + _BOX_W + _GAP

    def x(self, at: datetime) -> float:
        seconds = (at - self.start).total_seconds()
        if not self.times:
            return _LEFT + _GAP + seconds * self.scale
        index = bisect.bisect_right(self.times, seconds)
        if index == 0:
            return self.xs[0]
        if index == len(self.times):
            return max(self.xs) + (seconds - self.times[-1]) * self.scale
        t0, t1, x0, x1 = (
            self.times[index - 1],
            self.times[index],
            self.xs[index - 1],
            self.xs[index],
        )
        return x0 + (x1 - x0) * ((seconds - t0) / (t1 - t0) if t1 > t0 else 0.0)


def render_flow(flow: Flow, *, standalone: bool = False) -> str:
    """The flow as one ``<svg>`` element (``standalone``: with its XML namespace,
    for a file of its own)."""
    start, end = flow.start, flow.end
    if start is None or end is None:
        return "<p class='muted'>No messages in this flow yet.</p>"
    axis = _Axis(flow.boxes, start, end)
    row = {lane: index for index, lane in enumerate(flow.lanes)}
    width = int(max(axis.x(end), max(axis.xs) + _BOX_W) + _GAP + 20)
    height = _TOP + _LANE * len(flow.lanes) + 40
    parts = [
        f'<svg class="flow" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="flow {_e(flow.correlation)}"'
        + (' xmlns="http://www.w3.org/2000/svg"' if standalone else "")
        + f' data-correlation="{_e(flow.correlation)}">',
        f"<style>{_STYLE}</style>",
        '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" '
        'fill="#495057"/></marker></defs>',
    ]
    for lane, index in row.items():
        y = _TOP + index * _LANE
        parts.append(
            f'<g class="lane" data-role="{_e(lane)}"><rect class="lane-bg{" odd" * (index % 2)}" '
            f'x="0" y="{y}" width="{width}" height="{_LANE}"/><text class="lane-name" x="10" '
            f'y="{y + _LANE / 2 + 4}">{_e(lane)}</text></g>'
        )
    parts.append(_ticks(axis, start, end, width))
    positions: dict[str, tuple[float, float]] = {}
    for box, x in zip(flow.boxes, axis.xs, strict=True):
        positions[box.id] = (x, _TOP + row[box.lane] * _LANE + (_LANE - _BOX_H) / 2 - 6)
    for span in flow.spans:
        if span.lane not in row:
            continue
        x0, x1 = axis.x(span.start), axis.x(span.end)
        y = _TOP + row[span.lane] * _LANE + _LANE - 12
        seconds = (span.end - span.start).total_seconds()
        parts.append(
            f'<rect class="span span-{_e(span.kind)}" data-box="{_e(span.box)}" x="{x0:.1f}" '
            f'y="{y}" width="{max(2.0, x1 - x0):.1f}" height="6" rx="2" '
            f'fill="{_SPANS.get(span.kind, "#adb5bd")}"><title>{_e(span.kind)} '
            f"{_seconds(seconds)}{_e(': ' + span.label if span.label else '')}</title></rect>"
        )
    for box in flow.boxes:
        if box.cause in positions:
            parts.append(_arrow(positions[box.cause], positions[box.id], box.kind))
    for box in flow.boxes:
        parts.append(_box(box, *positions[box.id], start))
    parts.append(_legend(height - 18))
    parts.append("</svg>")
    return "".join(parts)


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _ticks(axis: _Axis, start: datetime, end: datetime, width: int) -> str:
    """Time offsets from the flow's start above the lanes, one per box column
    that has room for its label."""
    ticks = []
    last = -1e9
    for seconds, x in zip(axis.times, axis.xs, strict=True):
        if x - last < 70:
            continue
        last = x
        ticks.append(f'<text class="axis" x="{x:.1f}" y="{_TOP - 10}">+{_seconds(seconds)}</text>')
    return f'<g class="ticks">{"".join(ticks)}</g>'


def _arrow(cause: tuple[float, float], effect: tuple[float, float], kind: str) -> str:
    x1, y1 = cause[0] + _BOX_W, cause[1] + _BOX_H / 2
    x2, y2 = effect[0], effect[1] + _BOX_H / 2
    bend = max(20.0, (x2 - x1) / 2)
    dashed = " retry" if kind in ("retry", "dead-letter") else ""
    return (
        f'<path class="arrow{dashed}" d="M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} '
        f'{x2 - bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"/>'
    )


def _box(box: Box, x: float, y: float, start: datetime) -> str:
    colour = _COLOURS.get(box.kind, "#495057")
    offset = _seconds((box.at - start).total_seconds())
    details = "\n".join((*box.details, f"+{offset} into the flow"))
    task = f' data-task="{_e(box.task_id)}"' if box.task_id else ""
    return (
        f'<g class="box kind-{_e(box.kind)}" data-kind="{_e(box.kind)}" data-id="{_e(box.id)}" '
        f'data-lane="{_e(box.lane)}" data-at="{_e(box.at.isoformat())}"{task} '
        f'data-detail="{_e(details)}" tabindex="0"><title>{_e(details)}</title>'
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="5" '
        f'stroke="{colour}"/><text class="kind" x="{x + 7:.1f}" y="{y + 14:.1f}" '
        f'fill="{colour}">{_e(box.kind)}</text><text x="{x + 7:.1f}" y="{y + 27:.1f}">'
        f"{_e(_short(box.label))}</text></g>"
    )


def _legend(y: float) -> str:
    items = []
    x = 10
    for kind, colour in _COLOURS.items():
        items.append(
            f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="none" stroke="{colour}" '
            f'stroke-width="2"/><text class="legend" x="{x + 14}" y="{y}">{kind}</text>'
        )
        x += 24 + 7 * len(kind)
    for kind, colour in _SPANS.items():
        items.append(
            f'<rect x="{x}" y="{y - 6}" width="16" height="6" fill="{colour}"/>'
            f'<text class="legend" x="{x + 20}" y="{y}">{kind}</text>'
        )
        x += 28 + 7 * len(kind)
    return f'<g class="legend">{"".join(items)}</g>'
