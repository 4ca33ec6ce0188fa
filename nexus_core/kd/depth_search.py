"""Depth and width chosen together (Minitron): with --student-params and no depth set, a few depths are tried.

How a size cut is shared between depth and width matters, and Minitron measures it rather than guess:
each candidate here keeps a share of the primary teacher's layers (DEPTH_SHARES, by block influence) and
is width-pruned to the target, built exactly as a student of that depth would be (kd/student.py); it is
scored by its mean next-token cross-entropy on the calibration rows before any training (Minitron's LM
loss after pruning), and the lowest score wins. A depth whose width pruning cannot reach the target, or
whose student would not fit the memory budget, is recorded as skipped. One candidate is held at a time.
"""

from __future__ import annotations

import time
from typing import Callable

import structlog
import torch

from nexus_core.errors import BadInputError
from nexus_core.teachers import quality
from nexus_core.teachers.runner import FullRunner

log = structlog.get_logger("nexus.distill")
DEPTH_SHARES = (1.0, 0.75, 0.5)  # of the teacher's layers, deepest first: on a tie the deeper student wins
SCORE_BATCH = 4  # rows per scoring forward


def depths(n_layers: int) -> list[int]:
    """The kept-layer counts to try, deepest first, without repeats."""
    return list(dict.fromkeys(max(1, round(n_layers * s)) for s in DEPTH_SHARES))


@torch.no_grad()
def lm_loss(model, rows: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of the model on rows (n, T), scored as
    evaluation scores a student (teachers/quality.lm_loss: the head a vocabulary slice at a time)."""
    model.eval()
    runner = FullRunner.of(model, str(rows.device))
    return quality.lm_loss(runner, rows, mask, None, model.config.vocab_size, str(rows.device), SCORE_BATCH)["loss"]


def _shape(config) -> dict:
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads}


def _try(build: Callable, n: int, rows, mask) -> tuple[dict, tuple | None]:
    """One candidate built and scored: (its record, (n, model, info)), or (a skipped record, None)."""
    try:
        model, info = build(n)
    except BadInputError as exc:
        return {"layers": n, "skipped": str(exc)}, None
    score = lm_loss(model, rows, mask)
    row = {"layers": n, "kept_layers": info["kept_layers"], "shape": _shape(model.config),
           "params": info["params"], "score": round(score, 4)}
    return row, (n, model, info)


def search(n_layers: int, build: Callable, rows: torch.Tensor, mask: torch.Tensor, scored_on: str):
    """The best of the candidate depths. build(n_keep) -> (model, info), raising BadInputError when that depth
    cannot be built; returns (model, info) with info["depth_search"] recording every candidate and the choice,
    or None when no depth could be built (the caller's fixed-depth path then says why, or builds otherwise)."""
    t0 = time.monotonic()
    tried, held = [], None
    for n in depths(n_layers):
        held = None  # the previous candidate is freed before the next is built
        row, held = _try(build, n, rows, mask)
        tried.append(row)
    scored = [r for r in tried if "score" in r]
    if not scored:
        log.warning("distill.student_search", candidates=tried, chosen=None)
        return None
    best = min(scored, key=lambda r: r["score"])  # min keeps the first on ties: the deeper candidate
    if held is not None and held[0] == best["layers"]:
        model, info = held[1], held[2]  # the last one built is the best: no need to build it again
    else:
        held = None
        model, info = build(best["layers"])  # deterministic: the same student as when it was scored
    record = {"chosen": best["layers"], "teacher_layers": n_layers, "candidates": tried, "scored_on": scored_on,
              "metric": "mean next-token cross-entropy (nats) before training",
              "seconds": round(time.monotonic() - t0, 2)}
    log.info("distill.student_search", **record)
    return model, {**info, "depth_search": record}
