"""A model's held-out next-token loss per token and per character: what extraction measures of a teacher
besides its targets (heldout_quality), and what distill's evaluation reports (lm_loss, kd/evaluate)."""

from __future__ import annotations

import math

import torch

from nexus_core import data, progress
from nexus_core.errors import DatasetError
from nexus_core.teachers.logits import token_nll

HELDOUT_QUALITY_SEQUENCES = 16


@torch.no_grad()
def heldout_quality(runner, tok, heldout: list[str], ex, real_vocab: int) -> dict | None:
    """The teacher's next-token loss on the dataset's held-out split, per token and per character.

    Per character (nats/char) is what distill compares across teachers with different tokenizers
    (a coarser tokenizer has a higher per-token loss for the same knowledge); it sets each
    teacher's per-domain weight. None when there is no held-out text or no offset mapping.
    """
    if not heldout:
        return None
    try:
        ids, mask, cs, ce = data.pack_with_offsets(tok, heldout, ex.seq_len, HELDOUT_QUALITY_SEQUENCES)
    except (NotImplementedError, DatasetError):
        return None
    chars = (ce - cs).clamp(min=0)  # (n, T) characters each token covers
    out = lm_loss(runner, ids, mask, chars, real_vocab, "cpu", ex.batch_size)
    if out["tokens"] == 0 or "chars" not in out:
        return None
    return {k: out[k] for k in ("loss", "loss_per_char", "tokens", "chars")}


@torch.no_grad()
def train_loss(runner, ids: torch.Tensor, mask: torch.Tensor, real_vocab: int, batch_size: int) -> float:
    """The teacher's next-token loss on the first HELDOUT_QUALITY_SEQUENCES packed training rows: beside
    its held-out loss, it tells whether the teacher has seen these rows (kd/augment.has_seen)."""
    n = HELDOUT_QUALITY_SEQUENCES
    return lm_loss(runner, ids[:n], mask[:n], None, real_vocab, "cpu", batch_size)["loss"]


@torch.no_grad()
def lm_loss(runner, ids: torch.Tensor, mask: torch.Tensor, chars: torch.Tensor | None, vocab: int, device: str,
            batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy over real positions, per token and (with `chars`) per character of
    the target tokens. `runner` is a TeacherRunner (FullRunner.of(model) for a model in memory).

    The decoder runs on the batch; the head then meets only the scored positions, a slice of the vocabulary
    at a time (logits.token_nll): a plain forward builds the (b, T, V) float32 logits and a log-softmax
    beside them (2 GiB per batch of 8 x 128 at a 262k vocabulary)."""
    total, count, n_chars = 0.0, 0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].long().to(device)
        m = mask[i:i + batch_size].long().to(device)
        real = (m[:, :-1] * m[:, 1:]).bool()  # (b, T-1): position t predicts the real token t+1
        hidden = runner.forward(x, m).final_hidden  # (b, T, H)
        h = hidden[:, :-1][real.to(hidden.device)]  # (n, H): padding and the last position never meet the head
        nll = token_nll(runner.logits, h, x[:, 1:][real], vocab)  # (n,)
        progress.advance(x.shape[0], tokens=int(m.sum()))  # the caller's bar, if it opened one
        total += nll.double().sum().item()
        count += int(real.sum())
        if chars is not None:
            n_chars += int(chars[i:i + batch_size, 1:].to(device)[real].sum())
    loss = total / max(count, 1)
    out = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": count}
    if n_chars:
        out.update(loss_per_char=round(total / n_chars, 6), chars=n_chars)
    return out
