"""API contracts: semver-versioned documents in a KV registry, with compatibility.

A contract document is JSON, OpenAPI-shaped but small::

    {"name": "orders-api", "version": "1.1.0", "description": "...",
     "operations": {
        "createOrder": {"method": "POST", "path": "/orders",
                        "input":  {"item": {"type": "string", "required": true}},
                        "output": {"id": {"type": "string"}}}}}

A new version that breaks the previous one (an operation or field removed, a
type, method or path changed, a new required input) needs a major version
bump; otherwise it is refused with a readable diff of what broke.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rolebus.errors import CodecError, ConfigError, NotFoundError, RolebusError
from rolebus.nats.connection import Connection
from rolebus.team.roles import PERSON, Team
from rolebus.wire import codec
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Instant, utc_now
from rolebus.wire.subjects import CONTRACTS_BUCKET, validate_token

__all__ = [
    "ContractDocument",
    "ContractError",
    "ContractRegistry",
    "ContractVersion",
    "diff",
    "load_document",
    "parse_version",
]

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")

FieldType = Literal["string", "integer", "number", "boolean", "object", "array"]


class ContractError(RolebusError):
    """A contract document is malformed, or a version is refused."""


def parse_version(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if match is None:
        raise ContractError(
            f"version {version!r} is not semver",
            hint="use MAJOR.MINOR.PATCH, e.g. 1.2.0",
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    type: FieldType
    required: bool = False


class Operation(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str = Field(pattern=r"^/")
    input: dict[str, FieldSpec] = Field(default_factory=dict)
    output: dict[str, FieldSpec] = Field(default_factory=dict)


class ContractDocument(BaseModel):
    """One version of a contract."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    version: str
    description: str = ""
    operations: dict[str, Operation] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_token(cls, value: str) -> str:
        validate_token(value, what="contract name")
        return value

    @field_validator("version")
    @classmethod
    def _version_is_semver(cls, value: str) -> str:
        parse_version(value)
        return value


class ContractVersion(BaseModel):
    """A registered version: the document, who published it, and the answers."""

    model_config = ConfigDict(extra="allow")

    document: ContractDocument
    author: str
    published_at: Instant = Field(default_factory=utc_now)
    accepted_by: list[str] = Field(default_factory=list)
    changes_requested: dict[str, list[str]] = Field(default_factory=dict)


def document_from(value: Any, *, source: str) -> ContractDocument:
    """Validate a contract document, or a ContractError naming each problem."""
    try:
        return ContractDocument.model_validate(value)
    except ValidationError as error:
        problems = validation_problems(error)
        raise ContractError(
            f"{source} is not a valid contract document: {problems}",
            hint="a contract has name, version (semver) and operations "
            '{"opName": {"method", "path", "input": {...}, "output": {...}}}',
        ) from error
    except RolebusError as error:  # a token or version validator
        raise ContractError(f"{source}: {error.message}", hint=error.hint) from error


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


def diff(old: ContractDocument, new: ContractDocument) -> tuple[list[str], list[str]]:
    """What changed from ``old`` to ``new``: (breaking changes, compatible changes)."""
    breaking: list[str] = []
    compatible: list[str] = []
    for name, before in old.operations.items():
        after = new.operations.get(name)
        if after is None:
            breaking.append(f"- operation {name} ({before.method} {before.path}) removed")
            continue
        if (before.method, before.path) != (after.method, after.path):
            breaking.append(
                f"~ operation {name}: {before.method} {before.path} -> {after.method} {after.path}"
            )
        for side in ("input", "output"):
            _diff_fields(
                name, side, getattr(before, side), getattr(after, side), breaking, compatible
            )
    for name, after in new.operations.items():
        if name not in old.operations:
            compatible.append(f"+ operation {name} ({after.method} {after.path}) added")
    return breaking, compatible


def _diff_fields(
    operation: str,
    side: str,
    before: dict[str, FieldSpec],
    after: dict[str, FieldSpec],
    breaking: list[str],
    compatible: list[str],
) -> None:
    where = f"{operation}.{side}"
    for field, spec in before.items():
        if field not in after:
            breaking.append(f"- {where}.{field} ({spec.type}) removed")
        elif after[field].type != spec.type:
            breaking.append(f"~ {where}.{field}: type {spec.type} -> {after[field].type}")
        elif side == "input" and after[field].required and not spec.required:
            breaking.append(f"~ {where}.{field}: now required")
    for field, spec in after.items():
        if field in before:
            continue
        if side == "input" and spec.required:
            breaking.append(f"+ {where}.{field} ({spec.type}) added as a required input")
        else:
            compatible.append(f"+ {where}.{field} ({spec.type}) added")


def version_key(author: str, name: str, version: str) -> str:
    """Where ``author`` registers a version: under its own token, so that who
    published it comes from where the server let it land."""
    return f"v.{author}.{name}.{version}"


def answer_key(role: str, name: str, version: str) -> str:
    """Where ``role`` answers a version (accepted, or the changes it asks for)."""
    return f"a.{role}.{name}.{version}"


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

    async def publish(self, document: ContractDocument, *, author: str) -> ContractVersion:
        """Register a new version after checking it against the latest one."""
        if not self.may_author(author, document.name):
            assert self._team is not None
            authors = sorted(self._team.contract_authors(document.name) or ())
            raise ContractError(
                f"{author} may not write versions of {document.name}: "
                f"its role files give it to {', '.join(authors)}",
                hint=f"hand it to one of them, or add {document.name!r} to the contracts "
                f"of {author}'s role file",
            )
        versions = await self.versions(document.name)
        for existing in versions:
            if existing.document.version == document.version:
                if existing.document == document:
                    return existing  # publishing the same thing again is a no-op
                raise ContractError(
                    f"{document.name} {document.version} already exists with other content",
                    hint="publish it as a new version",
                )
        if versions:
            latest = versions[-1].document
            new, old = parse_version(document.version), parse_version(latest.version)
            if new <= old:
                raise ContractError(
                    f"{document.name} {document.version} is not newer than {latest.version}",
                    hint=f"use a version above {latest.version}",
                )
            breaking, _ = diff(latest, document)
            if breaking and new[0] == old[0]:
                raise ContractError(
                    f"{document.name} {document.version} breaks {latest.version} without a "
                    "major version bump:\n    " + "\n    ".join(breaking),
                    hint=f"keep the old fields and operations, or publish it as {old[0] + 1}.0.0",
                )
        entry = ContractVersion(document=document, author=author)
        created = await self._connection.kv.create(
            CONTRACTS_BUCKET,
            version_key(author, document.name, document.version),
            codec.encode(entry),
        )
        if created is None:  # published concurrently: that one wins if identical
            return await self.publish(document, author=author)
        return await self.get(document.name, document.version)

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
        answer = {"accepted": accepted, "reasons": list(reasons), "at": utc_now().isoformat()}
        await self._connection.kv.put(
            CONTRACTS_BUCKET, answer_key(role, name, version), codec.encode_map(answer)
        )
        return await self.get(name, version)
