"""Least privilege per role, clear permission errors, TLS with a CA the test makes."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import ConnectError, PermissionDeniedError
from rolebus.flows.state import StateStore
from rolebus.nats.server import EmbeddedServer
from rolebus.team.auth import ADMIN, Credentials, askers_of, permissions, render_config
from rolebus.team.roles import load_team
from rolebus.testing import wait_for
from rolebus.wire.messages import Decision
from rolebus.worker.loop import Worker
from rolebus.worker.runner import provision_team, start_workers

from ..conftest import REPO, CliRunner

TEAM = load_team(REPO / "roles")


def test_each_role_may_answer_only_the_roles_that_can_ask_it() -> None:
    assert askers_of(TEAM, "eng-fe") == {"eng-be"}  # eng-be's frontend-integration rule
    assert askers_of(TEAM, "cto") >= {"eng-be", "eng-fe", "architect", "pm", "perf-eng"}
    fe = permissions(TEAM, TEAM.role("eng-fe"))["publish"]["allow"]
    assert "decision.eng-be.*.eng-fe" in fe
    assert not any(subject.startswith("decision.cto.") for subject in fe)
    # It sends only under its own sender token.
    assert {"task.*.*.eng-fe", "handoff.*.*.eng-fe", "escalation.*.*.eng-fe"} <= set(fe)
    assert not {"task.>", "handoff.>", "escalation.>"} & set(fe)
    assert "$JS.API.CONSUMER.MSG.NEXT.ROLEBUS_WORK.worker-eng-fe" in fe
    assert not any("worker-eng-be" in subject for subject in fe)
    assert not any("DELETE.ROLEBUS" in subject or "PURGE" in subject for subject in fe)
    assert permissions(TEAM, TEAM.role("eng-fe"))["subscribe"]["allow"][0] == "_INBOX_eng-fe.>"


def test_a_contract_the_role_files_give_to_others_is_denied_even_under_its_own_token() -> None:
    # orders-api is the architect's and eng-be's.
    assert permissions(TEAM, TEAM.role("eng-fe"))["publish"]["deny"] == [
        "$KV.rolebus_contracts.v.eng-fe.orders-api.>"
    ]
    assert "deny" not in permissions(TEAM, TEAM.role("architect"))["publish"]


@dataclass
class SecuredServer:
    server: EmbeddedServer
    credentials: Credentials

    def settings(self, user: str, password: str | None = None) -> Settings:
        return Settings(
            nats_url=self.server.url,
            user=user,
            password=password or self.credentials.passwords[user],
        )


def server_with_users(tmp_path: Path, users: list[Any]) -> EmbeddedServer:
    """A server whose only users are ``users`` (nats-server's authorization block)."""
    config = "authorization {\n  users = " + json.dumps(users) + "\n}\n"
    return EmbeddedServer(store_dir=tmp_path / "nats", port=0, config_extra=config).start()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredServer]:
    credentials = Credentials.load_or_create(
        tmp_path / "secrets", [ADMIN, *(role.id for role in TEAM)]
    )
    server = EmbeddedServer(
        store_dir=tmp_path / "nats", port=0, config_extra=render_config(TEAM, credentials)
    ).start()
    try:
        yield SecuredServer(server, credentials)
    finally:
        server.stop()


@pytest.fixture
async def admin(secured: SecuredServer) -> AsyncIterator[Bus]:
    bus = await Bus.connect(secured.settings(ADMIN), name="admin")
    await provision_team(bus, TEAM)
    try:
        yield bus
    finally:
        await bus.close()


async def test_a_role_works_with_only_its_own_credentials(
    secured: SecuredServer, admin: Bus
) -> None:
    crew = await start_workers(
        secured.settings("eng-be"), TEAM, [TEAM.role("eng-be")], grace=1, supervise=False
    )
    try:
        task, _ = await admin.publish_task(
            "task.backend.build",
            title="under least privilege",
            payload={"then": [{"subject": "task.frontend.page", "title": "page"}]},
        )

        async def done() -> bool:
            stored = await StateStore(admin.connection).get(task.id)
            return stored is not None and stored.state.state == "completed"

        await wait_for(done)
    finally:
        await crew.stop(grace=0)


