"""What the extract stage measures besides the targets: the teacher's held-out loss (per token and
per character) and the probability mass the stored top-k keeps."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from nexus_core import align
from nexus_core.errors import DatasetError

LOGIT_CHUNK_BYTES = 32 << 20  # float32 logits alive at once when extract.logit_chunk is 0 (auto)

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
        ids, mask, cs, ce = align.pack_with_offsets(tok, heldout, ex.seq_len, HELDOUT_QUALITY_SEQUENCES)
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
        chunk = logit_positions(ex, real_vocab)
        for p0 in range(0, b * T, chunk):
            z = runner.logits(flat[p0:p0 + chunk].unsqueeze(0)).squeeze(0)[:, :real_vocab].float()
            lp = z.log_softmax(-1).gather(-1, tf[p0:p0 + chunk, None].to(z.device)).squeeze(-1).cpu()
            nll -= float(lp[rf[p0:p0 + chunk]].double().sum())
        tokens += int(real.sum())
        chars += int(width[real].sum())
    if tokens == 0 or chars == 0:
        return None
    return {"loss": round(nll / tokens, 6), "loss_per_char": round(nll / chars, 6), "tokens": tokens, "chars": chars}


def kept_mass(files: list[Path]) -> dict:
    """Mean and 5th percentile over real tokens of the probability mass the top-k keeps."""
    vals = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            m = st.get_tensor("attention_mask").bool()
            vals.append(-torch.expm1(st.get_tensor("tail_logmass")[m].double()))  # 1 - exp(tail)
    if not vals:
        return {"mean": None, "p5": None}
    v = torch.cat(vals)
    return {"mean": round(float(v.mean()), 6), "p5": round(float(torch.quantile(v.float(), 0.05)), 6)}


def logit_positions(ex, vocab: int) -> int:
    """Positions per full-vocabulary logits chunk: `extract.logit_chunk`, or (0) as many as fit in
    LOGIT_CHUNK_BYTES of float32 logits, so that the chunk stays small beside SLI's two resident layers
    (4,096 positions of a 152k vocabulary would be 2.4 GiB)."""
    if ex.logit_chunk > 0:
        return ex.logit_chunk
    return max(1, min(4096, LOGIT_CHUNK_BYTES // (4 * max(vocab, 1))))
