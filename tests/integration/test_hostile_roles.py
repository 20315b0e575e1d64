"""A hostile role, with its own credentials and plain requests, against the generated
permissions: each forgery fails with a named denial, or lands only under its own
name (and changes nothing of another role's), or is dead-lettered with its reason;
the owner's history and ``rebuild`` stay as they were.

What a compromised role can still do is in the README's threat model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from rolebus.bus import Bus
from rolebus.errors import PermissionDeniedError
from rolebus.flows import dlq
from rolebus.flows.contracts import (
    ContractDocument,
    ContractError,
    ContractRegistry,
    ContractVersion,
    version_key,
)
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.flows.record import PARKED, TERMINAL_STATES
from rolebus.flows.state import StateStore, StoredState
from rolebus.history.replay import rebuild
from rolebus.testing import wait_for
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Event, Task
from rolebus.wire.subjects import (
    BUDGETS_BUCKET,
    CALLS_BUCKET,
    CANCELS_BUCKET,
    CONTRACTS_BUCKET,
    ESCALATIONS_BUCKET,
    EVENTS_STREAM,
    WORK_STREAM,
    records_of,
)
from rolebus.worker.runner import start_workers

from .test_security import TEAM, SecuredServer, admin, secured  # noqa: F401 (fixtures)

T = TypeVar("T")


@dataclass
class Scene:
    """eng-be's finished task, eng-be's worker running on its own user, and the
    hostile roles' connections."""

    admin: Bus
    fe: Bus
    be: Bus
    task: Task
    record: StoredState


async def found(lookup: Callable[[], Awaitable[T | None]]) -> T:
    """What ``lookup`` finds, once it finds something."""

    async def there() -> bool:
        return await lookup() is not None

    await wait_for(there)
    value = await lookup()
    assert value is not None
    return value


async def settled(bus: Bus, task_id: str, *states: str) -> StoredState:
    """eng-be's record of ``task_id`` once it is in one of ``states``."""

    async def current() -> StoredState | None:
        stored = await StateStore(bus.connection).get(task_id, role="eng-be")
        return stored if stored is not None and stored.state.state in states else None

    return await found(current)


async def as_role(server: SecuredServer, role: str) -> Bus:
    return await Bus.connect(
        server.settings(role), provision=False, inbox_prefix=f"_INBOX_{role}", name=role
    )


@pytest.fixture
async def scene(secured: SecuredServer, admin: Bus) -> AsyncIterator[Scene]:  # noqa: F811
    crew = await start_workers(
        secured.settings("eng-be"), TEAM, [TEAM.role("eng-be")], grace=1, supervise=False
    )
    fe = await as_role(secured, "eng-fe")
    be = await as_role(secured, "eng-be")
    try:
        task, _ = await admin.publish_task("task.backend.build", title="the owner's work")
        record = await settled(admin, task.id, *TERMINAL_STATES)
        yield Scene(admin, fe, be, task, record)
    finally:
        await fe.close()
        await be.close()
        await crew.stop(grace=0)


def forged_record(task_id: str, role: str) -> bytes:
    event = Event(
        id=f"{task_id}_forged",
        state="completed",
        task_id=task_id,
        role=role,
        subject="task.backend.build",
        result={"forged": True},
        record={"effects": []},
    )
    return codec.encode(event)


async def completed_record_under_the_owners_name(scene: Scene) -> str:
    subject = f"event.task.completed.eng-be.{scene.task.id}"
    with pytest.raises(PermissionDeniedError) as denied:
        await scene.fe.connection.publish(
            subject, forged_record(scene.task.id, "eng-be"), msg_id="forged-1"
        )
    assert subject in denied.value.message
    return "denied"


async def completed_record_under_its_own_name(scene: Scene) -> str:
    # Allowed: it is eng-fe's own history, and says so; eng-be's task is untouched.
    await scene.fe.connection.publish(
        f"event.task.completed.eng-fe.{scene.task.id}",
        forged_record(scene.task.id, "eng-be"),  # the body's role is ignored
        msg_id="forged-2",
    )
    mine = await StateStore(scene.admin.connection).get(scene.task.id, role="eng-fe")
    assert mine is not None
    assert mine.state.role == "eng-fe"
    return "attributed to eng-fe"


