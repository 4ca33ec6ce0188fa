"""Profile stage: measure a teacher, choose how to run it (full or SLI), rank its layers.

Everything is measured: parameter counts, bytes and dtypes from the safetensors headers
(no weights loaded for that), vocabulary sizes from the config, weights and tokenizer, and
layer importance as block influence (mean 1 - cos(layer input, layer output)) over a
calibration sample of the teacher's training data, run in the mode the teacher will use.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from nexus_core import data
from nexus_core.config import Settings
from nexus_core.context import StageContext, StageResult
from nexus_core.data import DatasetRef
from nexus_core.errors import CorruptArtifactError, DatasetError
from nexus_core.paths import Paths
from nexus_core.records.registry import Teacher
from nexus_core.storage.atomic import write_json
from nexus_core.teachers.expert_load import ExpertLoad
from nexus_core.teachers.loading import (
    TeacherLoadError,
    check_against_weights,
    load_config,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_vocab,
)
from nexus_core.teachers.mode import choose_mode, open_runner
from nexus_core.teachers.runner import default_dtype
from nexus_core.teachers.weights import open_weights


def run_profile(cfg: Settings, teacher: Teacher, paths: Paths, datasets: list[DatasetRef],
                ctx: StageContext = StageContext()) -> StageResult:
    out = paths.profile(teacher.teacher_id)
    teacher_fp, settings_fp = teacher.fingerprint(), _settings_fp(cfg, teacher, datasets)
    cached = _cached(out, teacher_fp, settings_fp)
    if cached is not None:
        return StageResult(artifacts=[out], data=_summary(cached, cached=True))
    ctx.started()

    # 1. Static facts: weights headers, config, tokenizer.
    try:
        store = open_weights(teacher.path)
        meta = store.meta
    except CorruptArtifactError as exc:
        raise TeacherLoadError(f"teacher {teacher.teacher_id!r}: {exc}") from None
    config = load_config(teacher)
    tcfg = config.get_text_config()
    tok = load_tokenizer(teacher)
    head_vocab, real_vocab = check_against_weights(teacher, config, meta), tokenizer_vocab(tok)
    if real_vocab > head_vocab:
        raise TeacherLoadError(f"teacher {teacher.teacher_id!r}: the tokenizer has {real_vocab} tokens but the model only "
                               f"{head_vocab} vocabulary rows; the tokenizer does not belong to these weights")
    moe = _moe(tcfg)
    active = meta.active_params(*(moe.values() if moe else (None, None)))

    # 2. Mode: full load or sequential layer ingestion.
    device = cfg.resolved_device()
    dtype = default_dtype(device, meta.main_dtype)
    mode, reason, sli_ok, sli_why, sizes = choose_mode(cfg, teacher, config, meta, device, dtype)

    # 3. Layer importance over a calibration sample, in that mode; for a MoE teacher the same forward
    #    counts each expert's routed load (the dense student is seeded from the most-used experts).
    ids, mask, calib = _calibration(cfg, tok, paths, datasets)
    runner = open_runner(teacher, mode, device, dtype, memory_budget_bytes=sizes["budget_bytes"])
    try:
        with ExpertLoad(runner.layers) as load:
            importance = _block_influence(runner, ids, mask, cfg.extract.batch_size)
    finally:
        runner.close()
    L = len(importance)
    n_critical = max(1, math.ceil(cfg.profile.critical_ratio * L))
    critical = sorted(sorted(range(L), key=lambda i: (-importance[i], i))[:n_critical])

    profile = {
        "teacher_id": teacher.teacher_id, "teacher_fp": teacher_fp, "settings_fp": settings_fp,
        "model_type": tcfg.model_type, "architecture": (config.architectures or [type(config).__name__])[0],
        "params": meta.params, "active_params": active, "params_hint": teacher.params,
        "bytes": meta.bytes, "dtypes": meta.dtypes, "weight_files": meta.files,
        "layers": int(tcfg.num_hidden_layers), "hidden": int(tcfg.hidden_size),
        "head_vocab": head_vocab, "config_vocab": int(tcfg.vocab_size), "tokenizer_vocab": real_vocab,
        "vocab_padded": head_vocab > real_vocab, "tokenizer_fp": tokenizer_fingerprint(tok),
        "chat_template": bool(getattr(tok, "chat_template", None)), "moe": moe,
        "mode": mode, "mode_reason": reason, "sli_supported": sli_ok, "sli_unsupported_reason": sli_why,
        "device": device, "dtype": str(dtype).replace("torch.", ""), **sizes,
        "layer_importance": [round(float(x), 8) for x in importance], "critical_layers": critical,
        "calibration": calib, "expert_load": load.by_layer() if moe else {},
        "vision_tower": ("never loaded: the language model alone is distilled on text"
                         if getattr(store, "language_model_only", False) else None),
    }
    write_json(out, profile)
    return StageResult(artifacts=[out], data=_summary(profile, cached=False))


def _moe(tcfg) -> dict | None:
    experts = next((getattr(tcfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                    if isinstance(getattr(tcfg, a, None), int) and getattr(tcfg, a) > 1), None)
    per_tok = next((getattr(tcfg, a) for a in ("num_experts_per_tok", "moe_topk", "top_k_experts")
                    if isinstance(getattr(tcfg, a, None), int)), None)
    return {"experts": experts, "experts_per_tok": per_tok} if experts and per_tok else None


def _calibration(cfg: Settings, tok, paths: Paths, datasets: list[DatasetRef]):
    """calibration_samples packed sequences from the datasets' training splits (held-out never used)."""
    n, T = cfg.profile.calibration_samples, cfg.extract.seq_len
    if not datasets:  # no data named: a fixed random-token sample still ranks layers deterministically
        g = torch.Generator().manual_seed(cfg.run.seed)
        ids = torch.randint(0, tokenizer_vocab(tok), (n, T), generator=g, dtype=torch.int32)
        return ids, torch.ones(n, T, dtype=torch.uint8), {"source": "random tokens", "sequences": n, "tokens": n * T}
    per = max(1, math.ceil(n / len(datasets)))
    ids_parts, mask_parts, used, unusable = [], [], [], []
    for ref in datasets:
        # a bad dataset fails its own extract job; calibration just does without it
        try:
            texts = data.load_texts(paths, ref, cfg.extract.text_field)
        except DatasetError as exc:
            unusable.append(f"{ref}: {exc}")
            continue
        train, _ = data.split(texts, cfg.extract.heldout_fraction)
        if train:
            used.append(str(ref))
            ids, mask = data.pack(tok, train, T, per)
            ids_parts.append(ids)
            mask_parts.append(mask)
    if not ids_parts:
        raise DatasetError(f"profile: no training documents to calibrate on in {', '.join(map(str, datasets))}"
                           + (f" ({'; '.join(unusable)})" if unusable else ""))
    ids, mask = torch.cat(ids_parts)[:n], torch.cat(mask_parts)[:n]
    return ids, mask, {"source": used, "unusable": unusable, "sequences": int(ids.shape[0]), "tokens": int(mask.sum())}


