from __future__ import annotations

from pathlib import Path

import pytest

from rolebus.config import Settings
from rolebus.errors import ConfigError


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.nats_url is None
    assert settings.home == Path(".rolebus")
    assert settings.port == 4222
    assert settings.sync_interval == "always"
    assert settings.claimed_after == 0.25


def test_environment_and_overrides_are_read_once() -> None:
    settings = Settings.from_env(
        {"NATS_URL": "nats://a:1,nats://b:2", "ROLEBUS_HOME": "/x"}, roles_dir=Path("r")
    )
    assert settings.server_urls == ["nats://a:1", "nats://b:2"]
    assert settings.home == Path("/x")
    assert settings.roles_dir == Path("r")


def test_a_missing_credentials_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"creds file '/nope\.creds' does not exist"):
        Settings.from_env({"NATS_CREDS": "/nope.creds"})


def test_a_bad_url_or_port_is_refused_with_the_variable() -> None:
    with pytest.raises(ConfigError, match="NATS_URL"):
        Settings.from_env({"NATS_URL": "http://x"})
    with pytest.raises(ConfigError, match="ROLEBUS_PORT"):
        Settings.from_env({"ROLEBUS_PORT": "http"})


def test_claimed_after_is_read_and_a_bad_value_names_the_variable() -> None:
    assert Settings.from_env({"ROLEBUS_CLAIMED_AFTER": "0"}).claimed_after == 0
    assert Settings.from_env({"ROLEBUS_CLAIMED_AFTER": "1.5"}).claimed_after == 1.5
    for bad in ("soon", "-1"):
        with pytest.raises(ConfigError, match="ROLEBUS_CLAIMED_AFTER"):
            Settings.from_env({"ROLEBUS_CLAIMED_AFTER": bad})


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