async def test_eng_fe_cannot_pull_eng_be_work_answer_the_cto_or_delete_a_stream(
    secured: SecuredServer, admin: Bus
) -> None:
    fe = await Bus.connect(
        secured.settings("eng-fe"), provision=False, inbox_prefix="_INBOX_eng-fe"
    )
    try:
        worker = Worker(fe, TEAM.role("eng-be"), TEAM)
        with pytest.raises(PermissionDeniedError) as pulled:
            await worker.start()
        assert "worker-eng-be" in pulled.value.message
        with pytest.raises(PermissionDeniedError) as answered:
            await fe.publish(
                "decision.cto.e1", Decision(escalation_id="e1", to_role="cto", decision="approved")
            )
        assert "decision.cto.e1" in answered.value.message
        with pytest.raises(PermissionDeniedError) as deleted:
            await fe.connection.admin.delete_stream("ROLEBUS_WORK")
        assert "STREAM.DELETE.ROLEBUS_WORK" in deleted.value.message
    finally:
        await fe.close()
    assert (await admin.connection.admin.stream_state("ROLEBUS_WORK"))["messages"] == 0


async def test_a_wrong_password_fails_clearly(secured: SecuredServer) -> None:
    with pytest.raises(ConnectError) as caught:
        await Bus.connect(secured.settings("eng-fe", password="not-it"))
    assert "refused our credentials" in caught.value.message
    assert "Authorization Violation" in caught.value.message


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rolebus test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_with_a_self_signed_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n  ca_file: "{ca}"\n}}\n'
    server = EmbeddedServer(store_dir=tmp_path / "nats", port=0, config_extra=tls).start()
    try:
        url = server.url.replace("nats://", "tls://")
        async with await Bus.connect(Settings(nats_url=url, tls_ca=ca)) as bus:
            _, ack = await bus.publish_task("task.backend.x", title="over TLS")
            assert ack.seq == 1
        with pytest.raises(ConnectError):  # no CA: the server's certificate is not trusted
            await Bus.connect(Settings(nats_url=url))
    finally:
        server.stop()


