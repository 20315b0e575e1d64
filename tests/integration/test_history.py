"""History on a real server: replay filters, projection rebuild, what-if reruns, status."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from rolebus.bus import Bus
from rolebus.cli.demo import play
from rolebus.config import Settings
from rolebus.errors import ConfigError, SubjectError
from rolebus.handlers.loader import load_handler
from rolebus.history.replay import (
    Replayed,
    ReplayFilter,
    all_states,
    parse_since,
    read_events,
    rebuild,
    replay,
    stream_named,
)
from rolebus.history.rerun import rerun
from rolebus.history.status import AttemptCounts, collect, prometheus_text, serve_metrics
from rolebus.nats.delivery import StoredMessage
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import wait_for
from rolebus.wire.messages import Event, Task
from rolebus.wire.subjects import WORK_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import REPO, CliRunner

TEAM = load_team(REPO / "roles")


async def seqs(bus: Bus, wanted: ReplayFilter) -> list[int]:
    return [item.stored.seq async for item in replay(bus.connection, wanted, team=TEAM)]


async def test_replay_filters_return_exactly_the_expected_messages_in_order(
    rolebus_bus: Bus,
) -> None:
    flow = Task(kind="implement", title="root")
    published = [
        ("task.backend.implement", flow),
        ("task.frontend.page", Task(kind="page", title="fe", correlation_id=flow.id)),
        ("task.backend.review", Task(kind="review", title="be2", from_role="pm")),
        ("task.product.feature", Task(kind="feature", title="pm", from_role="eng-be")),
    ]
    for subject, task in published:
        await rolebus_bus.publish(subject, task)
    middle = datetime.now(UTC)
    await rolebus_bus.publish(
        "task.api.get", Task(kind="get", title="late", correlation_id=flow.id)
    )
    work = WORK_STREAM
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, subject="task.backend.*")) == [1, 3]
    # eng-be owns backend and api, and sent the product task.
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, role="eng-be")) == [1, 3, 4, 5]
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, correlation=flow.id)) == [1, 2, 5]
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, since=middle)) == [5]
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, until=middle)) == [1, 2, 3, 4]
    assert await seqs(rolebus_bus, ReplayFilter(stream=work, from_seq=4)) == [4, 5]


async def test_replay_follow_shows_a_message_published_after_it_started(rolebus_bus: Bus) -> None:
    await rolebus_bus.publish_task("task.backend.x", title="before")
    seen: list[str] = []

    async def follow() -> None:
        async for item in replay(
            rolebus_bus.connection, ReplayFilter(stream=WORK_STREAM, follow=True)
        ):
            assert isinstance(item.message, Task)
            seen.append(item.message.title)

    follower = asyncio.create_task(follow())
    try:

        async def saw_before() -> bool:
            return seen == ["before"]

        await wait_for(saw_before)
        await rolebus_bus.publish_task("task.backend.x", title="after")

        async def saw_after() -> bool:
            return seen == ["before", "after"]

        await wait_for(saw_after)
    finally:
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower


async def test_a_gap_in_sequences_is_reported_not_hidden(rolebus_bus: Bus) -> None:
    for number in range(4):
        await rolebus_bus.publish_task("task.backend.x", title=f"t{number}")
    await rolebus_bus.connection.streams.delete(WORK_STREAM, 2)
    items = [
        item async for item in replay(rolebus_bus.connection, ReplayFilter(stream=WORK_STREAM))
    ]
    assert [(item.stored.seq, item.gap_before) for item in items] == [(1, 0), (3, 1), (4, 0)]
    assert items[1].as_json()["gap_before"] == 1


def test_a_replayed_message_is_the_same_as_one_json_line_and_as_a_dict() -> None:
    stored = StoredMessage(
        stream="ROLEBUS_EVENTS",
        seq=7,
        subject="event.task.completed.eng-be.t1",
        time=datetime.now(UTC),
        headers={"Nats-Msg-Id": "t1_completed"},
        data=b"",
    )
    event = Event(state="completed", task_id="t1", role="eng-be", detail={"title": "Grüße ✓"})
    for item in (
        Replayed(stored=stored, message=event, gap_before=2),
        Replayed(stored=stored, message=None, error="not msgpack"),  # undecodable
    ):
        line = item.as_json_line()
        assert "\n" not in line
        assert json.loads(line) == item.as_json()


def test_bad_replay_input_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="unknown stream 'jobs'"):
        stream_named("jobs")
    with pytest.raises(SubjectError, match="not a valid subject token"):
        ReplayFilter(subject="task.back end.*")
    with pytest.raises(ConfigError, match="--since 'yesterday' is not a time"):
        parse_since("yesterday")
    assert parse_since("2026-11-22T04:00:00Z") == datetime(2026, 11, 22, 4, tzinfo=UTC)


def test_replay_bad_input_from_the_command_line(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    for args, message in (
        (["--stream", "jobs"], "unknown stream 'jobs'"),
        (["--subject", "task.>.x"], "not a valid subject token"),
        (["--since", "last tuesday"], "--since 'last tuesday' is not a time"),
    ):
        result = cli("replay", *args, env=env)
        assert result.code == 1, args
        assert message in result.stderr
        assert "Traceback" not in result.stderr


async def test_rebuild_matches_the_live_projection_after_retries_escalations_and_a_crash(
    rolebus_settings: Settings, rolebus_bus: Bus, rolebus_server: EmbeddedServer
) -> None:
    await play(rolebus_settings, TEAM, console=Console(file=io.StringIO()), timeout=60)
    ids = [
        (
            await rolebus_bus.publish_task(
                "task.backend.build", title=f"b{n}", payload={"sleep": 0.1}
            )
        )[0].id
        for n in range(20)
    ]
    env = {**os.environ, "NATS_URL": rolebus_server.url, "ROLEBUS_ROLES": str(REPO / "roles")}
    binary = str(Path(sys.executable).parent / "rolebus")
    worker = subprocess.Popen(
        [binary, "worker", "eng-be"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    states = await_states(rolebus_bus)
    try:

        async def some() -> bool:
            return sum(s == "completed" for s in (await states()).values()) >= 3

        await wait_for(some)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=10)
    crew = await start_workers(rolebus_settings, TEAM, [TEAM.role("eng-be")], grace=1)
    try:

        async def done() -> bool:
            current = await states()
            return all(current.get(task_id) == "completed" for task_id in ids)

        await wait_for(done, timeout=60)
    finally:
        await crew.stop(grace=0)
    rebuilt, differences = await rebuild(rolebus_bus.connection)
    assert differences == []
    assert len(rebuilt) >= 33


def await_states(bus: Bus) -> Callable[[], Awaitable[dict[str, str]]]:
    async def states() -> dict[str, str]:
        return {s.task_id: s.state for s in await all_states(bus.connection)}

    return states


async def test_rerun_reports_identical_outcomes_for_the_same_handler_and_a_diff_otherwise(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    result = await play(rolebus_settings, TEAM, console=Console(file=io.StringIO()), timeout=60)
    eng_fe = TEAM.role("eng-fe")
    same = [
        r
        async for r in rerun(
            rolebus_bus.connection,
            eng_fe,
            load_handler("builtin:eng-fe"),
            correlation=result.root.id,
        )
    ]
    assert len(same) == 2
    assert all(r.same for r in same)
    changed = [
        r
        async for r in rerun(
            rolebus_bus.connection,
            eng_fe,
            load_handler("builtin:scripted"),
            correlation=result.root.id,
        )
    ]
    assert [r.same for r in changed] == [False, False]
    assert '-    "answer": "changes-requested"' in changed[0].diff()


async def test_attempt_counts_read_only_the_events_since_their_last_update(
    rolebus_bus: Bus,
) -> None:
    def event(number: int, state: str, role: str = "eng-be") -> tuple[str, Event]:
        return f"event.task.{state}.{role}.t", Event(
            id=f"a{number}", state=state, task_id="t", role=role, record={}
        )

    await rolebus_bus.publish_many(
        [event(1, "claimed"), event(2, "retrying"), event(3, "completed"), event(4, "dead", "pm")]
    )
    counts = AttemptCounts(window=3600)
    await counts.update(rolebus_bus.connection)
    assert counts.totals("eng-be") == (2, 1)  # `claimed` is not an attempt's end
    assert counts.totals("pm") == (1, 1)
    await rolebus_bus.publish_many([event(5, "completed"), event(6, "retrying")])
    await counts.update(rolebus_bus.connection)
    assert counts.totals("eng-be") == (4, 2)  # the first four were not counted again
    fresh = AttemptCounts(window=3600)
    await fresh.update(rolebus_bus.connection)
    assert fresh.totals("eng-be") == counts.totals("eng-be")
    statuses = {s.role: s for s in await collect(rolebus_bus.connection, TEAM, counts=counts)}
    assert (statuses["eng-be"].attempts, statuses["eng-be"].failures) == (4, 2)


async def test_status_measures_each_role_against_its_slo_and_serves_prometheus(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    await play(rolebus_settings, TEAM, console=Console(file=io.StringIO()), timeout=60)
    statuses = {s.role: s for s in await collect(rolebus_bus.connection, TEAM)}
    be = statuses["eng-be"]
    assert be.failures == 1  # the implement task's first attempt
    assert be.error_rate == pytest.approx(be.failures / be.attempts)
    assert be.slo["error_rate"] == {"target": 0.001, "value": be.error_rate, "met": False}
    assert be.slo["p99_latency_ms"]["met"] is False  # the retry's 1 s backoff
    assert statuses["eng-fe"].slo["p99_latency_ms"]["met"] is True
    assert all(s.backlog == 0 and s.in_flight == 0 for s in statuses.values())
    text = prometheus_text(list(statuses.values()))
    assert 'rolebus_slo_met{role="eng-be",slo="error_rate"} 0' in text
    ready = asyncio.Event()
    server = asyncio.create_task(
        serve_metrics(
            rolebus_bus.connection, TEAM, host="127.0.0.1", port=0, window=3600, ready=ready
        )
    )
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server


def test_metrics_are_served_over_http(cli: CliRunner, rolebus_server: EmbeddedServer) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "NATS_URL": rolebus_server.url, "ROLEBUS_ROLES": str(REPO / "roles")}
    binary = str(Path(sys.executable).parent / "rolebus")
    server = subprocess.Popen(
        [binary, "metrics", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "serving metrics" in server.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            body = response.read().decode()
        assert 'rolebus_backlog{role="eng-be"} 0' in body
        assert "# TYPE rolebus_latency_ms gauge" in body
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


async def test_trace_context_is_carried_from_publish_through_every_follow_up(
    rolebus_settings: Settings, rolebus_bus: Bus
) -> None:
    crew = await start_workers(rolebus_settings, TEAM, [TEAM.role("eng-be"), TEAM.role("eng-fe")])
    try:
        await rolebus_bus.publish_task(
            "task.backend.x",
            title="root",
            payload={
                "then": [
                    {
                        "subject": "task.frontend.y",
                        "title": "child",
                        "payload": {"then": [{"subject": "task.backend.z", "title": "grandchild"}]},
                    }
                ]
            },
        )

        async def three() -> bool:
            state = await rolebus_bus.connection.admin.stream_state(WORK_STREAM)
            return state["messages"] == 3

        await wait_for(three)
    finally:
        await crew.stop(grace=0)
    traces = []
    for seq in (1, 2, 3):
        stored = await rolebus_bus.connection.streams.get(WORK_STREAM, seq)
        assert stored is not None
        traces.append(stored.headers["traceparent"].split("-"))
    assert len({trace[1] for trace in traces}) == 1  # one trace id end to end
    assert len({trace[2] for trace in traces}) == 3  # a new span at each hop


def test_history_commands_print_json(cli: CliRunner, rolebus_server: EmbeddedServer) -> None:
    env = {"NATS_URL": rolebus_server.url}
    cli("publish", "task.backend.x", "-t", "one", "--id", "t1", env=env)
    replayed = cli("replay", "--stream", "work", "--json", env=env)
    [line] = replayed.stdout.splitlines()
    document = json.loads(line)
    assert set(document) >= {"stream", "seq", "subject", "time", "headers", "message"}
    assert document["message"]["id"] == "t1"
    assert json.loads(cli("rebuild", "--json", env=env).stdout)["differences"] == []
    status = json.loads(cli("status", "--json", env=env).stdout)
    assert {row["role"] for row in status} == {r.id for r in TEAM}
    missing = cli("show", "nope", env=env)
    assert missing.code == 1
    assert "no task 'nope'" in missing.stderr


def test_replay_reads_the_stream_that_stores_the_subject(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    cli("publish", "task.backend.x", "-t", "one", "--id", "t1", env=env)
    cli("publish", "task.backend.y", "-t", "two", "--id", "t2", env=env)
    for pattern in ("task.backend.*", "task.>"):
        replayed = cli("replay", "--subject", pattern, "--json", env=env)
        assert replayed.code == 0, replayed.stderr
        ids = [json.loads(line)["message"]["id"] for line in replayed.stdout.splitlines()]
        assert ids == ["t1", "t2"]
    wrong = cli("replay", "--stream", "events", "--subject", "task.>", env=env)
    assert wrong.code == 1
    assert "ROLEBUS_EVENTS stores no 'task.>': those subjects are in ROLEBUS_WORK" in wrong.stderr
    unknown = cli("replay", "--role", "nobody", env=env)
    assert unknown.code == 1
    assert "--role 'nobody' is not a role of the team" in unknown.stderr
    empty = cli("replay", "--correlation", "nope", env=env)
    assert empty.code == 0
    assert "no message of flow 'nope'" in empty.stderr


def test_status_counts_the_backlog_of_a_role_whose_worker_never_started(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    for number in range(3):
        cli("publish", "task.backend.x", "-t", f"t{number}", env=env)
    status = {row["role"]: row for row in json.loads(cli("status", "--json", env=env).stdout)}
    assert status["eng-be"]["backlog"] == 3
    assert status["eng-fe"]["backlog"] == 0


async def test_rerun_reports_an_input_it_cannot_rebuild_and_compares_the_others(
    rolebus_settings: Settings, rolebus_bus: Bus, tmp_path: Path
) -> None:
    from ..team import write_team

    team = load_team(write_team(tmp_path / "roles", max_deliver=1))
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:
        broken, _ = await rolebus_bus.publish_task(
            "task.backend.x", title="broken", payload={"contracts": ["nope@1.0.0"]}
        )
        fine, _ = await rolebus_bus.publish_task("task.backend.x", title="fine")

        async def both_ended() -> bool:
            ended = await read_events(rolebus_bus.connection, states=["completed", "dead"])
            return {event.task_id for event in ended} >= {broken.id, fine.id}

        await wait_for(both_ended, timeout=30)
    finally:
        await crew.stop(grace=0)
    results = {
        r.task_id: r
        async for r in rerun(
            rolebus_bus.connection,
            team.role("eng-be"),
            load_handler("builtin:scripted"),
            include_failed=True,  # the broken input is dead
        )
    }
    assert results[fine.id].same
    assert results[broken.id].error is not None
    assert "no contract 'nope'" in (results[broken.id].error or "")
    assert not results[broken.id].same


async def test_a_task_published_without_id_or_time_is_the_same_task_for_every_reader(
    rolebus_settings: Settings, rolebus_bus: Bus, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    import msgpack
    import nats

    client = await nats.connect(rolebus_server.url)
    try:
        js = client.jetstream()
        bare = msgpack.packb({"kind": "build", "title": "no id, no time"})
        first = await js.publish("task.backend.build", bare)
        named = msgpack.packb({"kind": "build", "title": "id in the header"})
        await js.publish("task.backend.build", named, headers={"Nats-Msg-Id": "from-header"})
    finally:
        await client.close()

    async def read() -> list[tuple[str, datetime]]:
        wanted = ReplayFilter(stream=WORK_STREAM)
        return [
            (item.message.id, item.message.created_at)
            async for item in replay(rolebus_bus.connection, wanted)
            if item.message is not None
        ]

    once, again = await read(), await read()
    assert once == again
    assert [task_id for task_id, _ in once] == [f"seq-{first.seq}", "from-header"]
    stored = await rolebus_bus.connection.streams.get(WORK_STREAM, first.seq)
    assert stored is not None
    assert once[0][1] == stored.time

    from ..team import write_team

    team = load_team(write_team(tmp_path / "roles"))
    crew = await start_workers(rolebus_settings, team, [team.role("eng-be")], grace=1)
    try:

        async def both_done() -> bool:
            done = await read_events(rolebus_bus.connection, states=["completed"])
            return {event.task_id for event in done} == {f"seq-{first.seq}", "from-header"}

        await wait_for(both_done, timeout=30)
    finally:
        await crew.stop(grace=0)
