"""The plain fine-tune baseline: the same student, data and steps as distillation, trained
with cross-entropy alone. It answers "did distillation help?" in the demo and the report.

Writes results/baseline.json: {"steps", "batch_size", "datasets": {d: {"loss", "perplexity", "tokens"}}}.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.kd.evaluate import heldout, lm_loss, model_logits
from nexus_core.kd.student import build_student
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage import atomic
from nexus_core.storage.profiles import read_profile


def _training_rows(paths: Paths, plan: DistillPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The primary teacher's shard rows: exactly the token rows distillation trained on."""
    t = plan.primary_teacher
    ids, masks = [], []
    for d in plan.teacher_datasets(t):
        folder = paths.shard_dir(t.teacher_id, DatasetRef.parse(d).slug)
        for shard in sorted(folder.glob("shard-*.safetensors")):
            tensors = load_file(str(shard))
            ids.append(tensors["input_ids"])
            masks.append(tensors["attention_mask"])
    if not ids:
        raise FileNotFoundError(f"no shards of {t.teacher_id} under {paths.memory}: run the pipeline first")
    return torch.cat(ids), torch.cat(masks)


def run_ce_baseline(cfg: Settings, plan: DistillPlan, paths: Paths, steps: int) -> dict:
    from nexus_core.kd.trainer import train_causal_lm
    from nexus_core.teachers.loading import tokenizer_from

    t0 = time.monotonic()
    model, info = build_student(cfg, plan, paths, "cpu", read_profile(paths, plan.primary) or {})
    ids, mask = _training_rows(paths, plan)
    batch = cfg.distill.batch_size * max(1, cfg.distill.grad_accum)
    train_causal_lm(model, ids, mask, steps=steps, lr=cfg.distill.lr, batch_size=batch, seed=cfg.run.seed,
                    weight_decay=cfg.distill.weight_decay, grad_clip=cfg.distill.grad_clip)
    tok = tokenizer_from(plan.primary_teacher.path, plan.primary_teacher.trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0]
    out = {"steps": steps, "batch_size": batch, "student": info, "datasets": {}}
    for d in plan.datasets:
        held = heldout(cfg, paths, tok, d)
        if held is not None:
            out["datasets"][d] = lm_loss(model_logits(model), held[0], held[1], vocab, "cpu")
    out["seconds"] = round(time.monotonic() - t0, 2)
    atomic.write_json(paths.results / "baseline.json", out)
    return out

