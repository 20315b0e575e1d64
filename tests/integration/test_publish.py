"""Publishing lands tasks durably in JetStream, from rolebus or any NATS client."""

from __future__ import annotations

import msgpack
import nats
import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import (
    ConnectError,
    IncompatibleStreamError,
    PayloadTooLargeError,
    SubjectError,
)
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import start_server
from rolebus.wire import codec
from rolebus.wire.messages import Task
from rolebus.wire.subjects import WORK_STREAM


async def test_a_task_published_with_plain_nats_py_is_stored_once_per_msg_id(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer
) -> None:
    client = await nats.connect(rolebus_server.url)
    try:
        body = msgpack.packb(
            {
                "schema_version": 1,
                "id": "t-123",
                "kind": "implement",
                "title": "Orders API",
                "payload": {"endpoint": "/orders"},
                "created_at": "2026-11-22T04:00:00Z",
            }
        )
        headers = {"Nats-Msg-Id": "t-123", "Content-Type": "application/msgpack"}
        js = client.jetstream()
        first = await js.publish("task.backend.implement", body, headers=headers)
        second = await js.publish("task.backend.implement", body, headers=headers)
    finally:
        await client.close()
    assert first.stream == WORK_STREAM
    assert second.duplicate
    assert second.seq == first.seq
    stored = await rolebus_bus.connection.streams.get(WORK_STREAM, first.seq)
    assert stored is not None
    task = codec.decode(stored.subject, stored.data)
    assert isinstance(task, Task)
    assert (task.id, task.title, task.payload) == ("t-123", "Orders API", {"endpoint": "/orders"})
    assert (await rolebus_bus.connection.admin.stream_state(WORK_STREAM))["messages"] == 1


async def test_publish_task_stores_the_task_with_its_id_as_msg_id(rolebus_bus: Bus) -> None:
    task, ack = await rolebus_bus.publish_task(
        "task.backend", kind="implement", title="x", payload={"a": 1}
    )
    again = await rolebus_bus.publish("task.backend.implement", task)
    assert again.duplicate
    assert again.seq == ack.seq
    stored = await rolebus_bus.connection.streams.get(WORK_STREAM, ack.seq)
    assert stored is not None
    assert stored.headers["Nats-Msg-Id"] == task.id
    assert stored.headers["Content-Type"] == "application/msgpack"
    assert stored.headers["traceparent"].startswith("00-")


async def test_an_oversize_message_is_refused_before_sending_with_size_and_limit(
    tmp_path: object, rolebus_settings: Settings
) -> None:
    bus = await Bus.connect(rolebus_settings)
    try:
        limit = bus.connection.max_payload
        with pytest.raises(PayloadTooLargeError) as caught:
            await bus.publish_task("task.backend.x", title="big", payload={"blob": "x" * limit})
        assert f"{limit:,}" in caught.value.message
        assert caught.value.size > limit
        assert (await bus.connection.admin.stream_state(WORK_STREAM))["messages"] == 0
    finally:
        await bus.close()


async def test_a_domain_nobody_owns_is_refused_when_the_team_is_given(
    rolebus_bus: Bus, rolebus_settings: Settings
) -> None:
    team = load_team(rolebus_settings.roles_dir)
    with pytest.raises(Exception, match="no role owns the domain 'nowhere'"):
        await rolebus_bus.publish_task("task.nowhere.x", title="t", team=team)
    with pytest.raises(SubjectError, match="disagrees"):
        await rolebus_bus.publish_task("task.backend.x", kind="y", title="t")


async def test_no_server_gives_a_connect_error_that_says_what_to_run(tmp_path: object) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:1")
    with pytest.raises(ConnectError) as caught:
        await Bus.connect(settings)
    assert "no NATS server reachable at nats://127.0.0.1:1" in caught.value.message
    assert "rolebus server" in caught.value.hint


async def test_provisioning_is_idempotent_and_reports_an_incompatible_stream(
    rolebus_server: EmbeddedServer, rolebus_settings: Settings
) -> None:
    await (await Bus.connect(rolebus_settings)).close()
    await (await Bus.connect(rolebus_settings)).close()
    client = await nats.connect(rolebus_server.url)
    try:
        js = client.jetstream()
        await js.delete_stream(WORK_STREAM)
        await js.add_stream(name=WORK_STREAM, subjects=["task.>"])
    finally:
        await client.close()
    with pytest.raises(IncompatibleStreamError) as caught:
        await Bus.connect(rolebus_settings)
    assert "discard is 'old'" in caught.value.message
    assert "subjects are" in caught.value.message
    assert "does not replace it" in caught.value.hint


async def test_a_tasks_survive_a_server_kill_and_restart(tmp_path: object) -> None:
    from pathlib import Path

    store = Path(str(tmp_path)) / "store"
    server = start_server(store)
    try:
        settings = Settings(nats_url=server.url)
        async with await Bus.connect(settings) as bus:
            _, ack = await bus.publish_task("task.backend.x", title="durable")
        server.kill()
        server.restart()
        async with await Bus.connect(settings) as bus:
            stored = await bus.connection.streams.get(WORK_STREAM, ack.seq)
        assert stored is not None
        assert codec.decode_as(Task, stored.data).title == "durable"
    finally:
        server.stop()
