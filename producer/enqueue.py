"""Putting planned jobs on queue `nexus`, idempotently.

A job whose completion is on record with intact artefacts is not enqueued; an id that is
queued, deferred, running or finished in Redis is a no-op (RQ's `unique=` does not
combine with `depends_on`, hence the explicit check); a failed, stopped or cancelled one
is recreated, and so is every dependent of a recreated job so that no dependent waits on
a dependency RQ no longer knows.
"""

from __future__ import annotations

from pathlib import Path

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from nexus_core.broker import keys
from nexus_core.broker.keys import StageStatus
from nexus_core.records.events import EventLog
from nexus_core.records.job import JOB_FUNC, JobSerializer
from nexus_core.records.state import State, artifacts_intact, replay
from producer.planner import JobSpec

LIVE = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.FINISHED,
        JobStatus.CREATED, JobStatus.READY_TO_ENQUEUE}


def queue_for(conn) -> Queue:
    return Queue(keys.QUEUE, connection=conn, serializer=JobSerializer)


def _fetch(job_id: str, conn) -> Job | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer=JobSerializer)
    except NoSuchJobError:
        return None


def done_on_record(state: State, job_id: str, home: Path, _cache: dict | None = None) -> bool:
    st = state.stages.get(job_id)
    if st is None or st.status != StageStatus.DONE:
        return False
    if _cache is not None and job_id in _cache:
        return _cache[job_id]
    ok = artifacts_intact(st, home)
    if _cache is not None:
        _cache[job_id] = ok
    return ok


def enqueue_specs(specs: list[JobSpec], conn, log: EventLog, state: State, home: Path,
                  job_timeout: int, reason: str = "planned") -> list[str]:
    """Enqueue what is neither done nor live; return the ids newly (re)created."""
    queue = queue_for(conn)
    created: list[str] = []
    intact: dict = {}
    fresh: State | None = None
    for spec in specs:
        if done_on_record(state, spec.job_id, home, intact):
            continue
        job = _fetch(spec.job_id, conn)
        dep_recreated = any(d in created for d in spec.depends_on)
        if job is not None:
            status = job.get_status()
            if status == JobStatus.STARTED:
                continue  # a live worker owns it; orphans are recovered at worker start
            if status == JobStatus.FINISHED and fresh is None:
                # the state may predate this job's completion: look at the log once more
                fresh = replay(log.read())
            if status == JobStatus.FINISHED and done_on_record(fresh, spec.job_id, home):
                continue
            if status in LIVE and status != JobStatus.FINISHED and not dep_recreated:
                continue
            job.delete(remove_from_queue=True)
        pending_deps = [d for d in spec.depends_on if not done_on_record(state, d, home, intact)
                        and _fetch(d, conn) is not None]
        queue.enqueue_call(
            func=JOB_FUNC, args=(spec.payload.to_dict(),), job_id=spec.job_id, description=spec.description,
            depends_on=pending_deps or None, timeout=job_timeout, result_ttl=-1, failure_ttl=keys.FAILED_TTL_S,
            meta={"stage": spec.stage, "teacher_id": spec.teacher_id, "dataset": spec.dataset, "plan": spec.plan},
        )
        log.append("StageQueued", teacher_id=spec.teacher_id, stage=spec.stage, job_id=spec.job_id,
                   data={"description": spec.description, "dataset": spec.dataset, "plan": spec.plan,
                         "depends_on": list(spec.depends_on), "reason": reason, "spec": spec.payload.to_dict()})
        created.append(spec.job_id)
    return created
