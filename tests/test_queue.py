"""Planning and enqueueing against a real Redis: stable ids, idempotent drops, debounce."""

from __future__ import annotations

import json
import threading

from rq import Queue
from rq.job import Job, JobStatus

from nexus_core.config import load_settings
from nexus_core.records.events import EventLog, read_events, replay
from nexus_core.records.job import JobSerializer
from producer.planner import plan_jobs
from producer.sync import sync_once
from producer.watch import watch
from tests.helpers import wait_until, write_dataset


def _drop(paths, name, body):
    (paths.registry / name).write_text(json.dumps(body))


def _types(paths):
    return [e.type for e in read_events(paths.log)]


def test_job_ids_are_stable_and_follow_the_inputs(workdir, fake_model):
    write_dataset(workdir, "reasoning/x", [{"text": "1+1=2"}])
    _drop(workdir, "a.json", {"teacher_id": "a", "path": str(fake_model), "status": "ready"})
    log = EventLog(workdir.log)
    from producer.scan import scan_registry
    scan_registry(workdir, log, replay(log.read()))
    cfg = load_settings(workdir.home, environ={})
    ids1 = [s.job_id for s in plan_jobs(replay(log.read()), cfg, ["reasoning/x"], str(workdir.home))[0]]
    ids2 = [s.job_id for s in plan_jobs(replay(log.read()), cfg, ["reasoning/x"], str(workdir.home))[0]]
    assert ids1 == ids2
    assert [i.split("-")[0] for i in ids1] == ["profile", "extract", "distill", "router"]
    assert all(len(i.split("-")[1]) == 12 for i in ids1)
    cfg2 = load_settings(workdir.home, environ={"NEXUS_EXTRACT_TOP_K": "4"})
    ids3 = [s.job_id for s in plan_jobs(replay(log.read()), cfg2, ["reasoning/x"], str(workdir.home))[0]]
    assert ids3[0] == ids1[0] and ids3[1] != ids1[1]  # extract settings change extract and below only


def test_dropping_the_same_file_twice_enqueues_nothing_new(workdir, fake_model, redis_conn):
    write_dataset(workdir, "reasoning/x", [{"text": "1+1=2"}])
    cfg = load_settings(workdir.home, environ={})
    log = EventLog(workdir.log, redis=redis_conn)
    body = {"teacher_id": "a", "path": str(fake_model), "status": "ready"}
    _drop(workdir, "a.json", body)
    first = sync_once(workdir, cfg, redis_conn, log)
    assert len(first.created) == 4
    _drop(workdir, "a.json", body)  # same content again
    second = sync_once(workdir, cfg, redis_conn, log)
    assert second.created == [] and second.scan.events == []
    q = Queue("nexus", connection=redis_conn, serializer=JobSerializer)
    assert q.count == 1  # profile is queued, the rest wait on it
    statuses = [Job.fetch(j, connection=redis_conn, serializer=JobSerializer).get_status() for j in first.created]
    assert statuses == [JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.DEFERRED, JobStatus.DEFERRED]
    job = Job.fetch(first.created[1], connection=redis_conn, serializer=JobSerializer)
    assert job.timeout == cfg.run.job_timeout_s and job.description.startswith("extract a on reasoning/x")
    assert _types(workdir).count("StageQueued") == 4


def test_a_failed_job_is_recreated_with_its_dependents(workdir, fake_model, redis_conn):
    write_dataset(workdir, "reasoning/x", [{"text": "1+1=2"}])
    cfg = load_settings(workdir.home, environ={})
    log = EventLog(workdir.log, redis=redis_conn)
    _drop(workdir, "a.json", {"teacher_id": "a", "path": str(fake_model), "status": "ready"})
    first = sync_once(workdir, cfg, redis_conn, log)
    Job.fetch(first.created[0], connection=redis_conn, serializer=JobSerializer).delete()  # as if lost with a Redis flush
    again = sync_once(workdir, cfg, redis_conn, log)
    assert again.created == first.created  # the dependents are rebuilt too, none left dangling


def test_a_two_part_write_produces_one_teacher_added(workdir, fake_model, redis_conn):
    cfg = load_settings(workdir.home, environ={})
    log = EventLog(workdir.log, redis=redis_conn)
    stop = threading.Event()
    passes = []
    t = threading.Thread(target=watch, args=(workdir, cfg, redis_conn, log, stop), kwargs={"on_sync": passes.append},
                         daemon=True)
    t.start()
    wait_until(lambda: passes, what="the producer's first pass")
    text = json.dumps({"teacher_id": "slow", "path": str(fake_model), "status": "ready"})
    f = workdir.registry / "slow.json"
    with open(f, "w") as fh:
        fh.write(text[:20])
        fh.flush()
        wait_until(lambda: any(f in p.scan.pending for p in passes), what="a pass that sees the half-written file")
        fh.write(text[20:])
    wait_until(lambda: any(p.scan.events for p in passes), what="the pass that records the teacher")
    settled = len(passes)  # one more pass, provoked by another file in the folder, finds nothing new to record
    (workdir.registry / "notes.txt").write_text("not a teacher")
    wait_until(lambda: passes[settled:], what="a pass after the teacher was added")
    assert not passes[-1].scan.pending and not passes[-1].scan.events
    stop.set()
    t.join(timeout=5)
    types = _types(workdir)
    assert types.count("TeacherAdded") == 1 and "TeacherRejected" not in types


def test_watch_rescans_at_start(workdir, fake_model, redis_conn):
    """Drops made while the producer was down are picked up by its first pass."""
    _drop(workdir, "early.json", {"teacher_id": "early", "path": str(fake_model), "status": "ready"})
    cfg = load_settings(workdir.home, environ={})
    stop = threading.Event()
    seen = []
    t = threading.Thread(target=watch, args=(workdir, cfg, redis_conn, EventLog(workdir.log), stop),
                         kwargs={"on_sync": seen.append}, daemon=True)
    t.start()
    wait_until(lambda: seen, what="the producer's first pass")
    stop.set()
    t.join(timeout=5)
    assert "TeacherAdded" in _types(workdir)