def _block_influence(runner, ids, mask, batch_size: int) -> list[float]:
    """Token-weighted mean over batches of each layer's block influence."""
    total = torch.zeros(runner.num_layers, dtype=torch.float64)
    weight = 0.0
    for b0 in range(0, ids.shape[0], batch_size):
        m = mask[b0:b0 + batch_size]
        out = runner.forward(ids[b0:b0 + batch_size], m, influence=True)
        w = float(m.sum())
        total += out.influence.double().cpu() * w
        weight += w
    return (total / max(weight, 1.0)).tolist()


def _settings_fp(cfg: Settings, teacher: Teacher, datasets: list[DatasetRef]) -> str:
    d = cfg.to_dict()
    payload = {"profile": d["profile"], "memory": d["memory"], "sli": teacher.sli or d["run"]["sli"],
               "device": cfg.resolved_device(), "seq_len": d["extract"]["seq_len"],
               "heldout": d["extract"]["heldout_fraction"], "text_field": d["extract"]["text_field"],
               "batch_size": d["extract"]["batch_size"], "datasets": sorted(map(str, datasets))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cached(out: Path, teacher_fp: str, settings_fp: str) -> dict | None:
    try:
        prof = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(prof, dict) and prof.get("teacher_fp") == teacher_fp and prof.get("settings_fp") == settings_fp
    return prof if ok else None


def _summary(p: dict, cached: bool) -> dict:
    keys = ("params", "active_params", "layers", "hidden", "head_vocab", "tokenizer_vocab", "mode", "mode_reason",
            "critical_layers")
    return {**{k: p.get(k) for k in keys}, "cached": cached}


