"""Distillation losses: top-k KL with an explicit tail bucket, cross-entropy, hidden-state MSE.

Every function returns a *sum* over real positions; the training loop divides by the
number of real tokens in the whole accumulated batch (not per micro-batch), so gradient
accumulation, padding and out-of-memory splitting do not change the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOG_TINY = math.log(1e-30)  # the shards' floor for an empty tail; we clamp to the same value


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, via expm1 (accurate when x is close to 0), floored at LOG_TINY.

    x is clamped just below 0 first so that neither the value nor its gradient is infinite.
    """
    x = x.clamp(max=-1e-30)
    return torch.log(-torch.expm1(x)).clamp(min=LOG_TINY)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's (k+1)-bucket log-distribution at temperature T: (N, k), (N,) -> (N, k+1).

    Why a tail bucket: the shards keep only the top-k log-probabilities, so the rest of the
    vocabulary holds `exp(tail_logmass)` of the teacher's mass. Renormalising the top-k to 1
    would tell the student the teacher is surer than it is, and would leave the student's own
    mass outside the top-k unpenalised. With the tail as a (k+1)-th bucket both sides are
    full distributions over the same partition of the vocabulary, so the KL is the exact KL
    of the coarse-grained distributions (a lower bound of the full KL, equal to it when the
    tail is empty).
    Temperature: the stored values are log-probabilities at T=1; at T != 1 we temper the
    bucket distribution (the tail bucket as one unit), because the individual tail
    probabilities are not on disk. At T=1 this is exact.
    """
    logits = torch.cat([topk_logprobs.float(), tail_logmass.float().unsqueeze(-1)], dim=-1)  # (N, k+1)
    # log_softmax also absorbs the float16 rounding of the stored log-probabilities.
    return F.log_softmax(logits / temperature, dim=-1)


def student_buckets(student_logp: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The student's (k+1)-bucket log-distribution: full log-probs (N, V), ids (N, k) -> (N, k+1).

    The tail bucket is log(1 - sum of the student's top-k probabilities), computed from the
    log-sum-exp of the gathered values (one (N, k) gather, no second pass over V).
    """
    top = student_logp.gather(-1, topk_ids)  # (N, k)
    tail = log1mexp(torch.logsumexp(top, dim=-1))  # (N,)
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def bucket_kl(student_logp_T: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logmass: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position over k+1 buckets: (..., V), (..., k), (..., k), (...) -> (...).

    Not yet scaled by T^2."""
    q_log = teacher_buckets(topk_logprobs, tail_logmass, temperature)  # (N, k+1)
    s_log = student_buckets(student_logp_T, topk_ids.long())  # (N, k+1)
    return (q_log.exp() * (q_log - s_log)).sum(-1)


@dataclass
class TeacherTargets:
    """One teacher's stored targets for a micro-batch; position t describes the token at t+1."""

    weight: float
    topk_ids: torch.Tensor  # (b, T, k) int
    topk_logprobs: torch.Tensor  # (b, T, k) float16/32
    tail_logmass: torch.Tensor  # (b, T) float32


@dataclass
class LossSums:
    """Sums over real positions (tensors with grad for the ones that train)."""

    kd: torch.Tensor
    ce: torch.Tensor
    hidden: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


def masks(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KD positions: every real position (its target is the teacher's next-token distribution).
    CE positions: real positions whose next token is real too. (b, T) -> two bool (b, T)."""
    m = attention_mask.bool()
    ce = torch.zeros_like(m)
    ce[:, :-1] = m[:, :-1] & m[:, 1:]
    return m, ce


def loss_sums(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              targets: list[TeacherTargets], temperature: float, alpha: float, vocab: int) -> LossSums:
    """KD and CE sums for one micro-batch. logits (b, T, V_head) -> LossSums.

    Several teachers sharing the tokenizer are combined per token: sum_t w_t * KL_t / sum_t w_t.
    `vocab` is the tokenizer's real vocabulary: head rows past it are padding and are dropped
    so that student and teacher distributions have the same support.
    """
    kd_mask, ce_mask = masks(attention_mask)
    z = logits[..., :vocab].float()  # (b, T, V)
    logp = F.log_softmax(z, dim=-1)  # (b, T, V), shared by CE and (at T=1) by KD
    # CE: position t predicts token t+1.
    nxt = torch.zeros_like(input_ids, dtype=torch.long)
    nxt[:, :-1] = input_ids[:, 1:].long()
    ce_tok = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (b, T)
    ce = (ce_tok * ce_mask).sum()
    kd = torch.zeros((), device=logits.device)
    if alpha > 0 and targets:
        logp_T = logp if temperature == 1.0 else F.log_softmax(z / temperature, dim=-1)
        total_w = sum(t.weight for t in targets)
        for t in targets:
            # All positions at once (no boolean-index copy of the (b, T, V) tensor); padding is zeroed after.
            kl = bucket_kl(logp_T, t.topk_ids, t.topk_logprobs, t.tail_logmass, temperature)  # (b, T)
            kd = kd + (t.weight / total_w) * torch.where(kd_mask, kl, 0.0).sum()
    return LossSums(kd=kd, ce=ce)


def hidden_sum(student_h: torch.Tensor, teacher_h: torch.Tensor, attention_mask: torch.Tensor,
               proj: torch.nn.Module | None) -> torch.Tensor:
    """Sum over real positions of the mean-over-width squared error: (b, T, Hs), (b, T, Ht) -> scalar."""
    s = proj(student_h.float()) if proj is not None else student_h.float()  # (b, T, Ht)
    err = (s - teacher_h.float()).pow(2).mean(-1)  # (b, T)
    return (err * attention_mask.bool()).sum()


def combine(sums: LossSums, n_kd: int, n_ce: int, alpha: float, temperature: float,
            hidden_weight: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KD + (1 - alpha) * CE (+ hidden), each divided by the accumulated batch's real-token count.

    T^2 keeps the KD gradient's size independent of the temperature (Hinton et al., 2015).
    """
    loss = (1.0 - alpha) * sums.ce / max(n_ce, 1)
    if alpha > 0:
        loss = loss + alpha * temperature ** 2 * sums.kd / max(n_kd, 1)
    if hidden_weight > 0:
        loss = loss + hidden_weight * sums.hidden / max(n_kd, 1)
    return loss
