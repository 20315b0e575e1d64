"""Health of the bus per role, against each role's own success metrics (``slo``).

One collection serves ``rolebus status`` and the Prometheus endpoint of
``rolebus metrics``.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rolebus.flows import dlq
from rolebus.flows.budgets import BudgetLedger
from rolebus.flows.escalation import EscalationStore
from rolebus.flows.record import TERMINAL_STATES, State
from rolebus.history.projection import TaskProjection
from rolebus.history.replay import ReplayFilter, replay
from rolebus.history.usage import UsageLedger
from rolebus.nats.connection import Connection
from rolebus.team.roles import Team
from rolebus.wire.messages import Event
from rolebus.wire.subjects import EVENTS_STREAM, TASK_RECORDS, WORK_STREAM, consumer_name

__all__ = ["AttemptCounts", "RoleStatus", "collect", "prometheus_text", "serve_metrics"]


@dataclass
class RoleStatus:
    role: str
    backlog: int
    in_flight: int
    redelivered: int
    dead_letters: int
    open_escalations: int
    workers_waiting: int
    completed: int
    attempts: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None
    #: Finished tasks whose follow-ups are not stored yet (a full stream, say).
    effects_pending: int = 0
    #: Model calls, tokens and cost: {"today": ..., "total": ..., "models": {model: ...}}.
    usage: dict[str, Any] = field(default_factory=dict)
    slo: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Each 10-second slice of the window with completions: at, completed, p50_ms, p99_ms.
    series: list[dict[str, Any]] = field(default_factory=list)
    #: Dead letters and escalations the role raised in the window: at, kind, id.
    marks: list[dict[str, Any]] = field(default_factory=list)
    #: Model spend per hour over the last day: hour, tokens, cost_usd.
    spend_hours: list[dict[str, Any]] = field(default_factory=list)
    #: The caps in force (after `rolebus budget set`): tokens_per_day, usd_per_day.
    budget: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _slo(
    target: float | None, value: float | None, *, higher_is_better: bool = False
) -> dict[str, Any]:
    if target is None:
        return {"target": None, "value": value, "met": None}
    if value is None:
        return {"target": target, "value": None, "met": None}
    met = value >= target if higher_is_better else value <= target
    return {"target": target, "value": value, "met": met}


#: The records that end an attempt (a retry, a park, every end).
_ATTEMPT_ENDS = frozenset({*TERMINAL_STATES, State.RETRYING, State.PARKED})


class AttemptCounts:
    """Attempts and failures per role over the last ``window`` seconds, counted per
    second from the task events and read incrementally: an update replays only the
    events stored since the previous one. `rolebus status` reads once; the
    dashboard keeps one, so its refreshes stop replaying the whole hour."""

    def __init__(self, window: float = 3600.0) -> None:
        self.window = window
        # role -> second -> [attempts, failures]
        self._seconds: dict[str, dict[int, list[int]]] = {}
        self._next_seq: int | None = None

    async def update(self, connection: Connection) -> None:
        now = datetime.now(UTC)
        wanted = ReplayFilter(
            stream=EVENTS_STREAM,
            subject=TASK_RECORDS,
            since=None if self._next_seq else now - timedelta(seconds=self.window),
            from_seq=self._next_seq,
        )
        async for item in replay(connection, wanted):
            self._next_seq = item.stored.seq + 1
            event = item.message
            if not isinstance(event, Event) or event.role is None:
                continue
            if "effects_pending" in event.detail:
                continue  # repeats its task's finished record: not another attempt
            # Every attempt ends in exactly one of these (`claimed` is not published
            # for fast tasks, so it cannot count them).
            attempt = event.state in _ATTEMPT_ENDS
            failure = event.state in (State.RETRYING, State.DEAD)
            if attempt or failure:
                second = int(item.stored.time.timestamp())
                counts = self._seconds.setdefault(event.role, {}).setdefault(second, [0, 0])
                counts[0] += attempt
                counts[1] += failure
        oldest = now.timestamp() - self.window
        for seconds in self._seconds.values():
            for second in [second for second in seconds if second < oldest]:
                del seconds[second]

    def totals(self, role: str) -> tuple[int, int]:
        """(attempts, failures) of ``role`` as of the last update."""
        seconds = self._seconds.get(role, {}).values()
        return sum(c[0] for c in seconds), sum(c[1] for c in seconds)


async def collect(
    connection: Connection,
    team: Team,
    *,
    window: float = 3600.0,
    counts: AttemptCounts | None = None,
    records: TaskProjection | None = None,
    ledger: UsageLedger | None = None,
) -> list[RoleStatus]:
    """Per-role counters now, latency and error rate over the last ``window`` seconds.
    Pass the same ``counts`` and ``records`` again to read only the events and task
    records written since the last call (the dashboard does)."""
    counts = counts or AttemptCounts(window)
    await counts.update(connection)
    # A one-off read keeps no cards: only the dashboard shows them.
    records = records or TaskProjection((), window=window)
    await records.update(connection)
    ledger = ledger or UsageLedger()
    await ledger.update(connection)
    since = datetime.now(UTC) - timedelta(seconds=window)
    dead: dict[str, int] = {}
    marks: dict[str, list[dict[str, Any]]] = {}
    async for entry in dlq.list_dead_letters(connection):
        dead[entry.role] = dead.get(entry.role, 0) + 1
        if entry.time >= since:
            marks.setdefault(entry.role, []).append(
                {"at": entry.time.isoformat(), "kind": "dead-letter", "id": str(entry.seq)}
            )
    holders: dict[str, int] = {}
    for record in await EscalationStore(connection).all():
        if record.status == "open":
            holder = record.current_holder(team)
            holders[holder] = holders.get(holder, 0) + 1
        if record.opened_at >= since:
            marks.setdefault(record.asking_role, []).append(
                {"at": record.opened_at.isoformat(), "kind": "escalation", "id": record.id}
            )
    budgets = BudgetLedger(connection)
    day_ago = datetime.now(UTC) - timedelta(days=1)
    statuses = []
    for role in team:
        consumer = await connection.admin.consumer_state(
            WORK_STREAM, consumer_name(role.id), filter_subjects=tuple(role.filter_subjects)
        )
        latencies = records.latencies(role.id)
        completed, (p50, p99) = latencies.percentiles(0.5, 0.99)
        caps = await budgets.caps(role) if role.budget.capped else role.budget
        tried, failed = counts.totals(role.id)
        error_rate = failed / tried if tried else None
        statuses.append(
            RoleStatus(
                role=role.id,
                backlog=consumer["pending"],
                in_flight=consumer["ack_pending"],
                redelivered=consumer["redelivered"],
                dead_letters=dead.get(role.id, 0),
                open_escalations=holders.get(role.id, 0),
                workers_waiting=consumer["waiting"],
                completed=completed,
                effects_pending=records.effects_pending(role.id),
                usage={
                    "today": ledger.spent(role.id, today=True).as_json(),
                    "total": ledger.spent(role.id).as_json(),
                    "models": {
                        model: ledger.spent(role.id, model=model).as_json()
                        for model in ledger.models(role.id)
                    },
                },
                attempts=tried,
                failures=failed,
                p50_ms=p50,
                p99_ms=p99,
                error_rate=error_rate,
                slo={
                    "p50_latency_ms": _slo(role.slo.p50_latency_ms, p50),
                    "p99_latency_ms": _slo(role.slo.p99_latency_ms, p99),
                    "error_rate": _slo(role.slo.error_rate, error_rate),
                    # Uptime needs a history of worker liveness rolebus does not keep yet.
                    "uptime": {"target": role.slo.uptime, "value": None, "met": None},
                },
                series=[piece.as_json() for piece in latencies.series()],
                marks=sorted(marks.get(role.id, []), key=lambda mark: str(mark["at"])),
                spend_hours=[
                    {
                        "hour": hour.isoformat(),
                        "tokens": spent.tokens,
                        "cost_usd": round(spent.cost_usd, 6) if spent.priced else None,
                    }
                    for hour, spent in ledger.hours(role.id, day_ago)
                ],
                budget={"tokens_per_day": caps.tokens_per_day, "usd_per_day": caps.usd_per_day},
            )
        )
    return statuses


def prometheus_text(statuses: list[RoleStatus]) -> str:
    """The Prometheus text exposition of :func:`collect`'s result."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, values: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP rolebus_{name} {help_text}")
        lines.append(f"# TYPE rolebus_{name} {kind}")
        lines.extend(f"rolebus_{name}{{{labels}}} {value:g}" for labels, value in values)

    def per_role(attribute: str) -> list[tuple[str, float]]:
        return [
            (f'role="{s.role}"', float(getattr(s, attribute)))
            for s in statuses
            if getattr(s, attribute) is not None
        ]

    metric("backlog", "gauge", "Messages waiting for the role.", per_role("backlog"))
    metric("in_flight", "gauge", "Messages delivered, not yet acked.", per_role("in_flight"))
    metric("redelivered", "gauge", "Messages redelivered at least once.", per_role("redelivered"))
    metric("dead_letters", "gauge", "Dead letters from the role.", per_role("dead_letters"))
    metric(
        "open_escalations",
        "gauge",
        "Open escalations the role must answer.",
        per_role("open_escalations"),
    )
    metric(
        "error_rate", "gauge", "Failed attempts / attempts over the window.", per_role("error_rate")
    )
    metric(
        "latency_ms",
        "gauge",
        "Publish-to-done latency over the window.",
        [(f'role="{s.role}",quantile="0.5"', s.p50_ms) for s in statuses if s.p50_ms is not None]
        + [
            (f'role="{s.role}",quantile="0.99"', s.p99_ms) for s in statuses if s.p99_ms is not None
        ],
    )
    metric(
        "slo_met",
        "gauge",
        "1 when the role meets the target, 0 when not (absent: no target or no data).",
        [
            (f'role="{s.role}",slo="{name}"', 1.0 if check["met"] else 0.0)
            for s in statuses
            for name, check in s.slo.items()
            if check["met"] is not None
        ],
    )
    by_model = [
        (f'role="{s.role}",model="{_label(model)}"', spent)
        for s in statuses
        for model, spent in s.usage.get("models", {}).items()
    ]
    metric(
        "llm_calls_total",
        "counter",
        "Model calls paid for, by role and model.",
        [(labels, float(spent["calls"])) for labels, spent in by_model],
    )
    metric(
        "llm_tokens_total",
        "counter",
        "Model tokens, by role, model and kind (prompt or completion).",
        [
            (f'{labels},kind="{kind}"', float(spent[f"{kind}_tokens"]))
            for labels, spent in by_model
            for kind in ("prompt", "completion")
        ],
    )
    metric(
        "llm_cost_usd_total",
        "counter",
        "Model cost in US dollars, by role and model (absent: a price is unknown).",
        [
            (labels, spent["cost_usd"])
            for labels, spent in by_model
            if spent["cost_usd"] is not None
        ],
    )
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


async def serve_metrics(
    connection: Connection,
    team: Team,
    *,
    host: str,
    port: int,
    window: float,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve ``GET /metrics`` until cancelled (a tiny HTTP/1.1 server: no dependency)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            while (await reader.readline()).strip():
                pass  # headers
            path = request.split(b" ")[1] if request.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] != b"/metrics":
                body, status = b"try /metrics\n", b"404 Not Found"
            else:
                body = prometheus_text(await collect(connection, team, window=window)).encode()
                status = b"200 OK"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port)
    async with server:
        if ready is not None:
            ready.set()
        await server.serve_forever()
