"""KD loss: a hand-computed case (tail bucket, temperature), and token-count normalisation."""

import math

import torch

from nexus_core.demo.model_factory import build_model, make_config
from nexus_core.kd import loss as kd_loss
from nexus_core.kd.loss import TeacherTargets


def test_bucket_kl_matches_hand_computation():
    # Teacher over V=4: top-2 = ids 0, 1 with p = .5, .3; the tail (ids 2, 3) holds .2.
    T = 2.0
    q = [0.5 ** (1 / T), 0.3 ** (1 / T), 0.2 ** (1 / T)]
    q = [x / sum(q) for x in q]  # tempered 3-bucket teacher distribution
    z = [1.0, 0.0, -1.0, 0.5]  # student logits
    e = [math.exp(v / T) for v in z]
    p = [v / sum(e) for v in e]
    s = [p[0], p[1], p[2] + p[3]]  # student buckets: top-2 ids, then everything else
    expected = sum(qi * (math.log(qi) - math.log(si)) for qi, si in zip(q, s))

    logp_T = torch.log_softmax(torch.tensor([z]) / T, dim=-1)
    kl = kd_loss.bucket_kl(logp_T, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.5), math.log(0.3)]]).half(),
                           torch.tensor([math.log(0.2)]), T)
    assert abs(kl.item() - expected) < 2e-4  # the stored log-probs are float16
    # The total loss weighs KD by alpha * T^2 and divides by the real-token count.
    sums = kd_loss.LossSums(kd=kl.sum(), ce=torch.tensor(3.0))
    loss = kd_loss.combine(sums, n_kd=1, n_ce=2, alpha=0.75, temperature=T)
    assert abs(loss.item() - (0.75 * 4 * expected + 0.25 * 1.5)) < 1e-3


def test_tail_bucket_is_not_renormalised_away():
    # A student with the teacher's top-k ratios but no tail mass is NOT a perfect match.
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    ids, top, tail = torch.tensor([[0, 1]]), teacher[:, :2], torch.log(torch.tensor([0.2]))
    same = kd_loss.bucket_kl(teacher, ids, top, tail, 1.0)
    assert abs(same.item()) < 1e-6
    no_tail = torch.log(torch.tensor([[0.625, 0.375, 1e-9, 1e-9]]))  # same 5:3 ratio, tail ~0
    assert kd_loss.bucket_kl(no_tail, ids, top, tail, 1.0).item() > 0.5


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-6, -0.5, -30.0], dtype=torch.float32)
    want = torch.log(-torch.expm1(x.double())).float()
    assert torch.allclose(kd_loss.log1mexp(x), want, rtol=1e-5)
    assert torch.isfinite(kd_loss.log1mexp(torch.tensor([0.0]))).all()


def _grads(model, batches, n_kd, n_ce):
    model.zero_grad()
    for ids, mask, targets in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits
        sums = kd_loss.loss_sums(logits, ids, mask, targets, 2.0, 0.6, 40)
        kd_loss.combine(sums, n_kd, n_ce, 0.6, 2.0).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_grad_accumulation_with_padding_equals_one_batch():
    torch.manual_seed(0)
    model = build_model(make_config("llama", vocab_size=40, hidden=16, layers=2, heads=2, kv_heads=1), seed=0).float()
    B, T, k = 4, 10, 5
    ids = torch.randint(0, 40, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # padding in one row of each half
    mask[3, 3:] = 0
    logp = torch.log_softmax(torch.randn(B, T, 40), -1)
    top, idx = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1)
    tg = TeacherTargets(1.0, idx, top.half(), tail)
    kdm, cem = kd_loss.masks(mask)
    n_kd, n_ce = int(kdm.sum()), int(cem.sum())

    def part(sl):
        return ids[sl], mask[sl], [TeacherTargets(1.0, idx[sl], tg.topk_logprobs[sl], tail[sl])]

    one = _grads(model, [part(slice(0, 4))], n_kd, n_ce)
    two = _grads(model, [part(slice(0, 2)), part(slice(2, 4))], n_kd, n_ce)
    assert torch.allclose(one, two, atol=1e-6, rtol=1e-4)
    # Per-micro-batch normalisation (the bug this guards against) gives different gradients.
    model.zero_grad()
    for sl in (slice(0, 2), slice(2, 4)):
        k_, c_ = kd_loss.masks(mask[sl])
        i, m, t = part(sl)
        s = kd_loss.loss_sums(model(input_ids=i, attention_mask=m).logits, i, m, t, 2.0, 0.6, 40)
        (kd_loss.combine(s, int(k_.sum()), int(c_.sum()), 0.6, 2.0) / 2).backward()
    per_micro = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(one, per_micro, atol=1e-6, rtol=1e-4)
