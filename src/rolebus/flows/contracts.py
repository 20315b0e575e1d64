"""The contract registry: versions of API contracts in the ``rolebus_contracts``
bucket, with their answers (the documents and the compatibility rule are
:mod:`rolebus.flows.contract_document`'s)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from rolebus.errors import CodecError, ConfigError, NotFoundError
from rolebus.flows.contract_document import (
    ContractDocument,
    ContractError,
    ContractVersion,
    answer_key,
    check_publication,
    diff,
    document_from,
    parse_version,
    version_key,
)
from rolebus.nats.connection import Connection
from rolebus.team.roles import PERSON, Team
from rolebus.wire import codec
from rolebus.wire.messages import utc_now
from rolebus.wire.subjects import CONTRACTS_BUCKET, validate_token

__all__ = [
    "ContractDocument",
    "ContractError",
    "ContractRegistry",
    "ContractVersion",
    "diff",
    "document_from",
    "load_document",
    "parse_version",
    "version_key",
]


def load_document(path: Path) -> ContractDocument:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise ContractError(
            f"{path} is not JSON: {error.msg} at line {error.lineno} column {error.colno}",
            hint="a contract document is a JSON object",
        ) from error
    return document_from(value, source=str(path))


class ContractRegistry:
    """Contract versions in the ``rolebus_contracts`` bucket: each version under its
    author (``v.<author>.<name>.<version>``), each answer under the role that gave it
    (``a.<role>.<name>.<version>``). A role may write only under its own token, so
    none can rewrite another's version or answer; of two registrations of one
    version, the first one stored is the version.

    With the ``team``, a contract that role files list under ``contracts`` has
    versions only from those roles (or a person, the operator's CLI): another
    role's registration is refused here, denied by the generated permissions, and
    ignored when read."""

    def __init__(self, connection: Connection, *, team: Team | None = None) -> None:
        self._connection = connection
        self._team = team

    def may_author(self, author: str, contract: str) -> bool:
        """Whether ``author`` may write versions of ``contract``."""
        if self._team is None or author == PERSON:
            return True
        authors = self._team.contract_authors(contract)
        return authors is None or author in authors

    async def _read(self, name: str = "*", version: str = ">") -> list[ContractVersion]:
        documents: dict[tuple[str, str], ContractVersion] = {}
        answers: list[tuple[str, tuple[str, str], dict[str, Any]]] = []
        for kind in ("v", "a"):
            async for change in self._connection.kv.changes(
                CONTRACTS_BUCKET, keys=f"{kind}.*.{name}.{version}"
            ):
                if change.value is None:
                    continue
                _, writer, rest = change.key.split(".", 2)
                contract, _, number = rest.partition(".")
                with contextlib.suppress(CodecError):
                    if kind == "v":
                        entry = codec.decode_as(ContractVersion, change.value)
                        found = (entry.document.name, entry.document.version)
                        if (
                            found == (contract, number)
                            and found not in documents
                            and self.may_author(writer, contract)
                        ):
                            # The first stored wins (changes come in stream order).
                            documents[found] = entry.model_copy(update={"author": writer})
                    else:
                        answers.append((writer, (contract, number), codec.decode_map(change.value)))
        for role, key, answer in answers:
            answered = documents.get(key)
            if answered is None:
                continue
            if answer.get("accepted"):
                answered.accepted_by.append(role)
            else:
                answered.changes_requested[role] = [str(why) for why in answer.get("reasons", [])]
        return list(documents.values())

    async def versions(self, name: str) -> list[ContractVersion]:
        """Every version of one contract, oldest first."""
        found = await self._read(validate_token(name, what="contract name"))
        return sorted(found, key=lambda entry: parse_version(entry.document.version))

    async def names(self) -> list[str]:
        return sorted({entry.document.name for entry in await self._read()})

    async def get(self, name: str, version: str | None = None) -> ContractVersion:
        """One version (the latest when ``version`` is None)."""
        if version is not None:
            with contextlib.suppress(ValueError):
                parse_version(version)
                found = await self._read(validate_token(name, what="contract name"), version)
                if found:
                    return found[0]
        else:
            versions = await self.versions(name)
            if versions:
                return versions[-1]
        known = [entry.document.version for entry in await self.versions(name)]
        raise NotFoundError(
            f"no contract {name!r}" + (f" version {version}" if version else ""),
            hint=f"versions: {', '.join(known)}" if known else "`rolebus contracts list`",
        )

    def authors_of(self, contract: str) -> frozenset[str] | None:
        """Who may write versions of ``contract`` (None: anyone)."""
        if self._team is None:
            return None
        authors = self._team.contract_authors(contract)
        return None if authors is None else frozenset(authors)

    async def publish(self, document: ContractDocument, *, author: str) -> ContractVersion:
        """Register a new version after checking it against the latest one."""
        authors = None if author == PERSON else self.authors_of(document.name)
        versions = await self.versions(document.name)
        existing = check_publication(document, author=author, versions=versions, authors=authors)
        if existing is not None:
            return existing
        created = await self.create(ContractVersion(document=document, author=author))
        if not created:  # published concurrently: that one wins if identical
            return await self.publish(document, author=author)
        return await self.get(document.name, document.version)

    async def create(self, entry: ContractVersion) -> bool:
        """Store a version checked already; False when that key was taken first."""
        document = entry.document
        created = await self._connection.kv.create(
            CONTRACTS_BUCKET,
            version_key(entry.author, document.name, document.version),
            codec.encode(entry),
        )
        return created is not None

    async def resolve(self, references: object) -> dict[str, Any]:
        """What a handler's context gets for a task's ``contracts`` list
        (``"name"`` for the latest, ``"name@1.2.0"`` for one version)."""
        found: dict[str, Any] = {}
        for reference in references if isinstance(references, list) else []:
            name, _, version = str(reference).partition("@")
            entry = await self.get(name, version or None)
            found[name] = {
                "version": entry.document.version,
                "document": entry.document.model_dump(mode="json"),
                "accepted_by": entry.accepted_by,
            }
        return found

    async def record_answer(
        self, name: str, version: str, *, role: str, accepted: bool, reasons: list[str]
    ) -> ContractVersion:
        """Record a role's answer to a version (its own key: the last answer counts)."""
        await self.get(name, version)  # it must exist
        await self.put_answer(name, version, role=role, accepted=accepted, reasons=reasons)
        return await self.get(name, version)

    async def put_answer(
        self, name: str, version: str, *, role: str, accepted: bool, reasons: list[str]
    ) -> None:
        """Store a role's answer to a version known to exist."""
        answer = {"accepted": accepted, "reasons": list(reasons), "at": utc_now().isoformat()}
        await self._connection.kv.put(
            CONTRACTS_BUCKET, answer_key(role, name, version), codec.encode_map(answer)
        )
