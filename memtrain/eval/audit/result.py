"""The audit's typed result: report.json's document with typed rows, so callers (the fine-tuner's
closing audit, scripts) read figures by name instead of indexing dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from memtrain.core.errors import MemtrainError
from memtrain.core.report import CommandResult


@dataclass(frozen=True)
class AuditRow:
    """One mitigation under one threat model: memorization rates (MR: share of targets whose best
    seed has SSCD_Orig above the threshold) and the verdict."""

    mitigation: str
    threat_model: str
    mr_unmitigated: float | dict
    mr_prompt: float | dict
    mr_attack: float | dict
    mr_control: float | dict
    verdict: str
    variant: str | None = None

    @classmethod
    def from_report(cls, row: dict) -> "AuditRow":
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__})


@dataclass
class AuditResult(CommandResult):
    """What `memtrain audit` returns: report.json's document, its rows, where it was written; and
    the material its writer turns into grids and attack files (memtrain.eval.audit.report.write)."""

    material: tuple | None = field(default=None, repr=False, compare=False)  # (inputs, baseline items, runs, recipe)

    @property
    def rows(self) -> list[AuditRow]:
        return [AuditRow.from_report(r) for r in self.report.get("results", [])]

    def row(self, mitigation: str, threat_model: str | None = None) -> AuditRow:
        """The row of `mitigation` (under `threat_model`, else its first)."""
        for r in self.rows:
            if r.mitigation == mitigation and threat_model in (None, r.threat_model):
                return r
        raise MemtrainError(f"the audit has no row for mitigation '{mitigation}'"
                            + (f" under '{threat_model}'" if threat_model else ""))
