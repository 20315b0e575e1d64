"""Settings: one frozen object, and the only reader of the environment.

Variables (all optional):

- ``NATS_URL``: join this server or cluster (comma-separated URLs) instead of the
  embedded one.
- ``NATS_CREDS``: a ``.creds`` file (JWT + nkey); ``NATS_USER``/``NATS_PASSWORD``;
  ``NATS_NKEY``: an nkey seed file.
- ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``: TLS (CA bundle, client cert and key).
- ``ROLEBUS_HOME``: the state folder (embedded server store, its pid/url file);
  default ``.rolebus`` in the current directory.
- ``ROLEBUS_ROLES``: the folder of role files; default ``roles``.
- ``ROLEBUS_PORT``: the embedded server's port; default 4222.
- ``ROLEBUS_REPLICAS``: replicas of each stream and bucket (3 in a 3-node cluster);
  default 1.
- ``ROLEBUS_SYNC``: the embedded server's ``sync_interval``; default ``always``
  (fsync every write; JetStream's own default of 2 minutes loses acknowledged
  writes on power loss).
- ``ROLEBUS_CLAIMED_AFTER``: seconds a handler runs before its task's ``claimed``
  event is published; default 0.25. Faster tasks skip that event (their terminal
  event records the attempt): it would be one more fsynced write per task. ``0``
  publishes it for every task.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rolebus.errors import ConfigError

__all__ = ["Settings"]


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"ROLEBUS_PORT={value!r} is not a port number",
            hint="use a number from 1 to 65535 (or 0 for any free port)",
        )
    return port


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 86400:
        raise ConfigError(
            f"{name}={value!r} is not a number of seconds",
            hint="use a number such as 0.25 (0 for always)",
        )
    return seconds


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _age(name: str, value: str) -> float:
    """An age such as ``30d``, ``12h`` or a number of seconds."""
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not 60 <= seconds <= 3650 * 86400:
        raise ConfigError(
            f"{name}={value!r} is not an age between a minute and ten years",
            hint="use a number with a unit, such as 30d, 12h or 90m",
        )
    return seconds


def _replicas(value: str) -> int:
    if value not in ("1", "3", "5"):
        raise ConfigError(
            f"ROLEBUS_REPLICAS={value!r} is not a stream replica count",
            hint="use 1 (a single server), 3 or 5 (a cluster of at least that many nodes)",
        )
    return int(value)


#: The user that provisions streams and consumers (``rolebus auth`` makes it).
ADMIN_USER = "admin"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Where the bus runs and how to reach it. Build with :meth:`from_env`."""

    nats_url: str | None = None
    creds_file: Path | None = None
    user: str | None = None
    password: str | None = None
    nkey_seed_file: Path | None = None
    #: The role a connection acts as when its credentials do not name it (an nkey or a
    #: creds file): it listens on that role's inbox prefix and does not provision.
    acting_as: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    home: Path = Path(".rolebus")
    roles_dir: Path = Path("roles")
    port: int = 4222
    sync_interval: str = "always"
    replicas: int = 1
    claimed_after: float = 0.25
    #: How long recorded model calls are kept (None: as long as the events).
    calls_retention: float | None = None

    @property
    def role_user(self) -> str | None:
        """The role whose user this connection is (None: the admin, or no auth)."""
        if self.acting_as:
            return self.acting_as
        return self.user if self.user and self.user != ADMIN_USER else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment; keyword overrides (from CLI options) win when not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "nats_url": env.get("NATS_URL") or None,
            "creds_file": _optional_path(env.get("NATS_CREDS")),
            "user": env.get("NATS_USER") or None,
            "password": env.get("NATS_PASSWORD") or None,
            "nkey_seed_file": _optional_path(env.get("NATS_NKEY")),
            "acting_as": env.get("ROLEBUS_AS") or None,
            "tls_ca": _optional_path(env.get("NATS_CA")),
            "tls_cert": _optional_path(env.get("NATS_CERT")),
            "tls_key": _optional_path(env.get("NATS_KEY")),
            "home": Path(env.get("ROLEBUS_HOME") or ".rolebus"),
            "roles_dir": Path(env.get("ROLEBUS_ROLES") or "roles"),
            "port": _port(env.get("ROLEBUS_PORT") or "4222"),
            "sync_interval": env.get("ROLEBUS_SYNC") or "always",
            "replicas": _replicas(env.get("ROLEBUS_REPLICAS") or "1"),
            "claimed_after": _seconds(
                "ROLEBUS_CLAIMED_AFTER", env.get("ROLEBUS_CLAIMED_AFTER") or "0.25"
            ),
            "calls_retention": (
                _age("ROLEBUS_CALLS_RETENTION", env["ROLEBUS_CALLS_RETENTION"])
                if env.get("ROLEBUS_CALLS_RETENTION")
                else None
            ),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, naming the variable to fix."""
        for name in ("creds_file", "nkey_seed_file", "tls_ca", "tls_cert", "tls_key"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(
                    f"{name.replace('_', ' ')} {str(path)!r} does not exist",
                    hint="fix the path in the environment variable or CLI option",
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "TLS needs both a client certificate and its key",
                hint="set both NATS_CERT and NATS_KEY, or neither",
            )
        if self.nats_url is not None and not all(
            url.strip().split("://", 1)[0] in ("nats", "tls", "ws", "wss")
            for url in self.nats_url.split(",")
        ):
            raise ConfigError(
                f"NATS_URL={self.nats_url!r} is not a NATS URL",
                hint="use nats://host:4222 (or tls://...); separate several with commas",
            )

    @property
    def server_urls(self) -> list[str]:
        """The configured URLs as a list (``NATS_URL`` may hold several)."""
        return [url.strip() for url in (self.nats_url or "").split(",") if url.strip()]

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced (None leaves a field as it is)."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings
