"""The single GPU worker on queue `nexus`: jobs run in this process (no fork), one at a time.

No fork, so CUDA state and signals (USR1/USR2 to this pid) reach the running stage.
At start it recovers jobs left `started` by a worker that died (kill -9, power loss).
"""

from __future__ import annotations

import os
import socket

import structlog
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import Worker

from nexus_core import keys
from nexus_core.events import EventLog
from workers.context import Flags, install_process_handlers

log = structlog.get_logger("nexus.worker")


class NexusWorker(SimpleWorker):
    def execute_job(self, job, queue):
        super().execute_job(job, queue)
        if Flags.stop_after_job:
            self._stop_requested = True


def _live_workers(conn, me: str | None = None) -> list:
    out = []
    for w in Worker.all(connection=conn):
        if w.name == me:
            continue
        # a worker key outlives a kill -9 until its TTL; on this host, check its pid too
        if w.hostname == socket.gethostname() and w.pid:
            try:
                os.kill(w.pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
        out.append(w)
    return out


def recover_orphans(conn, events: EventLog, me: str | None = None) -> list[str]:
    """Re-enqueue jobs left `started` by a dead worker; their stages resume from partial outputs."""
    queue = Queue(keys.QUEUE, connection=conn)
    registry = StartedJobRegistry(queue=queue)
    busy = {w.get_current_job_id() for w in _live_workers(conn, me)}
    recovered = []
    for job_id in registry.get_job_ids(cleanup=False):
        if job_id in busy:
            continue
        try:
            job = Job.fetch(job_id, connection=conn)
        except NoSuchJobError:
            continue
        registry.remove_executions(job)
        job.set_status(JobStatus.QUEUED)
        queue.push_job_id(job.id, at_front=True)
        meta = job.meta or {}
        events.append("StageQueued", teacher_id=meta.get("teacher_id"), stage=meta.get("stage"), job_id=job.id,
                      data={"description": job.description, "reason": "orphaned: its worker died; resuming"})
        recovered.append(job.id)
        log.warning("recovered orphaned job", job_id=job.id)
    # dead workers' registrations would keep showing in `rq info`
    for w in Worker.all(connection=conn):
        if w.name != me and w not in _live_workers(conn, me):
            try:
                w.register_death()
            except Exception:
                pass
    return recovered


def run_worker(conn, events: EventLog, burst: bool = False, name: str | None = None) -> bool:
    """Work the queue; returns True when any job ran. Stops after a USR1/TERM-paused job."""
    queue = Queue(keys.QUEUE, connection=conn)
    worker = NexusWorker([queue], connection=conn, name=name)
    recover_orphans(conn, events, me=worker.name)
    install_process_handlers()
    Flags.stop_after_job = Flags.usr1  # a USR1 between jobs still pauses the next one
    return worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