async def test_an_nkey_user_connects_with_its_seed_file_and_a_wrong_seed_is_refused(
    tmp_path: Path,
) -> None:
    import nkeys

    def new_user(name: str) -> tuple[Path, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{name}.nk"
        path.write_bytes(seed + b"\n")
        return path, nkeys.from_seed(seed).public_key.decode()

    allowed, public = new_user("allowed")
    stranger, _ = new_user("stranger")
    config = f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
    server = EmbeddedServer(store_dir=tmp_path / "nats", port=0, config_extra=config).start()
    try:
        async with await Bus.connect(Settings(nats_url=server.url, nkey_seed_file=allowed)) as bus:
            _, ack = await bus.publish_task("task.backend.x", title="signed with an nkey")
            assert ack.seq == 1
        with pytest.raises(ConnectError, match="refused our credentials"):
            await Bus.connect(Settings(nats_url=server.url, nkey_seed_file=stranger))
    finally:
        server.stop()


def _jwt(claims: dict[str, object], issuer: Any) -> str:
    """A NATS JWT (v2) signed by ``issuer``'s nkey, as `nsc` would write it."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body: dict[str, object] = {
        **claims,
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signing_input = f"{header}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(issuer.sign(signing_input.encode()))}"


def _creds(user_jwt: str, seed: bytes) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


async def test_a_creds_file_user_of_a_jetstream_account_runs_the_bus(tmp_path: Path) -> None:
    """Operator mode (decentralized JWT auth): an operator signs an account with
    JetStream, the account signs a user, and `NATS_CREDS` is all rolebus needs."""
    import nkeys

    def new_key(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(seed)

    _, operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = new_key(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "leaf": -1}
    operator_jwt = _jwt(
        {
            "sub": operator.public_key.decode(),
            "name": "op",
            "nats": {"type": "operator", "version": 2},
        },
        operator,
    )
    account_jwt = _jwt(
        {
            "sub": account.public_key.decode(),
            "name": "team",
            "nats": {
                "type": "account",
                "version": 2,
                "limits": {
                    **unlimited,
                    "imports": -1,
                    "exports": -1,
                    "wildcards": True,
                    "mem_storage": -1,
                    "disk_storage": -1,
                    "streams": -1,
                    "consumer": -1,
                },
            },
        },
        operator,
    )
    user_jwt = _jwt(
        {
            "sub": user.public_key.decode(),
            "name": "eng-be",
            "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, **unlimited},
        },
        account,
    )
    # JetStream needs the server's own (system) account, signed by the operator too.
    _, system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    system_jwt = _jwt(
        {
            "sub": system.public_key.decode(),
            "name": "SYS",
            "nats": {"type": "account", "version": 2},
        },
        operator,
    )
    creds = tmp_path / "eng-be.creds"
    creds.write_text(_creds(user_jwt, user_seed))
    config = (
        f'operator: "{operator_jwt}"\nsystem_account: {system.public_key.decode()}\n'
        f"resolver: MEMORY\nresolver_preload: {{\n"
        f'  {account.public_key.decode()}: "{account_jwt}"\n'
        f'  {system.public_key.decode()}: "{system_jwt}"\n}}\n'
    )
    server = EmbeddedServer(store_dir=tmp_path / "nats", port=0, config_extra=config).start()
    try:
        async with await Bus.connect(Settings(nats_url=server.url, creds_file=creds)) as bus:
            _, ack = await bus.publish_task("task.backend.x", title="signed by the account")
            assert ack.seq == 1
        # A user the account never signed is refused, with the reason.
        stranger_seed, stranger = new_key(nkeys.PREFIX_BYTE_USER)
        _, other_account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        forged = tmp_path / "stranger.creds"
        forged.write_text(
            _creds(
                _jwt(
                    {
                        "sub": stranger.public_key.decode(),
                        "nats": {"type": "user", "version": 2, **unlimited},
                    },
                    other_account,
                ),
                stranger_seed,
            )
        )
        with pytest.raises(ConnectError, match="refused our credentials"):
            await Bus.connect(Settings(nats_url=server.url, creds_file=forged))
    finally:
        server.stop()


async def test_an_approval_and_a_retry_complete_with_each_worker_on_its_own_user(
    secured: SecuredServer, admin: Bus
) -> None:
    """The CTO approves eng-be's spend, eng-be resumes (reading the escalation's record)
    and retries a transient failure (reading the task's record): all under the
    generated least-privilege permissions."""
    crews = [
        await start_workers(
            secured.settings(role), TEAM, [TEAM.role(role)], grace=1, supervise=False
        )
        for role in ("eng-be", "cto")
    ]
    try:
        spend, _ = await admin.publish_task(
            "task.backend.spend", title="Managed Postgres for order history ($50/month)"
        )
        implement, _ = await admin.publish_task(
            "task.backend.implement",
            title="Implement it",
            payload={"contracts": []},
        )

        async def done(task_id: str) -> bool:
            stored = await StateStore(admin.connection).get(task_id)
            return stored is not None and stored.state.state == "completed"

        await wait_for(lambda: done(spend.id), timeout=30)
        # eng-be's implement fails once (transient), then asks the CTO about its budget.
        await wait_for(lambda: done(implement.id), timeout=60)
    finally:
        for crew in crews:
            await crew.stop(grace=0)
    stored = await StateStore(admin.connection).get(spend.id)
    assert stored is not None
    assert stored.state.detail["approved_by"] == "cto"
    stored = await StateStore(admin.connection).get(implement.id)
    assert stored is not None
    assert stored.state.failures == 1
    assert stored.state.detail["approved_by"] == "cto"  # the budget approval


def test_a_roles_user_publishes_from_the_cli_and_a_denied_read_is_named(
    cli: CliRunner, secured: SecuredServer
) -> None:
    import asyncio

    async def provision() -> None:
        async with await Bus.connect(secured.settings(ADMIN), name="admin") as bus:
            await provision_team(bus, TEAM)

    asyncio.run(provision())
    env = {
        "NATS_URL": secured.server.url,
        "NATS_USER": "eng-be",
        "NATS_PASSWORD": secured.credentials.passwords["eng-be"],
    }
    published = cli("publish", "task.frontend.page", "-t", "a page, from eng-be", env=env)
    assert published.code == 0, published.stderr  # its inbox prefix, no provisioning
    assert "published task" in published.stdout
    denied = cli("replay", env=env)  # the history is not eng-be's to read
    assert denied.code == 1
    assert "permission denied" in denied.stderr
    assert "CONSUMER.CREATE.ROLEBUS_EVENTS" in denied.stderr
    assert "unreachable" not in denied.stderr


def test_nkey_users_from_rolebus_auth_run_the_team_and_the_config_holds_no_secret(
    cli: CliRunner, tmp_path: Path
) -> None:
    """The recommended path: `rolebus auth --nkeys`, the server with that config, the
    admin provisions, a role's worker and `rolebus publish --as` use their seeds."""
    import asyncio

    secrets, deploy = tmp_path / "secrets", tmp_path / "deploy"
    made = cli("auth", "--nkeys", "--secrets", str(secrets), "--output", str(deploy))
    assert made.code == 0, made.stderr
    config = (deploy / "nats-auth.conf").read_text()
    seeds = sorted(path.name for path in secrets.glob("*.nk"))
    assert seeds == sorted(f"{user}.nk" for user in [ADMIN, *(role.id for role in TEAM)])
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in secrets.glob("*.nk"))
    for path in secrets.glob("*.nk"):  # the seeds stay in their files
        assert path.read_text().strip() not in config
    assert '"nkey": "U' in config
    assert "password" not in config
    again = cli("auth", "--nkeys", "--secrets", str(secrets))  # the same users, kept
    assert again.stdout == config

    server = EmbeddedServer(store_dir=tmp_path / "nats", port=0, config_extra=config).start()
    try:

        async def scenario() -> str:
            admin = Settings(nats_url=server.url, nkey_seed_file=secrets / "admin.nk")
            async with await Bus.connect(admin, name="admin") as bus:
                await provision_team(bus, TEAM)
                role = Settings(nats_url=server.url, nkey_seed_file=secrets / "eng-be.nk")
                crew = await start_workers(
                    role, TEAM, [TEAM.role("eng-be")], grace=1, supervise=False
                )
                try:
                    task, _ = await bus.publish_task("task.backend.build", title="signed")

                    async def done() -> bool:
                        stored = await StateStore(bus.connection).get(task.id)
                        return stored is not None and stored.state.state == "completed"

                    await wait_for(done)
                finally:
                    await crew.stop(grace=0)
                return task.id

        asyncio.run(scenario())
        env = {"NATS_URL": server.url, "NATS_NKEY": str(secrets / "eng-fe.nk")}
        published = cli("--as", "eng-fe", "publish", "task.backend.x", "-t", "from eng-fe", env=env)
        assert published.code == 0, published.stderr
        stranger = cli("publish", "task.backend.x", "-t", "no role named", env=env)
        assert stranger.code == 1  # eng-fe's user may not listen on the default inbox
        assert "permission denied" in stranger.stderr
    finally:
        server.stop()


