"""Budgets that climb the org chart: LLM roles on a real nats-server and the test kit's
chat-completions server."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from rolebus.bus import Bus
from rolebus.flows.budgets import BudgetLedger, today
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.flows.escalation_record import EscalationRecord
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import Team
from rolebus.testing import LlmServer, Reply, wait_for
from rolebus.wire.subjects import BUDGETS_BUCKET

from ..conftest import CliRunner
from .llm_team import StartTeam, until, write_llm_team


def records_of(bus: Bus, team: Team) -> Callable[[str], Awaitable[EscalationRecord | None]]:
    """Escalation records as a worker's ledger reads them (to verify grants)."""
    store = EscalationStore(bus.connection, writer="person", team=team)

    async def escalation(escalation_id: str) -> EscalationRecord | None:
        found = await store.get(escalation_id)
        return None if found is None else found.record

    return escalation


async def test_a_task_over_its_token_cap_asks_the_cto_before_any_call(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    team, _ = await start_llm_team(budget='tokens_per_task = 500\napprover = "cto"')
    llm_server.default = Reply.completed({"implemented": True})
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="a big one")
    await until(rolebus_bus, task.id, "input-required")
    assert llm_server.requests == []  # the call that would pass the cap did not happen
    [record] = await EscalationStore(rolebus_bus.connection).all()
    assert (record.holder, record.reason, record.kind) == ("cto", "budget", "approval")
    assert "eng-be would pass its tokens_per_task cap of 500" in record.question
    names = [option.name for option in record.options]
    assert names == ["raise-task-allowance", "raise-daily-cap", "reject"]
    allowance = (record.options[0].model_extra or {})["tokens"]
    assert allowance > 0

    await resolve(rolebus_bus.connection, team, record.id, decision="ok", approved=True)
    await until(rolebus_bus, task.id, "completed")
    assert llm_server.answered == 1
    ledger = BudgetLedger(rolebus_bus.connection, escalations=records_of(rolebus_bus, team))
    spent = await ledger.allowed_on(team.role("eng-be"), task.id)
    assert spent.granted == (record.id,)  # the entry names the approval; the record says how much
    assert spent.allowance_tokens == allowance
    assert 0 < spent.tokens <= 500 + allowance

    rejected, _ = await rolebus_bus.publish_task("task.backend.x", title="another big one")
    await until(rolebus_bus, rejected.id, "input-required")
    [second] = [r for r in await EscalationStore(rolebus_bus.connection).all() if r.id != record.id]
    await resolve(
        rolebus_bus.connection, team, second.id, decision="not this month", approved=False
    )
    await until(rolebus_bus, rejected.id, "rejected")
    assert llm_server.answered == 1  # nothing spent on the rejected one


async def test_a_raised_daily_cap_lasts_the_day_and_leaves_the_operators_caps_alone(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    team, _ = await start_llm_team(budget='tokens_per_day = 300\napprover = "cto"')
    llm_server.default = Reply.completed({"implemented": True})
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="over today's cap")
    await until(rolebus_bus, task.id, "input-required")
    [record] = await EscalationStore(rolebus_bus.connection).all()
    raised = next(o for o in record.options if o.name == "raise-daily-cap")
    assert (raised.model_extra or {})["cap"] == "tokens_per_day"
    tokens = (raised.model_extra or {})["tokens"]

    await resolve(
        rolebus_bus.connection, team, record.id, decision="raise-daily-cap", approved=True
    )
    await until(rolebus_bus, task.id, "completed")
    ledger = BudgetLedger(rolebus_bus.connection, escalations=records_of(rolebus_bus, team))
    role = team.role("eng-be")
    assert (await ledger.allowed_today(role)).allowance_tokens == tokens  # as the approval says
    assert (await ledger.allowed_on(role, task.id)).allowance_tokens == 0
    caps = await ledger.caps(role)
    assert caps.tokens_per_day == 300  # the caps (the operator's) are as the role file says
    # A redelivered decision raises nothing more.
    await ledger.approve(role, task.id, escalation_id=record.id)
    assert (await ledger.allowed_today(role)).allowance_tokens == tokens
    # The role writes its own day entry: an allowance it writes there counts for nothing,
    # and an id that is not an approval of its own is not one.
    await rolebus_bus.connection.kv.put(
        BUDGETS_BUCKET,
        f"eng-be.day.{today()}",
        json.dumps({"allowance_tokens": 10**12, "granted": [record.id, "made-up"]}).encode(),
    )
    assert (await ledger.allowed_today(role)).allowance_tokens == tokens


async def test_two_replicas_on_one_daily_cap_never_overspend_it_together(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    cap = 12_000
    await start_llm_team(budget=f"tokens_per_day = {cap}", replicas=2, extra=", max_tokens = 800")
    ids = [
        (await rolebus_bus.publish_task("task.backend.x", title=f"t{n}"))[0].id for n in range(30)
    ]

    async def settled() -> bool:
        events = await read_events(rolebus_bus.connection, states=["completed", "input-required"])
        return {event.task_id for event in events} >= set(ids)

    await wait_for(settled, timeout=60)
    events = await read_events(rolebus_bus.connection, states=["completed"])
    spent = sum(
        e.detail["usage"]["prompt_tokens"] + e.detail["usage"]["completion_tokens"] for e in events
    )
    assert 0 < spent <= cap
    assert len(events) < 30  # some were stopped at the cap, and asked
    assert llm_server.answered == len(events)
    day = await BudgetLedger(rolebus_bus.connection).spent_today("eng-be")
    assert day.tokens == spent  # every reservation settled to what the calls cost
    parked = await read_events(rolebus_bus.connection, states=["input-required"])
    assert len(parked) == 30 - len(events)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("tokens_per_day = -5", "budget.tokens_per_day"),
        ('usd_per_day = "lots"', "budget.usd_per_day"),
        ('approver = "nobody"', "budget.approver"),
        ("tokens_per_hour = 5", "budget.tokens_per_hour"),
    ],
)
def test_a_bad_budget_table_names_the_field(tmp_path: object, table: str, message: str) -> None:
    from pathlib import Path

    from rolebus.errors import RoleError

    from .llm_team import write_llm_team

    with pytest.raises(RoleError) as caught:
        write_llm_team(Path(str(tmp_path)) / "roles", "http://127.0.0.1:1/v1", budget=table)
    assert message in caught.value.message


