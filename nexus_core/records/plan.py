"""The distillation plan: which teachers' shards on which datasets feed the student.

A plan is data, derived from the replayed state; its fingerprint names the distill and
router jobs, so a teacher added mid-run gives a new plan (and a warm-started distill).

The primary teacher (its tokenizer and layers seed the student) is a decision with a reason, never
an accident of sorting: the teacher marked `"primary": true`, else the smallest ready teacher by
parameter count among those that cover every dataset of the plan, ties by id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from nexus_core.records.registry import Teacher


@dataclass(frozen=True)
class DistillPlan:
    teachers: tuple[Teacher, ...]  # ready teachers in the plan, sorted by id
    primary: str  # the teacher whose tokenizer (and pruned layers) the student inherits
    datasets: tuple[str, ...]  # "category/name" keys, sorted
    # (teacher_id, dataset) pairs left out, e.g. because their extraction failed; the
    # teachers themselves stay as registered so that their fingerprints match the shards
    excluded: tuple[tuple[str, str], ...] = ()
    # why `primary` seeds the student (primary_choice); words about the inputs, not an input of the plan:
    # left out of the fingerprint and of equality
    primary_reason: str = field(default="", compare=False)

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
                "primary_reason": self.primary_reason, "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, d: dict) -> "DistillPlan":
        return cls(teachers=tuple(Teacher.from_dict(t) for t in d["teachers"]), primary=d["primary"],
                   datasets=tuple(d["datasets"]), excluded=tuple(tuple(p) for p in d.get("excluded", ())),
                   primary_reason=d.get("primary_reason", ""))


@dataclass(frozen=True)
class PrimaryChoice:
    teacher_id: str
    reason: str  # one line for logs, events and the report


def primary_choice(teachers: list[Teacher], params: dict[str, int | None] | None = None,
                   covered: dict[str, set[str]] | None = None) -> PrimaryChoice:
    """Which ready teacher seeds the student, and why.

    1. The teacher marked `"primary": true` (the first by id if several are).
    2. Else the smallest by `params` (teacher id -> parameter count, None when unknown): a student
       pruned from a small teacher starts close to its size, and a large one would be cut deeply.
       Only teachers whose shards cover every dataset of the plan are candidates when any does
       (`covered`: teacher id -> datasets), since the student trains on the primary's rows.
    3. Else (no count known) the first by id, said so.
    """
    ready = sorted((t for t in teachers if t.ready), key=lambda t: t.teacher_id)
    assert ready, "a plan needs at least one ready teacher"
    marked = [t for t in ready if t.primary]
    if marked:
        extra = f" (first by id of {len(marked)} marked: {', '.join(t.teacher_id for t in marked)})" if len(marked) > 1 else ""
        return PrimaryChoice(marked[0].teacher_id, f"marked primary{extra}")
    params = params or {}
    candidates, scope = ready, f"{len(ready)} ready teacher{'s' if len(ready) > 1 else ''}"
    if covered:
        wanted = set().union(*covered.values())
        full = [t for t in ready if covered.get(t.teacher_id, set()) >= wanted]
        if full and len(full) < len(ready):
            candidates, scope = full, f"{len(full)} of {len(ready)} ready teachers covering every dataset"
    known = [t for t in candidates if params.get(t.teacher_id)]
    if not known:
        return PrimaryChoice(candidates[0].teacher_id, f"first by id of {scope}: no parameter count known")
    best = min(known, key=lambda t: (params[t.teacher_id], t.teacher_id))
    others = "; ".join(f"{t.teacher_id} {_count(params.get(t.teacher_id))}" for t in candidates if t is not best)
    return PrimaryChoice(best.teacher_id, f"smallest of {scope}: {_count(params[best.teacher_id])} params"
                                          + (f" ({others})" if others else ""))


def _count(n: int | None) -> str:
    if not n:
        return "size unknown"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
