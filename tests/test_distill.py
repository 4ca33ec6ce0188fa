"""Distill stage on a tiny teacher: checks, resume, checkpoints, OOM recovery, warm start, release."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nexus_core.context import Control, StageContext
from nexus_core.errors import BadInputError, CorruptArtifactError, PlanMismatchError, StageInterrupted
from nexus_core.kd.student import build_student
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.stages.distill import run_distill
from nexus_core.storage import checkpoint as ckpt
from nexus_core.storage.profiles import read_profile
from tests.helpers import build_workdir, make_teacher, write_profile, write_shards


class RecCtx(StageContext):
    def __init__(self, stop_at: int | None = None):
        self.events, self.polls, self.stop_at = [], 0, stop_at

    def started(self, **d):
        self.events.append(("started", d))

    def progress(self, **d):
        self.events.append(("progress", d))

    def checkpoint_saved(self, step, reason, path=None):
        self.events.append(("checkpoint", {"step": step, "reason": reason}))

    def oom_recovered(self, **d):
        self.events.append(("oom", d))

    def note(self, event_type, **d):
        self.events.append((event_type, d))

    def poll(self):
        self.polls += 1
        return Control.STOP_USR1 if self.polls == self.stop_at else Control.CONTINUE

    def of(self, kind):
        return [d for k, d in self.events if k == kind]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    home = tmp_path_factory.mktemp("base")
    cfg, plan, paths, tok = build_workdir(home, hidden_layers=(0, 2))
    return home, cfg, plan, tok


@pytest.fixture
def work(base, tmp_path):
    home, cfg, plan, tok = base
    dst = tmp_path / "w"
    shutil.copytree(home, dst, ignore=shutil.ignore_patterns("models"))
    return cfg, plan, Paths(dst), tok


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """An uninterrupted run: its final weights are what every other run must reproduce."""
    home, cfg, plan, tok = base
    dst = tmp_path_factory.mktemp("ref") / "w"
    shutil.copytree(home, dst, ignore=shutil.ignore_patterns("models"))
    ctx = RecCtx()
    result = run_distill(cfg, plan, Paths(dst), ctx)
    return result, ckpt.load(ckpt.latest_path(Paths(dst))), ctx, Paths(dst)


def test_run_writes_checkpoint_eval_and_a_release_that_generates(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, state, ctx, paths = reference
    assert state[ckpt.STEP] == 8 and ctx.of("started")[0]["resume_step"] == 0
    assert [c["reason"] for c in ctx.of("checkpoint")] == ["periodic"] * 3  # steps 3, 6 and the end
    numbered = sorted(p.name for p in paths.checkpoints.glob("checkpoint_0*.pt"))
    assert numbered == ["checkpoint_00000006.pt", "checkpoint_00000008.pt"]  # keep_checkpoints = 2
    ev = json.loads((paths.results / "eval.json").read_text())
    row = ev["datasets"]["reasoning/arithmetic"]
    assert row["student"]["tokens"] > 0 and "t1" in row["teachers"]
    assert row["student"]["perplexity"] == pytest.approx(2.718281828 ** row["student"]["loss"], rel=1e-3)
    assert result.data["eval"] == ev["datasets"] and result.data["skipped_sequences"] == 0
    card = (paths.release / "README.md").read_text()
    assert "t1" in card and "reasoning/arithmetic" in card and "training steps: 8" in card
    model = AutoModelForCausalLM.from_pretrained(paths.release)
    tok = AutoTokenizer.from_pretrained(paths.release)
    out = model.generate(**tok("12 + 3 =", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(tok("12 + 3 =")["input_ids"])
    assert torch.equal(load_file(paths.release / "model.safetensors")["model.embed_tokens.weight"],
                       state[ckpt.MODEL]["model.embed_tokens.weight"])
    assert {p.name for p in result.artifacts} >= {"checkpoint_latest.pt", "eval.json", "model.safetensors", "README.md"}


def test_interrupted_run_resumes_to_the_same_weights_bit_for_bit(work, reference):
    cfg, plan, paths, _ = work
    with pytest.raises(StageInterrupted) as err:
        run_distill(cfg, plan, paths, RecCtx(stop_at=4))
    assert err.value.reason == "sigusr1"
    assert ckpt.load(ckpt.latest_path(paths))[ckpt.STEP] == 4
    ctx = RecCtx()
    run_distill(cfg, plan, paths, ctx)
    assert ctx.of("started")[0]["resume_step"] == 4
    got, want = ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], reference[1][ckpt.MODEL]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_oom_is_recovered_by_splitting_and_gives_the_same_result(work, reference):
    cfg, plan, paths, _ = work
    cfg = dataclasses.replace(cfg, faults=dataclasses.replace(cfg.faults, oom_at_batches="1,5"))
    ctx = RecCtx()
    result = run_distill(cfg, plan, paths, ctx)
    assert [e["step"] for e in ctx.of("oom")] == [2, 6] and result.data["skipped_sequences"] == 0
    got, want = ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], reference[1][ckpt.MODEL]
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


class Evil:  # any custom class: a weights-only load must refuse to build it
    pass


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "checkpoint_latest.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(CorruptArtifactError, match="weights-only") as err:
        ckpt.load(path)
    assert str(path) in str(err.value)


def _manifest(paths, plan):
    folder = paths.shard_dir("t1", "reasoning__arithmetic")
    return folder, json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("change,error,words", [
    ("sha", CorruptArtifactError, "sha256"),
    ("k", PlanMismatchError, "k is 4"),
    ("tokenizer_fp", PlanMismatchError, "tokenizer_fp"),
])
def test_shard_that_does_not_match_the_plan_is_refused(work, change, error, words):
    cfg, plan, paths, _ = work
    folder, m = _manifest(paths, plan)
    if change == "sha":
        shard = folder / "shard-00001.safetensors"
        raw = bytearray(shard.read_bytes())
        raw[-3] ^= 0xFF
        shard.write_bytes(bytes(raw))
    else:
        m[change] = 4 if change == "k" else "0" * 64
        (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(error, match=words) as err:
        run_distill(cfg, plan, paths, RecCtx())
    assert str(folder) in str(err.value)
    assert change != "sha" or "shard-00001.safetensors" in str(err.value)
    assert not ckpt.latest_path(paths).exists()  # nothing trained on the wrong targets


def test_adding_a_teacher_warm_starts_and_continues_the_step_count(work, reference):
    cfg, plan, paths, tok = work
    shutil.copy(ckpt.latest_path(reference[3]), ckpt.latest_path(paths))  # plan 1 finished at step 8
    t2 = make_teacher(paths, "t2", tok, seed=5, weight=0.5)
    write_profile(paths, t2, tok, importance=[0.2, 0.4, 0.3, 0.1], critical=[1])
    write_shards(cfg, paths, t2, "reasoning/arithmetic", tok)
    plan2 = DistillPlan(teachers=(plan.teachers[0], t2), primary="t1", datasets=plan.datasets)
    ctx = RecCtx()
    result = run_distill(cfg, plan2, paths, ctx)
    assert ctx.of("StudentWarmStarted") == [{"from_plan": plan.fingerprint(), "step": 8}]
    assert result.data["steps"] == 16 and result.data["warm_started"]
    assert ckpt.load(ckpt.latest_path(paths))[ckpt.PLAN_FP] == plan2.fingerprint()
    assert set(result.data["eval"]["reasoning/arithmetic"]["teachers"]) == {"t1", "t2"}


def test_pruned_student_keeps_the_most_important_layers(work):
    from transformers import AutoModelForCausalLM

    cfg, plan, paths, _ = work
    model, info = build_student(cfg, plan, paths, "cpu", read_profile(paths, plan.primary) or {})
    assert info["kept_layers"] == [0, 2] and model.config.num_hidden_layers == 2  # importance .9 .1 .5 .3
    teacher = AutoModelForCausalLM.from_pretrained(plan.primary_teacher.path).state_dict()
    s = model.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["lm_head.weight"], teacher["lm_head.weight"])


def test_student_from_config_when_the_pruned_one_does_not_fit(work, tmp_path):
    from nexus_core.demo.model_factory import make_config

    cfg, plan, paths, _ = work
    small = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget="100KB"))
    with pytest.raises(BadInputError, match="student-config"):
        build_student(small, plan, paths, "cpu", read_profile(paths, plan.primary) or {})
    make_config("llama", vocab_size=10, hidden=16, layers=1, heads=2, kv_heads=1).save_pretrained(tmp_path / "sc")
    small = dataclasses.replace(small, student=dataclasses.replace(cfg.student, config=str(tmp_path / "sc")))
    model, info = build_student(small, plan, paths, "cpu", read_profile(paths, plan.primary) or {})
    assert info["source"] == "config" and model.config.hidden_size == 16
    assert model.config.vocab_size == len(work[3])


def test_hidden_state_loss_trains(work):
    cfg, plan, paths, _ = work
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, hidden_weight=0.5, max_steps=3))
    result = run_distill(cfg, plan, paths, RecCtx())
    assert result.data["steps"] == 3 and result.data["final"]["loss"] == result.data["final"]["loss"]  # not NaN
