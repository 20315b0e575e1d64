"""What a decision reads before it is made: the facts, and the ones it still needs.

A pure decision (:mod:`rolebus.flows.intake`, :mod:`rolebus.flows.answers`) is
given the facts read so far; when it needs one it was not given, it answers
:class:`Needs` instead, and the shell reads those and asks again. So what is read
for a delivery is what its decision asked for, and nothing is read twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from rolebus.flows.contract_document import ContractVersion
from rolebus.flows.escalation_record import StoredEscalation
from rolebus.flows.record import Record

__all__ = ["Facts", "Needs"]

_EMPTY: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True)
class Needs:
    """Facts a decision needs and was not given: task records (this role's, by task
    id), escalation records and contract versions (by contract name)."""

    records: frozenset[str] = frozenset()
    escalations: frozenset[str] = frozenset()
    contracts: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.records or self.escalations or self.contracts)


@dataclass(frozen=True)
class Facts:
    """The facts read so far (an escalation that does not exist is read as None)."""

    records: Mapping[str, Record] = field(default_factory=dict)
    escalations: Mapping[str, StoredEscalation | None] = field(default_factory=dict)
    contracts: Mapping[str, tuple[ContractVersion, ...]] = field(default_factory=dict)

    def lacking(
        self,
        *,
        records: tuple[str, ...] = (),
        escalations: tuple[str, ...] = (),
        contracts: tuple[str, ...] = (),
    ) -> Needs:
        """What of these the facts do not hold yet (falsy: nothing)."""
        return Needs(
            records=frozenset(key for key in records if key not in self.records),
            escalations=frozenset(key for key in escalations if key not in self.escalations),
            contracts=frozenset(key for key in contracts if key not in self.contracts),
        )

    def adding(
        self,
        *,
        records: Mapping[str, Record] = _EMPTY,  # type: ignore[assignment]
        escalations: Mapping[str, StoredEscalation | None] = _EMPTY,  # type: ignore[assignment]
        contracts: Mapping[str, tuple[ContractVersion, ...]] = _EMPTY,  # type: ignore[assignment]
    ) -> Facts:
        return replace(
            self,
            records={**self.records, **records},
            escalations={**self.escalations, **escalations},
            contracts={**self.contracts, **contracts},
        )