async def record_deleted(scene: Scene) -> str:
    with pytest.raises(PermissionDeniedError) as denied:
        await scene.be.connection.streams.delete(EVENTS_STREAM, scene.record.revision)
    assert "STREAM.MSG.DELETE.ROLEBUS_EVENTS" in denied.value.message
    return "denied"


async def another_roles_records_read(scene: Scene) -> str:
    with pytest.raises(PermissionDeniedError) as denied:
        await scene.fe.connection.streams.last(EVENTS_STREAM, records_of(scene.task.id, "eng-be"))
    assert f"event.task.*.eng-be.{scene.task.id}" in denied.value.message
    with pytest.raises(PermissionDeniedError) as scanned:
        await anext(scene.fe.connection.streams.read(EVENTS_STREAM))
    assert "CONSUMER.CREATE.ROLEBUS_EVENTS" in scanned.value.message
    return "denied"


async def another_roles_work_read_by_sequence(scene: Scene) -> str:
    with pytest.raises(PermissionDeniedError) as denied:
        await scene.fe.connection.streams.get(WORK_STREAM, scene.record.state.stream_seq)
    assert "DIRECT.GET.ROLEBUS_WORK" in denied.value.message
    return "denied"


async def dead_letter_in_the_ctos_name(scene: Scene) -> str:
    with pytest.raises(PermissionDeniedError) as denied:
        await scene.fe.connection.publish(
            "dlq.cto.decision.eng-be.x", b"\x80", msg_id="forged-dlq-1"
        )
    assert "dlq.cto.decision.eng-be.x" in denied.value.message
    # Under its own token, with headers that say the CTO: listed as eng-fe's, and
    # never republished with the operator's rights (eng-fe never receives it).
    await scene.fe.connection.publish(
        "dlq.eng-fe.decision.eng-be.x",
        codec.encode(Task(id="forged-dlq", kind="x", title="forged")),
        msg_id="forged-dlq-2",
        headers={Header.DLQ_ROLE: "cto", Header.DLQ_SUBJECT: "task.frontend.x"},
    )
    [entry] = [e async for e in dlq.list_dead_letters(scene.admin.connection)]
    assert (entry.role, entry.subject) == ("eng-fe", "decision.eng-be.x")
    refusal = dlq.refusal(entry, TEAM)
    assert refusal is not None
    assert "eng-fe does not receive" in refusal
    return "listed as eng-fe's; redrive refused"


async def dead_letter_of(scene: Scene, task_id: str) -> dlq.DeadLetter:
    """The dead letter eng-be's worker wrote about ``task_id``, once it is there."""

    async def buried() -> dlq.DeadLetter | None:
        entries = [e async for e in dlq.list_dead_letters(scene.admin.connection)]
        return next((e for e in entries if e.task_id == task_id), None)

    return await found(buried)


async def body_disagrees_with_subject(scene: Scene) -> str:
    smuggled = Task(id="smuggled", kind="x", title="kind x on a build subject", from_role="eng-fe")
    await scene.fe.connection.publish(
        "task.backend.build.eng-fe", codec.encode(smuggled), msg_id=smuggled.id
    )
    entry = await dead_letter_of(scene, "smuggled")
    assert entry.reason == "invalid"
    assert "disagrees with the subject" in entry.error
    assert "its kind is 'x'" in entry.error
    return "dead-lettered"


async def task_in_the_ctos_name(scene: Scene) -> str:
    forged = Task(id="from-cto", kind="build", title="the CTO says so", from_role="cto")
    # Under the CTO's sender token, or under none (as if a person sent it): denied.
    for subject in ("task.backend.build.cto", "task.backend.build"):
        with pytest.raises(PermissionDeniedError) as denied:
            await scene.fe.connection.publish(subject, codec.encode(forged), msg_id=forged.id)
        assert subject in denied.value.message
    # Under its own token, with a body that says the CTO: dead-lettered, with why.
    await scene.fe.connection.publish(
        "task.backend.build.eng-fe", codec.encode(forged), msg_id=forged.id
    )
    entry = await dead_letter_of(scene, "from-cto")
    assert entry.reason == "invalid"
    assert "its from_role is 'cto' but its subject names 'eng-fe'" in entry.error
    assert await StateStore(scene.admin.connection).get("from-cto", role="eng-be") is None
    return "denied; under its own name dead-lettered"