async def test_a_denial_is_named_as_soon_as_the_server_says_it(tmp_path: Path) -> None:
    """A KV write, a KV read and a stream read the user may not make fail with the
    subject named when the server's refusal arrives, well before the JetStream API's
    3 s timeout (the bound below is under it: a timeout cannot pass it)."""
    import asyncio

    from rolebus.wire.subjects import CALLS_BUCKET, EVENTS_STREAM

    narrow = {
        "publish": {"allow": ["$JS.API.INFO", "$JS.API.STREAM.INFO.KV_rolebus_llm_calls"]},
        "subscribe": {"allow": ["_INBOX_narrow.>"]},
    }
    users = [
        {"user": ADMIN, "password": "admin-pw"},
        {"user": "narrow", "password": "narrow-pw", "permissions": narrow},
    ]
    server = server_with_users(tmp_path, users)
    try:
        admin = Settings(nats_url=server.url, user=ADMIN, password="admin-pw")
        await (await Bus.connect(admin)).close()  # provisions
        role = Settings(nats_url=server.url, user="narrow", password="narrow-pw")
        async with await Bus.connect(role) as bus:
            with pytest.raises(PermissionDeniedError) as wrote:
                await asyncio.wait_for(bus.connection.kv.put(CALLS_BUCKET, "t1", b"x"), 2.0)
            assert "$KV.rolebus_llm_calls.t1" in wrote.value.message
            with pytest.raises(PermissionDeniedError) as read:
                await asyncio.wait_for(bus.connection.kv.get(CALLS_BUCKET, "t1"), 2.0)
            assert "DIRECT.GET.KV_rolebus_llm_calls" in read.value.message
            with pytest.raises(PermissionDeniedError) as scanned:
                await asyncio.wait_for(anext(bus.connection.streams.read(EVENTS_STREAM)), 2.0)
            assert "CONSUMER.CREATE.ROLEBUS_EVENTS" in scanned.value.message
            # The connection is fine afterwards: what it may do still works.
            assert await bus.connection.admin.stream_state("KV_rolebus_llm_calls") is not None
    finally:
        server.stop()


