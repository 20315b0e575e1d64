"""docker-compose.yml is checked, not run (no Docker engine here): its topology must
match roles/ and the config `rolebus auth` generates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rolebus.team.auth import ADMIN, Credentials, render_config
from rolebus.team.roles import load_team

from ..conftest import REPO

COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
TEAM = load_team(REPO / "roles")


def test_three_jetstream_nodes_fsync_always_and_route_to_each_other() -> None:
    nodes = [name for name in COMPOSE["services"] if name.startswith("nats-")]
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    for node in nodes:
        config = (REPO / "deploy" / f"{node}.conf").read_text()
        assert f"server_name: {node}" in config
        assert "sync_interval: always" in config
        assert "include nats-auth.conf" in config
        routes = re.search(r"routes: \[(.*)\]", config)
        assert routes is not None
        assert sorted(re.findall(r"nats-\d", routes.group(1))) == nodes


def test_one_worker_service_per_role_with_its_own_user_and_secret() -> None:
    services = COMPOSE["services"]
    for role in TEAM:
        service = services[role.id]
        command = service["command"]
        assert command[:2] == ["--user", role.id]
        assert command[2:4] == ["--password-file", f"/run/secrets/{role.id}"]
        assert command[-2:] == ["worker", role.id]
        assert service["secrets"] == [role.id]
        assert service["environment"]["ROLEBUS_REPLICAS"] == "3"
        assert service["environment"]["NATS_URL"].count("nats://nats-") == 3
    workers = {name for name, service in services.items() if "worker" in service.get("command", [])}
    assert workers == {role.id for role in TEAM}
    assert services["provision"]["command"][:2] == ["--user", ADMIN]
    assert services["provision"]["command"][-1] == "provision"


def test_the_secrets_match_the_users_rolebus_auth_generates(tmp_path: Path) -> None:
    users = [ADMIN, *(role.id for role in TEAM)]
    config = render_config(TEAM, Credentials.load_or_create(tmp_path, users))
    generated = re.findall(r'"user": "([^"]+)"', config)
    assert generated == users
    assert sorted(COMPOSE["secrets"]) == sorted(users)
    for user in users:
        assert COMPOSE["secrets"][user]["file"] == f"./deploy/secrets/{user}.password"
