"""What extraction measures of a teacher besides its targets: its held-out loss per token and per character."""

from __future__ import annotations

import torch

from nexus_core import data
from nexus_core.errors import DatasetError
from nexus_core.teachers.logits import logit_positions

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
    nll, tokens, chars = 0.0, 0, 0
    for b0 in range(0, ids.shape[0], ex.batch_size):
        x, m = ids[b0:b0 + ex.batch_size], mask[b0:b0 + ex.batch_size]
        h = runner.forward(x, m).final_hidden  # (b, T, H)
        b, T, H = h.shape
        tgt = torch.zeros(b, T, dtype=torch.long)
        tgt[:, :-1] = x[:, 1:].long()  # position t predicts token t+1 (row-local)
        real = torch.zeros(b, T, dtype=torch.bool)
        real[:, :-1] = (m[:, :-1] * m[:, 1:]).bool()
        width = torch.zeros(b, T, dtype=torch.long)
        width[:, :-1] = (ce[b0:b0 + b, 1:] - cs[b0:b0 + b, 1:]).clamp(min=0)  # chars the target token covers
        flat, tf, rf = h.reshape(b * T, H), tgt.view(-1), real.view(-1)
        chunk = logit_positions(ex, max(real_vocab, runner.head_vocab))  # the logits row is the head's width
        for p0 in range(0, b * T, chunk):
            z = runner.logits(flat[p0:p0 + chunk].unsqueeze(0)).squeeze(0)[:, :real_vocab].float()
            lp = z.log_softmax(-1).gather(-1, tf[p0:p0 + chunk, None].to(z.device)).squeeze(-1).cpu()
            nll -= float(lp[rf[p0:p0 + chunk]].double().sum())
        tokens += int(real.sum())
        chars += int(width[real].sum())
    if tokens == 0 or chars == 0:
        return None
    return {"loss": round(nll / tokens, 6), "loss_per_char": round(nll / chars, 6), "tokens": tokens, "chars": chars}



