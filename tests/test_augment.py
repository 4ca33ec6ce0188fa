"""Teacher-guided augmentation (extract.augment): perturbed copies of the rows, labelled by the teacher,
deterministic, resumable, kept apart from the real rows, and read by distill as KD data."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core.errors import PlanMismatchError, StageInterrupted  # noqa: E402
from nexus_core.kd import augment
from nexus_core.kd.streams import open_streams
from nexus_core.records.plan import DistillPlan
from nexus_core.stages.distill import run_distill  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.storage import shards
from nexus_core.storage.profiles import read_profiles
from tests.helpers import Recorder, setup_home, shard_files

SLUG = "reasoning__arith"


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


def test_perturb_replaces_about_p_of_the_tokens_with_the_teachers_draws():
    g = torch.Generator().manual_seed(0)
    n, T, k = 64, 32, 4
    ids = torch.randint(0, 100, (n, T), generator=g, dtype=torch.int32)
    mask = torch.ones(n, T, dtype=torch.uint8)
    mask[-1, 20:] = 0  # the last row is padded
    topk_ids = torch.randint(100, 200, (n, T, k), generator=g, dtype=torch.int32)  # draws are >= 100: visible
    topk_lp = torch.log_softmax(torch.randn(n, T, k, generator=g), -1).half()
    a_ids, a_mask = augment.perturb(ids, mask, topk_ids, topk_lp, copies=3, p=0.25, seed=5)
    assert a_ids.shape == (3 * n, T) and torch.equal(a_mask, mask.repeat(3, 1)) and a_ids.dtype == ids.dtype
    again, _ = augment.perturb(ids, mask, topk_ids, topk_lp, copies=3, p=0.25, seed=5)
    assert torch.equal(a_ids, again)  # same seed, same copies
    other, _ = augment.perturb(ids, mask, topk_ids, topk_lp, copies=3, p=0.25, seed=6)
    assert not torch.equal(a_ids, other)
    changed = a_ids != ids.repeat(3, 1)
    assert not changed[:, 0].any() and not changed[a_mask == 0].any()  # never the first token nor padding
    assert 0.2 < float(changed[:, 1:][a_mask[:, 1:].bool()].float().mean()) < 0.3
    # a replaced token at t is one of the teacher's top-k at t - 1 (which describes token t)
    rows, cols = changed.nonzero(as_tuple=True)
    prev = topk_ids.repeat(3, 1, 1)[rows, cols - 1]  # (m, k)
    assert bool((prev == a_ids[rows, cols].unsqueeze(-1)).any(-1).all())


def test_extract_adds_labelled_copies_keeps_real_rows_and_is_deterministic(tmp_path, teachers):
    plain_cfg, teacher, ref, plain = setup_home(tmp_path / "plain", teachers["llama"][0])
    run_extract(plain_cfg, teacher, ref, plain)
    cfg, teacher, ref, paths = setup_home(tmp_path / "aug", teachers["llama"][0], extract={"augment": 2})
    res = run_extract(cfg, teacher, ref, paths)
    real_dir = paths.shard_dir("tiny", SLUG)
    aug_dir = augment.folder(real_dir)
    assert shard_files(paths) == shard_files(plain)  # the real rows' shards do not change
    real, aug = shards.read_manifest(real_dir), shards.read_manifest(aug_dir)
    assert aug["complete"] and aug["augment"] == {"copies": 2, "p": 0.15} and aug["augment_of"] == real["data_fp"]
    assert aug["total_sequences"] == 2 * real["total_sequences"] and shards.verify_shards(aug_dir) == []
    assert res.data["augmented"]["sequences"] == aug["total_sequences"] and aug_dir / "manifest.json" in res.artifacts
    r_ids = torch.cat([load_file(real_dir / s["file"])["input_ids"] for s in real["shards"]])
    a = {k: torch.cat([load_file(aug_dir / s["file"])[k] for s in aug["shards"]]) for k in ("input_ids", "topk_ids")}
    changed = a["input_ids"] != r_ids.repeat(2, 1)
    assert 0.05 < float(changed.float().mean()) < 0.3  # copies, not the same rows
    again = tmp_path / "again"
    cfg2, teacher2, ref2, paths2 = setup_home(again, teachers["llama"][0], extract={"augment": 2})
    run_extract(cfg2, teacher2, ref2, paths2)
    assert files(augment.folder(paths2.shard_dir("tiny", SLUG))) == files(aug_dir)  # bit for bit


def test_interrupted_augmentation_resumes_and_other_settings_keep_the_real_shards(tmp_path, teachers):
    cfg, teacher, ref, paths = setup_home(tmp_path / "ref", teachers["llama"][0], extract={"augment": 3})
    run_extract(cfg, teacher, ref, paths)
    want = files(augment.folder(paths.shard_dir("tiny", SLUG)))
    n_real = len(shards.read_manifest(paths.shard_dir("tiny", SLUG))["shards"])
    cfg, teacher, ref, paths = setup_home(tmp_path / "cut", teachers["llama"][0], extract={"augment": 3})
    with pytest.raises(StageInterrupted):  # progress: one per real shard, the copies' start, then 2 of theirs
        run_extract(cfg, teacher, ref, paths, ctx=Recorder(stop_after=n_real + 3))
    aug_dir = augment.folder(paths.shard_dir("tiny", SLUG))
    kept = sorted(p.name for p in aug_dir.glob("shard-*.safetensors"))
    assert len(kept) == 2 and not shards.read_manifest(aug_dir).get("complete")
    rec = Recorder()
    run_extract(cfg, teacher, ref, paths, ctx=rec)
    assert files(aug_dir) == want
    assert [d["resume_shard"] for d in rec.of("progress") if "augment_shards" in d] == [len(kept)]
    real_before = shard_files(paths)
    cfg_p, teacher, ref, _ = setup_home(paths.home, teachers["llama"][0], extract={"augment": 3, "augment_p": 0.3})
    run_extract(cfg_p, teacher, ref, paths)
    assert shard_files(paths) == real_before and files(aug_dir) != want  # new copies, same real shards
    assert shards.read_manifest(aug_dir)["augment"] == {"copies": 3, "p": 0.3}


def test_distill_reads_each_teachers_copies_as_a_stream_and_refuses_missing_ones(tmp_path, teachers):
    cfg, teacher, ref, paths = setup_home(tmp_path, teachers["llama"][0], extract={"augment": 2},
                                          distill={"max_steps": 4, "batch_size": 4, "epochs": 100},
                                          memory={"budget": "8GB"})
    run_extract(cfg, teacher, ref, paths)
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    streams, info = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))
    assert [s.n for s in streams][1] == 2 * streams[0].n and {s.dataset for s in streams} == {ref.key}
    assert info["teacher_usage"]["tiny"]["domains"][ref.key]["augmented_sequences"] == streams[1].n
    res = run_distill(cfg, plan, paths)
    assert res.data["eval"][ref.key]["student"]["loss"] > 0
    cfg_more, teacher, ref, _ = setup_home(paths.home, teachers["llama"][0], extract={"augment": 5})
    with pytest.raises(PlanMismatchError, match="augment"):
        open_streams(cfg_more, plan, paths, read_profiles(paths, plan.teachers))


def test_samples_continue_each_rows_prompt_deterministically_and_are_made_once(tmp_path, teachers):
    kw = {"augment_samples": 2, "max_samples": 6}
    cfg, teacher, ref, paths = setup_home(tmp_path / "a", teachers["llama"][0], extract=kw)
    assert "augmented" in run_extract(cfg, teacher, ref, paths).data
    real_dir = paths.shard_dir("tiny", SLUG)
    aug_dir = augment.folder(real_dir)
    real, aug = shards.read_manifest(real_dir), shards.read_manifest(aug_dir)
    assert aug["augment"] == {"samples": 2, "temperature": 0.8} and aug["total_sequences"] == 2 * 6
    load = lambda d, m, k: torch.cat([load_file(d / s["file"])[k] for s in m["shards"]])  # noqa: E731
    r_ids, a_ids = load(real_dir, real, "input_ids"), load(aug_dir, aug, "input_ids")
    P = augment.sample_prefix(32)
    assert torch.equal(a_ids[:, :P], r_ids[:, :P].repeat(2, 1))  # each row's prompt, twice
    assert not torch.equal(a_ids[:6, P:], a_ids[6:, P:]) and not torch.equal(a_ids[:6, P:], r_ids[:, P:])
    assert int(load(aug_dir, aug, "attention_mask").min()) == 1
    cfg_b, teacher_b, ref_b, paths_b = setup_home(tmp_path / "b", teachers["llama"][0], extract=kw)
    run_extract(cfg_b, teacher_b, ref_b, paths_b)
    assert files(augment.folder(paths_b.shard_dir("tiny", SLUG))) == files(aug_dir)  # bit for bit
    again = run_extract(cfg, teacher, ref, paths)
    assert "augmented" not in again.data and files(aug_dir) == files(augment.folder(paths_b.shard_dir("tiny", SLUG)))


def test_nexus_run_with_augmentation_end_to_end(demo_workdir, redis_conn, redis_url):
    from nexus_core.records.events import read_events
    from tests.helpers import nexus, of_type

    paths = demo_workdir
    flags = ("--extract-augment", "1", "--extract-augment-samples", "1")
    run = nexus(paths, "run", *flags, redis_url=redis_url)
    assert run.returncode == 0, run.stderr[-3000:]
    events = read_events(paths.log)
    for ds in ("reasoning__arith", "code__snippets"):
        real = shards.read_manifest(paths.memory / "tiny" / ds)
        aug = shards.read_manifest(augment.folder(paths.memory / "tiny" / ds))
        assert aug["complete"] and aug["augment"] == {"copies": 1, "p": 0.15, "samples": 1, "temperature": 0.8}
        assert aug["total_sequences"] > real["total_sequences"]
    assert all("augmented" in e.data for e in of_type(events, "StageCompleted", "extract"))
    usage = [e.data["teacher_usage"]["tiny"]["domains"] for e in events if e.data.get("note") == "TeacherSignalsAligned"]
    assert usage and all(d["augmented_sequences"] > 0 for d in usage[-1].values())
    again = nexus(paths, "run", *flags, redis_url=redis_url)
    assert again.returncode == 0
    assert len(of_type(read_events(paths.log), "StageStarted")) == len(of_type(events, "StageStarted"))  # nothing redone


# --- the automatic rule (augment.resolve): extract.augment / augment_samples default -1 = auto -------------

def test_rule_turns_copies_on_for_a_small_dataset_samples_for_a_whole_teacher_and_an_explicit_value_wins():
    from nexus_core.config import ExtractSettings
    from nexus_core.errors import ConfigError

    auto = ExtractSettings()
    assert (auto.augment, auto.augment_samples) == (augment.AUTO, augment.AUTO)  # the defaults are "auto"
    ex, d = augment.resolve(auto, 96, "full")
    assert (ex.augment, ex.augment_samples) == (augment.AUTO_COPIES, augment.AUTO_SAMPLES) and augment.wanted(ex)
    assert d["auto"] and d["copies"] == 16 and d["samples"] == 8 and "96 training sequences < 512" in d["reason"]
    ex, d = augment.resolve(auto, 300, "full")  # copies yes, samples no
    assert (ex.augment, ex.augment_samples) == (16, 0) and "300 training sequences >= 128" in d["reason"]
    ex, d = augment.resolve(auto, augment.AUTO_BELOW, "full")  # a large dataset: off
    assert (ex.augment, ex.augment_samples) == (0, 0) and not augment.wanted(ex) and d["auto"]
    ex, d = augment.resolve(auto, 10, "sli")  # a streamed teacher: copies only
    assert (ex.augment, ex.augment_samples) == (16, 0) and "streamed" in d["reason"]
    ex, d = augment.resolve(ExtractSettings(augment=0, augment_samples=0), 10, "full")  # explicit 0 wins
    assert (ex.augment, ex.augment_samples) == (0, 0) and not d["auto"] and "set explicitly" in d["reason"]
    ex, d = augment.resolve(ExtractSettings(augment=3), 10_000, "full")  # an explicit number wins, samples stay auto
    assert (ex.augment, ex.augment_samples) == (3, 0) and d["auto"]
    with pytest.raises(ConfigError, match="--extract-augment"):
        ExtractSettings(augment=-2)


def test_nexus_toml_env_and_flags_can_switch_the_rule_off(tmp_path):
    import argparse

    from nexus_core.config import add_cli_flags, load_settings

    home = tmp_path / "h"
    home.mkdir()
    assert load_settings(home, environ={}).extract.augment == augment.AUTO
    (home / "nexus.toml").write_text("[extract]\naugment = 0\n")
    assert load_settings(home, environ={}).extract.augment == 0
    assert load_settings(home, environ={"NEXUS_EXTRACT_AUGMENT": "-1"}).extract.augment == augment.AUTO
    ap = argparse.ArgumentParser()
    add_cli_flags(ap)
    cfg = load_settings(home, args=ap.parse_args(["--extract-augment-samples", "0"]), environ={})
    assert (cfg.extract.augment, cfg.extract.augment_samples) == (0, 0)


@pytest.fixture(scope="module")
def seen_teacher(tmp_path_factory, teachers, tokenizer):
    """The llama teacher trained on the test dataset's training rows until it knows them by heart (a user's
    teacher fine-tuned on the data it is then distilled on)."""
    import copy

    from nexus_core import data
    from nexus_core.config import ExtractSettings
    from nexus_core.demo import model_factory as mf
    from nexus_core.kd.trainer import train_causal_lm
    from tests.helpers import DOCS

    train, _ = data.split(DOCS, ExtractSettings().heldout_fraction)
    ids, mask = data.pack(tokenizer, train, 32, 6)  # the rows extract's max_samples 6 keeps (setup_home's seq_len)
    model = copy.deepcopy(teachers["llama"][1])
    train_causal_lm(model, ids, mask, steps=120, lr=3e-3, batch_size=6, seed=0)
    return mf.save_model(model, tokenizer, tmp_path_factory.mktemp("seen") / "llama")


def test_rule_copies_only_for_a_teacher_that_has_seen_the_rows():
    from nexus_core.config import ExtractSettings

    auto = ExtractSettings(augment_samples=0)
    seen = {"loss": 4.0, "train_loss": 2.0}
    ex, d = augment.resolve(auto, 96, "full", seen)
    assert ex.augment == augment.AUTO_COPIES and "has seen them" in d["reason"] and "2.000" in d["reason"]
    unseen = {"loss": 4.0, "train_loss": 3.9}  # a pretrained teacher on the user's own rows
    ex, d = augment.resolve(auto, 300, "full", unseen)
    assert ex.augment == 0 and "has not seen them" in d["reason"] and d["auto"]
    ex, d = augment.resolve(auto, 96, "full", unseen)  # ... but few rows: a couple of copies still pay
    assert ex.augment == augment.UNSEEN_COPIES == 2 and "they are few (< 128)" in d["reason"]
    for unknown in (None, {"loss": 4.0}, {"loss": 4.0, "train_loss": None}):  # nothing to compare: size alone
        assert augment.resolve(auto, 96, "full", unknown)[0].augment == augment.AUTO_COPIES
    assert augment.resolve(auto, augment.AUTO_BELOW, "full", seen)[0].augment == 0  # large: off either way
    assert augment.resolve(ExtractSettings(augment=2), 96, "full", {"loss": 4.0, "train_loss": 3.9})[0].augment == 2


def _auto(tmp_path, teachers, name, **sections):
    extract = {"augment": augment.AUTO, "augment_samples": 0, **sections.pop("extract", {})}
    return setup_home(tmp_path / name, teachers["llama"][0], extract=extract, **sections)


def test_rule_on_a_small_dataset_extracts_copies_records_why_and_distill_reads_them(tmp_path, seen_teacher):
    teachers = {"llama": (seen_teacher, None)}
    cfg, teacher, ref, paths = _auto(tmp_path, teachers, "a", extract={"max_samples": 6},
                                     distill={"max_steps": 2, "batch_size": 4, "epochs": 100},
                                     memory={"budget": "8GB"})
    res = run_extract(cfg, teacher, ref, paths)
    real_dir = paths.shard_dir("tiny", SLUG)
    real = shards.read_manifest(real_dir)
    n, q = real["planned_sequences"], real["heldout_quality"]
    assert q["train_loss"] <= augment.SEEN_RATIO * q["loss"]  # measured by extract: the teacher knows the rows
    assert res.data["augment"]["copies"] == 16 and res.data["augment"]["auto"]
    assert res.data["augment"]["reason"].startswith(f"{n} training sequences < 512 and the teacher has seen them")
    aug = shards.read_manifest(augment.folder(real_dir))
    assert aug["augment"] == {"copies": 16, "p": 0.15} and aug["augment_rule"]["auto"]
    assert aug["total_sequences"] == 16 * n
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    streams, _ = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))  # distill resolves it the same way
    assert [s.n for s in streams] == [n, 16 * n]
    cfg_b, teacher_b, ref_b, paths_b = _auto(tmp_path, teachers, "b", extract={"max_samples": 6})
    run_extract(cfg_b, teacher_b, ref_b, paths_b)  # same inputs: same shards, and the same settings fingerprint
    assert files(augment.folder(paths_b.shard_dir("tiny", SLUG))) == files(augment.folder(real_dir))
    assert cfg_b.fingerprint("extract") == cfg.fingerprint("extract")


def test_rule_gives_a_teacher_that_never_saw_the_rows_no_copies_and_distill_agrees(tmp_path, teachers, monkeypatch):
    monkeypatch.setattr(augment, "AUTO_SAMPLES_BELOW", 2)  # the tiny dataset counts as more than a few rows
    cfg, teacher, ref, paths = _auto(tmp_path, teachers, "unseen", extract={"max_samples": 6})
    res = run_extract(cfg, teacher, ref, paths)  # an untrained teacher: as lost on the rows as on held-out text
    real_dir = paths.shard_dir("tiny", SLUG)
    q = shards.read_manifest(real_dir)["heldout_quality"]
    assert q["train_loss"] > augment.SEEN_RATIO * q["loss"]
    assert res.data["augment"]["copies"] == 0 and "has not seen them" in res.data["augment"]["reason"]
    assert "augmented" not in res.data and not augment.folder(real_dir).exists()
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    assert len(open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))[0]) == 1


def test_rule_leaves_a_large_dataset_alone_and_an_sli_teacher_gets_no_samples(tmp_path, teachers, monkeypatch):
    monkeypatch.setattr(augment, "AUTO_BELOW", 2)  # the tiny dataset counts as large
    cfg, teacher, ref, paths = _auto(tmp_path, teachers, "large", extract={"max_samples": 6})
    res = run_extract(cfg, teacher, ref, paths)
    assert res.data["augment"]["copies"] == 0 and "augmented" not in res.data
    assert not augment.folder(paths.shard_dir("tiny", SLUG)).exists()
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    assert len(open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))[0]) == 1
    monkeypatch.setattr(augment, "AUTO_BELOW", 512)
    cfg, teacher, ref, paths = _auto(tmp_path, teachers, "sli", run={"sli": "always"},
                                     extract={"augment": 0, "augment_samples": augment.AUTO, "max_samples": 6})
    res = run_extract(cfg, teacher, ref, paths)
    assert res.data["augment"]["samples"] == 0 and "teacher mode sli" in res.data["augment"]["reason"]
    assert "augmented" not in res.data
