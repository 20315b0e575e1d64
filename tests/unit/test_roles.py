from __future__ import annotations

from pathlib import Path

import pytest

from rolebus.errors import RoleError
from rolebus.team.durations import parse_duration
from rolebus.team.handler_specs import CommandHandler
from rolebus.team.roles import Team, load_team, parse_role

from ..conftest import REPO, CliRunner

MINIMAL = """+++
id = "{id}"
title = "T"
handler = "builtin:echo"
{extra}
+++
persona of {id}
"""


def write_role(folder: Path, role_id: str, extra: str = "") -> Path:
    path = folder / f"{role_id}.md"
    path.write_text(MINIMAL.format(id=role_id, extra=extra), encoding="utf-8")
    return path


def test_the_shipped_team_is_valid_and_has_the_six_roles() -> None:
    team = load_team(REPO / "roles")
    assert sorted(team.roles) == ["architect", "cto", "eng-be", "eng-fe", "perf-eng", "pm"]
    be = team.role("eng-be")
    assert be.reports_to == "cto"
    assert team.owner_of("backend").id == "eng-be"
    assert team.owner_of("frontend").id == "eng-fe"
    spend = be.never_rule_for("spend")
    assert spend is not None
    assert spend.to == "cto"
    assert be.never_rule_for("ui").action == "handoff"  # type: ignore[union-attr]
    assert be.escalation_rule_for("ambiguous-spec").to == "architect"  # type: ignore[union-attr]
    assert be.escalation_rule_for("perf-vs-consistency").to == "pm"  # type: ignore[union-attr]
    assert be.escalation_rule_for("frontend-integration").to == "eng-fe"  # type: ignore[union-attr]
    assert be.slo.p99_latency_ms == 100
    assert "Backend Engineer" in be.persona
    assert team.chain_above("eng-be") == ["cto"]
    assert team.contract_authors("orders-api") == {"architect", "eng-be"}
    assert team.contract_authors("billing-api") is None  # nobody's: anyone may


def test_contracts_are_tokens_listed_once_and_no_role_is_called_person(tmp_path: Path) -> None:
    write_role(tmp_path, "a", 'contracts = ["orders api"]')
    with pytest.raises(RoleError, match="contract 'orders api' is not a valid subject token"):
        load_team(tmp_path)
    write_role(tmp_path, "a", 'contracts = ["orders-api", "orders-api"]')
    with pytest.raises(RoleError, match="a contract is listed twice"):
        load_team(tmp_path)
    (tmp_path / "a.md").unlink()
    write_role(tmp_path, "person")
    with pytest.raises(RoleError, match="stands for a person"):
        load_team(tmp_path)


