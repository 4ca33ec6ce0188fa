"""Scale out on one real Redis: two workers share the queue, each dataset split into two range
jobs (extract.ranges = 2), and the shard folders match one worker's with one job per dataset,
manifest.json included; a worker killed mid-job has its job adopted by the other after the
dead-worker timeout."""

from __future__ import annotations

import json
import time

import pytest
from rq.worker import Worker

from nexus_core.broker import keys
from nexus_core.paths import Paths, check_lockable, filesystem_type
from nexus_core.records.events import read_events
from tests.helpers import (
    ARITH,
    CODE,
    artefact_bytes,
    kill_tree,
    nexus,
    of_type,
    register,
    spawn,
    wait_for,
    wait_until,
    write_dataset,
)

DATASETS = {"reasoning/arith": [{"text": t} for t in ARITH], "code/snippets": [{"text": t} for t in CODE],
            "code/more": [{"text": t.replace("add", "sub")} for t in CODE]}
SHARDS = "memory/tiny/*/*"  # shards and manifest.json (no part manifest left behind)


def _setup(paths, teacher_dir):
    for key, rows in DATASETS.items():
        write_dataset(paths, key, rows)
    register(paths, "tiny", teacher_dir)


def test_two_workers_extract_in_parallel_with_identical_shards(tmp_path, workdir, tiny_teacher_dir, fast_env,
                                                               redis_conn, redis_url):
    ref = Paths(tmp_path / "reference").ensure()
    _setup(ref, tiny_teacher_dir)
    one = nexus(ref, "run", redis_url=redis_url, env_extra=fast_env)
    assert one.returncode == 0, one.stderr[-2000:]
    redis_conn.flushdb()

    _setup(workdir, tiny_teacher_dir)
    env = dict(fast_env, NEXUS_EXTRACT_RANGES="2")
    workers = [spawn(workdir, "worker", redis_url=redis_url, env_extra=env) for _ in range(2)]
    producer = spawn(workdir, "watch", redis_url=redis_url, env_extra=env)
    try:
        wait_for(workdir, lambda ev: len(of_type(ev, "StageCompleted", "router")) == 1, timeout=300, proc=workers[0])
    finally:
        for p in (producer, *workers):
            kill_tree(p, 15)
    assert artefact_bytes(workdir, SHARDS) == artefact_bytes(ref, SHARDS)
    assert len(artefact_bytes(ref, "memory/tiny/*/manifest.json")) == 3
    events = read_events(workdir.log)
    pids = {e.data["pid"] for e in of_type(events, "StageStarted")}
    assert len(pids) == 2  # both workers took jobs from the one queue
    assert all(len(of_type(events, "StageCompleted", s)) == n for s, n in
               (("profile", 1), ("extract", 6), ("distill", 1), ("router", 1)))
    assert sorted(e.data["merged"] for e in of_type(events, "StageCompleted", "extract")) == [False] * 3 + [True] * 3


@pytest.mark.slow  # ~160 s on 2 cores: a 400-step distill outlives the kill; CI time goes to faster cases
def test_a_dead_workers_job_is_adopted_after_the_timeout(workdir, tiny_teacher_dir, fast_env, redis_conn, redis_url):
    _setup(workdir, tiny_teacher_dir)
    env = dict(fast_env, NEXUS_DISTILL_MAX_STEPS="400", NEXUS_DISTILL_EPOCHS="100")
    first = spawn(workdir, "worker", redis_url=redis_url, env_extra=env)
    producer = spawn(workdir, "watch", redis_url=redis_url, env_extra=env)
    second = None
    try:
        wait_for(workdir, lambda ev: [e for e in of_type(ev, "CheckpointSaved", "distill") if e.data["step"] >= 2],
                 timeout=240, proc=first)
        second = spawn(workdir, "worker", redis_url=redis_url, env_extra=env)
        # the second worker is up and idle: the distill job belongs to the first
        wait_until(lambda: any(w.pid == second.pid and w.get_state() == "idle" for w in Worker.all(connection=redis_conn)),
                   timeout=120, what="the second worker listening")
        kill_tree(first)  # kill -9 mid-job
        t_kill = time.time()
        wait_for(workdir, lambda ev: len(of_type(ev, "StageStarted", "distill")) == 2, timeout=keys.ALIVE_TTL_S * 4,
                 proc=second)
        adopted_after = time.time() - t_kill
        wait_for(workdir, lambda ev: of_type(ev, "StageCompleted", "router"), timeout=400, proc=second)
    finally:
        for p in (producer, second, first):
            if p is not None and p.poll() is None:
                kill_tree(p, 15)
    events = read_events(workdir.log)
    requeued = [e for e in of_type(events, "StageQueued", "distill") if "orphaned" in e.data.get("reason", "")]
    assert len(requeued) == 1
    # adopted by the live worker's next maintenance (a dead pid on this host is seen at once;
    # a silent worker elsewhere after ALIVE_TTL_S)
    assert adopted_after <= keys.ALIVE_TTL_S * 3
    restarted = of_type(events, "StageStarted", "distill")[1]
    assert restarted.data["resume_step"] >= 2


def test_filesystem_lock_check(tmp_path, monkeypatch):
    assert filesystem_type(tmp_path) != "unknown"
    check_lockable(Paths(tmp_path))  # a local disk is fine
    import nexus_core.paths as p

    monkeypatch.setattr(p, "filesystem_type", lambda path: "cifs")
    with pytest.raises(Exception, match="cifs"):
        check_lockable(Paths(tmp_path))
    monkeypatch.setenv("NEXUS_TRUST_FLOCK", "1")
    check_lockable(Paths(tmp_path))
    json.dumps({})


def test_workers_claim_distinct_gpus(redis_conn):
    from workers.worker import claim_gpu

    assert claim_gpu(redis_conn, "w1", 2) == 0
    assert claim_gpu(redis_conn, "w2", 2) == 1
    assert claim_gpu(redis_conn, "w3", 2) is None  # all taken
    redis_conn.delete(keys.GPU_CLAIM_KEY.format(0))  # w1 died: its claim expired
    assert claim_gpu(redis_conn, "w3", 2) == 0
    assert 0 < redis_conn.ttl(keys.GPU_CLAIM_KEY.format(1)) <= keys.ALIVE_TTL_S
