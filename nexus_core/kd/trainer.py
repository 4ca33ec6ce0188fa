"""A plain next-token trainer and evaluator for packed rows: demo teachers, the CE baseline, benches."""

from __future__ import annotations

import math


def train_causal_lm(model, input_ids, attention_mask, steps: int, lr: float, batch_size: int, seed: int,
                    *, weight_decay: float = 0.01, grad_clip: float = 1.0, on_step=None) -> list[float]:
    """Plain AdamW next-token training on packed rows; returns the loss of every step.

    input_ids/attention_mask: (n, T). Batches are drawn from a seeded permutation (reshuffled
    each epoch); lr warms up linearly over the first 10% of steps, then decays by cosine to 10%.
    on_step(step, loss) is called after each step (progress display).
    """
    import torch

    device = next(model.parameters()).device
    ids = input_ids.long()
    mask = attention_mask.long()
    labels = ids.masked_fill(mask == 0, -100)  # padding is never a target; HF shifts labels itself
    n = ids.shape[0]
    assert n > 0 and steps >= 0
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    model.train()
    try:
        for step in range(steps):
            if pos + min(batch_size, n) > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += len(idx)
            out = model(input_ids=ids[idx].to(device), attention_mask=mask[idx].to(device),
                        labels=labels[idx].to(device))
            out.loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.eval()
    return losses


def eval_causal_lm(model, input_ids, attention_mask, batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over real (mask=1) targets."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].long().to(device)
            mask = attention_mask[i:i + batch_size].long().to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (b, T, V)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (b, T-1): target and context both real
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (b, T-1)
            total += float(ce[valid].sum())
            count += int(valid.sum())
    return total / max(1, count)
