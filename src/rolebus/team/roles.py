"""Role files (``roles/*.md``) -> :class:`RoleSpec`, and the team checked as a whole.

A role file is an identity card: TOML front matter between ``+++`` lines (what
the bus enforces), then Markdown (the persona a model is given). Every error
names the file, the field and the fix.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from rolebus.errors import RoleError, SubjectError
from rolebus.team.budget import Budget
from rolebus.team.durations import Duration
from rolebus.team.handler_specs import CommandHandler, HandlerSpec, LlmHandler
from rolebus.team.tool_specs import ToolSource
from rolebus.wire.subjects import role_filter_subjects, validate_role_id, validate_token

__all__ = [
    "PERSON",
    "Brakes",
    "EscalationRule",
    "NeverRule",
    "RoleSpec",
    "Slo",
    "Team",
    "load_role",
    "load_team",
    "with_model",
]

#: Above the top of the chart: a person, through the CLI or the dashboard (no role id).
PERSON: Final = "person"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NeverRule(_Strict):
    """A boundary: task kinds this role must not do alone, and what happens instead.

    ``approval``: ask ``to`` first, run only once approved. ``handoff``: the task
    goes to ``to`` instead. ``refuse``: the task ends rejected.
    """

    what: str
    kinds: list[str] = Field(min_length=1)
    action: Literal["approval", "handoff", "refuse"]
    to: str | None = None
    #: An approval for a task whose ``payload.usd`` is above this (or not a number)
    #: goes to a person, whatever ``to`` is: no role decides it.
    person_above_usd: float | None = Field(default=None, ge=0)


class EscalationRule(_Strict):
    """Where a question with this ``reason`` goes, and how long to wait for an answer."""

    reason: str
    to: str
    timeout: Duration = 3600.0


#: Task kinds that ask the role to decide or review, not to do work: a ``then``
#: route never follows them.
DECIDING_KINDS: Final = frozenset({"escalation", "handoff"})


class Then(_Strict):
    """A task the role files whenever it completes one of ``kinds`` (every kind when
    empty, decisions and reviews excepted), whatever its handler answered: the team's
    process, written down once (a small model need not plan it). The task carries
    what was done (``payload.after``) and passes the same brakes and boundaries as
    the follow-ups a handler asks for."""

    kinds: list[str] = Field(default_factory=list)
    #: ``task.<domain>.<kind>``: a domain of the role that does it next.
    subject: str
    #: ``{title}`` and ``{kind}`` stand for the completed task's.
    title: str = "{title}"

    @field_validator("subject")
    @classmethod
    def _task_subject(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != "task":
            raise ValueError(f"{value!r} is not task.<domain>.<kind>")
        for token in parts[1:]:
            validate_token(token, what="a then subject's token")
        return value

    def applies_to(self, kind: str) -> bool:
        return kind not in DECIDING_KINDS and (not self.kinds or kind in self.kinds)


class Brakes(_Strict):
    """Bounds on the work one flow (a correlation) may make this role send: met, the
    task parks and asks ``reports_to`` (approving lets the flow go as far again).
    The defaults are far above any real flow and stop a storm within seconds."""

    follow_ups_per_task: int = Field(default=20, ge=1, le=10_000)
    #: Follow-up generations below the flow's root task.
    depth: int = Field(default=12, ge=1, le=1000)
    #: Tasks one task this role receives may cause below it.
    tasks_per_flow: int = Field(default=200, ge=1, le=1_000_000)
    #: Model tokens one task this role receives may spend, with what it causes.
    tokens_per_flow: int = Field(default=2_000_000, ge=1, le=10**12)
    #: US dollars it may spend, with what it causes (off by default: a local model
    #: has no price, and a role with prices sets its own).
    usd_per_flow: float | None = Field(default=None, ge=0)


class Slo(_Strict):
    """The role's success metrics, checked by ``rolebus status``."""

    p50_latency_ms: float | None = Field(default=None, gt=0)
    p99_latency_ms: float | None = Field(default=None, gt=0)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    uptime: float | None = Field(default=None, gt=0, le=1)


