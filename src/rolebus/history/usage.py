"""What each role's model calls cost: tokens and dollars per role and model, today
and in all, folded from the task events (each attempt's event carries its usage)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from rolebus.history.replay import ReplayFilter, replay
from rolebus.nats.connection import Connection
from rolebus.wire.messages import Event, Usage
from rolebus.wire.subjects import EVENTS_STREAM, TASK_RECORDS

__all__ = ["Spent", "UsageLedger"]


@dataclass
class Spent:
    """Calls, tokens and dollars; ``priced`` is False once a call's price was unknown."""

    calls: int = 0
    reused_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: Usage) -> None:
        self.calls += usage.calls
        self.reused_calls += usage.reused_calls
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        if usage.cost_usd is None:
            self.priced = self.priced and usage.calls == 0
        else:
            self.cost_usd += usage.cost_usd

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["tokens"] = self.tokens
        document["cost_usd"] = round(self.cost_usd, 6) if self.priced else None
        return document


class UsageLedger:
    """Read incrementally: an update folds only the events stored since the last."""

    def __init__(self) -> None:
        self._next_seq: int | None = None
        self._total: dict[tuple[str, str], Spent] = {}  # (role, model)
        self._by_day: dict[tuple[str, str, str], Spent] = {}  # (role, model, day)
        self._by_hour: dict[tuple[str, int], Spent] = {}  # (role, hour's start in epoch s)

    async def update(self, connection: Connection) -> None:
        wanted = ReplayFilter(stream=EVENTS_STREAM, subject=TASK_RECORDS, from_seq=self._next_seq)
        async for item in replay(connection, wanted):
            self._next_seq = item.stored.seq + 1
            event = item.message
            if not isinstance(event, Event) or event.role is None:
                continue
            raw = event.detail.get("usage")
            if not isinstance(raw, dict):
                continue
            try:
                usage = Usage.model_validate(raw)
            except ValueError:
                continue
            day = item.stored.time.astimezone(UTC).date().isoformat()
            self._total.setdefault((event.role, usage.model), Spent()).add(usage)
            self._by_day.setdefault((event.role, usage.model, day), Spent()).add(usage)
            hour = int(item.stored.time.timestamp()) // 3600 * 3600
            self._by_hour.setdefault((event.role, hour), Spent()).add(usage)

    def spent(self, role: str, *, today: bool = False, model: str | None = None) -> Spent:
        """What ``role`` spent (on ``model``, or all of them), today (UTC) or in all."""
        day = datetime.now(UTC).date().isoformat()
        rows: list[Spent]
        if today:
            rows = [
                spent
                for (who, which, when), spent in self._by_day.items()
                if who == role and when == day and model in (None, which)
            ]
        else:
            rows = [
                spent
                for (who, which), spent in self._total.items()
                if who == role and model in (None, which)
            ]
        total = Spent()
        for spent in rows:
            total.calls += spent.calls
            total.reused_calls += spent.reused_calls
            total.prompt_tokens += spent.prompt_tokens
            total.completion_tokens += spent.completion_tokens
            total.cost_usd += spent.cost_usd
            total.priced = total.priced and spent.priced
        return total

    def hours(self, role: str, since: datetime) -> list[tuple[datetime, Spent]]:
        """What ``role`` spent in each hour from ``since`` on (hours without calls
        left out), oldest first: the dashboard's spend chart."""
        oldest = int(since.timestamp()) // 3600 * 3600
        return [
            (datetime.fromtimestamp(hour, UTC), spent)
            for (who, hour), spent in sorted(self._by_hour.items(), key=lambda item: item[0][1])
            if who == role and hour >= oldest
        ]

    def models(self, role: str) -> list[str]:
        return sorted({model for (who, model) in self._total if who == role})
