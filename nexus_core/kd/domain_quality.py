"""Each teacher's quality per domain on one scale, and the teacher each domain should be routed to.

The scale is the held-out loss in nats per character that extraction measures for every teacher on
its own tokenization (teachers/quality.py, stored in the extraction manifest): a coarser tokenizer
has a higher loss per token for the same knowledge, so per-token losses of teachers with different
tokenizers cannot be compared, per-character ones can. Distill weighs teachers by exactly these
numbers (streams._weigh -> align.quality_weights), and the router names the teacher distill trusted
most, so the router never contradicts the distillation.
"""

from __future__ import annotations

import math

from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.errors import CorruptArtifactError
from nexus_core.kd import align
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage.shards import read_manifest


def loss_per_char(manifest: dict) -> float | None:
    """The teacher's held-out nats per character on the manifest's dataset, or None when not measured."""
    v = (manifest.get("heldout_quality") or {}).get("loss_per_char")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _manifest(paths: Paths, teacher_id: str, dataset: str) -> dict:
    try:
        return read_manifest(paths.shard_dir(teacher_id, DatasetRef.parse(dataset).slug))
    except CorruptArtifactError:  # not extracted (yet): no measured quality
        return {}


def domain_quality(cfg: Settings, plan: DistillPlan, paths: Paths) -> dict[str, dict[str, dict]]:
    """{dataset: {teacher: {"loss_per_char": x or None, "weight": w}}} for every teacher of the plan on
    each of its datasets: the held-out losses from the extraction manifests and the weights distill
    gives the teachers from them (registry weight x softmax(-loss / tau))."""
    out: dict[str, dict[str, dict]] = {}
    for d in plan.datasets:
        teachers = [t for t in plan.teachers if d in plan.teacher_datasets(t)]
        losses = {t.teacher_id: loss_per_char(_manifest(paths, t.teacher_id, d)) for t in teachers}
        weights = align.quality_weights(losses, {t.teacher_id: t.weight for t in teachers},
                                        cfg.distill.teacher_quality_tau)
        out[d] = {t: {"loss_per_char": losses[t], "weight": round(weights[t], 6)} for t in sorted(losses)}
    return out


def best_teachers(quality: dict[str, dict[str, dict]], primary: str,
                  token_losses: dict[str, dict[str, float]] | None = None) -> dict[str, dict]:
    """{dataset: {"teacher", "reason"}}: per domain the teacher with the largest distill weight (with
    equal registry weights: the lowest held-out loss per character), ties to the lower loss, then id.

    When some teacher's loss per character is unknown (shards of an older Nexus, a slow tokenizer),
    the scales cannot be compared: the lowest per-token loss among `token_losses` (teachers that share
    the student's tokenizer, results/eval.json) decides, else the primary teacher.
    """
    out = {}
    for d, scores in quality.items():
        known = {t: s for t, s in scores.items() if s["loss_per_char"] is not None}
        if scores and len(known) == len(scores):
            best = min(known, key=lambda t: (-known[t]["weight"], known[t]["loss_per_char"], t))
            table = ", ".join(f"{t} {s['loss_per_char']:.4g}" for t, s in sorted(known.items(), key=lambda kv: kv[1]["loss_per_char"]))
            reason = (f"largest distill weight ({known[best]['weight']:.3g}) from held-out nats per character: "
                      f"{table}")
        elif (token_losses or {}).get(d):
            losses = token_losses[d]
            best = min(losses, key=lambda t: (losses[t], t))
            reason = "lowest held-out loss per token among teachers sharing the student's tokenizer " \
                     "(loss per character not measured for every teacher)"
        else:
            best, reason = primary, "primary teacher (no held-out quality measured)"
        out[d] = {"teacher": best, "reason": reason}
    return out
