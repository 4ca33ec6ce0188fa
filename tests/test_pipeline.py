"""End to end on CPU with a tiny teacher through the real CLI: complete, skip, resume."""

from __future__ import annotations

import json

from nexus_core.records.events import read_events
from tests.helpers import (
    ARITH,
    artefact_bytes,
    bad_model_folders,
    kill_tree,
    nexus,
    of_type,
    register,
    spawn,
    wait_for,
    wait_until,
    write_dataset,
)

STAGES = ("profile", "extract", "distill", "router")


def _check_complete(paths):
    events = read_events(paths.log)
    done = {s: len(of_type(events, "StageCompleted", s)) for s in STAGES}
    assert done == {"profile": 1, "extract": 2, "distill": 1, "router": 1}, done
    assert (paths.profiles / "tiny.json").exists()
    for ds in ("reasoning__arith", "code__snippets"):
        manifest = json.loads((paths.memory / "tiny" / ds / "manifest.json").read_text())
        assert manifest["complete"] and manifest["shards"]
    assert (paths.checkpoints / "checkpoint_latest.pt").exists()
    assert (paths.release / "config.json").exists() and any(paths.release.glob("*.safetensors"))
    assert (paths.router_dir / "router.json").exists() and (paths.router_dir / "router.safetensors").exists()
    for e in of_type(events, "StageCompleted"):
        assert e.data["artifacts"] and all(len(a["sha256"]) == 64 for a in e.data["artifacts"])
    return events


def test_run_completes_then_a_rerun_starts_no_stage(demo_workdir, redis_conn, redis_url):
    paths = demo_workdir
    first = nexus(paths, "run", redis_url=redis_url)
    assert first.returncode == 0, first.stderr[-3000:]
    events = _check_complete(paths)
    started = len(of_type(events, "StageStarted"))
    second = nexus(paths, "run", redis_url=redis_url)
    assert second.returncode == 0, second.stderr[-3000:]
    after = read_events(paths.log)
    assert len(of_type(after, "StageStarted")) == started  # nothing ran again
    assert not of_type(after, "StageQueued")[len(of_type(events, "StageQueued")):]
    status = nexus(paths, "status", "--json")
    assert status.returncode == 0
    assert {s["status"] for s in json.loads(status.stdout)["stages"]} == {"done"}
    route = nexus(paths, "route", "What is 12 + 30?", "--json")
    assert route.returncode == 0, route.stderr
    assert json.loads(route.stdout)["intent"] == "reasoning/arith"


def test_kill_9_mid_distill_then_rerun_resumes_only_what_is_left(demo_workdir, redis_conn, redis_url):
    paths = demo_workdir
    env = {"NEXUS_DISTILL_MAX_STEPS": "40", "NEXUS_DISTILL_CHECKPOINT_EVERY": "2"}
    proc = spawn(paths, "run", redis_url=redis_url, env_extra=env)
    wait_for(paths, lambda ev: [e for e in of_type(ev, "CheckpointSaved") if e.stage == "distill"
                                and e.data["step"] >= 4], proc=proc)
    kill_tree(proc)  # kill -9: no chance to clean up
    shards_before = artefact_bytes(paths, "memory/tiny/*/shard-*.safetensors")
    before = read_events(paths.log)
    rerun = nexus(paths, "run", redis_url=redis_url, env_extra=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = read_events(paths.log)[len(before):]
    started = of_type(after, "StageStarted")
    assert [e.stage for e in started] == ["distill", "router"]  # profile and extract are not redone
    assert started[0].data["resume_step"] >= 4
    assert artefact_bytes(paths, "memory/tiny/*/shard-*.safetensors") == shards_before
    _check_complete(paths)


def test_embedded_redis_path_runs_the_pipeline(demo_workdir, monkeypatch):
    """No REDIS_URL: `nexus run` starts and stops its own Redis under .nexus/redis/."""
    paths = demo_workdir
    monkeypatch.delenv("REDIS_URL", raising=False)
    result = nexus(paths, "run", "--datasets", "reasoning/arith", redis_url=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (paths.redis_dir / "redis.log").exists()
    assert not (paths.redis_dir / "url").exists()  # shut down on exit
    events = read_events(paths.log)
    assert len(of_type(events, "StageCompleted")) == 4


def test_watch_and_worker_distill_the_good_teachers_when_one_is_bad(workdir, tiny_teacher_dir, fast_env, redis_conn,
                                                                      redis_url, tmp_path):
    """`nexus watch` + `nexus worker`, as compose runs them: a good teacher, then another good one and one
    whose custom code may not run. The bad one fails its profile and is left out; the student and the
    router complete with the two good ones; nothing is left queued that can never run."""
    from rq import Queue

    from nexus_core.records.job import JobSerializer

    paths = workdir
    write_dataset(paths, "reasoning/arith", [{"text": t} for t in ARITH])
    bad = bad_model_folders(tmp_path / "models", tiny_teacher_dir, tmp_path)["remote"]
    watch = spawn(paths, "watch", redis_url=redis_url, env_extra=fast_env)
    worker = spawn(paths, "worker", redis_url=redis_url, env_extra=fast_env)
    try:
        register(paths, "tiny", tiny_teacher_dir)  # the producer's rescan at start sees it even if it is early
        wait_for(paths, lambda ev: of_type(ev, "StageStarted", "profile"), timeout=120, proc=worker)
        register(paths, "tiny2", tiny_teacher_dir)
        register(paths, "custom", bad)

        def good_plan_done(events):
            usage = [set(e.data["teacher_usage"]) for e in of_type(events, "StageCompleted", "distill")]
            return usage and usage[-1] == {"tiny", "tiny2"} and of_type(events, "StageCompleted", "router")
        wait_for(paths, good_plan_done, timeout=240, proc=worker)
        queue = Queue("nexus", connection=redis_conn, serializer=JobSerializer)
        wait_until(lambda: queue.count == 0 and not queue.deferred_job_registry.get_job_ids()
                   and not queue.started_job_registry.get_job_ids(), timeout=60, what="an empty queue")
    finally:
        kill_tree(watch, 15)
        kill_tree(worker, 15)
    events = read_events(paths.log)
    (failed,) = [e for e in of_type(events, "StageFailed", "profile")]
    assert failed.teacher_id == "custom" and "trust_remote_code" in failed.data["error"]
    router = of_type(events, "StageCompleted", "router")[-1]
    distill = of_type(events, "StageCompleted", "distill")[-1]
    assert distill.seq < router.seq and set(distill.data["teacher_usage"]) == {"tiny", "tiny2"}


def test_bad_input_exit_code_and_others_carry_on(demo_workdir, redis_conn, redis_url):
    paths = demo_workdir
    (paths.registry / "broken.json").write_text('{"teacher_id": "broken", "path": "/nope", "status": "ready"}')
    result = nexus(paths, "run", "--datasets", "reasoning/arith", redis_url=redis_url)
    assert result.returncode == 2
    assert "broken.json" in result.stderr and "does not exist" in result.stderr
    events = read_events(paths.log)
    assert of_type(events, "TeacherRejected") and len(of_type(events, "StageCompleted")) == 4


def test_second_run_in_the_same_workdir_refuses(demo_workdir, redis_conn, redis_url):
    paths = demo_workdir
    proc = spawn(paths, "run", redis_url=redis_url)
    try:
        wait_for(paths, lambda ev: of_type(ev, "RunStarted"), proc=proc)
        second = nexus(paths, "run", redis_url=redis_url)
        assert second.returncode == 2 and "another `nexus run`" in second.stderr
    finally:
        kill_tree(proc)