class RoleSpec(_Strict):
    """One role's identity card as the bus enforces it."""

    id: str
    title: str = Field(min_length=1)
    reports_to: str | None = None
    domains: list[str] = Field(default_factory=list)
    #: The API contracts this role writes versions of (owns, or revises as it hands
    #: them on): those listed by some role get versions only from those roles.
    contracts: list[str] = Field(default_factory=list)
    handler: HandlerSpec
    concurrency: int = Field(default=4, ge=1, le=1024)
    ack_wait: Duration = 30.0
    max_deliver: int = Field(default=5, ge=1, le=1000)
    backoff: list[Duration] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    never: list[NeverRule] = Field(default_factory=list)
    escalate: list[EscalationRule] = Field(default_factory=list)
    #: How many times one task may ask (escalate) before the bus asks the role's
    #: ``reports_to`` whether it may go on (a brake: approving allows as many more).
    max_escalations: int = Field(default=5, ge=1, le=1000)
    brakes: Brakes = Field(default_factory=Brakes)
    then: list[Then] = Field(default_factory=list)
    tools: list[ToolSource] = Field(default_factory=list)
    slo: Slo = Field(default_factory=Slo)
    budget: Budget = Field(default_factory=Budget)
    persona: str = ""
    source: str = ""

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        try:
            validate_role_id(value)
        except SubjectError as error:  # pydantic reports ValueErrors with the field
            raise ValueError(f"{error.message} ({error.hint})") from error
        if value == PERSON:
            raise ValueError(f"{PERSON!r} stands for a person, above the chart: name the role")
        return value

    @field_validator("domains", "contracts")
    @classmethod
    def _valid_tokens(cls, value: list[str], info: ValidationInfo) -> list[str]:
        what = "domain" if info.field_name == "domains" else "contract"
        for token in value:
            try:
                validate_token(token, what=what)
            except SubjectError as error:
                raise ValueError(f"{error.message} ({error.hint})") from error
        if len(set(value)) != len(value):
            raise ValueError(f"a {what} is listed twice")
        return value

    @field_validator("handler")
    @classmethod
    def _valid_handler(
        cls, value: str | CommandHandler | LlmHandler
    ) -> str | CommandHandler | LlmHandler:
        if isinstance(value, str) and not (
            re.match(r"^builtin:[\w\-]+$", value) or re.match(r"^python:[\w.]+:\w+$", value)
        ):
            raise ValueError(
                f"{value!r} is not a handler: use 'builtin:NAME', "
                "'python:package.module:function', { command = [...], timeout = 60 } "
                'or { llm = "MODEL" }'
            )
        return value

    @property
    def filter_subjects(self) -> list[str]:
        return role_filter_subjects(self.id, self.domains)

    def retry_delay(self, attempt: int) -> float:
        """How long a retry waits after attempt number ``attempt`` (from 1) failed: the
        role's ``backoff`` list, its last entry once the list runs out."""
        delays = self.backoff or [1.0]
        return delays[max(1, min(attempt, len(delays))) - 1]

    def never_rule_for(self, kind: str) -> NeverRule | None:
        return next((rule for rule in self.never if kind in rule.kinds), None)

    @property
    def budget_approver(self) -> str | None:
        """Who approves this role's budget breaches: the budget's ``approver``, else
        the target of its rule about spending, else ``reports_to``."""
        if self.budget.approver:
            return self.budget.approver
        spend = next(
            (rule for rule in self.never if {"spend", "purchase"} & set(rule.kinds) and rule.to),
            None,
        )
        return spend.to if spend is not None else self.reports_to

    def escalation_rule_for(self, reason: str) -> EscalationRule | None:
        return next((rule for rule in self.escalate if rule.reason == reason), None)


def with_model(team: Team, model: str) -> Team:
    """The team with every LLM role on ``model``."""
    return Team.from_roles(
        [
            role.model_copy(update={"handler": role.handler.model_copy(update={"llm": model})})
            if isinstance(role.handler, LlmHandler)
            else role
            for role in team
        ]
    )


