"""Full-vocabulary logits, a chunk at a time: top-k ids and log-probabilities plus the exact tail mass
(extraction), or the next-token loss (held-out scoring).

No caller ever holds more than one chunk of (positions, vocabulary) float32 logits."""

from __future__ import annotations

import math

import torch


def logit_positions(ex, vocab: int) -> int:
    """Positions per full-vocabulary logits chunk: `extract.logit_chunk`, or (0) as many as fit in
    LOGIT_CHUNK_BYTES of float32 logits, so that the chunk stays small beside SLI's two resident layers
    (4,096 positions of a 152k vocabulary would be 2.4 GiB)."""
    if ex.logit_chunk > 0:
        return ex.logit_chunk
    return max(1, min(4096, LOGIT_CHUNK_BYTES // (4 * max(vocab, 1))))


LOGIT_CHUNK_BYTES = 32 << 20  # float32 logits alive at once when extract.logit_chunk is 0 (auto)


def topk_targets(logits_fn, flat: torch.Tensor, k: int, real_vocab: int, chunk: int):
    """(P, H) final hidden states -> top-k ids (P, k) int32, log-probs (P, k) float16, tail log-mass (P,) float32.

    `logits_fn` maps (1, p, H) to (1, p, V) float32 logits; one chunk of `chunk` positions is alive
    at a time and is reused in place for the tail."""
    P = flat.shape[0]
    top_ids = torch.empty(P, k, dtype=torch.int32)
    top_lp = torch.empty(P, k, dtype=torch.float16)
    tail = torch.empty(P, dtype=torch.float32)
    for p0 in range(0, P, chunk):
        p1 = min(p0 + chunk, P)
        z = logits_fn(flat[p0:p1].unsqueeze(0)).squeeze(0)  # (p, V) float32
        if z.shape[-1] > real_vocab:
            z[:, real_vocab:] = float("-inf")  # padded head rows are not tokens
        lse = torch.logsumexp(z, dim=-1)  # (p,)
        v, i = z.topk(k, dim=-1)  # (p, k)
        top_ids[p0:p1] = i.to("cpu", torch.int32)
        top_lp[p0:p1] = (v - lse[:, None]).to("cpu", torch.float16)
        z.scatter_(-1, i, float("-inf"))  # what is left is the tail
        tail[p0:p1] = (torch.logsumexp(z, dim=-1) - lse).clamp_min(LOG_EPS).cpu()  # log(1 - sum p_topk), exact
        del z
    return top_ids, top_lp, tail


MIN_VOCAB_SLICE = 1024  # head rows per slice at least: narrower slices starve the head matmul


def token_nll(logits_fn, flat: torch.Tensor, targets: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """(P, H) final hidden states and (P,) target ids -> (P,) float32 -log p(target) over the real vocabulary.

    `logits_fn(flat, rows)` gives the (P, w) float32 logits of a slice of the head's rows. All P positions
    meet one slice of the vocabulary at a time, the log-sum-exp carried across slices, so one (P, w) block
    (LOGIT_CHUNK_BYTES) exists at a time and the head's weights are read once: chunks of positions instead
    re-read the whole head per chunk (32 positions at 262k: the head matmul ran 2.9x slower)."""
    P = flat.shape[0]
    width = max(MIN_VOCAB_SLICE, LOGIT_CHUNK_BYTES // (4 * max(P, 1)))
    lse = picked = None
    for v0 in range(0, real_vocab, width):
        v1 = min(v0 + width, real_vocab)
        z = logits_fn(flat, slice(v0, v1))  # (P, w) float32
        t = targets.to(z.device, torch.long)
        part = torch.logsumexp(z, dim=-1)  # (P,)
        lse = part if lse is None else torch.logaddexp(lse, part)
        here = z.gather(-1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(-1)  # (P,) valid where t is in the slice
        picked = here if picked is None else torch.where((t >= v0) & (t < v1), here, picked)
        del z
    return lse - picked


LOG_EPS = math.log(1e-30)  # tail_logmass floor when the top-k holds (numerically) all the mass
