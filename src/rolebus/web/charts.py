"""A role's charts (SVG): completions and latency per 10 seconds over the window,
with the SLO line and the dead letters and escalations marked; model spend per hour
against the budget.

Pure: each chart draws what :func:`rolebus.history.status.collect` reported (the
same points as ``rolebus status --json``, each carried as data attributes), scaled
to the box it is given. Every text is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rolebus.history.projection import SLICE_SECONDS
from rolebus.history.status import RoleStatus

__all__ = ["latency_chart", "role_charts", "spend_chart", "throughput_chart"]

_PAD_LEFT = 38
_PAD = 14
_MARKS = {"dead-letter": "#e03131", "escalation": "#f59f00"}
_STYLE = (
    ".chart text{font:10px system-ui,sans-serif;fill:#6b7280}"
    ".chart .title{font-weight:600;fill:#1d2330}.chart .frame{fill:#fff;stroke:#dde1e7}"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _at(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if value >= 1000:
        return f"{value / 1000:.3g}k"
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


class _Frame:
    """A chart's drawing box: time across (``since`` to ``until``), values up (0 to ``top``)."""

    def __init__(
        self,
        width: int,
        height: int,
        since: datetime,
        until: datetime,
        top: float,
        *,
        bottom: float | None = None,
    ) -> None:
        self.width, self.height = width, height
        self.since, self.until = since, until
        self.top = top if top > 0 else 1.0
        #: Set: a log scale from ``bottom`` up (latencies span milliseconds to minutes).
        self.bottom = None if bottom is None else max(min(bottom, self.top / 10), 1e-3)
        self.span = max((until - since).total_seconds(), 1.0)

    def x(self, at: datetime) -> float:
        share = (at - self.since).total_seconds() / self.span
        return _PAD_LEFT + max(0.0, min(1.0, share)) * (self.width - _PAD_LEFT - _PAD)

    def y(self, value: float) -> float:
        if self.bottom is None:
            share = value / self.top
        else:
            low = math.log10(self.bottom)
            share = (math.log10(max(value, self.bottom)) - low) / (math.log10(self.top) - low)
        share = max(0.0, min(1.0, share))
        return self.height - _PAD - share * (self.height - 2 * _PAD - 6)

    def open(self, kind: str, title: str, role: str) -> str:
        return (
            f'<svg class="chart chart-{kind}" data-role="{_e(role)}" viewBox="0 0 {self.width} '
            f'{self.height}" width="100%" role="img" '
            f'aria-label="{_e(title)}"><style>{_STYLE}</style>'
            f'<rect class="frame" x="{_PAD_LEFT}" y="{_PAD}" '
            f'width="{self.width - _PAD_LEFT - _PAD}" height="{self.height - 2 * _PAD}"/>'
            f'<text class="title" x="{_PAD_LEFT}" y="10">'
            f'{_e(title)}</text><text x="2" y="{self.y(self.top) + 4:.1f}">{_number(self.top)}'
            f'</text><text x="2" y="{self.height - _PAD:.1f}">{_number(self.bottom or 0)}</text>'
        )

    def limit(self, classes: str, data: str, value: float, title: str) -> str:
        """A target or a cap: a dashed line across the chart at ``value``."""
        y = self.y(value)
        return (
            f'<line class="{classes}" {data} x1="{_PAD_LEFT}" y1="{y:.1f}" '
            f'x2="{self.width - _PAD}" y2="{y:.1f}" stroke="#e03131" stroke-dasharray="5 3">'
            f"<title>{_e(title)}</title></line>"
        )

    def axis(self) -> str:
        ago = round((self.until - self.since).total_seconds() / 60)
        label = f"{ago} min ago" if ago < 120 else f"{ago // 60} h ago"
        return (
            f'<text x="{_PAD_LEFT}" y="{self.height - 2}">{label}</text>'
            f'<text x="{self.width - _PAD - 24}" y="{self.height - 2}">now</text>'
        )


def throughput_chart(
    status: RoleStatus, *, now: datetime, window: float, width: int = 300, height: int = 90
) -> str:
    """Completions per 10 seconds, with the role's dead letters and escalations marked."""
    since = now - timedelta(seconds=window)
    series = status.series
    frame = _Frame(width, height, since, now, max((p["completed"] for p in series), default=1))
    slot = (width - _PAD_LEFT - _PAD) * SLICE_SECONDS / frame.span
    parts = [frame.open("throughput", "completed per 10 s", status.role)]
    for point in series:
        x, y = frame.x(_at(point["at"])), frame.y(point["completed"])
        parts.append(
            f'<rect class="bar" data-at="{_e(point["at"])}" data-completed="{point["completed"]}" '
            f'x="{x:.1f}" y="{y:.1f}" width="{max(1.5, slot - 0.5):.1f}" '
            f'height="{height - _PAD - y:.1f}" fill="#4dabf7"><title>{_e(point["at"])}: '
            f"{point['completed']} completed</title></rect>"
        )
    parts.extend(_marks(frame, status.marks))
    parts.append(frame.axis() + "</svg>")
    return "".join(parts)


