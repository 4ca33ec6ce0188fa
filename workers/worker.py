"""The single GPU worker on queue `nexus`: jobs run in this process (no fork), one at a time.

No fork, so CUDA state and signals (USR1/USR2 to this pid) reach the running stage.
At start it recovers jobs left `started` by a worker that died (kill -9, power loss).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import Worker

from nexus_core.broker import keys
from nexus_core.errors import NexusError, RedisGoneError
from nexus_core.paths import Paths
from nexus_core.records.events import EventLog
from nexus_core.records.job import JobSerializer
from workers.admission import structural_refusal
from workers.context import Flags, install_process_handlers

log = structlog.get_logger("nexus.worker")


class NexusWorker(SimpleWorker):
    """SimpleWorker + a short-lived liveness key (kept fresh during long jobs by a thread)
    and orphan recovery in its maintenance, so that another worker adopts a dead one's job."""

    events: EventLog | None = None
    gpu_index: int | None = None  # the GPU this worker claimed, kept while it lives

    def _touch_alive(self) -> None:
        try:
            self.connection.set(keys.ALIVE_KEY.format(self.name), f"{socket.gethostname()}:{os.getpid()}",
                                ex=keys.ALIVE_TTL_S)
            if self.gpu_index is not None:
                self.connection.set(keys.GPU_CLAIM_KEY.format(self.gpu_index), self.name, ex=keys.ALIVE_TTL_S)
        except Exception:
            pass

    lost_redis_is_fatal = False  # burst workers (`nexus run`) stop when Redis is gone; others wait for it

    def heartbeat(self, *args, **kwargs):
        self._touch_alive()
        try:
            return super().heartbeat(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if self.lost_redis_is_fatal:  # RQ would retry forever; the run that owns this Redis stops instead
                raise RedisGoneError(f"Redis went away ({str(exc).splitlines()[0][:120]})") from None
            raise

    def execute_job(self, job, queue):
        reason = structural_refusal(job)  # before RQ resolves anything the job names
        if reason is not None:
            self._refuse(job, queue, reason)
            return
        stop = threading.Event()

        def beat():
            while not stop.wait(keys.ALIVE_TTL_S / 3):
                self._touch_alive()

        self._touch_alive()
        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            super().execute_job(job, queue)
        finally:
            stop.set()
        if Flags.stop_after_job:
            self._stop_requested = True

    def _refuse(self, job, queue, reason: str) -> None:
        """Fail a job that is not ours without running any of it: no function, callback or webhook."""
        with self.connection.pipeline() as p:
            p.lrem(queue.intermediate_queue_key, 1, job.id)
            job.set_status(JobStatus.FAILED, pipeline=p)
            queue.failed_job_registry.add(job, ttl=keys.FAILED_TTL_S, exc_string=f"refused by Nexus: {reason}",
                                          pipeline=p)
            p.execute()
        if self.events is not None:
            self.events.append("JobRefused", job_id=job.id, data={"reason": reason})
        log.error("job refused; nothing of it ran", job_id=job.id, reason=reason)

    def run_maintenance_tasks(self):
        super().run_maintenance_tasks()
        if self.events is not None:
            recover_orphans(self.connection, self.events, me=self.name)

    def teardown(self):
        try:
            self.connection.delete(keys.ALIVE_KEY.format(self.name))
            if self.gpu_index is not None:
                self.connection.delete(keys.GPU_CLAIM_KEY.format(self.gpu_index))
        except Exception:
            pass
        super().teardown()


class _QuietWhenRedisIsGone(logging.Filter):
    """Drop RQ's multi-page traceback for a lost Redis: the run reports it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (redis.ConnectionError, redis.TimeoutError, RedisGoneError))


logging.getLogger("rq.worker").addFilter(_QuietWhenRedisIsGone())


def _alive(conn, worker_name: str | None) -> bool:
    """Its liveness key is fresh and, when it ran on this host, its process still exists
    (a kill -9 here is seen at once; on another machine, after ALIVE_TTL_S)."""
    if not worker_name:
        return False
    raw = conn.get(keys.ALIVE_KEY.format(worker_name))
    if raw is None:
        return False
    host, _, pid = raw.decode(errors="replace").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def any_live_worker(conn) -> bool:
    return any(_alive(conn, w.name) for w in Worker.all(connection=conn))


def recover_orphans(conn, events: EventLog, me: str | None = None) -> list[str]:
    """Re-enqueue jobs left `started` by a dead worker; their stages resume from partial outputs."""
    queue = Queue(keys.QUEUE, connection=conn, serializer=JobSerializer)
    registry = StartedJobRegistry(queue=queue)
    recovered = []
    for job_id in registry.get_job_ids(cleanup=False):
        try:
            job = Job.fetch(job_id, connection=conn, serializer=JobSerializer)
        except NoSuchJobError:
            continue
        if job.worker_name == me or _alive(conn, job.worker_name):
            continue
        registry.remove_executions(job)
        job.set_status(JobStatus.QUEUED)
        queue.push_job_id(job.id, at_front=True)
        meta = job.meta or {}
        events.append("StageQueued", teacher_id=meta.get("teacher_id"), stage=meta.get("stage"), job_id=job.id,
                      data={"description": job.description, "reason": f"orphaned: worker {job.worker_name} died; resuming"})
        recovered.append(job.id)
        log.warning("recovered orphaned job", job_id=job.id, dead_worker=job.worker_name)
    # registrations of dead workers would keep showing in `rq info`
    for w in Worker.all(connection=conn):
        if w.name != me and not _alive(conn, w.name):
            try:
                w.register_death()
            except Exception:
                pass
    return recovered


def claim_gpu(conn, worker_name: str, gpu_count: int) -> int | None:
    """The first GPU no live worker holds; claims expire with the worker's liveness, so a
    dead worker's GPU is free again after the dead-worker timeout."""
    for i in range(gpu_count):
        if conn.set(keys.GPU_CLAIM_KEY.format(i), worker_name, nx=True, ex=keys.ALIVE_TTL_S):
            return i
    return None


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def run_worker(conn, events: EventLog, paths: Paths, burst: bool = False, name: str | None = None,
               device: str | None = None) -> bool:
    """Work the queue for the workdir `paths`; returns True when any job ran. Stops after a USR1/TERM-paused job.

    `device` (e.g. cuda:1) overrides the device in every job's settings: one worker per GPU.
    """
    queue = Queue(keys.QUEUE, connection=conn, serializer=JobSerializer)
    worker = NexusWorker([queue], connection=conn, name=name, worker_ttl=keys.ALIVE_TTL_S,
                         maintenance_interval=keys.ALIVE_TTL_S, serializer=JobSerializer)
    worker.events = events
    worker.lost_redis_is_fatal = burst
    if device is None and _visible_gpus() > 1:
        # several GPUs and no --device: take a free one (`docker compose up --scale worker=N`)
        worker.gpu_index = claim_gpu(conn, worker.name, _visible_gpus())
        if worker.gpu_index is None:
            raise NexusError(f"every one of the {_visible_gpus()} GPUs is held by a live worker; "
                             "stop one, or start this worker with --device cpu")
        device = f"cuda:{worker.gpu_index}"
        log.info("worker claimed a GPU", device=device)
    Flags.device, Flags.home = device, paths.home
    _preload_stages()
    recover_orphans(conn, events, me=worker.name)
    install_process_handlers()
    Flags.stop_after_job = Flags.usr1  # a USR1 between jobs still pauses the next one
    return worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)


def _preload_stages() -> None:
    """Import the stages (torch, transformers: seconds) before taking a job, so the first job a fresh
    worker takes starts as fast as the later ones and a second worker joins a running queue at once."""
    import nexus_core.stages.distill  # noqa: F401
    import nexus_core.stages.extract  # noqa: F401
    import nexus_core.stages.profile  # noqa: F401
    import nexus_core.stages.router  # noqa: F401
