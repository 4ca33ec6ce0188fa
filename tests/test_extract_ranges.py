"""Extraction split into extract.ranges jobs per (teacher, dataset): any split, any order, any
interruption ends in the shard folder one job writes, byte for byte (manifest.json included);
the planner's range jobs; two real workers sharing one dataset on a real Redis."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nexus_core.config import load_settings
from nexus_core.errors import StageInterrupted
from nexus_core.records.events import EventLog, read_events, replay
from nexus_core.stages.extract import run_extract
from nexus_core.storage import shards
from producer.planner import job_id, plan_jobs
from tests.helpers import ARITH, Recorder, kill_tree, of_type, register, setup_home, spawn, wait_for, write_dataset

SAMPLES = 40  # 5 shards of 8


def folder(paths) -> dict[str, bytes]:
    """Every file of the shard folder (manifest and part manifests included), by name."""
    d = paths.shard_dir("tiny", "reasoning__arith")
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir):
    """The folder one job (ranges = 1) writes."""
    cfg, teacher, ref, paths = setup_home(tmp_path_factory.mktemp("one"), tiny_teacher_dir,
                                          extract={"max_samples": SAMPLES})
    run_extract(cfg, teacher, ref, paths)
    return folder(paths)


def test_shard_blocks_cover_every_shard_and_leave_no_job_empty():
    for n in range(1, 12):
        for R in range(1, 9):
            blocks = [shards.shard_block(r, R, n) for r in range(R)]
            assert all(hi > lo for lo, hi in blocks)  # every job has outputs to record
            assert set().union(*(range(lo, hi) for lo, hi in blocks)) == set(range(n))
            if R <= n:  # disjoint and in order
                assert [lo for lo, _ in blocks[1:]] == [hi for _, hi in blocks[:-1]] and blocks[-1][1] == n


def test_range_jobs_in_any_order_write_the_folder_one_job_writes(tmp_path, tiny_teacher_dir, reference):
    cfg, teacher, ref, paths = setup_home(tmp_path, tiny_teacher_dir, extract={"max_samples": SAMPLES, "ranges": 3})
    assert len(reference) == 6  # 5 shards + manifest.json
    out_dir = paths.shard_dir("tiny", "reasoning__arith")
    # blocks of 3 over 5 shards: [0, 1), [1, 3), [3, 5); the last job to finish merges
    second = run_extract(cfg, teacher, ref, paths, Recorder(), part=(1, 3))
    assert second.data["merged"] is False and second.data["shard_range"] == [1, 3]
    assert second.artifacts == [out_dir / "shard-00001.safetensors", out_dir / "shard-00002.safetensors"]
    assert second.data["heldout_loss_per_char"] is None and second.data["kept_mass_mean"] is None
    assert not (out_dir / "manifest.json").exists()
    third = run_extract(cfg, teacher, ref, paths, part=(2, 3))
    assert third.data["merged"] is False and sorted(folder(paths)) == [
        "manifest-part-00001-of-00003.json", "manifest-part-00002-of-00003.json",
        *(f"shard-0000{i}.safetensors" for i in range(1, 5))]
    ctx = Recorder()
    first = run_extract(cfg, teacher, ref, paths, ctx, part=(0, 3))
    assert ctx.of("started") == [{"resume_shard": 0, "part": [0, 3], "shard_range": [0, 1]}]
    assert first.data["merged"] is True and first.artifacts[-1] == out_dir / "manifest.json"
    assert folder(paths) == reference  # parts gone, manifest.json as one job wrote it
    assert (out_dir.parent / ".reasoning__arith.lock").exists()  # the lock lives beside the folder, not in it
    assert first.data["heldout_loss_per_char"] == json.loads(reference["manifest.json"])["heldout_quality"]["loss_per_char"]
    # A rerun of a merged, intact range writes nothing, not even a part manifest.
    again = run_extract(cfg, teacher, ref, paths, part=(1, 3))
    assert again.data["merged"] is False and again.data["resume_shard"] == 3 and folder(paths) == reference


def test_a_killed_range_job_resumes_from_its_own_shards(tmp_path, tiny_teacher_dir, reference):
    cfg, teacher, ref, paths = setup_home(tmp_path, tiny_teacher_dir, extract={"max_samples": SAMPLES, "ranges": 2})
    # blocks of 2 over 5 shards: [0, 2), [2, 5)
    with pytest.raises(StageInterrupted):
        run_extract(cfg, teacher, ref, paths, Recorder(stop_after=1), part=(1, 2))
    part = shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"), shards.part_name(1, 2))
    assert part["complete"] is False and [r["file"] for r in part["shards"]] == ["shard-00002.safetensors"]
    assert part["part"] == [1, 2] and part["shard_range"] == [2, 5]
    assert run_extract(cfg, teacher, ref, paths, part=(0, 2)).data["merged"] is False  # block 1 is not done
    ctx = Recorder()
    res = run_extract(cfg, teacher, ref, paths, ctx, part=(1, 2))
    assert ctx.of("started") == [{"resume_shard": 3, "part": [1, 2], "shard_range": [2, 5]}]
    assert [p["shard"] for p in ctx.of("progress")] == [2, 3] and {p["shards"] for p in ctx.of("progress")} == {3}
    assert res.data["merged"] is True and res.data["resume_shard"] == 3
    assert folder(paths) == reference


def test_changing_ranges_keeps_the_verified_shards_and_repairs_after_a_merge(tmp_path, tiny_teacher_dir, reference):
    cfg, teacher, ref, paths = setup_home(tmp_path, tiny_teacher_dir, extract={"max_samples": SAMPLES, "ranges": 2})
    run_extract(cfg, teacher, ref, paths, part=(1, 2))  # shards 2..4 in a part manifest, no manifest.json
    # Back to one job: it keeps those three and does the two missing ones.
    cfg1, *_ = setup_home(tmp_path, tiny_teacher_dir, extract={"max_samples": SAMPLES})
    ctx = Recorder()
    run_extract(cfg1, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": 0}] and len(ctx.of("progress")) == 2
    assert folder(paths) == reference
    # After the merge a shard of block 0 is damaged: its job alone repairs it and merges again,
    # taking block 1's records from the verified manifest.json.
    victim = paths.shard_dir("tiny", "reasoning__arith") / "shard-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    ctx = Recorder()
    res = run_extract(cfg, teacher, ref, paths, ctx, part=(0, 2))
    assert ctx.of("started")[0]["resume_shard"] == 1 and res.data["merged"] is True
    assert folder(paths) == reference


def _planned(workdir, fake_model, environ):
    for key in ("reasoning/x", "reasoning/y"):
        write_dataset(workdir, key, [{"text": "1+1=2"}])
    (workdir.registry / "a.json").write_text(json.dumps({"teacher_id": "a", "path": str(fake_model), "status": "ready"}))
    from producer.scan import scan_registry

    log = EventLog(workdir.log)
    scan_registry(workdir, log, replay(log.read()))
    cfg = load_settings(workdir.home, environ=environ)
    return log, cfg


def test_planner_range_jobs_and_a_failed_range_excludes_its_pair(workdir, fake_model):
    log, cfg1 = _planned(workdir, fake_model, {})
    specs1, _ = plan_jobs(replay(log.read()), cfg1, ["reasoning/x", "reasoning/y"], str(workdir.home))
    extract1 = [s for s in specs1 if s.stage == "extract"]
    # ranges = 1: one job per dataset; neither how the work is split nor the logits chunk is in the id
    ex = {k: v for k, v in cfg1.to_dict()["extract"].items() if k not in ("ranges", "logit_chunk")}
    fp = hashlib.sha256(json.dumps({"extract": ex}, sort_keys=True).encode()).hexdigest()[:16]
    assert fp == cfg1.fingerprint("extract")
    profile_id = specs1[0].job_id
    assert extract1[0].job_id == job_id("extract", {"teacher": _teacher_fp(log), "dataset": "reasoning/x",
                                                    "profile": profile_id, "settings": fp})
    assert "range" not in extract1[0].payload.to_dict()

    _, cfg = _planned(workdir, fake_model, {"NEXUS_EXTRACT_RANGES": "2"})
    specs, plan = plan_jobs(replay(log.read()), cfg, ["reasoning/x", "reasoning/y"], str(workdir.home))
    again, _ = plan_jobs(replay(log.read()), cfg, ["reasoning/x", "reasoning/y"], str(workdir.home))
    assert [s.job_id for s in specs] == [s.job_id for s in again]  # stable
    extract = [s for s in specs if s.stage == "extract"]
    assert [(s.dataset, s.payload.to_dict()["range"]) for s in extract] == [("reasoning/x", [0, 2]), ("reasoning/x", [1, 2]),
                                                                ("reasoning/y", [0, 2]), ("reasoning/y", [1, 2])]
    assert extract[1].description == "extract a on reasoning/x (part 2/2)"
    assert len({s.job_id for s in extract} | {s.job_id for s in extract1}) == 6
    distill = next(s for s in specs if s.stage == "distill")
    assert set(distill.depends_on) == {s.job_id for s in extract}

    # One range of reasoning/x fails: the pair leaves the plan, the distill waits on y's ranges only.
    since = log.append("RunStarted").seq
    log.append("StageFailed", teacher_id="a", stage="extract", job_id=extract[1].job_id, data={"error": "boom"})
    specs2, plan2 = plan_jobs(replay(log.read()), cfg, ["reasoning/x", "reasoning/y"], str(workdir.home), since)
    assert plan2.datasets == ("reasoning/y",) and plan.datasets == ("reasoning/x", "reasoning/y")
    distill2 = next(s for s in specs2 if s.stage == "distill")
    assert set(distill2.depends_on) == {extract[2].job_id, extract[3].job_id}
    assert extract[1].job_id not in {s.job_id for s in specs2}  # not retried in this pass


def _teacher_fp(log) -> str:

    return replay(log.read()).active_teachers()[0].fingerprint()


@pytest.mark.slow  # ~20 s quiet, ~50 s on a busy 2-core machine; tests/test_scale.py runs ranges = 2 too
def test_two_workers_share_one_dataset_with_identical_shards(tmp_path, workdir, tiny_teacher_dir, fast_env,
                                                             redis_conn, redis_url):
    env = dict(fast_env, NEXUS_EXTRACT_MAX_SAMPLES="48", NEXUS_EXTRACT_RANGES="2")
    ref_cfg, teacher, ref, ref_paths = setup_home(tmp_path / "ref", tiny_teacher_dir, ARITH,
                                                  extract={"max_samples": 48, "seq_len": 32, "top_k": 8,
                                                           "logit_chunk": 0})
    run_extract(ref_cfg, teacher, ref, ref_paths)
    write_dataset(workdir, "reasoning/arith", [{"text": t} for t in ARITH])
    register(workdir, "tiny", tiny_teacher_dir)
    workers = [spawn(workdir, "worker", redis_url=redis_url, env_extra=env) for _ in range(2)]
    producer = spawn(workdir, "watch", redis_url=redis_url, env_extra=env)
    try:
        wait_for(workdir, lambda ev: len(of_type(ev, "StageCompleted", "extract")) == 2, timeout=240, proc=workers[0])
    finally:
        for p in (producer, *workers):
            kill_tree(p, 15)
    assert folder(workdir) == folder(ref_paths)
    events = read_events(workdir.log)
    done = of_type(events, "StageCompleted", "extract")
    assert sorted(e.data["part"][0] for e in done) == [0, 1] and sorted(e.data["merged"] for e in done) == [False, True]
    assert len({e.data["pid"] for e in of_type(events, "StageStarted", "extract")}) == 2  # one range per worker
    assert sum(e.data["shards"] for e in done) == 6
    merger = next(e for e in done if e.data["merged"])
    assert [Path(a["path"]).name for a in merger.data["artifacts"]][-1] == "manifest.json"
