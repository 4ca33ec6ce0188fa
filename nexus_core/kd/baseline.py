"""The plain fine-tune baseline: the same student init, rows and steps as distillation, trained
with cross-entropy alone at the best learning rate of a small sweep. It answers "did
distillation pay off?" in the report (`nexus run --baseline`, and the demo).

The sweep is tuned on the held-out split the report scores, so the baseline gets its best
shot: KD ahead of it is KD ahead of a tuned fine-tune, not of an untuned one.

Writes results/baseline.json: {"steps", "batch_size", "lr", "sweep": [{"lr", "mean_loss", "datasets"}],
"datasets": {d: <the student's held-out metrics, as kd.evaluate gives them>}, "key", ...}.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time

import structlog
import torch
from safetensors.torch import load_file

from nexus_core import progress
from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.kd.evaluate import evaluate
from nexus_core.kd.student import build_student
from nexus_core.kd.trainer import train_causal_lm
from nexus_core.kd.training import config_hash
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage import atomic
from nexus_core.storage.profiles import read_profiles

log = structlog.get_logger("nexus.baseline")
# The sweep: distillation's peak lr times these. A fine-tune's best lr is rarely more than 3x
# away from a distillation's on the same student; three points keep the cost at 3 short runs.
# When the best is at an end of the default sweep, it goes on that way (up to MAX_EXTRA more lrs,
# each a factor STEP further), so the baseline is not held back by where the sweep stopped.
LR_FACTORS = (0.3, 1.0, 3.0)
STEP, MAX_EXTRA = 10 ** 0.5, 2


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


def sweep_lrs(cfg: Settings) -> list[float]:
    return [float(f"{cfg.distill.lr * f:.3g}") for f in LR_FACTORS]


def mean_loss(datasets: dict) -> float:
    """What picks the best lr: the mean held-out loss over the domains (each domain counts once); a loss
    that is not finite counts as infinitely bad (and _train_one marks a run at over twice a uniform guess diverged)."""
    losses = [m.get("loss") for m in datasets.values()]
    if not losses or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        return math.inf
    return sum(losses) / len(losses)


def _finite(metrics: dict) -> dict:
    """A diverged run's NaN/inf as null: baseline.json stays plain JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def baseline_key(cfg: Settings, plan: DistillPlan, steps: int, lrs: list[float]) -> str:
    """What the baseline depends on: a baseline.json with this key is not trained again."""
    body = {"plan": plan.fingerprint(), "settings": config_hash(cfg), "steps": steps, "lrs": lrs,
            "heldout_fraction": cfg.extract.heldout_fraction}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _cached(paths: Paths, key: str) -> dict | None:
    try:
        old = json.loads((paths.results / "baseline.json").read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("key") == key else None


def _score(entry: dict) -> float:
    return math.inf if entry["mean_loss"] is None else entry["mean_loss"]


def _further_lr(sweep: list[dict]) -> float | None:
    """The next lr past the end of the sweep where the best one sits; None when the best is inside."""
    ordered = sorted(sweep, key=lambda s: s["lr"])
    best = min(ordered, key=_score)
    if best is ordered[0]:
        return float(f"{best['lr'] / STEP:.3g}")
    if best is ordered[-1]:
        return float(f"{best['lr'] * STEP:.3g}")
    return None


def _train_one(cfg: Settings, plan: DistillPlan, paths: Paths, init, rows, tok, profiles: dict, steps: int, lr: float,
               batch: int, device: str) -> dict:
    """The plain fine-tune at one lr from (a copy of) the shared init: {"lr", "mean_loss", "datasets", "diverged"}."""
    model = copy.deepcopy(init)  # the same init for every lr
    with progress.Bar(f"baseline lr {lr:g}", total=steps, unit="steps") as bar:
        train_causal_lm(model, *rows, steps=steps, lr=lr, batch_size=batch, seed=cfg.run.seed,
                        weight_decay=cfg.distill.weight_decay, grad_clip=cfg.distill.grad_clip,
                        on_step=lambda step, loss: bar.update(step + 1, loss=loss))
    with progress.Bar("evaluate", total=None, unit="sequences").current():
        metrics = evaluate(cfg, plan, paths, model, tok, device, profiles, teachers=False)
    datasets = {d: _finite(m["student"]) for d, m in metrics.items()}
    score = mean_loss(datasets)
    # Diverged: not finite, or over twice a uniform guess's loss (even a random init scores about log V; an lr far
    # too large can leave finite but absurd losses, thousands of nats, depending on the machine's float paths).
    diverged = not math.isfinite(score) or score > 2 * math.log(model.config.vocab_size)
    log.info("baseline.lr_done", lr=lr, mean_heldout_loss=score, diverged=diverged)
    return {"lr": lr, "mean_loss": None if diverged else round(score, 6), "datasets": datasets, "diverged": diverged}


def run_ce_baseline(cfg: Settings, plan: DistillPlan, paths: Paths, steps: int, lrs: list[float] | None = None,
                    device: str = "cpu") -> dict:
    """Train the plain fine-tune at each lr from one student init (the default sweep goes on past an end
    that wins); keep the best; write baseline.json."""
    from nexus_core.teachers.loading import tokenizer_from

    extend = lrs is None  # an explicit list is swept as given
    lrs = list(lrs or sweep_lrs(cfg))
    key = baseline_key(cfg, plan, steps, lrs)
    if (done := _cached(paths, key)) is not None:
        log.info("baseline.cached", lr=done.get("lr"), steps=steps)
        return done
    t0 = time.monotonic()
    profiles = read_profiles(paths, plan.teachers)
    init, info = build_student(cfg, plan, paths, device, profiles.get(plan.primary) or {})
    init = init.to(device)
    ids, mask = _training_rows(paths, plan)
    tok = tokenizer_from(plan.primary_teacher.path, plan.primary_teacher.trust_remote_code)
    batch = cfg.distill.batch_size * max(1, cfg.distill.grad_accum)

    def train(lr: float) -> dict:
        return _train_one(cfg, plan, paths, init, (ids, mask), tok, profiles, steps, lr, batch, device)

    sweep = [train(lr) for lr in lrs]
    for _ in range(MAX_EXTRA if extend else 0):
        further = _further_lr(sweep)
        if further is None:
            break
        sweep.append(train(further))
    best = min(sweep, key=_score)
    out = {"steps": steps, "batch_size": batch, "student": info, "lr": best["lr"], "lrs": [s["lr"] for s in sweep],
           "sweep": sorted(sweep, key=lambda s: s["lr"]),
           "datasets": best["datasets"], "picked_by": "lowest mean held-out loss over the domains", "key": key,
           "plan_fp": plan.fingerprint(), "seconds": round(time.monotonic() - t0, 2)}
    atomic.write_json(paths.results / "baseline.json", out)
    return out
