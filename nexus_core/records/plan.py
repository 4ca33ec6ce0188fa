"""The distillation plan: which teachers' shards on which datasets feed the student.

A plan is data, derived from the replayed state; its fingerprint names the distill and
router jobs, so a teacher added mid-run gives a new plan (and a warm-started distill).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from nexus_core.records.registry import Teacher


@dataclass(frozen=True)
class DistillPlan:
    teachers: tuple[Teacher, ...]  # ready teachers in the plan, sorted by id
    primary: str  # the teacher whose tokenizer (and pruned layers) the student inherits
    datasets: tuple[str, ...]  # "category/name" keys, sorted
    # (teacher_id, dataset) pairs left out, e.g. because their extraction failed; the
    # teachers themselves stay as registered so that their fingerprints match the shards
    excluded: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        assert any(t.teacher_id == self.primary for t in self.teachers), "primary must be in the plan"

    @property
    def primary_teacher(self) -> Teacher:
        return next(t for t in self.teachers if t.teacher_id == self.primary)

    def teacher_datasets(self, teacher: Teacher) -> tuple[str, ...]:
        """Datasets a teacher's shards come from: its own list, else the plan's, less exclusions."""
        mine = tuple(sorted(teacher.datasets)) if teacher.datasets else self.datasets
        return tuple(d for d in mine if (teacher.teacher_id, d) not in self.excluded)

    def extractions(self) -> list[tuple[Teacher, str]]:
        return [(t, d) for t in self.teachers for d in self.teacher_datasets(t)]

    def fingerprint(self) -> str:
        body = {"teachers": sorted(t.fingerprint() for t in self.teachers), "primary": self.primary,
                "datasets": list(self.datasets)}
        if self.excluded:
            body["excluded"] = sorted(map(list, self.excluded))
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"teachers": [t.to_dict() for t in self.teachers], "primary": self.primary,
                "datasets": list(self.datasets), "excluded": [list(p) for p in self.excluded],
                "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, d: dict) -> "DistillPlan":
        return cls(teachers=tuple(Teacher.from_dict(t) for t in d["teachers"]), primary=d["primary"],
                   datasets=tuple(d["datasets"]), excluded=tuple(tuple(p) for p in d.get("excluded", ())))


def choose_primary(teachers: list[Teacher]) -> str:
    """The teacher marked primary (first by id if several), else the first ready teacher by id."""
    ready = sorted((t for t in teachers if t.ready), key=lambda t: t.teacher_id)
    assert ready, "a plan needs at least one ready teacher"
    marked = [t for t in ready if t.primary]
    return (marked or ready)[0].teacher_id
