"""Contract compatibility rules, and the contracts/escalations commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rolebus.bus import Bus
from rolebus.errors import NotFoundError
from rolebus.flows.contracts import (
    ContractError,
    ContractRegistry,
    ContractVersion,
    diff,
    document_from,
    parse_version,
    version_key,
)
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import load_team
from rolebus.wire import codec
from rolebus.wire.subjects import CONTRACTS_BUCKET

from ..conftest import REPO, CliRunner

BASE: dict[str, Any] = {
    "name": "orders-api",
    "version": "1.0.0",
    "operations": {
        "createOrder": {
            "method": "POST",
            "path": "/orders",
            "input": {"item": {"type": "string", "required": True}, "note": {"type": "string"}},
            "output": {"id": {"type": "string"}},
        }
    },
}


def changed(**operation: Any) -> Any:
    create = {**BASE["operations"]["createOrder"], **operation}
    return document_from(
        {**BASE, "version": "1.1.0", "operations": {"createOrder": create}}, source="test"
    )


def test_adding_an_optional_input_or_an_output_field_is_compatible() -> None:
    new = changed(
        input={**BASE["operations"]["createOrder"]["input"], "gift": {"type": "boolean"}},
        output={"id": {"type": "string"}, "eta": {"type": "string"}},
    )
    breaking, compatible = diff(document_from(BASE, source="t"), new)
    assert breaking == []
    assert compatible == [
        "+ createOrder.input.gift (boolean) added",
        "+ createOrder.output.eta (string) added",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"output": {}}, "- createOrder.output.id (string) removed"),
        (
            {"output": {"id": {"type": "integer"}}},
            "~ createOrder.output.id: type string -> integer",
        ),
        (
            {
                "input": {
                    "item": {"type": "string", "required": True},
                    "note": {"type": "string", "required": True},
                }
            },
            "~ createOrder.input.note: now required",
        ),
        (
            {
                "input": {
                    "item": {"type": "string", "required": True},
                    "note": {"type": "string"},
                    "qty": {"type": "integer", "required": True},
                }
            },
            "+ createOrder.input.qty (integer) added as a required input",
        ),
        ({"path": "/v2/orders"}, "~ operation createOrder: POST /orders -> POST /v2/orders"),
    ],
)
def test_each_breaking_change_is_named_in_the_diff(change: dict[str, Any], expected: str) -> None:
    breaking, _ = diff(document_from(BASE, source="t"), changed(**change))
    assert breaking == [expected]


def test_a_removed_operation_is_breaking() -> None:
    other = document_from(
        {
            **BASE,
            "version": "2.0.0",
            "operations": {"getOrder": {"method": "GET", "path": "/orders/{id}"}},
        },
        source="t",
    )
    breaking, compatible = diff(document_from(BASE, source="t"), other)
    assert breaking == ["- operation createOrder (POST /orders) removed"]
    assert compatible == ["+ operation getOrder (GET /orders/{id}) added"]


@pytest.mark.parametrize("version", ["1", "1.0", "v1.0.0", "01.0.0", "1.0.0-beta"])
def test_versions_must_be_plain_semver(version: str) -> None:
    with pytest.raises(ContractError, match="not semver"):
        parse_version(version)


def test_a_malformed_document_names_every_problem() -> None:
    with pytest.raises(ContractError) as caught:
        document_from({"name": "bad name", "version": "1.0.0", "operations": {}}, source="x.json")
    assert "x.json" in caught.value.message


def test_contract_commands_publish_refuse_diff_and_list(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(BASE))
    assert cli("contracts", "publish", str(v1), "--author", "architect", env=env).code == 0
    broken = {
        **BASE,
        "version": "1.1.0",
        "operations": {"createOrder": {**BASE["operations"]["createOrder"], "output": {}}},
    }
    v11 = tmp_path / "v11.json"
    v11.write_text(json.dumps(broken))
    refused = cli("contracts", "publish", str(v11), env=env)
    assert refused.code == 1
    assert "breaks 1.0.0 without a major version bump" in refused.stderr
    assert "- createOrder.output.id (string) removed" in refused.stderr
    assert "2.0.0" in refused.stderr
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({**broken, "version": "2.0.0"}))
    assert cli("contracts", "publish", str(v2), env=env).code == 0
    differences = json.loads(
        cli("contracts", "diff", "orders-api", "1.0.0", "2.0.0", "--json", env=env).stdout
    )
    assert differences["breaking"] == ["- createOrder.output.id (string) removed"]
    listed = json.loads(cli("contracts", "list", "--json", env=env).stdout)
    assert [(row["version"], row["author"]) for row in listed] == [
        ("1.0.0", "architect"),
        ("2.0.0", "person"),
    ]
    shown = json.loads(cli("contracts", "show", "orders-api", env=env).stdout)
    assert shown["document"]["version"] == "2.0.0"
    # The role files give orders-api to the architect and eng-be: not to eng-fe.
    v3 = tmp_path / "v3.json"
    v3.write_text(json.dumps({**broken, "version": "3.0.0"}))
    foreign = cli("contracts", "publish", str(v3), "--author", "eng-fe", env=env)
    assert foreign.code == 1
    assert "eng-fe may not write versions of orders-api" in foreign.stderr
    assert "architect, eng-be" in foreign.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    malformed = cli("contracts", "publish", str(bad), env=env)
    assert malformed.code == 1
    assert "is not JSON" in malformed.stderr


def test_escalation_commands_list_and_refuse_unknown_ids(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    assert "no open escalations" in cli("escalations", env=env).stdout
    missing = cli("resolve", "nope", "--decision", "yes", env=env)
    assert missing.code == 1
    assert "no escalation 'nope'" in missing.stderr
    both = cli("resolve", "nope", "-d", "x", "--approve", "--reject", env=env)
    assert both.code == 1
    assert "not both" in both.stderr


async def test_a_version_from_a_role_the_role_files_do_not_name_is_not_read(
    rolebus_bus: Bus,
) -> None:
    # Written as if the server let it (a config made before the role files said who
    # authors orders-api): a reader with the team passes over it.
    document = document_from(BASE, source="test")
    planted = ContractVersion(document=document, author="eng-fe")
    await rolebus_bus.connection.kv.put(
        CONTRACTS_BUCKET, version_key("eng-fe", "orders-api", "1.0.0"), codec.encode(planted)
    )
    team = load_team(REPO / "roles")
    with pytest.raises(NotFoundError, match="no contract 'orders-api'"):
        await ContractRegistry(rolebus_bus.connection, team=team).get("orders-api")
    assert (await ContractRegistry(rolebus_bus.connection).get("orders-api")).author == "eng-fe"
    await ContractRegistry(rolebus_bus.connection, team=team).publish(document, author="architect")
    found = await ContractRegistry(rolebus_bus.connection, team=team).get("orders-api", "1.0.0")
    assert found.author == "architect"
