"""The RQ job: run one stage function and record what happened. Only wiring lives here."""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager

import structlog
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from nexus_core.broker.keys import Stage
from nexus_core.errors import NexusError, StageInterrupted
from nexus_core.paths import Paths
from nexus_core.records.events import EventLog, load_state
from nexus_core.records.job import JobPayload, JobRefusedError, JobSerializer
from nexus_core.records.state import files_intact
from nexus_core.storage.atomic import artifact_record
from workers.admission import verify_payload
from workers.context import Flags, WorkerContext, signal_handlers

log = structlog.get_logger("nexus.worker")


def _call_stage(payload: JobPayload, paths: Paths, ctx: WorkerContext):
    cfg = payload.settings
    if Flags.device:
        cfg.run.device = Flags.device
    if payload.stage == Stage.PROFILE:
        from nexus_core.stages.profile import run_profile

        return run_profile(cfg, payload.teacher, paths, list(payload.datasets), ctx)
    if payload.stage == Stage.EXTRACT:
        from nexus_core.stages.extract import run_extract

        return run_extract(cfg, payload.teacher, payload.dataset, paths, ctx, payload.part)
    if payload.stage == Stage.DISTILL:
        from nexus_core.stages.distill import run_distill

        return run_distill(cfg, payload.plan, paths, ctx)
    from nexus_core.stages.router import run_router

    return run_router(cfg, payload.plan, paths, ctx)


def _dependents(job: Job, conn) -> list[Job]:
    """Every job waiting (directly or not) on `job`."""
    out, todo, seen = [], list(job.dependent_ids), set()
    while todo:
        jid = todo.pop(0)
        if jid in seen:
            continue
        seen.add(jid)
        try:
            dep = Job.fetch(jid, connection=conn, serializer=JobSerializer)
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


def run_stage(raw: dict) -> dict:
    """JOB_FUNC: one stage job, from its payload to StageCompleted (or StageFailed/StagePaused/JobRefused)."""
    job = get_current_job()
    conn, job_id = job.connection, job.id
    paths = Paths(Flags.home) if Flags.home else Paths.from_env()  # this worker's workdir, not the payload's say-so
    events = EventLog(paths.log, redis=conn)
    state = load_state(paths)

    # 1. the payload is data this worker may act on: it decodes, names this workdir, and its teachers are on record
    try:
        payload = verify_payload(raw, state, paths.home)
    except JobRefusedError as exc:
        events.append("JobRefused", job_id=job_id, data={"reason": str(exc)})
        fail_dependents(job, conn, events, f"refused: {exc}")
        log.error("job refused; nothing of it ran", job_id=job_id, reason=str(exc))
        raise
    stage, teacher_id = payload.stage.value, payload.teacher_id

    # 2. completed before with intact artefacts (the queue was rebuilt, or its worker died
    #    between recording the completion and telling RQ): record the skip, redo nothing
    record = state.stages.get(job_id)
    if record is not None and files_intact(record.artifacts, paths.home):
        events.append("StageSkipped", teacher_id=teacher_id, stage=stage, job_id=job_id,
                      data={"reason": "completed earlier with intact artefacts"})
        return {"skipped": True}

    # 3. the stage itself; whatever happens to it becomes an event
    ctx = WorkerContext(events, conn, job_id, stage, teacher_id)
    t0 = time.monotonic()
    with _outcome_recorded(job, payload, ctx):
        result = _call_stage(payload, paths, ctx)
    ctx.started()
    artifacts = [artifact_record(p, paths.home) for p in result.artifacts]
    events.append("StageCompleted", teacher_id=teacher_id, stage=stage, job_id=job_id,
                  data={"artifacts": artifacts, "seconds": round(time.monotonic() - t0, 3), **result.data})
    log.info("stage completed", job_id=job_id, stage=stage, teacher=teacher_id, seconds=round(time.monotonic() - t0, 2))
    return {"artifacts": len(artifacts)}


@contextmanager
def _outcome_recorded(job: Job, payload: JobPayload, ctx: WorkerContext):
    """Run the stage under the job-time signal handlers, with every log line carrying the job's identity;
    a pause (signal, Ctrl+C) becomes StagePaused, an error StageFailed (its dependents fail visibly too)."""
    events, stage, teacher_id = ctx.log, payload.stage.value, payload.teacher_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job.id, stage=stage, teacher=teacher_id,
                                           dataset=payload.dataset.key if payload.dataset else None)
    t0 = time.monotonic()
    log.info("stage started")

    def paused(reason: str) -> None:
        ctx.started()
        events.append("StagePaused", teacher_id=teacher_id, stage=stage, job_id=job.id,
                      data={"reason": reason, "seconds": round(time.monotonic() - t0, 3)})
        Flags.stop_after_job = True

    try:
        with signal_handlers():
            yield
    except StageInterrupted as exc:
        paused(exc.reason)
        log.info("stage paused; a rerun resumes it", reason=exc.reason)
        raise
    except KeyboardInterrupt:
        paused("interrupted")
        raise
    except Exception as exc:
        ctx.started()
        message = str(exc) if isinstance(exc, NexusError) else f"{type(exc).__name__}: {exc}"
        first_line, bad_input = message.splitlines()[0] if message else type(exc).__name__, getattr(exc, "exit_code", 1) == 2
        events.append("StageFailed", teacher_id=teacher_id, stage=stage, job_id=job.id,
                      data={"error": first_line[:500], "kind": type(exc).__name__, "bad_input": bad_input,
                            "traceback": traceback.format_exc(limit=6)[-2000:]})
        fail_dependents(job, job.connection, events, first_line[:200], bad_input=bad_input)
        log.error("stage failed", error=message[:300])
        raise
    finally:
        Flags.clear_handled()
        structlog.contextvars.clear_contextvars()