ORDERS = ContractDocument.model_validate(
    {
        "name": "orders-api",
        "version": "1.0.0",
        "operations": {"listOrders": {"method": "GET", "path": "/orders"}},
    }
)


async def contract_overwritten_and_purged(scene: Scene) -> str:
    registry = ContractRegistry(scene.admin.connection)
    await ContractRegistry(scene.be.connection).publish(ORDERS, author="eng-be")
    before = await registry.get("orders-api", "1.0.0")
    tampered = ContractVersion(
        document=ORDERS.model_copy(update={"description": "TAMPERED"}), author="eng-be"
    )
    key = version_key("eng-be", "orders-api", "1.0.0")
    with pytest.raises(PermissionDeniedError) as overwritten:
        await scene.fe.connection.kv.put(CONTRACTS_BUCKET, key, codec.encode(tampered))
    assert f"$KV.{CONTRACTS_BUCKET}.{key}" in overwritten.value.message
    with pytest.raises(PermissionDeniedError):  # a purge is this message on the wire
        await scene.fe.connection.publish(
            f"$KV.{CONTRACTS_BUCKET}.{key}",
            b"",
            msg_id="purge-1",
            headers={Header.KV_OPERATION: "PURGE", "Nats-Rollup": "sub"},
        )
    # Under its own name too: the role files give orders-api to the architect and eng-be.
    own = version_key("eng-fe", "orders-api", "1.0.0")
    with pytest.raises(PermissionDeniedError) as copied:
        await scene.fe.connection.kv.put(
            CONTRACTS_BUCKET, own, codec.encode(tampered.model_copy(update={"author": "eng-fe"}))
        )
    assert f"$KV.{CONTRACTS_BUCKET}.{own}" in copied.value.message
    newer = ORDERS.model_copy(update={"version": "2.0.0"})
    with pytest.raises(ContractError, match="eng-fe may not write versions of orders-api"):
        await ContractRegistry(scene.fe.connection, team=TEAM).publish(newer, author="eng-fe")
    after = await registry.get("orders-api", "1.0.0")
    assert (after.document, after.author) == (before.document, "eng-be")
    assert [v.document.version for v in await registry.versions("orders-api")] == ["1.0.0"]
    return "denied, under its name too"


async def escalation_rewritten_as_approved(scene: Scene) -> str:
    # eng-be may never spend without the CTO: the task parks on an approval.
    spend, _ = await scene.admin.publish_task("task.infra.spend", title="a bigger database")
    states = StateStore(scene.admin.connection)
    parked_record = await settled(scene.admin, spend.id, PARKED)
    escalation_id = str(parked_record.state.waiting_for)
    opened = (await EscalationStore(scene.admin.connection).require(escalation_id)).record
    assert (opened.holder, opened.kind) == ("cto", "approval")

    approved = opened.model_copy(
        update={"status": "decided", "decision": "yes", "approved": True, "decided_by": "cto"}
    )
    key = f"e.cto.{escalation_id}.1"
    with pytest.raises(PermissionDeniedError) as denied:  # in the CTO's name
        await scene.fe.connection.kv.create(ESCALATIONS_BUCKET, key, codec.encode(approved))
    assert f"$KV.{ESCALATIONS_BUCKET}.{key}" in denied.value.message
    # In its own name: a decision by a role that does not hold it, and a climb to
    # itself before the deadline, are both ignored.
    forger = EscalationStore(scene.fe.connection, writer="eng-fe")
    found = await forger.require(escalation_id)
    decided = {"status": "decided", "decision": "yes", "approved": True}
    assert await forger.change(found, **decided, decided_by="eng-fe") is None  # not its holder
    assert await forger.change(found, **decided, decided_by="cto") is None  # not its writer
    assert await forger.change(found, holder="eng-fe", level=1) is None
    # A decision message alone (eng-fe may answer eng-be, which asks it things) says
    # "approved by the CTO": eng-be's worker reads the record, which says open.
    await scene.fe.publish(
        f"decision.eng-be.{escalation_id}",
        Decision(
            escalation_id=escalation_id,
            to_role="eng-be",
            decision="yes",
            approved=True,
            decided_by="cto",
            task_id=spend.id,
            from_role="eng-fe",
        ),
    )

    async def handled() -> bool:
        state = await scene.admin.connection.admin.consumer_state("ROLEBUS_WORK", "worker-eng-be")
        return state["pending"] == 0 and state["ack_pending"] == 0

    await wait_for(handled)
    now = (await EscalationStore(scene.admin.connection).require(escalation_id)).record
    assert (now.status, now.holder, now.level) == ("open", "cto", 0)
    still = await states.get(spend.id, role="eng-be")
    assert still == parked_record  # not resumed: the same record, at the same place
    # The genuine answer still lands, and the task ends as it says.
    await resolve(
        scene.admin.connection, TEAM, escalation_id, decision="not this quarter", approved=False
    )
    await settled(scene.admin, spend.id, "rejected")
    return "denied; its own steps and message ignored; the person's answer lands"