def test_budget_shows_caps_and_set_changes_them_for_everyone_as_an_event(
    cli: CliRunner, rolebus_server: EmbeddedServer
) -> None:
    import json

    env = {"NATS_URL": rolebus_server.url}
    changed = cli("budget", "set", "eng-be", "--usd-per-day", "2.5", "--json", env=env)
    assert changed.code == 0, changed.stderr
    assert json.loads(changed.stdout)["caps"]["usd_per_day"] == 2.5
    [row] = json.loads(cli("budget", "eng-be", "--json", env=env).stdout)
    # The role file's caps stay for what was not set.
    assert row["caps"] == {
        "usd_per_day": 2.5,
        "tokens_per_day": 2_000_000,
        "tokens_per_task": 20_000,
    }
    assert row["approver"] == "cto"  # eng-be's spend rule names the CTO
    assert row["left_today"]["usd_per_day"] == 2.5
    assert "eng-be" in cli("budget", env=env).stdout
    events = cli("replay", "--subject", "event.budget.>", "--json", env=env).stdout.splitlines()
    [event] = [json.loads(line)["message"] for line in events]
    assert event["detail"]["after"]["usd_per_day"] == 2.5
    assert event["detail"]["before"]["usd_per_day"] == 5.0
    for args, message in (
        (["set", "nobody", "--usd-per-day", "1"], "no role 'nobody'"),
        (["set", "eng-be", "--tokens-per-day", "-1"], "--tokens-per-day -1 is negative"),
        (["set", "eng-be"], "say which cap to set"),
        (["eng-be", "--usd-per-day", "1"], "caps are changed with `rolebus budget set"),
    ):
        result = cli("budget", *args, env=env)
        assert result.code == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


async def test_ten_workers_share_one_rate_limit_and_a_429_slows_them_all(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    rpm = 600  # one call every 0.1 s for everyone together
    await start_llm_team(replicas=10, extra=f", rpm = {rpm}")
    llm_server.script(*[Reply.completed({"n": n}) for n in range(10)])
    llm_server.script(Reply.failing(429, retry_after=1))
    ids = [
        (await rolebus_bus.publish_task("task.backend.x", title=f"t{n}"))[0].id for n in range(25)
    ]
    for task_id in ids:
        await until(rolebus_bus, task_id, "completed", timeout=60)
    arrivals = sorted(request.at for request in llm_server.requests)
    # The calls are spaced 60 / rpm apart across all ten workers, so no one-second
    # window of the server's own arrival times holds more than rpm / 60 of them (+1:
    # a window's edges may catch a call early or late by the network's jitter).
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 2) * 60 / rpm
    for start in arrivals:
        assert sum(1 for at in arrivals if start <= at < start + 1.0) <= rpm // 60 + 1
    # The 429 (the 11th call) made everyone wait its Retry-After, not only its caller.
    refused = next(i for i, r in enumerate(llm_server.requests) if r.status == 429)
    after = llm_server.requests[refused + 1].at - llm_server.requests[refused].at
    assert after >= 0.95


async def test_an_urgent_task_goes_before_background_work_when_the_limit_is_short(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    await start_llm_team(extra=", rpm = 120", concurrency=8)  # one call every 0.5 s
    background = [
        (await rolebus_bus.publish_task("task.backend.x", title=f"background {n}"))[0]
        for n in range(5)
    ]
    urgent, _ = await rolebus_bus.publish_task("task.backend.x", title="urgent", priority=9)
    for task in [*background, urgent]:
        await until(rolebus_bus, task.id, "completed", timeout=30)
    order = [
        next(line for line in r.messages[1]["content"].splitlines() if line.startswith("title:"))
        for r in sorted(llm_server.requests, key=lambda request: request.at)
    ]
    assert order.index("title: urgent") <= 2  # not behind the background work
    assert order[-1] != "title: urgent"


async def test_a_reservation_left_by_a_worker_that_died_expires_and_a_settled_one_counts_its_cost(
    rolebus_bus: Bus, tmp_path: Path
) -> None:
    team = write_llm_team(
        tmp_path / "roles", "http://127.0.0.1:9/v1", budget="tokens_per_day = 1000"
    )
    role = team.role("eng-be")
    ledger = BudgetLedger(rolebus_bus.connection)
    # A call reserves its worst case, and its worker dies before it settles.
    assert (
        await ledger.reserve(role, "t1", tokens=900, usd=None, reservation="r1", expires_in=0.5)
        is None
    )
    refused = await ledger.reserve(
        role, "t2", tokens=200, usd=None, reservation="r2", expires_in=60
    )
    assert refused is not None  # while it holds, it counts

    async def expired() -> bool:
        return (await ledger.spent_today("eng-be")).tokens == 0

    await wait_for(expired, timeout=10)
    assert (
        await ledger.reserve(role, "t2", tokens=200, usd=None, reservation="r2", expires_in=60)
        is None
    )
    await ledger.settle("eng-be", "t2", reservation="r2", used=(150, 0.0))
    assert (await ledger.spent_today("eng-be")).tokens == 150  # the cost, not the worst case
    assert (await ledger.spent_on("eng-be", "t2")).tokens == 150