def test_a_reports_to_cycle_is_refused_naming_the_file_field_and_cycle(tmp_path: Path) -> None:
    write_role(tmp_path, "a", 'reports_to = "b"')
    write_role(tmp_path, "b", 'reports_to = "a"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert "a.md" in str(caught.value)
    assert caught.value.field == "reports_to"
    assert "cycle: a -> b -> a" in caught.value.message
    assert "tree" in caught.value.hint


def test_a_domain_owned_twice_is_refused(tmp_path: Path) -> None:
    write_role(tmp_path, "a", 'domains = ["backend"]')
    write_role(tmp_path, "b", 'domains = ["backend"]')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "domains"
    assert "b.md" in caught.value.message
    assert "already owned by role 'a'" in caught.value.message
    assert "exactly one owner" in caught.value.hint


def test_a_missing_field_is_named_with_its_fix(tmp_path: Path) -> None:
    (tmp_path / "x.md").write_text('+++\nid = "x"\ntitle = "X"\n+++\n', encoding="utf-8")
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "handler"
    assert "missing" in caught.value.message
    assert "builtin:NAME" in caught.value.hint


def test_invalid_toml_is_refused_with_the_line(tmp_path: Path) -> None:
    (tmp_path / "x.md").write_text('+++\nid = "x\n+++\n', encoding="utf-8")
    with pytest.raises(RoleError, match=r"x\.md: front matter is not valid TOML.*line 1"):
        load_team(tmp_path)


def test_a_rule_pointing_at_a_role_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    write_role(tmp_path, "a", '[[escalate]]\nreason = "unknown"\nto = "ghost"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "escalate[0].to"
    assert "'ghost' does not exist" in caught.value.message


def test_an_unknown_setting_is_refused_as_a_probable_typo(tmp_path: Path) -> None:
    write_role(tmp_path, "a", "concurency = 3")
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "concurency"
    assert "not a known setting" in caught.value.message


def test_a_file_without_front_matter_says_how_to_start_one() -> None:
    with pytest.raises(RoleError) as caught:
        parse_role("# just markdown\n", file="roles/x.md")
    assert "'+++'" in caught.value.hint


def test_duplicate_role_ids_are_refused(tmp_path: Path) -> None:
    write_role(tmp_path, "a")
    (tmp_path / "copy.md").write_text(MINIMAL.format(id="a", extra=""), encoding="utf-8")
    with pytest.raises(RoleError, match="also used by"):
        load_team(tmp_path)


def test_a_bad_handler_spec_is_explained(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text('+++\nid = "a"\ntitle = "A"\nhandler = "shell"\n+++\n')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "handler"


def test_a_missing_roles_folder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(RoleError, match="does not exist"):
        load_team(tmp_path / "nope")


def test_a_command_handler_and_durations_parse() -> None:
    role = parse_role(
        '+++\nid = "a"\ntitle = "A"\nack_wait = "2m"\n'
        'handler = { command = ["python", "agent.py"], timeout = "90s" }\n+++\n',
        file="a.md",
    )
    assert role.ack_wait == 120.0
    assert isinstance(role.handler, CommandHandler)
    assert role.handler.command == ["python", "agent.py"]
    assert role.handler.timeout == 90.0


@pytest.mark.parametrize(
    ("text", "seconds"), [(30, 30.0), ("500ms", 0.5), ("5m", 300.0), ("2h", 7200.0)]
)
def test_durations_accept_numbers_and_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_the_team_reports_its_domains_when_one_is_unknown() -> None:
    team = Team.from_roles([])
    with pytest.raises(RoleError, match="no role owns the domain"):
        team.owner_of("x")


@pytest.mark.parametrize(
    ("handler", "ack_wait", "message"),
    [
        ('"builtin:nope"', '"30s"', "no builtin handler 'nope'"),
        ('"python:no_such_module_here:handle"', '"30s"', "cannot import 'no_such_module_here'"),
        ('{ command = ["no-such-agent-binary"] }', '"30s"', "'no-such-agent-binary' not found"),
        ('"builtin:scripted"', '"99999999h"', "longer than the longest duration allowed"),
    ],
)
def test_roles_check_refuses_what_would_fail_later(
    cli: CliRunner, tmp_path: Path, handler: str, ack_wait: str, message: str
) -> None:
    folder = tmp_path / "roles"
    folder.mkdir()
    (folder / "eng-be.md").write_text(
        f'+++\nid = "eng-be"\ntitle = "Backend"\ndomains = ["backend"]\n'
        f"handler = {handler}\nack_wait = {ack_wait}\n+++\nPersona.\n",
        encoding="utf-8",
    )
    result = cli("roles", "check", "--roles", str(folder))
    assert result.code == 1
    assert message in result.stderr
    assert "eng-be.md" in result.stderr
    assert "Traceback" not in result.stderr


def test_auth_writes_its_secrets_readable_by_their_owner_only(
    cli: CliRunner, tmp_path: Path
) -> None:
    import stat

    secrets = tmp_path / "secrets"
    done = cli("auth", "--secrets", str(secrets), "--output", str(tmp_path / "deploy"))
    assert done.code == 0, done.stderr
    config = tmp_path / "deploy" / "nats-auth.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "authorization {" in config.read_text()
    assert done.stdout == ""  # no password on the screen
    for password in secrets.glob("*.password"):
        assert stat.S_IMODE(password.stat().st_mode) == 0o600
        assert password.read_text().strip() not in done.stderr


def test_roles_lists_a_team_of_llm_roles(cli: CliRunner) -> None:
    listed = cli("roles", "--roles", str(REPO / "examples" / "llm-team" / "roles"), "--json")
    assert listed.code == 0, listed.stderr
    import json

    rows = json.loads(listed.stdout)
    assert {row["handler"] for row in rows} == {"llm:llama3.2"}


def test_a_then_route_must_name_a_task_subject_of_a_domain_the_team_has(tmp_path: Path) -> None:
    write_role(tmp_path, "a", 'domains = ["product"]\n[[then]]\nsubject = "task.design.x"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "then[0].subject"
    assert "no role has the domain 'design'" in caught.value.message
    write_role(tmp_path, "a", '[[then]]\nsubject = "event.x.y"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert "is not task.<domain>.<kind>" in caught.value.message


def test_then_routes_follow_completed_work_not_decisions_nor_what_the_model_asked_already(
    tmp_path: Path,
) -> None:
    from rolebus.flows.routes import with_routes
    from rolebus.wire.messages import FollowUp, Outcome, Task

    write_role(
        tmp_path,
        "pm",
        'domains = ["product", "design"]\n'
        '[[then]]\nkinds = ["feature"]\nsubject = "task.design.sketch"\ntitle = "Sketch: {title}"\n'
        '[[then]]\nsubject = "task.design.review"',
    )
    role = load_team(tmp_path).role("pm")
    feature = Task(title="Orders", kind="feature")
    done = with_routes(role, feature, Outcome.completed({"filed": True}))
    assert [(t.subject, t.title) for t in done.tasks] == [
        ("task.design.sketch", "Sketch: Orders"),
        ("task.design.review", "Orders"),
    ]
    assert done.tasks[0].payload["after"]["result"] == {"filed": True}
    # The model asked for one of them itself: filed once.
    own = FollowUp(subject="task.design.review", title="mine")
    assert len(with_routes(role, feature, Outcome.completed(tasks=[own])).tasks) == 2
    # Another kind gets the routes for every kind only; decisions and failures none.
    other = with_routes(role, Task(title="Other", kind="bug"), Outcome.completed())
    assert [t.subject for t in other.tasks] == ["task.design.review"]
    decided = Task(title="Decide", kind="escalation")
    assert with_routes(role, decided, Outcome.completed()).tasks == []
    assert with_routes(role, feature, Outcome.failed("no", retryable=False)).tasks == []


def test_tools_are_one_source_each_with_an_allow_list_and_only_for_llm_roles(
    tmp_path: Path,
) -> None:
    write_role(tmp_path, "a", '[[tools]]\nmcp = ["server"]')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert "need allow = [names]" in caught.value.message
    write_role(tmp_path, "a", '[[tools]]\nmcp = ["server"]\npython = "m:f"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert "a tool source is one of" in caught.value.message
    write_role(tmp_path, "a", '[[tools]]\npython = "pkg.mod:lookup"')
    with pytest.raises(RoleError) as caught:
        load_team(tmp_path)
    assert caught.value.field == "tools"
    assert "llm handler" in caught.value.message
    llm = 'handler = { llm = "m" }\n[[tools]]\npython = "pkg.mod:lookup"'
    (tmp_path / "a.md").write_text(
        f'+++\nid = "a"\ntitle = "T"\n{llm}\n+++\npersona\n', encoding="utf-8"
    )
    [source] = load_team(tmp_path).role("a").tools
    assert source.allow == ["lookup"]  # a function allows its own name
