"""Planning: from the replayed state and settings, the jobs the pipeline needs.

Pure: no Redis, no writes. Job ids are `<stage>-<hash12>` over the stage's inputs, so the
same inputs always give the same id and re-planning is idempotent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from nexus_core.broker.keys import Stage, StageStatus
from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.records.job import JobPayload
from nexus_core.records.plan import DistillPlan, primary_choice
from nexus_core.records.registry import Teacher
from nexus_core.records.state import State
from nexus_core.teachers.size import param_count


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    stage: str
    description: str
    teacher_id: str | None
    dataset: str | None
    plan: str | None
    depends_on: tuple[str, ...]
    payload: JobPayload = field(hash=False, compare=False)


def job_id(stage: str, inputs: dict) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    return f"{stage}-{digest}"


def extract_jobs(t: Teacher, dataset: str, pid: str, cfg: Settings, home: str) -> list[JobSpec]:
    """extract.ranges jobs for one (teacher, dataset): job r extracts block r of the dataset's shards."""
    R = cfg.extract.ranges
    out = []
    for r in range(R):
        inputs = {"teacher": t.fingerprint(), "dataset": dataset, "profile": pid, "settings": cfg.fingerprint("extract")}
        payload = JobPayload(Stage.EXTRACT, home, cfg, teacher=t, dataset=DatasetRef.parse(dataset), part=(r, R))
        words = f"extract {t.teacher_id} on {dataset}"
        if R > 1:
            inputs["range"] = [r, R]
            words += f" (part {r + 1}/{R})"
        out.append(JobSpec(job_id("extract", inputs), Stage.EXTRACT.value, words, t.teacher_id, dataset, None, (pid,),
                           payload))
    return out


def _selected(state: State, models: str) -> list[Teacher]:
    wanted = {m.strip() for m in models.split(",") if m.strip()}
    out = []
    for t in state.active_teachers():
        if t.ready and (not wanted or t.teacher_id in wanted):
            out.append(t)
    return out


def _failed(state: State, jid: str, since_seq: int | None) -> bool:
    """A job that failed after `since_seq` is not retried in this pass, and is planned around."""
    st = state.stages.get(jid)
    return (since_seq is not None and st is not None and st.status == StageStatus.FAILED
            and st.failed_seq is not None and st.failed_seq > since_seq)


def plan_jobs(state: State, cfg: Settings, datasets: list[str], home: str,
              failed_since_seq: int | None = None) -> tuple[list[JobSpec], DistillPlan | None]:
    """Jobs in dependency order: profile(t) -> extract(t, d) -> distill(plan) -> router(plan).

    Teachers whose profile, and (teacher, dataset) pairs whose extraction (any of its
    extract.ranges jobs), failed after `failed_since_seq` are left out of the distillation
    plan, so one bad teacher or dataset does not stop the others.
    """
    teachers = _selected(state, cfg.run.models)
    specs: list[JobSpec] = []
    healthy: list[tuple[Teacher, str, list[str]]] = []  # (teacher, dataset, its extract job ids)
    for t in teachers:
        t_datasets = sorted(t.datasets) if t.datasets else sorted(datasets)
        pid = job_id("profile", {"teacher": t.fingerprint(), "settings": cfg.fingerprint("profile", "memory"),
                                 "sli": t.sli or cfg.run.sli, "datasets": t_datasets})
        specs.append(JobSpec(pid, Stage.PROFILE.value, f"profile {t.teacher_id}", t.teacher_id, None, None, (),
                             JobPayload(Stage.PROFILE, home, cfg, teacher=t,
                                        datasets=tuple(DatasetRef.parse(d) for d in t_datasets))))
        if _failed(state, pid, failed_since_seq):
            continue
        for d in t_datasets:
            jobs = extract_jobs(t, d, pid, cfg, home)
            specs.extend(jobs)
            if not any(_failed(state, j.job_id, failed_since_seq) for j in jobs):
                healthy.append((t, d, [j.job_id for j in jobs]))
    plan_teachers = sorted({t.teacher_id: t for t, _, _ in healthy}.values(), key=lambda t: t.teacher_id)
    if not plan_teachers:
        return _without_failed(specs, state, failed_since_seq), None
    pairs = {(t.teacher_id, d) for t, d, _ in healthy}
    all_datasets = sorted({d for _, d in pairs})
    excluded = tuple(sorted((t.teacher_id, d) for t in plan_teachers
                            for d in (sorted(t.datasets) if t.datasets else all_datasets) if (t.teacher_id, d) not in pairs))
    covered = {t.teacher_id: {d for tid, d in pairs if tid == t.teacher_id} for t in plan_teachers}
    choice = primary_choice(plan_teachers, {t.teacher_id: param_count(t)[0] for t in plan_teachers}, covered)
    plan = DistillPlan(teachers=tuple(plan_teachers), primary=choice.teacher_id, datasets=tuple(all_datasets),
                       excluded=excluded, primary_reason=choice.reason)
    extract_ids = tuple(sorted(eid for _, _, eids in healthy for eid in eids))
    did = job_id("distill", {"plan": plan.fingerprint(), "extracts": extract_ids,
                             "settings": cfg.fingerprint("distill", "student")})
    names = ", ".join(t.teacher_id for t in plan.teachers)
    words = (f"distill {names} into the student on {len(plan.datasets)} dataset(s); "
             f"student seeded from {plan.primary}: {plan.primary_reason}")
    specs.append(JobSpec(did, Stage.DISTILL.value, words,
                         None, None, plan.fingerprint(), extract_ids,
                         JobPayload(Stage.DISTILL, home, cfg, plan=plan)))
    rid = job_id("router", {"distill": did, "settings": cfg.fingerprint("router")})
    specs.append(JobSpec(rid, Stage.ROUTER.value, f"router over {len(plan.datasets)} domain(s)", None, None,
                         plan.fingerprint(), (did,),
                         JobPayload(Stage.ROUTER, home, cfg, plan=plan)))
    return _without_failed(specs, state, failed_since_seq), plan


def _without_failed(specs: list[JobSpec], state: State, since_seq: int | None) -> list[JobSpec]:
    """Drop jobs that failed in this run, and everything downstream of them: no retry loops."""
    dropped: set[str] = set()
    out = []
    for spec in specs:
        if _failed(state, spec.job_id, since_seq) or any(d in dropped for d in spec.depends_on):
            dropped.add(spec.job_id)
            continue
        out.append(spec)
    return out