async def test_a_worker_denied_its_record_dead_letters_the_task_naming_the_denial(
    tmp_path: Path,
) -> None:
    """A role's user without the right to write task records: its worker logs the
    denial, retries, and when the server gives up the dead letter says why, not only
    "no ack"."""
    from rolebus.flows import dlq

    from ..team import write_team

    team = load_team(write_team(tmp_path / "roles", ack_wait="1s", max_deliver=2))
    crippled = permissions(team, team.role("eng-be"))
    crippled["publish"]["allow"].remove("event.task.*.eng-be.*")
    users = [
        {"user": ADMIN, "password": "admin-pw"},
        {"user": "eng-be", "password": "be-pw", "permissions": crippled},
    ]
    server = server_with_users(tmp_path, users)
    try:
        admin_settings = Settings(nats_url=server.url, user=ADMIN, password="admin-pw")
        async with await Bus.connect(admin_settings, name="admin") as admin:
            await provision_team(admin, team)
            role = Settings(nats_url=server.url, user="eng-be", password="be-pw")
            crew = await start_workers(role, team, [team.role("eng-be")], grace=1, supervise=False)
            try:
                task, _ = await admin.publish_task("task.backend.build", title="denied record")

                async def buried() -> bool:
                    entries = [e async for e in dlq.list_dead_letters(admin.connection)]
                    return any(entry.task_id == task.id for entry in entries)

                await wait_for(buried, timeout=30)
            finally:
                await crew.stop(grace=0)
            [entry] = [e async for e in dlq.list_dead_letters(admin.connection)]
            assert entry.reason == "max-deliver"
            assert "permission denied" in entry.error
            assert f"event.task.completed.eng-be.{task.id}" in entry.error
    finally:
        server.stop()


async def test_the_demo_flow_ends_as_without_auth_with_every_worker_on_its_own_user(
    secured: SecuredServer, admin: Bus
) -> None:
    """The whole demo (handoffs, a contract revision, three escalations answered, a
    retry, the performance report) with each of the six workers on its own role's
    user under the generated permissions; the demo itself watches as the operator."""
    import io

    from rich.console import Console

    from rolebus.cli.demo import play
    from rolebus.flows import dlq

    result = await play(
        secured.settings(ADMIN),
        TEAM,
        console=Console(file=io.StringIO()),
        timeout=60,
        worker_settings=lambda role: secured.settings(role.id),
    )
    assert result.states
    assert all(state.state == "completed" for state in result.states), [
        (state.role, state.title, state.state, state.error) for state in result.states
    ]
    assert sorted(r.decided_by or "" for r in result.escalations) == ["architect", "cto", "cto"]
    assert [entry async for entry in dlq.list_dead_letters(admin.connection)] == []
    retried = [state for state in result.states if state.failures]
    assert retried  # the transient failure was retried under eng-be's own user