_FIELD_HINTS = {
    "id": "a short lowercase name such as 'eng-be', unique in the team",
    "title": "a human-readable title such as 'Backend Engineer'",
    "handler": "'builtin:NAME', 'python:module:function', { command = [...], timeout = 60 } "
    'or { llm = "MODEL", base_url = "http://...", api_key_env = "OPENAI_API_KEY" }',
    "domains": 'a list of domain names this role owns, e.g. ["backend", "api"]',
    "contracts": 'a list of the API contracts this role writes versions of, e.g. ["orders-api"]',
    "concurrency": "a whole number of tasks this role may run at once (1 to 1024)",
    "ack_wait": "seconds (30) or a string like '30s' or '5m'",
    "max_deliver": "how many attempts a task gets before it is dead-lettered (1 to 1000)",
    "never": "[[never]] tables with what, kinds, action (approval|handoff|refuse) and to",
    "escalate": "[[escalate]] tables with reason, to and timeout",
    "slo": "a [slo] table with p50_latency_ms, p99_latency_ms, error_rate, uptime",
    "budget": "a [budget] table with usd_per_day, tokens_per_day, tokens_per_task (numbers, "
    "none negative) and approver (a role id)",
}


def _split_front_matter(text: str, file: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "+++":
        raise RoleError(
            "no front matter",
            file=file,
            hint="start the file with a line '+++', the TOML settings, then another '+++' line",
        )
    for index in range(1, len(lines)):
        if lines[index].strip() == "+++":
            return "".join(lines[1:index]), "".join(lines[index + 1 :]).strip()
    raise RoleError(
        "front matter is not closed",
        file=file,
        hint="end the TOML settings with a line containing only '+++'",
    )


def parse_role(text: str, *, file: str) -> RoleSpec:
    """Parse the text of one role file (``file`` names it in errors)."""
    front, persona = _split_front_matter(text, file)
    try:
        data: dict[str, Any] = tomllib.loads(front)
    except tomllib.TOMLDecodeError as error:
        raise RoleError(
            f"front matter is not valid TOML: {error}",
            file=file,
            hint="check quotes, brackets and '=' signs on that line",
        ) from error
    for reserved in ("persona", "source"):
        if reserved in data:
            raise RoleError(
                f"'{reserved}' is set by rolebus, not in the front matter",
                file=file,
                field=reserved,
                hint="the persona is the Markdown after the closing '+++'",
            )
    try:
        return RoleSpec.model_validate({**data, "persona": persona, "source": file})
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        top = str(first["loc"][0]) if first["loc"] else ""
        problem = "missing" if first["type"] == "missing" else first["msg"]
        if first["type"] == "extra_forbidden":
            problem = "is not a known setting"
            hint = "remove it, or check its spelling against `rolebus roles --help`"
        else:
            hint = f"{top} is {_FIELD_HINTS.get(top, 'described in the README')}"
        more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
        raise RoleError(f"{problem}{more}", file=file, field=location, hint=hint) from error


def load_role(path: Path) -> RoleSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RoleError(f"cannot read: {error}", file=str(path)) from error
    return parse_role(text, file=str(path))


@dataclass(frozen=True)
class Team:
    """All roles, validated together: ids unique, one owner per domain, an acyclic
    ``reports_to`` chart, every rule pointing at a role that exists."""

    roles: Mapping[str, RoleSpec]
    domain_owner: Mapping[str, str]

    def __iter__(self) -> Iterator[RoleSpec]:
        return iter(self.roles.values())

    def __len__(self) -> int:
        return len(self.roles)

    def role(self, role_id: str) -> RoleSpec:
        try:
            return self.roles[role_id]
        except KeyError:
            raise RoleError(
                f"no role {role_id!r} in the team",
                hint=f"known roles: {', '.join(sorted(self.roles))}",
            ) from None

    def owner_of(self, domain: str) -> RoleSpec:
        try:
            return self.roles[self.domain_owner[domain]]
        except KeyError:
            # Asked by whoever names a domain (a publish, a file of tasks): no role
            # file is at fault, so no file or field is named.
            raise RoleError(
                f"no role owns the domain {domain!r}",
                hint=f"known domains: {', '.join(sorted(self.domain_owner))}; "
                "or add it to a role's domains",
            ) from None

    def contract_authors(self, contract: str) -> set[str] | None:
        """The roles that may write versions of ``contract`` (None: no role file
        lists it, so any role may)."""
        authors = {role.id for role in self if contract in role.contracts}
        return authors or None

    def chain_above(self, role_id: str) -> list[str]:
        """The roles above ``role_id``, nearest first (empty at the top)."""
        chain: list[str] = []
        current = self.role(role_id).reports_to
        while current is not None:
            chain.append(current)
            current = self.roles[current].reports_to
        return chain

    @classmethod
    def from_roles(cls, roles: list[RoleSpec]) -> Team:
        by_id: dict[str, RoleSpec] = {}
        owner: dict[str, str] = {}
        for role in roles:
            if role.id in by_id:
                raise RoleError(
                    f"role id {role.id!r} is also used by {by_id[role.id].source}",
                    file=role.source,
                    field="id",
                    hint="give each role a unique id",
                )
            by_id[role.id] = role
            for domain in role.domains:
                if domain in owner:
                    raise RoleError(
                        f"domain {domain!r} is already owned by role {owner[domain]!r} "
                        f"({by_id[owner[domain]].source})",
                        file=role.source,
                        field="domains",
                        hint="each domain has exactly one owner: remove it from one of the roles",
                    )
                owner[domain] = role.id
        for role in roles:
            _check_references(role, by_id)
        for role in roles:
            _check_no_cycle(role, by_id)
            if role.tools and not isinstance(role.handler, LlmHandler):
                raise RoleError(
                    "tools are for a role with an llm handler",
                    file=role.source,
                    field="tools",
                    hint="remove [[tools]], or give the role handler = { llm = ... }",
                )
            for index, route in enumerate(role.then):
                domain = route.subject.split(".")[1]
                if domain not in owner:
                    raise RoleError(
                        f"no role has the domain {domain!r} that then[{index}] files to",
                        file=role.source,
                        field=f"then[{index}].subject",
                        hint=f"use a domain of the team: {', '.join(sorted(owner))}",
                    )
        return cls(roles=by_id, domain_owner=owner)


def _check_references(role: RoleSpec, by_id: Mapping[str, RoleSpec]) -> None:
    known = ", ".join(sorted(by_id))

    def must_exist(target: str | None, field: str) -> None:
        if target is not None and target not in by_id:
            raise RoleError(
                f"role {target!r} does not exist",
                file=role.source,
                field=field,
                hint=f"use one of: {known}",
            )

    must_exist(role.reports_to, "reports_to")
    must_exist(role.budget.approver, "budget.approver")
    if role.reports_to == role.id:
        raise RoleError(
            "a role cannot report to itself",
            file=role.source,
            field="reports_to",
            hint="name the role above it, or leave reports_to out at the top of the chart",
        )
    for index, rule in enumerate(role.never):
        must_exist(rule.to, f"never[{index}].to")
        if rule.action != "refuse" and rule.to is None:
            raise RoleError(
                f"action {rule.action!r} needs a role to go to",
                file=role.source,
                field=f"never[{index}].to",
                hint='set to = "<role id>" (who approves, or who takes the task)',
            )
    for index, escalation in enumerate(role.escalate):
        must_exist(escalation.to, f"escalate[{index}].to")


def _check_no_cycle(role: RoleSpec, by_id: Mapping[str, RoleSpec]) -> None:
    seen = [role.id]
    current = role.reports_to
    while current is not None:
        if current in seen:
            cycle = " -> ".join([*seen[seen.index(current) :], current])
            raise RoleError(
                f"reports_to makes a cycle: {cycle}",
                file=role.source,
                field="reports_to",
                hint="the org chart must be a tree: one role at the top has no reports_to",
            )
        seen.append(current)
        current = by_id[current].reports_to


def load_team(directory: Path) -> Team:
    """Load and validate every ``*.md`` role file in ``directory``."""
    if not directory.is_dir():
        raise RoleError(
            f"roles folder {str(directory)!r} does not exist",
            hint="pass --roles DIR (or set ROLEBUS_ROLES) to a folder of role files",
        )
    paths = sorted(path for path in directory.glob("*.md") if path.name.lower() != "readme.md")
    if not paths:
        raise RoleError(
            f"no role files (*.md) in {str(directory)!r}",
            hint="add a role file; see roles/eng-be.md for an example",
        )
    return Team.from_roles([load_role(path) for path in paths])
