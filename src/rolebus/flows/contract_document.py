"""API contracts, as documents: semver versions and what breaks between two (pure).

A contract document is JSON, OpenAPI-shaped but small::

    {"name": "orders-api", "version": "1.1.0", "description": "...",
     "operations": {
        "createOrder": {"method": "POST", "path": "/orders",
                        "input":  {"item": {"type": "string", "required": true}},
                        "output": {"id": {"type": "string"}}}}}

A new version that breaks the previous one (an operation or field removed, a
type, method or path changed, a new required input) needs a major version
bump; otherwise it is refused with a readable diff of what broke
(:func:`check_publication`, the rule the registry and the worker both apply).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rolebus.errors import RolebusError
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Instant, utc_now
from rolebus.wire.subjects import validate_token

__all__ = [
    "ContractDocument",
    "ContractError",
    "ContractVersion",
    "answer_key",
    "check_publication",
    "diff",
    "document_from",
    "parse_version",
    "version_key",
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


def check_publication(
    document: ContractDocument,
    *,
    author: str,
    versions: Sequence[ContractVersion],
    authors: Collection[str] | None,
) -> ContractVersion | None:
    """Whether ``author`` may register ``document`` given the contract's
    ``versions`` (oldest first) and who its role files let write it (``authors``,
    None: anyone): the version stored already (the same document again), None (a
    new version to store), or a ContractError saying what is wrong."""
    if authors is not None and author not in authors:
        raise ContractError(
            f"{author} may not write versions of {document.name}: "
            f"its role files give it to {', '.join(sorted(authors))}",
            hint=f"hand it to one of them, or add {document.name!r} to the contracts "
            f"of {author}'s role file",
        )
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
    return None


def version_of(versions: Sequence[ContractVersion], version: str | None) -> ContractVersion | None:
    """One of ``versions`` (oldest first): ``version``, or the latest when None."""
    if version is None:
        return versions[-1] if versions else None
    return next((entry for entry in versions if entry.document.version == version), None)
