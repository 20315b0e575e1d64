"""Handoffs, escalations and boundaries between role workers on a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows import dlq
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.flows.state import StateStore
from rolebus.handlers.base import Handler, HandlerContext
from rolebus.history.replay import read_events
from rolebus.nats.server import EmbeddedServer
from rolebus.team.roles import Team, load_team
from rolebus.testing import wait_for
from rolebus.wire.messages import (
    EscalationOption,
    EscalationRequest,
    Event,
    HandoffRequest,
    Outcome,
    Task,
)
from rolebus.worker.runner import Crew, start_workers

ORG = {
    "cto": ('domains = ["budget"]', ""),
    "architect": ('domains = ["architecture"]\nreports_to = "cto"', ""),
    "eng-be": (
        'domains = ["backend"]\nreports_to = "cto"',
        """
[[never]]
what = "spend money without the CTO's approval"
kinds = ["spend"]
action = "approval"
to = "cto"

[[never]]
what = "write frontend code"
kinds = ["ui"]
action = "handoff"
to = "eng-fe"

[[escalate]]
reason = "ambiguous-spec"
to = "architect"
timeout = "30s"

[[escalate]]
reason = "unknown"
to = "architect"
timeout = "2s"
""",
    ),
    "eng-fe": ('domains = ["frontend"]\nreports_to = "cto"', ""),
}

ORDERS_V1 = {
    "name": "orders-api",
    "version": "1.0.0",
    "operations": {
        "createOrder": {
            "method": "POST",
            "path": "/orders",
            "input": {"item": {"type": "string", "required": True}},
            "output": {"id": {"type": "string"}, "status": {"type": "string"}},
        }
    },
}


def write_org(folder: Path) -> Team:
    folder.mkdir()
    for role_id, (head, tail) in ORG.items():
        (folder / f"{role_id}.md").write_text(
            f'+++\nid = "{role_id}"\ntitle = "{role_id}"\nhandler = "builtin:scripted"\n'
            f'ack_wait = "5s"\nmax_deliver = 3\nbackoff = ["100ms"]\n{head}\n{tail}\n+++\n'
            f"Persona of {role_id}.\n"
        )
    return load_team(folder)


Handlers = dict[str, Handler]
StartTeam = Callable[[Handlers], Awaitable[Crew]]


@pytest.fixture
def team(tmp_path: Path) -> Team:
    return write_org(tmp_path / "roles")


@pytest.fixture
async def start_team(rolebus_settings: Settings, team: Team) -> AsyncIterator[StartTeam]:
    crews: list[Crew] = []

    async def start(handlers: Handlers) -> Crew:
        roles = [team.role(role_id) for role_id in handlers]
        crew = await start_workers(rolebus_settings, team, roles, handlers=handlers, grace=1)
        crews.append(crew)
        return crew

    yield start
    for crew in crews:
        await crew.stop(grace=0)


async def events(bus: Bus, entity: str = "task") -> list[Event]:
    return [event for event in await read_events(bus.connection) if event.entity == entity]


async def task_state(bus: Bus, task_id: str) -> str | None:
    stored = await StateStore(bus.connection).get(task_id)
    return None if stored is None else stored.state.state


async def until_state(bus: Bus, task_id: str, state: str, timeout: float = 30) -> None:
    async def reached() -> bool:
        return await task_state(bus, task_id) == state

    await wait_for(reached, timeout=timeout)


# --- contracts ------------------------------------------------------------------------------


async def test_a_contract_flows_architect_to_be_to_fe_and_versions_are_checked(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    answers: list[tuple[str, str, str]] = []

    async def architect(task: Task, context: HandlerContext) -> Outcome:
        if task.kind == "handoff-answer":
            answers.append(("architect", task.payload["version"], task.payload["status"]))
            return Outcome.completed()
        document = task.payload["document"]
        return Outcome(
            status="handoff",
            handoff=HandoffRequest(
                to="eng-be",
                contract=document["name"],
                version=document["version"],
                document=document,
            ),
        )

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        if task.kind == "handoff-answer":
            answers.append(("eng-be", task.payload["version"], task.payload["status"]))
            return Outcome.completed()
        contract = context.contracts["orders-api"]
        assert contract["version"] == task.payload["version"]
        return Outcome(
            status="handoff",
            handoff=HandoffRequest(
                to="eng-fe",
                contract="orders-api",
                version=contract["version"],
                note="here is the API contract you requested",
            ),
        )

    async def eng_fe(task: Task, context: HandlerContext) -> Outcome:
        assert "createOrder" in context.contracts["orders-api"]["document"]["operations"]
        return Outcome.completed({"answer": "accepted"})

    await start_team({"architect": architect, "eng-be": eng_be, "eng-fe": eng_fe})
    registry = ContractRegistry(rolebus_bus.connection)

    async def design(document: dict[str, Any]) -> Task:
        task, _ = await rolebus_bus.publish_task(
            "task.architecture.design",
            title=f"design {document['version']}",
            payload={"document": document},
        )
        return task

    async def accepted_by_both(version: str) -> bool:
        try:
            entry = await registry.get("orders-api", version)
        except Exception:
            return False
        return sorted(entry.accepted_by) == ["eng-be", "eng-fe"]

    await design(ORDERS_V1)
    await wait_for(lambda: accepted_by_both("1.0.0"))

    v1_1 = {
        **ORDERS_V1,
        "version": "1.1.0",
        "operations": {
            "createOrder": {
                **ORDERS_V1["operations"]["createOrder"],  # type: ignore[index]
                "output": {
                    "id": {"type": "string"},
                    "status": {"type": "string"},
                    "eta": {"type": "string"},
                },
            }
        },
    }
    await design(v1_1)
    await wait_for(lambda: accepted_by_both("1.1.0"))

    v1_2 = {
        **ORDERS_V1,
        "version": "1.2.0",
        "operations": {
            "createOrder": {
                **ORDERS_V1["operations"]["createOrder"],  # type: ignore[index]
                "output": {"id": {"type": "string"}, "eta": {"type": "string"}},
            }
        },
    }
    refused = await design(v1_2)

    async def dead() -> bool:
        return any(e.task_id == refused.id for e in await events(rolebus_bus) if e.state == "dead")

    await wait_for(dead)
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    assert entry.reason == "failed"
    assert "orders-api 1.2.0 breaks 1.1.0 without a major version bump" in entry.error
    assert "- createOrder.output.status (string) removed" in entry.error

    v2 = {**v1_2, "version": "2.0.0"}
    await design(v2)
    await wait_for(lambda: accepted_by_both("2.0.0"))
    versions = [e.document.version for e in await registry.versions("orders-api")]
    assert versions == ["1.0.0", "1.1.0", "2.0.0"]

    async def all_answers() -> bool:
        return len(answers) == 6

    await wait_for(all_answers)
    assert sorted(answers) == sorted(
        [
            (who, version, "accepted")
            for who in ("architect", "eng-be")
            for version in ("1.0.0", "1.1.0", "2.0.0")
        ]
    )


async def test_changes_requested_flow_back_to_the_sender_with_reasons(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    heard: list[dict[str, Any]] = []

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        if task.kind == "handoff-answer":
            heard.append(task.payload)
            return Outcome.completed()
        return Outcome(
            status="handoff",
            handoff=HandoffRequest(
                to="eng-fe", contract="orders-api", version="1.0.0", document=ORDERS_V1
            ),
        )

    async def eng_fe(task: Task, context: HandlerContext) -> Outcome:
        return Outcome.completed(
            {"answer": "changes-requested", "reasons": ["the page needs an eta per order"]}
        )

    await start_team({"eng-be": eng_be, "eng-fe": eng_fe})
    await rolebus_bus.publish_task("task.backend.implement", title="orders API")

    async def answered() -> bool:
        return len(heard) == 1

    await wait_for(answered)
    assert heard[0]["status"] == "changes-requested"
    assert heard[0]["reasons"] == ["the page needs an eta per order"]
    entry = await ContractRegistry(rolebus_bus.connection).get("orders-api", "1.0.0")
    assert entry.changes_requested == {"eng-fe": ["the page needs an eta per order"]}


# --- escalations ----------------------------------------------------------------------------


def ambiguous_be(results: list[Any]) -> Handler:
    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        if not context.decisions:
            return Outcome(
                status="escalate",
                escalation=EscalationRequest(
                    reason=task.payload.get("reason", "ambiguous-spec"),
                    question="Paginate /orders by offset or by cursor?",
                    options=[
                        EscalationOption(name="offset", tradeoffs="simple; slow deep pages"),
                        EscalationOption(name="cursor", tradeoffs="fast; opaque tokens"),
                    ],
                ),
            )
        results.append([d.decision for d in context.decisions])
        return Outcome.completed({"built_with": context.decisions[-1].decision})

    return eng_be


async def decide_cursor(task: Task, context: HandlerContext) -> Outcome:
    assert task.kind == "escalation"
    assert [o["name"] for o in task.payload["options"]] == ["offset", "cursor"]
    return Outcome.completed({"decision": f"cursor (decided by {context.role.id})"})


async def test_an_ambiguous_spec_escalates_to_the_architect_and_resumes_the_same_task(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    results: list[Any] = []
    await start_team({"eng-be": ambiguous_be(results), "architect": decide_cursor})
    task, _ = await rolebus_bus.publish_task("task.backend.implement", title="list orders")
    await until_state(rolebus_bus, task.id, "completed")
    assert results == [["cursor (decided by architect)"]]
    stored = await StateStore(rolebus_bus.connection).get(task.id)
    assert stored is not None
    assert stored.state.result == {"built_with": "cursor (decided by architect)"}
    states = [e.state for e in await events(rolebus_bus) if e.task_id == task.id]
    # Each run is done well within ROLEBUS_CLAIMED_AFTER, so no `claimed` events.
    assert states == ["input-required", "resumed", "completed"]
    escalation_states = [e.state for e in await events(rolebus_bus, "escalation")]
    assert escalation_states == ["opened", "decided"]
    [record] = await EscalationStore(rolebus_bus.connection).all()
    assert (record.status, record.decided_by, record.holder) == (
        "decided",
        "architect",
        "architect",
    )
    assert record.id == f"{task.id}-1"


async def test_a_spend_task_waits_for_cto_approval_and_then_runs(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    ran: list[str] = []

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        ran.append(task.id)
        return Outcome.completed({"bought": task.title})

    async def cto(task: Task, context: HandlerContext) -> Outcome:
        assert task.payload["approval"] is True
        approve = "cheap" in task.title or "cheap" in task.payload["question"]
        return Outcome.completed(
            {"approved": approve, "decision": "within budget" if approve else "too expensive"}
        )

    await start_team({"eng-be": eng_be, "cto": cto})
    cheap, _ = await rolebus_bus.publish_task("task.backend.spend", title="cheap managed Postgres")
    pricey, _ = await rolebus_bus.publish_task("task.backend.spend", title="a data centre")
    await until_state(rolebus_bus, cheap.id, "completed")
    await until_state(rolebus_bus, pricey.id, "rejected")
    assert ran == [cheap.id]
    rejected = await StateStore(rolebus_bus.connection).get(pricey.id)
    assert rejected is not None
    assert rejected.state.error == "not approved by cto: too expensive"
    opened = [e for e in await events(rolebus_bus, "escalation") if e.state == "opened"]
    assert {e.detail["kind"] for e in opened} == {"approval"}
    assert all("spend money without the CTO's approval" in e.detail["boundary"] for e in opened)


async def test_frontend_work_sent_to_the_backend_engineer_is_handed_to_eng_fe(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    done: list[Task] = []

    async def eng_fe(task: Task, context: HandlerContext) -> Outcome:
        done.append(task)
        return Outcome.completed()

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        raise AssertionError("eng-be must never run frontend work")

    await start_team({"eng-be": eng_be, "eng-fe": eng_fe})
    task, _ = await rolebus_bus.publish_task("task.backend.ui", title="orders page")
    await until_state(rolebus_bus, f"{task.id}-1", "completed")
    assert await task_state(rolebus_bus, task.id) == "handed-off"
    assert done[0].causation_id == task.id
    assert done[0].from_role == "eng-be"
    handed = [e for e in await events(rolebus_bus) if e.state == "handed-off"]
    assert handed[0].result["to"] == "eng-fe"
    assert "never write frontend code" in handed[0].result["because"]


async def test_an_unanswered_escalation_climbs_reports_to_even_across_worker_restarts(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    results: list[Any] = []
    # The architect is away: nobody runs it. eng-be's rule gives it 2 s.
    first = await start_team({"eng-be": ambiguous_be(results)})
    task, _ = await rolebus_bus.publish_task(
        "task.backend.implement", title="partition the events table", payload={"reason": "unknown"}
    )
    await until_state(rolebus_bus, task.id, "input-required")
    await first.stop(grace=0)  # every worker (and the supervisor) goes away...
    await start_team({"eng-be": ambiguous_be(results), "cto": decide_cursor})  # ...and back
    await until_state(rolebus_bus, task.id, "completed")
    assert results == [["cursor (decided by cto)"]]
    [record] = await EscalationStore(rolebus_bus.connection).all()
    assert (record.level, record.holder, record.trail) == (1, "cto", ["architect", "cto"])
    states = [e.state for e in await events(rolebus_bus, "escalation")]
    assert states == ["opened", "climbed", "decided"]


async def test_a_person_resolves_an_escalation_and_a_closed_one_is_refused(
    rolebus_bus: Bus, start_team: StartTeam, team: Team
) -> None:
    results: list[Any] = []
    await start_team({"eng-be": ambiguous_be(results)})
    task, _ = await rolebus_bus.publish_task("task.backend.implement", title="list orders")
    await until_state(rolebus_bus, task.id, "input-required")
    escalation_id = f"{task.id}-1"
    await resolve(
        rolebus_bus.connection, team, escalation_id, decision="offset, for now", approved=None
    )
    await until_state(rolebus_bus, task.id, "completed")
    assert results == [["offset, for now"]]
    with pytest.raises(Exception, match="already decided"):
        await resolve(rolebus_bus.connection, team, escalation_id, decision="again", approved=None)
    with pytest.raises(Exception, match="no escalation 'nope'"):
        await resolve(rolebus_bus.connection, team, "nope", decision="x", approved=None)


# --- bad input -------------------------------------------------------------------------------


async def test_escalating_to_a_role_that_does_not_exist_dead_letters_instead_of_parking(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        return Outcome(
            status="escalate",
            escalation=EscalationRequest(reason="unknown", question="?", to="ghost"),
        )

    await start_team({"eng-be": eng_be})
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="x")
    await until_state(rolebus_bus, task.id, "dead")
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    assert "escalation to role 'ghost', which does not exist" in entry.error
    assert await EscalationStore(rolebus_bus.connection).all() == []


async def test_a_decision_for_an_unknown_escalation_is_dead_lettered_clearly(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, start_team: StartTeam
) -> None:
    await start_team({"eng-be": ambiguous_be([])})
    client = await nats.connect(rolebus_server.url)
    try:
        await client.jetstream().publish(
            "decision.eng-be.nope",
            msgpack.packb({"escalation_id": "nope", "to_role": "eng-be", "decision": "yes"}),
            headers={"Nats-Msg-Id": "d1"},
        )
    finally:
        await client.close()

    async def dead() -> bool:
        return len([e async for e in dlq.list_dead_letters(rolebus_bus.connection)]) == 1

    await wait_for(dead)
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    assert entry.error == "decision for unknown escalation 'nope'"


async def test_a_malformed_contract_in_a_handoff_is_refused_with_its_problems(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    async def architect(task: Task, context: HandlerContext) -> Outcome:
        return Outcome(
            status="handoff",
            handoff=HandoffRequest(
                to="eng-be",
                contract="orders-api",
                version="1.0.0",
                document={
                    "name": "orders-api",
                    "version": "1.0.0",
                    "operations": {"x": {"method": "FETCH", "path": "orders"}},
                },
            ),
        )

    await start_team({"architect": architect})
    task, _ = await rolebus_bus.publish_task("task.architecture.design", title="x")
    await until_state(rolebus_bus, task.id, "dead")
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    assert "not a valid contract document" in entry.error
    assert "operations.x.method" in entry.error
    assert "operations.x.path" in entry.error


async def test_a_timed_out_escalation_is_recorded_climbing_to_a_person_with_a_trace(
    rolebus_bus: Bus, start_team: StartTeam, team: Team
) -> None:
    from rolebus.flows.escalation import resolve
    from rolebus.history.replay import ReplayFilter, replay
    from rolebus.team.roles import PERSON
    from rolebus.wire.subjects import TIMERS_STREAM

    results: list[Any] = []
    # Nobody runs the architect or the CTO: each level times out (2 s, the rule's).
    await start_team({"eng-be": ambiguous_be(results)})
    task, _ = await rolebus_bus.publish_task(
        "task.backend.implement", title="partition the events table", payload={"reason": "unknown"}
    )
    store = EscalationStore(rolebus_bus.connection)

    async def held_by_a_person() -> bool:
        found = await store.get(f"{task.id}-1")
        return found is not None and found.record.holder == PERSON

    await wait_for(held_by_a_person, timeout=30)
    [record] = await store.all()
    assert (record.level, record.holder, record.trail) == (2, PERSON, ["architect", "cto", PERSON])
    climbs = [e for e in await events(rolebus_bus, "escalation") if e.state == "climbed"]
    assert [(e.detail["to"], e.detail["timeout_at"]) for e in climbs] == [
        ("cto", "architect"),
        (PERSON, "cto"),
    ]
    # The old holders can no longer decide; a person can.
    for old in ("architect", "cto"):
        late = await store.decide(
            record.id, decision="too late", approved=None, decided_by=old, as_holder=True
        )
        assert late is None
    await resolve(rolebus_bus.connection, team, record.id, decision="cursor", approved=None)
    await until_state(rolebus_bus, task.id, "completed")
    assert results == [["cursor"]]
    timers = [
        item async for item in replay(rolebus_bus.connection, ReplayFilter(stream=TIMERS_STREAM))
    ]
    assert timers
    assert all(item.message is not None for item in timers), [item.error for item in timers]


async def test_a_body_that_disagrees_with_its_subject_cannot_pass_a_boundary(
    rolebus_bus: Bus, rolebus_server: EmbeddedServer, start_team: StartTeam
) -> None:
    import msgpack
    import nats

    from rolebus.flows import dlq

    ran: list[str] = []

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        ran.append(task.kind)
        return Outcome.completed()

    await start_team({"eng-be": eng_be})
    client = await nats.connect(rolebus_server.url)
    try:
        # A spend task (the CTO must approve it) whose body claims to be something else.
        body = msgpack.packb({"id": "sneaky", "kind": "implement", "title": "buy a database"})
        await client.jetstream().publish("task.backend.spend", body)
    finally:
        await client.close()

    async def dead() -> bool:
        return any([e async for e in dlq.list_dead_letters(rolebus_bus.connection)])

    await wait_for(dead, timeout=30)
    [entry] = [e async for e in dlq.list_dead_letters(rolebus_bus.connection)]
    assert entry.reason == "invalid"
    assert "its kind is 'implement' but its subject 'task.backend.spend' says 'spend'" in (
        entry.error
    )
    assert ran == []  # neither run nor read the other way
    assert await EscalationStore(rolebus_bus.connection).all() == []


async def test_a_follow_up_whose_kind_disagrees_with_its_subject_fails_with_the_reason(
    rolebus_bus: Bus, start_team: StartTeam
) -> None:
    from rolebus.wire.messages import FollowUp

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        return Outcome.completed(
            tasks=[FollowUp(subject="task.frontend.page", title="p", kind="deploy")]
        )

    await start_team({"eng-be": eng_be})
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="parent")
    await until_state(rolebus_bus, task.id, "dead")
    stored = await StateStore(rolebus_bus.connection).get(task.id)
    assert stored is not None
    assert "kind 'deploy' disagrees with its subject 'task.frontend.page'" in (
        stored.state.error or ""
    )
