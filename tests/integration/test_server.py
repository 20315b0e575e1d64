from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rolebus.errors import ServerError
from rolebus.nats.server import EmbeddedServer, running_server_url, serve


def test_the_embedded_server_runs_jetstream_with_sync_always(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "s", port=0).start()
    try:
        assert server.port > 0
        config = (tmp_path / "s" / "nats-server.conf").read_text()
        assert "sync_interval: always" in config
        assert '"127.0.0.1:' in config
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as connection:
            assert connection.recv(4096).startswith(b"INFO ")
    finally:
        server.stop()
    assert not server.running


def test_a_taken_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServerError) as caught:
            EmbeddedServer(store_dir=tmp_path, port=port).start()
    assert f"port {port}" in caught.value.message
    assert "--port" in caught.value.hint


def test_a_second_server_on_one_state_folder_is_refused(tmp_path: Path) -> None:
    with serve(home=tmp_path, port=0, sync_interval="always") as first:
        assert running_server_url(tmp_path) == first.url
        with (
            pytest.raises(ServerError, match="already runs on the state folder") as caught,
            serve(home=tmp_path, port=0, sync_interval="always"),
        ):
            pass
        assert first.url in caught.value.message
    assert running_server_url(tmp_path) is None


def test_a_stale_state_file_from_a_killed_server_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "server.json").write_text('{"url": "nats://127.0.0.1:1", "pid": 1}')
    assert running_server_url(tmp_path) is None


def test_a_server_restarts_on_the_same_store_and_port(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path, port=0).start()
    port = server.port
    try:
        server.kill()
        assert not server.running
        server.restart()
        assert server.running
        assert server.port == port
    finally:
        server.stop()


async def test_a_client_follows_the_embedded_server_to_its_new_port(tmp_path: Path) -> None:
    from rolebus.bus import Bus
    from rolebus.config import Settings

    home = tmp_path / "home"
    settings = Settings(home=home)  # no NATS_URL: the state folder's server
    with serve(home=home, port=0, sync_interval="always") as first:
        bus = await Bus.connect(settings)
        await bus.publish_task("task.backend.x", title="before the restart")
    with serve(home=home, port=0, sync_interval="always") as second:
        try:
            assert second.url != first.url
            _, ack = await bus.publish_task("task.backend.x", title="after it")
            assert ack.seq == 2  # the same store, reached on the new port
            assert bus.connection.url == second.url
        finally:
            await bus.close()
