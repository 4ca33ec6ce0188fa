"""The RQ job: run one stage function and record what happened. Only wiring lives here."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import structlog
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from nexus_core.atomic import artifact_record
from nexus_core.config import Settings, load_settings
from nexus_core.data import DatasetRef
from nexus_core.errors import NexusError, StageInterrupted
from nexus_core.events import EventLog, read_events
from nexus_core.paths import Paths
from nexus_core.plan import DistillPlan
from nexus_core.registry import Teacher
from nexus_core.state import files_intact, replay
from workers.context import Flags, WorkerContext, signal_handlers

log = structlog.get_logger("nexus.worker")


def _settings(payload: dict) -> Settings:
    cfg = load_settings(Path(payload["home"]), environ={}, **payload["settings"])
    if Flags.device:
        cfg.run.device = Flags.device
    return cfg


def _call_stage(stage: str, cfg: Settings, payload: dict, paths: Paths, ctx: WorkerContext):
    if stage == "profile":
        from nexus_core.stages.profile import run_profile

        datasets = [DatasetRef.parse(d) for d in payload["datasets"]]
        return run_profile(cfg, Teacher.from_dict(payload["teacher"]), paths, datasets, ctx)
    if stage == "extract":
        from nexus_core.stages.extract import run_extract

        part = tuple(payload.get("range", (0, 1)))  # (r, R): block r of R of the dataset's shards
        return run_extract(cfg, Teacher.from_dict(payload["teacher"]), DatasetRef.parse(payload["dataset"]), paths, ctx,
                           part)
    if stage == "distill":
        from nexus_core.stages.distill import run_distill

        return run_distill(cfg, DistillPlan.from_dict(payload["plan"]), paths, ctx)
    if stage == "router":
        from nexus_core.stages.router import run_router

        return run_router(cfg, DistillPlan.from_dict(payload["plan"]), paths, ctx)
    raise NexusError(f"unknown stage {stage!r}")


def _dependents(job: Job, conn) -> list[Job]:
    """Every job waiting (directly or not) on `job`."""
    out, todo, seen = [], list(job.dependent_ids), set()
    while todo:
        jid = todo.pop(0)
        if jid in seen:
            continue
        seen.add(jid)
        try:
            dep = Job.fetch(jid, connection=conn)
        except NoSuchJobError:
            continue
        out.append(dep)
        todo.extend(dep.dependent_ids)
    return out


def fail_dependents(job: Job, conn, events: EventLog, cause: str, bad_input: bool = False) -> None:
    """A failed stage fails its dependents visibly: StageFailed with the cause, and cancelled in RQ.

    They inherit `bad_input`, so a bad teacher's dependents keep `nexus run`'s exit code at 2."""
    for dep in _dependents(job, conn):
        meta = dep.meta or {}
        events.append("StageFailed", teacher_id=meta.get("teacher_id"), stage=meta.get("stage"), job_id=dep.id,
                      data={"error": f"dependency {job.id} failed: {cause}", "cause": job.id, "bad_input": bad_input})
        try:
            dep.cancel()
        except Exception:
            pass


def run_stage(payload: dict) -> dict:
    job = get_current_job()
    conn = job.connection
    stage, job_id = payload["stage"], job.id
    paths = Paths(Path(payload["home"]))
    events = EventLog(paths.log, redis=conn)
    teacher_id = (payload.get("teacher") or {}).get("teacher_id")
    # every log line of the stage (its own modules' too) carries the job's identity
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job_id, stage=stage, teacher=teacher_id, dataset=payload.get("dataset"))
    bound = log

    # 1. completed before with intact artefacts (the queue was rebuilt, or its worker died
    #    between recording the completion and telling RQ): record the skip, redo nothing
    record = replay(read_events(paths.log)).stages.get(job_id)
    if record is not None and files_intact(record.artifacts, paths.home):
        events.append("StageSkipped", teacher_id=teacher_id, stage=stage, job_id=job_id,
                      data={"reason": "completed earlier with intact artefacts"})
        return {"skipped": True}

    ctx = WorkerContext(events, conn, job_id, stage, teacher_id)
    t0 = time.monotonic()
    bound.info("stage started")
    try:
        with signal_handlers():
            cfg = _settings(payload)
            result = _call_stage(stage, cfg, payload, paths, ctx)
    except StageInterrupted as exc:
        ctx.started()
        events.append("StagePaused", teacher_id=teacher_id, stage=stage, job_id=job_id,
                      data={"reason": exc.reason, "seconds": round(time.monotonic() - t0, 3)})
        Flags.stop_after_job = True
        bound.info("stage paused; a rerun resumes it", reason=exc.reason)
        raise
    except KeyboardInterrupt:
        ctx.started()
        events.append("StagePaused", teacher_id=teacher_id, stage=stage, job_id=job_id,
                      data={"reason": "interrupted", "seconds": round(time.monotonic() - t0, 3)})
        Flags.stop_after_job = True
        raise
    except Exception as exc:
        ctx.started()
        message = str(exc) if isinstance(exc, NexusError) else f"{type(exc).__name__}: {exc}"
        events.append("StageFailed", teacher_id=teacher_id, stage=stage, job_id=job_id,
                      data={"error": message.splitlines()[0][:500] if message else type(exc).__name__,
                            "kind": type(exc).__name__, "bad_input": getattr(exc, "exit_code", 1) == 2,
                            "traceback": traceback.format_exc(limit=6)[-2000:]})
        fail_dependents(job, conn, events, message.splitlines()[0][:200] if message else type(exc).__name__,
                        bad_input=getattr(exc, "exit_code", 1) == 2)
        bound.error("stage failed", error=message[:300])
        raise
    finally:
        Flags.clear_handled()
        structlog.contextvars.clear_contextvars()
    ctx.started()
    artifacts = [artifact_record(p, paths.home) for p in result.artifacts]
    events.append("StageCompleted", teacher_id=teacher_id, stage=stage, job_id=job_id,
                  data={"artifacts": artifacts, "seconds": round(time.monotonic() - t0, 3), **result.data})
    log.info("stage completed", job_id=job_id, stage=stage, teacher=teacher_id, seconds=round(time.monotonic() - t0, 2))
    return {"artifacts": len(artifacts)}