async def shared_buckets_written(scene: Scene) -> str:
    attempts = [
        # a "recorded" model answer that eng-be's redelivery would reuse
        (CALLS_BUCKET, f"eng-be.{scene.task.id}.g0.c1"),
        # its own budget caps (the operator's to set), or another role's spending
        (BUDGETS_BUCKET, "eng-fe.caps"),
        (BUDGETS_BUCKET, "eng-be.day.2026-12-02"),
        # cancelling another role's task (`rolebus cancel` is the operator's)
        (CANCELS_BUCKET, scene.task.id),
    ]
    for bucket, key in attempts:
        with pytest.raises(PermissionDeniedError) as denied:
            await scene.fe.connection.kv.put(bucket, key, b"{}")
        assert f"$KV.{bucket}.{key}" in denied.value.message
    # Nor read another role's recorded calls or spending (its own, key by key).
    for bucket, key in attempts[:3]:
        if key.startswith("eng-fe."):
            continue
        with pytest.raises(PermissionDeniedError) as unread:
            await scene.fe.connection.kv.get(bucket, key)
        assert f"DIRECT.GET.KV_{bucket}" in unread.value.message
    assert await scene.fe.connection.kv.get(BUDGETS_BUCKET, "eng-fe.caps") is None
    return "denied"


async def escalation_event_in_the_ctos_name(scene: Scene) -> str:
    decided = Event(
        id="forged-decided",
        entity="escalation",
        state="decided",
        task_id=scene.task.id,
        role="cto",
        detail={"decided_by": "cto", "approved": True},
    )
    for subject in ("event.escalation.decided.cto", "event.escalation.decided"):
        with pytest.raises(PermissionDeniedError) as denied:
            await scene.fe.connection.publish(subject, codec.encode(decided), msg_id=decided.id)
        assert subject in denied.value.message
    return "denied"


FORGERIES: dict[str, Callable[[Scene], Awaitable[str]]] = {
    "a model call, a budget or a cancel of another role's written or read": shared_buckets_written,
    "an escalation rewritten as approved by the CTO": escalation_rewritten_as_approved,
    "a contract version overwritten and purged": contract_overwritten_and_purged,
    "a completed record under the owner's name": completed_record_under_the_owners_name,
    "a completed record under its own name": completed_record_under_its_own_name,
    "a record deleted": record_deleted,
    "another role's records read": another_roles_records_read,
    "another role's work read by sequence": another_roles_work_read_by_sequence,
    "a dead letter in the CTO's name": dead_letter_in_the_ctos_name,
    "a body that disagrees with its subject": body_disagrees_with_subject,
    "a task in the CTO's name": task_in_the_ctos_name,
    "an escalation event in the CTO's name": escalation_event_in_the_ctos_name,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_hostile_role_cannot_change_another_roles_history(
    scene: Scene, forgery: str
) -> None:
    before, differences = await rebuild(scene.admin.connection)
    assert differences == []
    outcome = await FORGERIES[forgery](scene)
    assert outcome
    after, differences = await rebuild(scene.admin.connection)
    assert differences == []
    owner = f"{scene.task.id}@eng-be"
    assert after[owner] == before[owner] == ("completed", "eng-be")
    now = await StateStore(scene.admin.connection).get(scene.task.id, role="eng-be")
    assert now == scene.record  # the owner's record: the same, at the same place