async def test_a_climb_and_a_redrive_work_with_each_worker_on_its_own_user(
    tmp_path: Path,
) -> None:
    """An unanswered escalation climbs (the supervisor runs on eng-be's user) to the
    CTO, who answers on its own; a dead letter the operator redrives runs again."""
    from typing import Any as AnyType

    from rolebus.flows import dlq
    from rolebus.flows.escalation import EscalationStore
    from rolebus.handlers.base import HandlerContext
    from rolebus.wire.messages import Outcome, Task

    from .test_flows import ambiguous_be, decide_cursor, write_org

    org = write_org(tmp_path / "roles")
    credentials = Credentials.load_or_create(
        tmp_path / "secrets", [ADMIN, *(role.id for role in org)]
    )
    server = EmbeddedServer(
        store_dir=tmp_path / "nats", port=0, config_extra=render_config(org, credentials)
    ).start()
    secured = SecuredServer(server, credentials)
    results: list[AnyType] = []
    tries: list[str] = []
    ambiguous = ambiguous_be(results)

    async def eng_be(task: Task, context: HandlerContext) -> Outcome:
        if task.kind != "flaky":
            return await ambiguous(task, context)
        tries.append(task.id)
        if len(tries) == 1:
            return Outcome(status="failed", error="broken the first time", retryable=False)
        return Outcome.completed({"tries": len(tries)})

    async def state(bus: Bus, task_id: str) -> str | None:
        stored = await StateStore(bus.connection).get(task_id)
        return None if stored is None else stored.state.state

    try:
        async with await Bus.connect(secured.settings(ADMIN), name="admin") as admin:
            await provision_team(admin, org)
            crew = await start_workers(
                lambda role: secured.settings(role.id),
                org,
                [org.role("eng-be"), org.role("cto")],
                handlers={"eng-be": eng_be, "cto": decide_cursor},
                grace=1,
            )
            try:
                # The architect is away: eng-be's rule gives it 2 s, then the CTO.
                asked, _ = await admin.publish_task(
                    "task.backend.implement", title="partition", payload={"reason": "unknown"}
                )
                await wait_for(lambda: _is(state(admin, asked.id), "completed"), timeout=30)
                assert results == [["cursor (decided by cto)"]]
                [record] = await EscalationStore(admin.connection).all()
                assert (record.holder, record.trail) == ("cto", ["architect", "cto"])

                flaky, _ = await admin.publish_task("task.backend.flaky", title="flaky")
                await wait_for(lambda: _is(state(admin, flaky.id), "dead"), timeout=30)
                entry = await dlq.find(admin.connection, flaky.id)
                await dlq.redrive(admin.connection, entry)  # the operator's
                await wait_for(lambda: _is(state(admin, flaky.id), "completed"), timeout=30)
                assert tries == [flaky.id, flaky.id]
            finally:
                await crew.stop(grace=0)
    finally:
        server.stop()


async def _is(value: Any, expected: object) -> bool:
    return bool(await value == expected)


async def test_the_dashboard_inbox_resumes_a_task_whose_worker_runs_on_its_own_user(
    secured: SecuredServer, admin: Bus
) -> None:
    import re

    from .test_dashboard import ambiguous, browser, serving

    crew = await start_workers(
        secured.settings("eng-be"),
        TEAM,
        [TEAM.role("eng-be")],
        handlers={"eng-be": ambiguous},
        grace=1,
        supervise=False,
    )
    try:
        task, _ = await admin.publish_task("task.backend.implement", title="paginate")

        async def parked() -> bool:
            stored = await StateStore(admin.connection).get(task.id)
            return stored is not None and stored.state.state == "input-required"

        await wait_for(parked)
        async with serving(secured.settings(ADMIN)) as base, browser(base) as web:
            inbox = (await web.get("/escalations")).text
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', inbox)
            assert csrf is not None
            answered = await web.post(
                f"/escalations/{task.id}-1/resolve",
                data={"decision": "cursor", "verdict": "answer", "csrf": csrf.group(1)},
            )
            assert answered.status_code == 303

            async def completed() -> bool:
                stored = await StateStore(admin.connection).get(task.id)
                return stored is not None and stored.state.state == "completed"

            await wait_for(completed)
    finally:
        await crew.stop(grace=0)
    stored = await StateStore(admin.connection).get(task.id)
    assert stored is not None
    assert stored.state.result == {"used": "cursor"}
