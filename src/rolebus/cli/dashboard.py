"""`rolebus dashboard`: the web dashboard."""

from __future__ import annotations

import secrets
import socket
from typing import Annotated

import typer

from rolebus.bus import Bus
from rolebus.cli.app import (
    RolesOption,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import ConfigError


def dashboard_command(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option(help="Required on every request; made up when --host is public.")
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Another host name it may be reached by (repeat it); loopback names and "
            "--host are allowed already. Any other Host header is refused.",
        ),
    ] = None,
    roles: RolesOption = None,
) -> None:
    """Serve the web dashboard: the team board, task pages, the escalation inbox,
    contracts and the live event stream (no CDN, nothing to build)."""
    import uvicorn

    from rolebus.web.app import create_app
    from rolebus.web.guard import LOOPBACK

    settings = settings_for(roles)
    team = team_for(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        token = secrets.token_urlsafe(16)
    run(_check_server(settings))  # a clear error now, not a traceback from uvicorn's startup
    hosts = {*LOOPBACK, *(name.lower() for name in allow_host or [])}
    if host not in ("0.0.0.0", "::"):
        hosts.add(host.lower())
    app_ = create_app(settings, team, token=token, hosts=hosts)
    suffix = f"/?token={token}" if token else "/"
    # Bound before the address is printed: whoever reads the line can connect at once
    # (the kernel queues a connection until the server takes it), and a port in use is
    # a clear error here.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listening = socket.create_server((host, port), family=family)
    except OSError as error:
        raise ConfigError(
            f"cannot serve on {host}:{port}: {error.strerror or error}",
            hint="give another --port (or stop what uses it)",
        ) from error
    out.print(f"rolebus dashboard on http://{host}:{port}{suffix} (Ctrl-C to stop)")
    server = uvicorn.Server(uvicorn.Config(app_, log_level="warning"))
    server.run(sockets=[listening])


async def _check_server(settings: Settings) -> None:
    """Raise the ConnectError (with its hint) when no NATS server answers."""
    async with await Bus.connect(settings, name="rolebus-dashboard-check", provision=False):
        pass
