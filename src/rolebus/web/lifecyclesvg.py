"""The task lifecycle drawn (SVG) from its table: a box per stage, an arrow per
(stage, stage) pair that some input leads along, labelled with those inputs.

Pure: it draws :data:`rolebus.flows.lifecycle.TABLE` and reads nothing else, so the
picture cannot drift from the rules (docs/lifecycle.svg is this output, and a test
says so). Inputs that write nothing (a redelivery of a finished task, a stale
message) stay in their stage: ``rolebus lifecycle`` lists them.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Mapping

from rolebus.flows.lifecycle import STAGES, TABLE, Rows
from rolebus.flows.record import TERMINAL_STATES, State

__all__ = ["lifecycle_boxes", "lifecycle_edges", "render_lifecycle"]

_H = 36  # a stage's box
#: Where each box stands (by its first stage): a task arrives, runs, waits, ends.
_AT: Mapping[str, tuple[int, int]] = {
    State.NEW: (80, 250),
    State.CLAIMED: (320, 250),
    State.RETRYING: (320, 110),
    State.REDRIVEN: (320, 390),
    State.PARKED: (600, 410),
    State.RESUMED: (600, 110),
    State.COMPLETED: (870, 50),
    State.HANDED_OFF: (870, 140),
    State.REJECTED: (870, 230),
    State.CANCELLED: (870, 320),
    State.DEAD: (870, 430),
}
_TERMINAL = TERMINAL_STATES
_COLOURS: dict[str, str] = {
    State.DEAD: "#e03131",
    State.PARKED: "#f59f00",
    State.RESUMED: "#2f9e44",
}
_STYLE = (
    ".stage rect{fill:#fff;stroke-width:2}.stage.end rect{stroke-width:3}"
    ".stage text{font:600 12px system-ui,sans-serif;text-anchor:middle}"
    ".edge{fill:none;stroke:#868e96;stroke-width:1.2;marker-end:url(#head)}"
    ".label{font:10px system-ui,sans-serif;fill:#343a40;paint-order:stroke;"
    "stroke:#fff;stroke-width:3px}"
    ".caption{font:11px system-ui,sans-serif;fill:#495057}"
)

Table = Mapping[State, Rows]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def lifecycle_boxes(table: Table = TABLE) -> list[tuple[str, ...]]:
    """The boxes: unfinished stages whose every row is the same rule are one box
    (they behave alike, whatever the input); each end is a box of its own."""
    kinds = sorted({kind for rows in table.values() for kind in rows}, key=lambda k: k.__name__)
    boxes: dict[object, list[str]] = {}
    for stage in STAGES:
        key: object = stage if stage in _TERMINAL else tuple(table[stage][k] for k in kinds)
        boxes.setdefault(key, []).append(stage)
    return [tuple(stages) for stages in boxes.values()]


def lifecycle_edges(table: Table = TABLE) -> dict[tuple[str, str], list[str]]:
    """(from stage, to stage) -> the inputs that lead along it, in table order."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for stage, rows in table.items():
        for kind, rule in rows.items():
            for target in rule.leads_to:
                if target != stage and kind.__name__ not in edges[(stage, target)]:
                    edges[(stage, target)].append(kind.__name__)
    return dict(edges)


def _moves(table: Table) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """The arrows between boxes (by their first stages), and the captions for moves
    every unfinished box makes alike (drawn once, in words)."""
    home = {stage: box[0] for box in lifecycle_boxes(table) for stage in box}
    arrows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (source, target), inputs in lifecycle_edges(table).items():
        into = f" (to {target})" if home[target] == home[source] else ""
        for name in inputs:
            label = name + into
            if label not in arrows[(home[source], home[target])]:
                arrows[(home[source], home[target])].append(label)
    unfinished = {home[stage] for stage in STAGES if stage not in _TERMINAL}
    captions = []
    for target in STAGES:
        shared = set.intersection(*(set(arrows.get((box, target), [])) for box in unfinished))
        for name in sorted(shared):
            for box in unfinished:
                arrows[(box, target)].remove(name)
        if shared:
            captions.append(
                f"From every unfinished stage: {', '.join(sorted(shared))} -> {target}."
            )
    return {key: value for key, value in arrows.items() if value}, captions


