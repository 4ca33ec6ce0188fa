"""The router names the teacher that is best per domain on a scale that compares tokenizers.

Two real teachers, extracted for real: 'a-bpe' shares the student's tokenizer but is untrained;
'b-uni' has another tokenizer (unigram, adding <bos> like Gemma's) and has been trained on the domain. Only 'a-bpe' can be
scored per token against the student's ids (results/eval.json), which used to hand it every domain;
per character, 'b-uni' is clearly better, distill weighs it higher, and the router must pick it.
"""

from __future__ import annotations

import pytest
import torch

from nexus_core import data
from nexus_core.data import DatasetRef
from nexus_core.demo.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.kd.domain_quality import best_teachers, domain_quality
from nexus_core.kd.streams import open_streams
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher, _weight_files
from nexus_core.stages.extract import run_extract
from nexus_core.stages.profile import run_profile
from nexus_core.storage.profiles import read_profiles
from tests.helpers import settings, write_datasets

DATASET = "reasoning/arithmetic"


def _teacher(paths: Paths, tid: str, tok, train_texts: list[str] | None = None) -> Teacher:
    """A 2-layer Llama with `tok`; trained for a few steps on `train_texts` when given."""
    model = build_model(make_config("llama", vocab_size=len(tok), hidden=32, layers=2, heads=4, kv_heads=2,
                                    tokenizer=tok, max_pos=64), seed=1)
    if train_texts:
        ids, mask = data.pack(tok, train_texts, 32)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        model.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            pick = torch.randint(0, ids.shape[0], (8,), generator=g)
            x, m = ids[pick].long(), mask[pick].long()
            loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    folder = save_model(model, tok, paths.home / "models" / tid)
    return Teacher(teacher_id=tid, path=str(folder.resolve()), status="ready", source=f"registry/{tid}.json",
                   weight_files=_weight_files(folder))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    home = tmp_path_factory.mktemp("route-teacher")
    paths = Paths(home).ensure()
    texts = write_datasets(paths, 240, (DATASET,))[DATASET]
    cfg = settings(home, extract={"max_samples": 8, "batch_size": 8}, profile={"calibration_samples": 4})
    train, _ = data.split(texts, cfg.extract.heldout_fraction)
    a = _teacher(paths, "a-bpe", train_tokenizer(texts, 300, "bpe"))
    b = _teacher(paths, "b-uni", train_tokenizer(texts, 200, "unigram", add_bos=True), train)  # Gemma-style BOS
    ref = DatasetRef.parse(DATASET)
    for t in (a, b):
        run_profile(cfg, t, paths, [ref])
        run_extract(cfg, t, ref, paths)
    plan = DistillPlan(teachers=(a, b), primary="a-bpe", datasets=(DATASET,))
    return cfg, plan, paths


def test_the_teacher_better_per_character_is_chosen_whatever_its_tokenizer(extracted):
    cfg, plan, paths = extracted
    quality = domain_quality(cfg, plan, paths)[DATASET]
    assert quality["b-uni"]["loss_per_char"] < quality["a-bpe"]["loss_per_char"]
    # eval.json scores only the teacher sharing the student's tokenizer: that must not decide
    chosen = best_teachers({DATASET: quality}, plan.primary, {DATASET: {"a-bpe": 0.5}})[DATASET]
    assert chosen["teacher"] == "b-uni" and "nats per character" in chosen["reason"]


def test_the_router_ranks_teachers_by_the_weights_distill_uses(extracted):
    cfg, plan, paths = extracted
    quality = domain_quality(cfg, plan, paths)[DATASET]
    _, info = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))
    for tid, scores in quality.items():
        dom = info["teacher_usage"][tid]["domains"][DATASET]
        assert dom["heldout_loss_per_char"] == scores["loss_per_char"]
        assert dom["weight"] == pytest.approx(scores["weight"], abs=1e-4)
    # b-uni's BOS-led rows align with the student's rows by character (its 8 rows of a finer tokenizer
    # cover about 40 % of the student's text; without BOS it would be 40.2 %, BOS takes a slot per row)
    assert info["teacher_usage"]["b-uni"]["domains"][DATASET]["aligned_positions_pct"] > 35
    assert quality["b-uni"]["weight"] > quality["a-bpe"]["weight"]


def test_without_a_per_character_loss_for_every_teacher_the_old_rule_applies():
    quality = {"d": {"a": {"loss_per_char": 0.9, "weight": 1.0}, "b": {"loss_per_char": None, "weight": 1.0}}}
    assert best_teachers(quality, "b", {"d": {"a": 2.0}})["d"]["teacher"] == "a"
    assert best_teachers(quality, "b", {})["d"] == {"teacher": "b",
                                                   "reason": "primary teacher (no held-out quality measured)"}