def latency_chart(
    status: RoleStatus,
    *,
    now: datetime,
    window: float,
    slo: dict[str, dict[str, Any]] | None = None,
    width: int = 300,
    height: int = 90,
) -> str:
    """p50 and p99 per 10 seconds (ms), and the SLO's targets as dashed lines."""
    since = now - timedelta(seconds=window)
    checks = slo if slo is not None else status.slo
    targets = {
        name: float(checks[f"{name}_latency_ms"]["target"])
        for name in ("p50", "p99")
        if checks.get(f"{name}_latency_ms", {}).get("target") is not None
    }
    values = [p[key] for p in status.series for key in ("p50_ms", "p99_ms") if p[key] is not None]
    everything = [*values, *targets.values()]
    frame = _Frame(
        width,
        height,
        since,
        now,
        max(everything, default=10) * 1.5,
        bottom=min(everything, default=1) / 2,
    )
    parts = [frame.open("latency", "p50 / p99 ms (log)", status.role)]
    for name, colour in (("p50", "#2f9e44"), ("p99", "#7048e8")):
        points = [p for p in status.series if p[f"{name}_ms"] is not None]
        line = " ".join(
            f"{frame.x(_at(p['at'])):.1f},{frame.y(p[f'{name}_ms']):.1f}" for p in points
        )
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" points="{line}"/>')
        parts.extend(
            f'<circle class="{name}" data-at="{_e(p["at"])}" data-value="{p[f"{name}_ms"]}" '
            f'cx="{frame.x(_at(p["at"])):.1f}" cy="{frame.y(p[f"{name}_ms"]):.1f}" r="2" '
            f'fill="{colour}"><title>{_e(p["at"])}: {name} {p[f"{name}_ms"]:.1f} ms</title>'
            "</circle>"
            for p in points
        )
    parts.extend(
        frame.limit(
            f"slo slo-{name}",
            f'data-target="{target}"',
            target,
            f"SLO: {name} at most {target:g} ms",
        )
        for name, target in targets.items()
    )
    parts.extend(_marks(frame, status.marks))
    parts.append(frame.axis() + "</svg>")
    return "".join(parts)


def spend_chart(
    status: RoleStatus, *, now: datetime, unit: str, width: int = 300, height: int = 90
) -> str:
    """Model spend per hour over the last day (``unit``: tokens or cost_usd), and
    today's running total (UTC) against the daily cap, when there is one."""
    since = now - timedelta(days=1)
    cap_name = "tokens_per_day" if unit == "tokens" else "usd_per_day"
    cap = status.budget.get(cap_name)
    hours = [(_at(h["hour"]), float(h[unit] or 0)) for h in status.spend_hours]
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    running, total = [], 0.0
    for hour, spent in hours:
        if hour >= midnight:
            total += spent
            running.append((hour + timedelta(hours=1), total))
    top = max([spent for _, spent in hours] + [total] + ([float(cap)] if cap else []), default=1)
    frame = _Frame(width, height, since, now, top * 1.1)
    label = "tokens" if unit == "tokens" else "USD"
    parts = [frame.open(f"spend-{unit}", f"{label} per hour, today vs cap", status.role)]
    slot = (width - _PAD_LEFT - _PAD) * 3600 / frame.span
    for hour, spent in hours:
        x, y = frame.x(hour), frame.y(spent)
        room = frame.x(now) - x  # the hour under way is drawn up to now
        parts.append(
            f'<rect class="bar" data-hour="{_e(hour.isoformat())}" data-value="{spent:g}" '
            f'x="{x:.1f}" y="{y:.1f}" width="{max(2.0, min(slot - 1, room)):.1f}" '
            f'height="{height - _PAD - y:.1f}" fill="#ffa94d"><title>{_e(hour.isoformat())}: '
            f"{spent:g} {label}</title></rect>"
        )
    if running:
        line = " ".join(f"{frame.x(min(at, now)):.1f},{frame.y(v):.1f}" for at, v in running)
        start = f"{frame.x(midnight):.1f},{frame.y(0):.1f} "
        parts.append(
            f'<polyline class="today" fill="none" stroke="#e8590c" points="{start}{line}">'
            f"<title>today: {total:g} {label}</title></polyline>"
        )
    if cap:
        parts.append(frame.limit("cap", f'data-cap="{cap}"', float(cap), f"{cap_name}: {cap:g}"))
    parts.append(frame.axis() + "</svg>")
    return "".join(parts)


def _marks(frame: _Frame, marks: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f'<line class="mark mark-{_e(m["kind"])}" data-at="{_e(m["at"])}" '
        f'x1="{frame.x(_at(m["at"])):.1f}" y1="{_PAD}" x2="{frame.x(_at(m["at"])):.1f}" '
        f'y2="{_PAD + 8}" stroke="{_MARKS.get(m["kind"], "#495057")}" stroke-width="2">'
        f"<title>{_e(m['kind'])} {_e(m['id'])} at {_e(m['at'])}</title></line>"
        for m in marks
        if _at(m["at"]) >= frame.since
    ]


def role_charts(
    status: RoleStatus, *, now: datetime, window: float, spends: bool, size: tuple[int, int]
) -> str:
    """Every chart of one role: throughput and latency; spend too when it calls models."""
    width, height = size
    charts = [
        throughput_chart(status, now=now, window=window, width=width, height=height),
        latency_chart(status, now=now, window=window, width=width, height=height),
    ]
    if spends:
        charts.append(spend_chart(status, now=now, unit="tokens", width=width, height=height))
        if status.budget.get("usd_per_day") or any(h["cost_usd"] for h in status.spend_hours):
            charts.append(spend_chart(status, now=now, unit="cost_usd", width=width, height=height))
    return "".join(charts)