def _width(box: tuple[str, ...]) -> int:
    return max(110, 7 * len(" · ".join(box)) + 24)


def _label(inputs: list[str]) -> str:
    return ", ".join(inputs) if len(inputs) <= 3 else f"{', '.join(inputs[:3])} +{len(inputs) - 3}"


def _edge(source: tuple[str, ...], target: tuple[str, ...], inputs: list[str], bend: float) -> str:
    (x1, y1), (x2, y2) = _AT[source[0]], _AT[target[0]]
    title = f"{' · '.join(source)} -> {' · '.join(target)}: {', '.join(inputs)}"
    if source == target:  # a move inside a box: a loop above it
        w = _width(source) / 2
        left, right, top = x1 - w / 3, x1 + w / 3, y1 - _H / 2
        path = (
            f"M{left:.0f},{top} C{left:.0f},{y1 - 70} {right:.0f},{y1 - 70} {right:.0f},{top - 2}"
        )
        lx, ly, anchor = float(x1), float(y1 - 62), "middle"
    else:
        dx, dy = x2 - x1, y2 - y1
        length = math.hypot(dx, dy) or 1.0

        # Leave and enter at the boxes' borders, not their centres.
        def border(box: tuple[str, ...]) -> float:
            return min(
                (_width(box) / 2 + 4) / abs(dx) if dx else math.inf,
                (_H / 2 + 4) / abs(dy) if dy else math.inf,
            )

        sx, sy = x1 + dx * border(source), y1 + dy * border(source)
        ex, ey = x2 - dx * border(target), y2 - dy * border(target)
        # A gentle curve, so that two arrows between the same boxes do not overlap.
        cx = (sx + ex) / 2 - dy / length * bend
        cy = (sy + ey) / 2 + dx / length * bend
        path = f"M{sx:.0f},{sy:.0f} Q{cx:.0f},{cy:.0f} {ex:.0f},{ey:.0f}"
        lx, ly = (sx + 2 * cx + ex) / 4, (sy + 2 * cy + ey) / 4
        # A label beside a bent arrow stands on its outer side, clear of its twin.
        aside = cx - (sx + ex) / 2
        anchor = "start" if aside > 1 else "end" if aside < -1 else "middle"
    return (
        f'<g><title>{_e(title)}</title><path class="edge" d="{path}"/>'
        f'<text class="label" x="{lx:.0f}" y="{ly:.0f}" text-anchor="{anchor}">'
        f"{_e(_label(inputs))}</text></g>"
    )


def render_lifecycle(table: Table = TABLE) -> str:
    """The state diagram as a standalone SVG document."""
    boxes = {box[0]: box for box in lifecycle_boxes(table)}
    arrows, captions = _moves(table)
    width, height = 960, 480 + 16 * len(captions)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="The task lifecycle">',
        f"<style>{_STYLE}</style>",
        '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#868e96"/>'
        "</marker></defs>",
    ]
    for (source, target), inputs in arrows.items():
        bend = 44.0 if (target, source) in arrows else 0.0
        parts.append(_edge(boxes[source], boxes[target], inputs, bend))
    for first, box in boxes.items():
        x, y = _AT[first]
        colour = _COLOURS.get(first, "#1c7ed6")
        end = " end" if first in _TERMINAL else ""
        w = _width(box)
        parts.append(
            f'<g class="stage{end}"><rect x="{x - w / 2:.0f}" y="{y - _H / 2:.0f}" '
            f'width="{w}" height="{_H}" rx="8" style="stroke:{colour}"/>'
            f'<text x="{x}" y="{y + 4}">{_e(" · ".join(box))}</text></g>'
        )
    lines = [
        *captions,
        "Arrows: the inputs that write a new record; stages in one box behave alike. "
        "Every other input leaves its stage as it is (`rolebus lifecycle` lists all).",
    ]
    for number, line in enumerate(lines):
        y = height - 12 - 16 * (len(lines) - 1 - number)
        parts.append(f'<text class="caption" x="12" y="{y}">{_e(line)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
