"""The rolebus command as a user runs it: clear output, clear errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rolebus.nats.server import EmbeddedServer

from ..conftest import CliRunner, user_environment


def test_help_teaches_the_commands(cli: CliRunner) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("server", "publish", "roles", "subjects"):
        assert command in result.stdout


def test_roles_lists_the_team_and_check_validates_it(cli: CliRunner) -> None:
    listed = cli("roles", "--json")
    assert listed.code == 0
    ids = [row["id"] for row in json.loads(listed.stdout)]
    assert ids == ["architect", "cto", "eng-be", "eng-fe", "perf-eng", "pm"]
    checked = cli("roles", "check")
    assert checked.code == 0
    assert "6 roles OK" in checked.stdout


def test_roles_check_names_the_file_and_field_of_a_bad_role(cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        '+++\nid = "a"\ntitle = "A"\nhandler = "builtin:x"\nreports_to = "a"\n+++\n'
    )
    result = cli("roles", "check", "--roles", str(tmp_path))
    assert result.code == 1
    assert "a.md, field 'reports_to': a role cannot report to itself" in result.stderr
    assert "Traceback" not in result.stderr


def test_subjects_prints_the_catalog_with_domain_owners(cli: CliRunner) -> None:
    result = cli("subjects", "--json")
    rows = {row["subject"]: row for row in json.loads(result.stdout)}
    assert rows["task.backend.>"]["read_by"] == "eng-be"
    assert rows["event.<entity>.<state>"]["stream"] == "ROLEBUS_EVENTS"


def test_publish_prints_the_task_id_and_sequence(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    env = {"NATS_URL": rolebus_server.url}
    result = cli(
        "publish",
        "task.backend.implement",
        "-t",
        "Orders API",
        "--payload",
        '{"endpoint": "/orders"}',
        "--id",
        "t1",
        "--json",
        env=env,
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "id": "t1",
        "subject": "task.backend.implement",
        "stream": "ROLEBUS_WORK",
        "seq": 1,
        "duplicate": False,
    }
    again = cli("publish", "task.backend.implement", "-t", "Orders API", "--id", "t1", env=env)
    assert "duplicate" in again.stdout
    assert "seq 1" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task.backend.x", "-t", "x", "--payload", "{not json"], "--payload is not JSON"),
        (["task.backend.x", "-t", "x", "--payload", "[1]"], "is a JSON list, not an object"),
        (["task.back end.x", "-t", "x"], "'back end' is not a valid subject token"),
        (["task.nowhere.x", "-t", "x"], "no role owns the domain 'nowhere'"),
        (["jobs.backend.x", "-t", "x"], "is not a task subject"),
    ],
)
def test_publish_bad_input_gives_one_clear_error_and_exit_1(
    cli: CliRunner, rolebus_server: EmbeddedServer, args: list[str], message: str
) -> None:
    result = cli("publish", *args, env={"NATS_URL": rolebus_server.url})
    assert result.code == 1
    assert message in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_publish_with_no_server_says_exactly_what_to_run(cli: CliRunner) -> None:
    result = cli("publish", "task.backend.x", "-t", "x")
    assert result.code == 1
    assert "no NATS server" in result.stderr
    assert "rolebus server" in result.stderr


def test_an_oversize_payload_file_is_refused_with_size_and_limit(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"blob": "x" * 2_000_000}))
    result = cli(
        "publish",
        "task.backend.x",
        "-t",
        "x",
        "--payload-file",
        str(big),
        env={"NATS_URL": rolebus_server.url},
    )
    assert result.code == 1
    assert "over the server's max_payload of 1,048,576 bytes" in result.stderr


def test_publish_file_stores_every_line_once_in_batches_and_twice_adds_nothing(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    backlog = tmp_path / "backlog.jsonl"
    lines = ["# the backlog: one task a line", ""]
    lines += [
        json.dumps({"subject": "task.backend.implement", "title": f"endpoint {n}", "id": f"b{n}"})
        for n in range(2500)
    ]
    lines.append(json.dumps({"subject": "task.frontend", "kind": "build", "title": "page"}))
    backlog.write_text("\n".join(lines) + "\n")
    env = {"NATS_URL": rolebus_server.url}
    result = cli("publish-file", str(backlog), "--json", env=env)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["published"], summary["duplicates"]) == (2501, 0)
    assert (summary["first_seq"], summary["last_seq"]) == (1, 2501)
    assert summary["ids"][:2] == ["b0", "b1"]
    again = cli("publish-file", str(backlog), env=env)
    assert again.code == 0, again.stderr
    # The line without an id gets one derived from its text and place: the same again.
    assert "published 0 tasks" in again.stdout
    assert "2,501 already stored, not added again" in again.stdout


def test_publish_file_names_every_bad_line_and_publishes_nothing(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    backlog = tmp_path / "backlog.jsonl"
    good = json.dumps({"subject": "task.backend.x", "title": "fine"})
    backlog.write_text("\n".join([good, "{oops", good, '{"subject": "task.x"}', "[1]"]) + "\n")
    result = cli("publish-file", str(backlog), env={"NATS_URL": rolebus_server.url})
    assert result.code == 1
    assert "3 bad line(s), nothing published" in result.stderr
    for line in ("line 2 is not JSON", "line 4:", "line 5: a JSON list"):
        assert line in result.stderr


def test_bad_input_is_a_clear_error_never_a_traceback(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    (tmp_path / "latin1.json").write_bytes(b'\xff\xfe{"a": 1}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep400.json").write_text('{"a":' * 400 + "1" + "}" * 400)
    (tmp_path / "nan.json").write_text('{"x": NaN}')
    (tmp_path / "deep.jsonl").write_text(
        json.dumps({"subject": "task.backend.x", "title": "t"})[:-1]
        + ', "payload": '
        + '{"a":' * 400
        + "1"
        + "}" * 401
        + "\n"
    )
    env = {"NATS_URL": rolebus_server.url}
    cases = [
        (["--payload-file", str(tmp_path / "latin1.json")], "is not UTF-8 text"),
        (["--payload-file", str(tmp_path / "deep.json")], "nests too deeply"),
        (["--payload-file", str(tmp_path / "deep400.json")], "nests deeper than 64 levels"),
        (["--payload-file", str(tmp_path / "nan.json")], "which JSON cannot carry"),
        (["--priority", "99999999999999999999999"], "priority"),
        (["--id", "bad id"], "an id is letters, digits"),
    ]
    for args, message in cases:
        result = cli("publish", "task.backend.x", "-t", "t", *args, env=env)
        assert result.code == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
    for path, message in (
        (tmp_path / "latin1.json", "is not UTF-8 text"),
        (tmp_path / "deep.jsonl", "nests deeper than 64 levels"),
    ):
        result = cli("publish-file", str(path), env=env)
        assert result.code == 1, path
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    stored = cli("replay", "--stream", "work", "--json", env=env)
    assert stored.stdout == ""  # none of it was published


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"subject": "task.backend.x", "title": "a"}\n{"subject": ', "line 2 is not JSON"),
        ('{"subject": "task.nowhere.x", "title": "a"}', "line 1: no role owns the domain"),
        ('{"subject": "task.backend.x", "titel": "a"}', "line 1: unknown field 'titel'"),
        ('{"subject": "task.backend.x", "title": "a", "payload": [1]}', "line 1: payload:"),
        ('["task.backend.x"]', "line 1: a JSON list, not an object"),
        ("# nothing but a comment", "has no tasks"),
    ],
)
def test_publish_file_names_the_bad_line_and_publishes_nothing(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path, content: str, message: str
) -> None:
    backlog = tmp_path / "backlog.jsonl"
    backlog.write_text(content + "\n")
    result = cli("publish-file", str(backlog), env={"NATS_URL": rolebus_server.url})
    assert result.code == 1
    assert message in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "ROLEBUS_WORK" not in result.stdout


def test_the_installed_console_script_runs_server_and_publish_end_to_end(tmp_path: Path) -> None:
    """The real processes a user starts: `rolebus server`, then `rolebus publish`."""
    binary = Path(sys.executable).parent / "rolebus"
    env = user_environment(tmp_path / "home")
    server = subprocess.Popen(
        [str(binary), "server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "rolebus server listening on nats://127.0.0.1:" in line
        published = subprocess.run(
            [str(binary), "publish", "task.backend.implement", "-t", "from a user", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["seq"] == 1
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert server.returncode == 0, errors
    assert "Traceback" not in errors


def test_dlq_list_show_and_redrive_from_the_command_line(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    import asyncio

    from rolebus.bus import Bus
    from rolebus.config import Settings
    from rolebus.flows import dlq
    from rolebus.wire import codec
    from rolebus.wire.messages import Task

    task = Task(id="t-dead", kind="x", title="doomed")

    async def plant() -> None:
        async with await Bus.connect(Settings(nats_url=rolebus_server.url)) as bus:
            await dlq.dead_letter(
                bus.connection,
                subject="task.backend.x",
                data=codec.encode(task),
                headers={},
                stream_seq=7,
                reason="failed",
                error="no such table: orders",
                role="eng-be",
                attempts=1,
            )

    asyncio.run(plant())
    env = {"NATS_URL": rolebus_server.url}
    listed = cli("dlq", "list", "--json", env=env)
    assert listed.code == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["task_id"] == "t-dead"
    assert entry["reason"] == "failed"
    assert entry["error"] == "no such table: orders"
    shown = cli("dlq", "show", "t-dead", "--json", env=env)
    assert json.loads(shown.stdout)["message"]["title"] == "doomed"
    missing = cli("dlq", "show", "nope", env=env)
    assert missing.code == 1
    assert "no dead letter 'nope'" in missing.stderr
    redriven = cli("dlq", "redrive", "--all", "--json", env=env)
    assert json.loads(redriven.stdout)[0]["subject"] == "task.backend.x"
    assert "no dead letters" in cli("dlq", "list", env=env).stdout


def test_up_runs_the_whole_team_on_an_embedded_server_and_stops_cleanly(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "rolebus"
    env = user_environment(tmp_path / "home")
    up = subprocess.Popen(
        [str(binary), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert up.stdout is not None
        lines: list[str] = []
        while not any("Stop with Ctrl-C" in line for line in lines):
            line = up.stdout.readline()
            assert line, "rolebus up exited early"
            lines.append(line)
        text = "".join(lines)
        assert "embedded nats-server on nats://127.0.0.1:" in text
        for role in ("architect", "cto", "eng-be", "eng-fe", "perf-eng", "pm"):
            assert role in text
        published = subprocess.run(
            [str(binary), "publish", "task.backend.implement", "-t", "via up", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert published.returncode == 0, published.stderr
    finally:
        up.send_signal(2)
        _, errors = up.communicate(timeout=60)
    assert up.returncode == 0, errors
    assert "Traceback" not in errors


def test_help_keeps_its_placeholders(cli: CliRunner) -> None:
    assert "task.<domain>.<kind>" in cli("publish", "--help").stdout


def test_publish_file_into_a_full_stream_reports_what_was_stored_and_a_rerun_is_safe(
    cli: CliRunner, rolebus_server: EmbeddedServer, tmp_path: Path
) -> None:
    import asyncio

    from rolebus.bus import Bus
    from rolebus.config import Settings
    from rolebus.nats.admin import StreamLimits

    async def provision(max_msgs: int) -> None:
        settings = Settings(nats_url=rolebus_server.url)
        async with await Bus.connect(settings, limits=StreamLimits(work_max_msgs=max_msgs)):
            pass

    asyncio.run(provision(28))
    backlog = tmp_path / "backlog.jsonl"
    backlog.write_text(
        "\n".join(json.dumps({"subject": "task.backend.x", "title": f"t{n}"}) for n in range(100))
    )
    env = {"NATS_URL": rolebus_server.url}
    result = cli("publish-file", str(backlog), "--json", env=env)
    assert result.code == 1
    report = json.loads(result.stdout)
    assert "maximum messages" in report["error"]
    assert len(report["ids"]) + len(report["not_confirmed"]) == 100
    text = cli("publish-file", str(backlog), env=env)
    assert text.code == 1
    assert "of 100 tasks from" in text.stderr
    assert "run the same command again" in text.stderr
    assert "Traceback" not in text.stderr
    stored_before = len(cli("replay", "--stream", "work", "--json", env=env).stdout.splitlines())
    assert stored_before == 28

    async def make_room() -> None:
        import nats

        client = await nats.connect(rolebus_server.url)
        try:
            js = client.jetstream()
            config = (await js.stream_info("ROLEBUS_WORK")).config
            config.max_msgs = -1
            await js.update_stream(config)
        finally:
            await client.close()

    asyncio.run(make_room())
    again = cli("publish-file", str(backlog), "--json", env=env)
    assert again.code == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["published"], summary["duplicates"]) == (72, 28)
    stored = cli("replay", "--stream", "work", "--json", env=env).stdout.splitlines()
    assert len(stored) == 100


def test_the_dashboard_without_a_server_is_one_clear_error(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    result = cli("dashboard", "--port", "0", env={"ROLEBUS_HOME": str(tmp_path / "home")})
    assert result.code == 1
    assert "no NATS server" in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Application startup failed" not in result.stderr


def test_dead_letters_and_tasks_read_as_a_person_expects(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    import asyncio

    from rolebus.bus import Bus
    from rolebus.config import Settings
    from rolebus.flows import dlq
    from rolebus.wire import codec

    async def plant() -> None:
        async with await Bus.connect(Settings(nats_url=rolebus_server.url)) as bus:
            await dlq.dead_letter(
                bus.connection,
                subject="task.backend.x",
                data=codec.encode_map({"id": "t-invalid", "kind": "x"}),  # no title: invalid
                headers={},
                stream_seq=3,
                reason="invalid",
                error="not a valid Task: title: Field required",
                role="eng-be",
                attempts=1,
            )

    asyncio.run(plant())
    env = {"NATS_URL": rolebus_server.url}
    [entry] = json.loads(cli("dlq", "list", "--json", env=env).stdout)
    assert entry["task_id"] == "t-invalid"
    shown = cli("dlq", "show", "t-invalid", env=env)
    assert shown.code == 0, shown.stderr
    assert '"undecodable": "message on' in shown.stdout  # JSON, not a Python repr
    assert "{'" not in shown.stdout
    cli("publish", "task.backend.x", "-t", "waiting", "--id", "t-waits", env=env)
    waiting = cli("show", "t-waits", env=env)
    assert waiting.code == 1
    assert "is published" in waiting.stderr
    assert "no worker has picked it up yet" in waiting.stderr
    bad_state = cli("tasks", "--state", "finished", env=env)
    assert bad_state.code == 1
    assert "--state 'finished' is not a task state" in bad_state.stderr
    assert "completed" in bad_state.stderr
