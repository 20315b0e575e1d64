"""The task projection the dashboard keeps: cards and latencies folded from the state
bucket, each update reading only what was written since the last."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from rolebus.bus import Bus
from rolebus.flows.record import TaskState
from rolebus.flows.state import StateStore
from rolebus.history.projection import LatencyHistogram, TaskProjection


def _exact(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def test_histogram_percentiles_are_within_half_a_percent_of_the_exact_ones() -> None:
    generator = random.Random(7)
    samples = [generator.lognormvariate(1.5, 1.2) for _ in range(20_000)]
    histogram = LatencyHistogram(window=3600)
    now = datetime.now(UTC)
    for sample in samples:
        histogram.add(now, sample)
    count, (p50, p99) = histogram.percentiles(0.5, 0.99)
    assert count == len(samples)
    assert p50 is not None
    assert p99 is not None
    assert abs(p50 / _exact(samples, 0.5) - 1) <= 0.005
    assert abs(p99 / _exact(samples, 0.99) - 1) <= 0.005


def test_histogram_forgets_what_left_the_window_and_reports_nothing_when_empty() -> None:
    histogram = LatencyHistogram(window=60)
    assert histogram.percentiles(0.5) == (0, [None])
    now = datetime.now(UTC)
    histogram.add(now - timedelta(seconds=600), 5.0)  # already outside: not even kept
    histogram.add(now - timedelta(seconds=45), 1000.0)
    histogram.add(now, 2.0)
    assert histogram.count == 2
    histogram.window = 30  # the 45-second-old one is now outside
    assert histogram.percentiles(0.5)[0] == 1


def _record(task_id: str, role: str, *, state: str = "completed", took_ms: float = 10) -> TaskState:
    finished = datetime.now(UTC)
    return TaskState(
        task_id=task_id,
        state=state,
        role=role,
        subject="task.backend.implement",
        created_at=finished - timedelta(milliseconds=took_ms),
        updated_at=finished,
    )


async def test_projection_keeps_each_roles_newest_cards_and_reads_only_new_records(
    rolebus_bus: Bus,
) -> None:
    store = StateStore(rolebus_bus.connection)
    for number in range(8):
        await store.put(_record(f"be-{number}", "eng-be", took_ms=100))
    await store.put(_record("fe-0", "eng-fe", state="claimed"))
    await store.put(_record("ghost-0", "no-such-role"))
    projection = TaskProjection(["eng-be", "eng-fe"], cards=5, window=3600)
    await projection.update(rolebus_bus.connection)
    assert [card.task_id for card in projection.cards("eng-be")] == [
        f"be-{number}" for number in (7, 6, 5, 4, 3)
    ]
    assert [card.state for card in projection.cards("eng-fe")] == ["claimed"]
    assert projection.latencies("eng-be").count == 8
    assert projection.latencies("eng-fe").count == 0  # not completed

    # Nothing new: an update changes nothing (no completion counted twice).
    await projection.update(rolebus_bus.connection)
    assert projection.latencies("eng-be").count == 8

    # An old task changes: its card comes back to the top; the newly completed
    # one is counted once.
    await store.put(_record("be-0", "eng-be", state="retrying"))
    await store.put(_record("fe-0", "eng-fe", took_ms=3000))
    await projection.update(rolebus_bus.connection)
    assert [card.task_id for card in projection.cards("eng-be")][:2] == ["be-0", "be-7"]
    assert len(projection.cards("eng-be")) == 5
    assert projection.cards("eng-fe")[0].state == "completed"
    count, (p50,) = projection.latencies("eng-fe").percentiles(0.5)
    assert count == 1
    assert p50 is not None
    assert abs(p50 - 3000) <= 15
    assert projection.latencies("eng-be").count == 8
