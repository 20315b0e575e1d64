"""The pictures, drawn from data alone: the flow's swimlanes and a role's charts."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from rolebus.history.flow import Box, Flow, Span
from rolebus.history.status import RoleStatus
from rolebus.web.charts import latency_chart, spend_chart, throughput_chart
from rolebus.web.flowsvg import render_flow

SVG = "{http://www.w3.org/2000/svg}"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def burst_flow() -> Flow:
    """Five messages in two milliseconds, then a retry a second later."""
    return Flow(
        correlation="root",
        lanes=["pm", "architect", "eng-be"],
        boxes=[
            Box("root", "task", "pm", at(0), "<script>alert(1)</script>", details=("a & b",)),
            Box("root-1", "follow-up", "architect", at(0.5), "design", cause="root"),
            Box("root-1-1", "handoff", "eng-be", at(1), "orders-api", cause="root-1"),
            Box("root-1-1-1", "escalation", "architect", at(1.5), "which?", cause="root-1-1"),
            Box("d", "decision", "eng-be", at(2), "cursor", cause="root-1-1-1"),
            Box("r", "retry", "eng-be", at(1000), "boom", cause="root-1-1"),
        ],
        spans=[Span("eng-be", at(1), at(2), "waiting", "root-1-1", "waiting for a decision")],
    )


def boxes_of(svg: ET.Element) -> list[ET.Element]:
    return [g for g in svg.iter(f"{SVG}g") if "box" in g.get("class", "").split()]


def test_a_flow_has_a_lane_per_role_and_a_box_per_message_escaped() -> None:
    text = render_flow(burst_flow(), standalone=True)
    svg = ET.fromstring(text)  # well-formed XML: every text was escaped
    lanes = [g.get("data-role") for g in svg.iter(f"{SVG}g") if g.get("class") == "lane"]
    assert lanes == ["pm", "architect", "eng-be"]
    assert [g.get("data-kind") for g in boxes_of(svg)] == [
        "task",
        "follow-up",
        "handoff",
        "escalation",
        "decision",
        "retry",
    ]
    assert "<script>" not in text
    assert "&lt;script&gt;" in text
    arrows = [p for p in svg.iter(f"{SVG}path") if "arrow" in p.get("class", "")]
    assert len(arrows) == 5  # one per box with a cause on the picture
    waiting = [r for r in svg.iter(f"{SVG}rect") if "span-waiting" in r.get("class", "")]
    assert len(waiting) == 1
    assert "waiting" in "".join(waiting[0].itertext())


def test_boxes_never_overlap_on_a_lane_and_every_arrow_points_forward() -> None:
    svg = ET.fromstring(render_flow(burst_flow(), standalone=True))
    placed = {}
    for group in boxes_of(svg):
        rect = group.find(f"{SVG}rect")
        assert rect is not None
        placed[group.get("data-id")] = (
            group.get("data-lane"),
            float(rect.get("x", "0")),
            float(rect.get("width", "0")),
        )
    by_lane: dict[str, list[tuple[float, float]]] = {}
    for lane, x, width in placed.values():
        by_lane.setdefault(str(lane), []).append((x, width))
    for spans in by_lane.values():
        spans.sort()
        for (x0, w0), (x1, _) in itertools.pairwise(spans):
            assert x1 >= x0 + w0
    for path in svg.iter(f"{SVG}path"):
        if "arrow" in path.get("class", ""):
            numbers = [float(n) for n in re.findall(r"-?\d+\.?\d*", path.get("d", ""))]
            assert numbers[-2] > numbers[0]  # ends right of where it starts


def test_an_empty_flow_says_so() -> None:
    assert "No messages" in render_flow(Flow("nothing"))


def status(**fields: object) -> RoleStatus:
    base: dict[str, object] = {
        "role": "eng-be",
        "backlog": 0,
        "in_flight": 0,
        "redelivered": 0,
        "dead_letters": 0,
        "open_escalations": 0,
        "workers_waiting": 0,
        "completed": 0,
        "attempts": 0,
        "failures": 0,
        "p50_ms": None,
        "p99_ms": None,
        "error_rate": None,
    }
    base.update(fields)
    return RoleStatus(**base)  # type: ignore[arg-type]


def test_the_charts_carry_the_status_points_and_the_slo_line() -> None:
    now = T0
    series = [
        {
            "at": (now - timedelta(seconds=60)).isoformat(),
            "completed": 4,
            "p50_ms": 3.0,
            "p99_ms": 9.0,
        },
        {
            "at": (now - timedelta(seconds=30)).isoformat(),
            "completed": 2,
            "p50_ms": 5.0,
            "p99_ms": 2e4,
        },
    ]
    marks = [{"at": (now - timedelta(seconds=20)).isoformat(), "kind": "dead-letter", "id": "7"}]
    slo = {"p99_latency_ms": {"target": 1000.0, "value": 2e4, "met": False}}
    role = status(series=series, marks=marks, slo=slo)
    throughput = ET.fromstring(throughput_chart(role, now=now, window=3600))
    bars = [r for r in throughput.iter("rect") if r.get("class") == "bar"]
    assert [(b.get("data-at"), int(b.get("data-completed", "0"))) for b in bars] == [
        (p["at"], p["completed"]) for p in series
    ]
    assert [m.get("data-at") for m in throughput.iter("line")] == [marks[0]["at"]]
    latency = ET.fromstring(latency_chart(role, now=now, window=3600))
    p99 = [(c.get("data-at"), float(c.get("data-value", "0"))) for c in latency.iter("circle")]
    assert [point for point in p99 if point[1] in (9, 2e4)] == [
        (p["at"], p["p99_ms"]) for p in series
    ]
    lines = [line for line in latency.iter("line") if "slo" in line.get("class", "")]
    assert [float(line.get("data-target", "0")) for line in lines] == [1000.0]
    # Log scale: the slower p99 is higher (smaller y) than the SLO line, which is higher than 9 ms.
    ys = {c.get("data-value"): float(c.get("cy", "0")) for c in latency.iter("circle")}
    slo_y = float(lines[0].get("y1", "0"))
    assert ys["20000.0"] < slo_y < ys["9.0"]


def test_the_spend_chart_draws_the_hours_and_the_daily_cap() -> None:
    now = T0.replace(hour=15)
    hours = [
        {"hour": (now - timedelta(hours=2)).isoformat(), "tokens": 300, "cost_usd": 0.1},
        {"hour": now.isoformat(), "tokens": 100, "cost_usd": 0.05},
    ]
    role = status(spend_hours=hours, budget={"tokens_per_day": 1000, "usd_per_day": None})
    chart = ET.fromstring(spend_chart(role, now=now, unit="tokens"))
    bars = [r for r in chart.iter("rect") if r.get("class") == "bar"]
    assert [float(b.get("data-value", "0")) for b in bars] == [300, 100]
    caps = [line for line in chart.iter("line") if line.get("class") == "cap"]
    assert [line.get("data-cap") for line in caps] == ["1000"]
    today = next(p for p in chart.iter("polyline") if p.get("class") == "today")
    assert "400" in "".join(today.itertext())


def test_a_task_s_time_is_split_where_its_events_say_it_started_waited_and_ended() -> None:
    from rolebus.history.flow import _spans
    from rolebus.wire.messages import Event

    box = Box("t", "task", "eng-be", at(0), "t", task_id="t")

    def event(state: str, ms: float, started_ms: float | None = None) -> Event:
        detail = {} if started_ms is None else {"started_at": at(started_ms).isoformat()}
        return Event(state=state, task_id="t", role="eng-be", at=at(ms), detail=detail)

    history = [
        event("retrying", 30, started_ms=20),  # 20 ms in the backlog, 10 ms of work
        event("input-required", 1100, started_ms=1090),  # the retry's wait, then work
        event("resumed", 1500),
        event("completed", 1600, started_ms=1500),
    ]
    spans = [
        (s.kind, round((s.end - s.start).total_seconds() * 1000))
        for s in _spans({"t": box}, history)
    ]
    assert spans == [
        ("queued", 20),
        ("working", 10),
        ("queued", 1060),
        ("working", 10),
        ("waiting", 400),
        ("working", 100),
    ]


def test_the_lifecycle_diagram_in_docs_is_the_one_drawn_from_the_table() -> None:
    from pathlib import Path

    from rolebus.web.lifecyclesvg import render_lifecycle

    shipped = Path(__file__).parents[2] / "docs" / "lifecycle.svg"
    assert shipped.read_text() == render_lifecycle(), (
        "docs/lifecycle.svg is stale: run `rolebus lifecycle --svg docs/lifecycle.svg`"
    )


def test_the_lifecycle_diagram_draws_every_move_the_table_allows() -> None:
    """Each move between stages is an arrow between their boxes, labelled with its
    input, or a caption line when every unfinished stage makes it alike."""
    from rolebus.flows.lifecycle import STAGES
    from rolebus.web.lifecyclesvg import lifecycle_boxes, lifecycle_edges, render_lifecycle

    svg = ET.fromstring(render_lifecycle())
    titles = [title.text or "" for title in svg.iter(f"{SVG}title")]
    captions = [text.text or "" for text in svg.iter(f"{SVG}text") if "every" in (text.text or "")]
    box_of = {stage: " · ".join(box) for box in lifecycle_boxes() for stage in box}
    assert box_of["claimed"] == box_of["retrying"] == box_of["redriven"]
    assert box_of["input-required"] != box_of["resumed"]
    for (source, target), inputs in lifecycle_edges().items():
        arrow = [t for t in titles if t.startswith(f"{box_of[source]} -> {box_of[target]}: ")]
        for name in inputs:
            drawn = bool(arrow) and name in arrow[0]
            told = any(name in line and f"-> {target}" in line for line in captions)
            assert drawn or told, f"{source} -> {target} by {name} is not in the picture"
    stages = " ".join(text.text or "" for text in svg.iter(f"{SVG}text"))
    assert all(stage in stages for stage in STAGES)
