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
    return _with_tail(student_logp.gather(-1, topk_ids))


def _with_tail(top: torch.Tensor) -> torch.Tensor:
    """Gathered student log-probs (..., k) -> (..., k+1) with the tail bucket appended."""
    tail = log1mexp(torch.logsumexp(top, dim=-1))  # (...,)
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def _kl(q_log: torch.Tensor, s_log: torch.Tensor) -> torch.Tensor:
    return (q_log.exp() * (q_log - s_log)).sum(-1)


def bucket_kl(student_logp_T: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logmass: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position over k+1 buckets: (..., V), (..., k), (..., k), (...) -> (...).

    Not yet scaled by T^2."""
    q_log = teacher_buckets(topk_logprobs, tail_logmass, temperature)  # (N, k+1)
    s_log = student_buckets(student_logp_T, topk_ids.long())  # (N, k+1)
    return _kl(q_log, s_log)


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
    use_kd = alpha > 0 and bool(targets)
    if use_kd and temperature == 1.0:
        # One gather for the CE target and every teacher's top-k ids, (b, T, 1 + sum k): its backward is a
        # single scatter into (b, T, V) instead of one per gather, which keeps KD's cost over CE small.
        ids = torch.cat([nxt.unsqueeze(-1), *(t.topk_ids.long() for t in targets)], dim=-1)
        picked = logp.gather(-1, ids)
        ce_tok = -picked[..., 0]  # (b, T)
        tops = picked[..., 1:].split([t.topk_ids.shape[-1] for t in targets], dim=-1)  # (b, T, k) each
    else:
        ce_tok = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (b, T)
        if use_kd:
            logp_T = F.log_softmax(z / temperature, dim=-1)  # (b, T, V)
            tops = [logp_T.gather(-1, t.topk_ids.long()) for t in targets]
    ce = (ce_tok * ce_mask).sum()
    kd = torch.zeros((), device=logits.device)
    if use_kd:
        total_w = sum(t.weight for t in targets)
        for t, top in zip(targets, tops):
            # All positions at once (no boolean-index copy of the (b, T, V) tensor); padding is zeroed after.
            q_log = teacher_buckets(t.topk_logprobs, t.tail_logmass, temperature)  # (b, T, k+1)
            kl = _kl(q_log, _with_tail(top))  # (b, T), = bucket_kl(logp_T, ...)
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


# --- teachers with another vocabulary (additive; see nexus_core/align.py) -----------------------
#
# A teacher whose tokenizer differs from the student's has its top-k stored in *its* ids, at
# *its* positions. align.py maps its positions onto the student's (by character) and its ids
# onto the student's where the two vocabularies hold the same token text. Two losses then use
# that signal, chosen with [distill] xtok_loss:
#   "shared": the exact bucket KL of bucket_kl, with one bucket per top-k token that has a
#             student counterpart and one "rest" bucket for everything else (unmapped top-k
#             tokens + the tail). Mass is conserved: the buckets hold all of the teacher's mass.
#             Exact where vocabularies overlap, but blind to how the unmapped mass is shaped.
#   "uld":    Universal Logit Distillation (Boizard et al., 2024): the L1 distance between the
#             teacher's and the student's probabilities sorted in decreasing order (a closed-form
#             Wasserstein-1 distance when ids are not comparable). Needs no shared vocabulary, but
#             only matches the *shape* (confidence) of the distribution, not which token.
#   "hybrid" (default): "shared" for what the vocabularies share, plus ULD on the unmapped
#             top-k mass against the student's best tokens outside the mapped ones - the ids
#             that can be matched are matched, the rest still teaches calibration.


@dataclass
class AlignedTargets:
    """A cross-tokenizer teacher's targets laid onto the student's positions and ids."""

    weight: float
    student_ids: torch.Tensor  # (b, T, k) int64: student id of each teacher top-k token, -1 = none
    topk_logprobs: torch.Tensor  # (b, T, k) teacher log-probs (its own vocabulary, T=1)
    tail_logmass: torch.Tensor  # (b, T) log mass outside the teacher's top-k
    present: torch.Tensor  # (b, T) bool: position aligned to a teacher position

    def select(self, idx) -> "AlignedTargets":
        return AlignedTargets(self.weight, self.student_ids[idx], self.topk_logprobs[idx], self.tail_logmass[idx],
                              self.present[idx])

    def to(self, device) -> "AlignedTargets":
        return AlignedTargets(self.weight, self.student_ids.to(device), self.topk_logprobs.to(device),
                              self.tail_logmass.to(device), self.present.to(device))


def shared_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, student_ids: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's distribution on the shared-token partition: (..., k), (...), (..., k) ->
    (log q of each mapped top-k token (..., k) with -inf where unmapped, log q_rest (...), mapped (..., k) bool).

    exp(mapped).sum() + exp(rest) == 1: every bit of the teacher's mass is in exactly one bucket.
    """
    q = teacher_buckets(topk_logprobs, tail_logmass, temperature)  # (..., k+1) tempered, normalised
    mapped = student_ids >= 0
    top = torch.where(mapped, q[..., :-1], float("-inf"))
    # rest = unmapped top-k + tail; logsumexp over the complement avoids 1 - x cancellation.
    rest = torch.logsumexp(torch.cat([torch.where(mapped, float("-inf"), q[..., :-1]), q[..., -1:]], -1), -1)
    return top, rest, mapped


def xtok_position_loss(student_logp_T: torch.Tensor, t: AlignedTargets, temperature: float, mode: str,
                       uld_weight: float = 1.0) -> torch.Tensor:
    """Per-position loss of one cross-tokenizer teacher: (b, T, V), AlignedTargets -> (b, T) (not yet x T^2)."""
    top, rest, mapped = shared_buckets(t.topk_logprobs, t.tail_logmass, t.student_ids, temperature)  # (b,T,k),(b,T)
    sid = t.student_ids.clamp(min=0)  # (b, T, k); unmapped entries point at id 0 and are masked below
    loss = torch.zeros(top.shape[:-1], device=top.device)
    if mode in ("shared", "hybrid"):
        # A very negative finite fill instead of -inf keeps logsumexp's gradient finite when nothing maps.
        s_top = torch.where(mapped, student_logp_T.gather(-1, sid), 4 * LOG_TINY)  # (b, T, k)
        s_rest = log1mexp(torch.logsumexp(s_top, -1))  # (b, T)
        top_safe = torch.where(mapped, top, 0.0)
        kl_top = torch.where(mapped, top_safe.exp() * (top_safe - s_top), 0.0).sum(-1)
        loss = loss + kl_top + rest.exp() * (rest - s_rest)
    if mode in ("uld", "hybrid"):
        q = teacher_buckets(t.topk_logprobs, t.tail_logmass, temperature)[..., :-1].exp()  # (b, T, k)
        k = q.shape[-1]
        if mode == "uld":  # all of the top-k against the student's top-k, plus the two remainders
            t_sorted = q.sort(-1, descending=True).values
            s_sorted = student_logp_T.topk(k, -1).values.exp()
            uld = (t_sorted - s_sorted).abs().sum(-1) + (s_sorted.sum(-1) - t_sorted.sum(-1)).abs()
        else:  # the unmapped top-k only, against the student's best tokens outside the mapped ones
            t_sorted = torch.where(mapped, 0.0, q).sort(-1, descending=True).values  # zeros (mapped) sort last
            hit = torch.zeros(student_logp_T.shape, dtype=torch.int32, device=sid.device)
            hit.scatter_add_(-1, sid, mapped.int())  # (b, T, V) >0 where a mapped token sits
            s_sorted = student_logp_T.masked_fill(hit > 0, float("-inf")).topk(k, -1).values.exp()
            # Only as many ranks as the teacher has unmapped top-k tokens: its tail's shape is unknown,
            # and the total outside the mapped tokens is already matched by the KL's rest bucket.
            ranks = torch.arange(k, device=q.device) < (~mapped).sum(-1, keepdim=True)  # (b, T, k)
            uld = torch.where(ranks, (t_sorted - s_sorted).abs(), 0.0).sum(-1)
        loss = loss + uld_weight * uld
    return loss


def multi_loss_sums(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    targets: list[TeacherTargets], aligned: list[AlignedTargets], temperature: float,
                    alpha: float, vocab: int, mode: str = "hybrid", uld_weight: float = 1.0) -> LossSums:
    """loss_sums with cross-tokenizer teachers too. logits (b, T, V_head) -> LossSums.

    Per position the teachers present there are mixed: sum_t w_t L_t / sum_t w_t over the
    teachers that cover the position (same-tokenizer teachers cover every real position; an
    aligned teacher only its aligned ones), so a missing alignment does not dilute the others.
    With no aligned teachers this equals loss_sums.
    """
    if not aligned:
        return loss_sums(logits, input_ids, attention_mask, targets, temperature, alpha, vocab)
    base = loss_sums(logits, input_ids, attention_mask, [], temperature, 0.0, vocab)  # CE only
    kd_mask, _ = masks(attention_mask)
    kd = torch.zeros((), device=logits.device)
    if alpha > 0:
        z = logits[..., :vocab].float()
        logp_T = F.log_softmax(z / temperature, dim=-1)  # (b, T, V)
        num = torch.zeros(kd_mask.shape, device=logits.device)
        den = torch.zeros(kd_mask.shape, device=logits.device)
        for t in targets:
            kl = bucket_kl(logp_T, t.topk_ids, t.topk_logprobs, t.tail_logmass, temperature)  # (b, T)
            num, den = num + t.weight * kl, den + t.weight
        for a in aligned:
            here = a.present & kd_mask
            pl = xtok_position_loss(logp_T, a, temperature, mode, uld_weight)  # (b, T)
            num = num + torch.where(here, a.weight * pl, 0.0)
            den = den + a.weight * here
        kd = torch.where(kd_mask & (den > 0), num / den.clamp(min=1e-30), 0.0).sum()
    return LossSums(kd=kd, ce=base.ce)
