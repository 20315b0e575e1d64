"""``rolebus storage``: what the bus keeps on disk, stream by stream and bucket by
bucket, how fast it grows, and how long it is kept."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import JsonOption, keep_whole, out, print_json, run, settings_for
from rolebus.config import Settings

_DAY = 86400.0


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or value.startswith("0001-"):
        return None  # the server's zero time: nothing stored
    try:
        # The server writes nanoseconds; Python reads microseconds.
        head, _, rest = value.partition(".")
        zone = rest[rest.find("Z") :] if "Z" in rest else rest[len(rest.rstrip("+-:0123456789")) :]
        fraction = rest[: len(rest) - len(zone)][:6] if rest else ""
        text = f"{head}.{fraction or '0'}{zone}".replace("Z", "+00:00")
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def growth_per_day(entry: dict[str, Any]) -> float | None:
    """Bytes a day, from the oldest to the newest message held (None under a minute
    of history: too little to say)."""
    first, last = _instant(entry.get("first")), _instant(entry.get("last"))
    if first is None or last is None:
        return None
    span = (last - first).total_seconds()
    return entry["bytes"] * _DAY / span if span >= 60 else None


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return "-"


async def _storage(settings: Settings) -> list[dict[str, Any]]:
    async with await Bus.connect(settings, name="rolebus-storage") as bus:
        entries = await bus.connection.admin.storage()
    for entry in entries:
        entry["growth_per_day"] = growth_per_day(entry)
    return entries


def storage(as_json: JsonOption = False) -> None:
    """Bytes per stream and bucket, their growth per day, and how long they are kept.

    Growth is measured over what each holds now (oldest to newest message). Recorded
    model calls (rolebus_llm_calls, rolebus_llm_parts) are kept ROLEBUS_CALLS_RETENTION
    (default: as long as the events); set it before the buckets are first made.
    """
    entries = run(_storage(settings_for()))
    if as_json:
        print_json(entries)
        return
    table = Table("name", "kind", "messages", "bytes", "growth/day", "kept", "s2")
    for entry in entries:
        age = entry["max_age_s"]
        table.add_row(
            entry["name"],
            entry["kind"],
            f"{entry['messages']:,}",
            _size(entry["bytes"]),
            _size(entry["growth_per_day"]),
            f"{age / _DAY:g} d" if age else "always",
            "yes" if entry["compression"] not in ("none", None) else "no",
        )
    out.print(keep_whole(table, 0))
    total = sum(entry["bytes"] for entry in entries)
    out.print(f"{_size(total)} in {len(entries)} streams and buckets")
