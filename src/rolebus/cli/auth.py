"""`rolebus auth`: per-role NATS users and permissions generated from roles/."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from rolebus.cli.app import (
    RolesOption,
    err,
    settings_for,
    team_for,
)
from rolebus.errors import ConfigError
from rolebus.team.auth import ADMIN, Credentials, render_config


def auth_command(
    secrets: Annotated[
        Path,
        typer.Option(help="Folder for the users' password or nkey seed files (created, 0600)."),
    ] = Path(".rolebus/secrets"),
    nkeys: Annotated[
        bool,
        typer.Option(
            "--nkeys",
            help="Users by nkey instead of password (recommended): each role's seed is "
            "SECRETS/<role>.nk and the config holds only public keys.",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the config as nats-auth.conf in this folder (mode 0600), "
            "instead of to stdout.",
        ),
    ] = None,
    roles: RolesOption = None,
) -> None:
    """Write a nats-server authorization config for the team (least privilege).

    `rolebus auth --nkeys --output deploy/`, then `include nats-auth.conf` in the
    server config. Workers connect as their role: `rolebus --nkey
    .rolebus/secrets/eng-be.nk worker eng-be` (other commands: add `--as eng-be`).
    Without --nkeys the users have passwords (`rolebus --user eng-be --password-file
    .rolebus/secrets/eng-be.password worker eng-be`); that config holds them, so it
    is never printed to a terminal, and a file it goes into is made readable by its
    owner only (`> file` too).
    """
    team = team_for(settings_for(roles))
    users = [ADMIN, *(role.id for role in team)]
    if nkeys:
        credentials = Credentials.load_or_create(secrets, users, nkeys=True)
        config = render_config(team, credentials)
        if output is None:
            sys.stdout.write(config)  # public keys only: safe anywhere
            return
        output.mkdir(parents=True, exist_ok=True)
        (output / "nats-auth.conf").write_text(config, encoding="utf-8")
        err.print(
            f"wrote {output / 'nats-auth.conf'} (public keys only); each user's seed is "
            f"{secrets}/<user>.nk (mode 0600): rolebus --nkey {secrets}/eng-be.nk worker eng-be",
            highlight=False,
        )
        return
    if output is None and sys.stdout.isatty():
        raise ConfigError(
            "the config holds the users' passwords: it is not printed to a terminal",
            hint="rolebus auth --output DIR (writes DIR/nats-auth.conf, mode 0600), "
            "or redirect it: rolebus auth > nats-auth.conf",
        )
    credentials = Credentials.load_or_create(secrets, users)
    config = render_config(team, credentials)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        path = output / "nats-auth.conf"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(config)
        err.print(f"wrote {path} (mode 0600); the passwords are in {secrets}")
        return
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            os.fchmod(sys.stdout.fileno(), 0o600)  # `> file`: not readable by others
    sys.stdout.write(config)


# --- the team ----------------------------------------------------------------------------
