"""Seeded kill -9 matrix: several points inside every stage, each followed by `nexus run`.

Run with:  .venv/bin/python -m pytest -m slow tests/test_faults_slow.py
Seeds:     NEXUS_FAULT_SEEDS=0,1,2 (default; each seed picks one kill point per stage).

A kill point is "the n-th event (StageStarted/StageProgress/CheckpointSaved) of stage S
has been logged, plus d seconds", with n and d drawn from random.Random(f"{S}-{seed}").
The worker runs inside `nexus run`, so kill -9 of its process group kills the worker
mid-stage. After the rerun: exit 0, shards and released weights byte-identical to the
undisturbed reference run, every job completed exactly once, log gapless.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.helpers import (
    ENV,
    assert_same_outputs,
    completed_once,
    kill_tree,
    make_workdir,
    nexus,
    no_temp_files,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("NEXUS_FAULT_SEEDS", "0,1,2").split(",") if s.strip()]
# How many of a stage's own events (fast settings) a kill point may wait for: profile logs few,
# extract 2 jobs x 3 shards, distill 6 steps + checkpoints, router its epochs.
MAX_N = {"profile": 2, "extract": 8, "distill": 10, "router": 4}
MARKS = ("StageStarted", "StageProgress", "CheckpointSaved")


def kill_point(stage: str, seed: int) -> tuple[int, float]:
    rng = random.Random(f"{stage}-{seed}")
    return rng.randint(1, MAX_N[stage]), round(rng.uniform(0.0, 0.6), 3)


def _reached(stage: str, n: int):
    def pred(events):
        mine = [e for e in events if e.stage == stage and e.type in MARKS]
        done = any(e.stage == stage and e.type == "StageCompleted" for e in events)
        return len(mine) >= n or (done and mine)  # a stage with fewer events than n: kill just after it
    return pred


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", ["profile", "extract", "distill", "router"])
def test_kill_9_at_a_seeded_point_then_rerun(stage, seed, tmp_path, tiny_teacher_dir, reference, redis_conn,
                                             redis_url):
    n, delay = kill_point(stage, seed)
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    proc = spawn(paths, "run", redis_url=redis_url, env_extra=ENV)
    try:
        wait_for(paths, _reached(stage, n), timeout=400, proc=proc)
        time.sleep(delay)
    finally:
        kill_tree(proc)  # kill -9: the worker dies wherever it is
    rerun = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert rerun.returncode == 0, f"kill point {stage} n={n} +{delay}s:\n{rerun.stderr[-3000:]}"
    completed_once(paths)
    assert_same_outputs(paths, reference)
    assert not no_temp_files(paths)
