"""Tables a person copies ids from: the ids are never cut, even at 80 columns."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from rolebus.cli.app import keep_whole


def test_an_id_column_is_never_cut_at_80_columns() -> None:
    long_id = "3be677d92dc14ccb-escalation-2"
    table = Table("task", "role", "state", "kind", "attempt", "title", "updated")
    table.add_row(long_id, "eng-be", "completed", "implement", "2", "x " * 60, "20:42:10")
    printed = io.StringIO()
    Console(file=printed, width=80).print(keep_whole(table, 0))
    assert long_id in printed.getvalue()

    cut = io.StringIO()
    table = Table("task", "role", "state", "kind", "attempt", "title", "updated")
    table.add_row(long_id, "eng-be", "completed", "implement", "2", "x " * 60, "20:42:10")
    Console(file=cut, width=80).print(table)
    assert long_id not in cut.getvalue()  # what rich does without it


def test_storage_growth_is_bytes_a_day_over_the_history_held() -> None:
    from rolebus.cli.storage import growth_per_day

    day = {
        "bytes": 1000,
        "first": "2026-12-04T20:00:00.123456789Z",  # the server writes nanoseconds
        "last": "2026-12-06T20:00:00.123456789Z",
    }
    assert growth_per_day(day) == 500.0
    assert growth_per_day({**day, "last": "2026-12-04T20:00:30Z"}) is None  # too short
    assert growth_per_day({**day, "first": "0001-01-01T00:00:00Z"}) is None  # empty
