"""CUDA-only checks (marker `gpu`; skipped without a CUDA device; bench/gpu_check.sh runs them).

SLI on CUDA in bf16 reads each layer into pinned host buffers and copies it on a side stream while the
previous layer computes; its results must match a full bf16 load. A KD step under bf16 autocast must give
finite losses and gradients close to the fp32 step's."""

from __future__ import annotations

import pytest
import torch

from nexus_core.demo import model_factory as mf
from nexus_core.kd import loss as kd_loss
from nexus_core.teachers.sli import StreamingRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(120)]
SIZES = dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, max_pos=128)


@pytest.fixture(scope="module")
def tok():
    return mf.train_tokenizer(TEXTS, vocab_size=300)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_sli_cuda_bf16_pinned_copy_stream_matches_full_load(tmp_path, tok, arch):
    from transformers import AutoModelForCausalLM

    d = mf.make_teacher(tmp_path / arch, TEXTS, arch=arch, tokenizer=tok, **SIZES)
    runner = StreamingRunner(d, device="cuda", dtype=torch.bfloat16)
    pinned: list[bool] = []
    to_device = runner._to_device

    def spy(tensors, lazy):
        pinned.extend(t.is_pinned() for t in tensors.values() if t.numel())
        return to_device(tensors, lazy)
    runner._to_device = spy
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, runner.head_vocab, (4, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = runner.forward(ids, mask, keep_layers=[1])
    logits = runner.logits(out.final_hidden).float().cpu()
    assert runner._copy_stream is not None and pinned and all(pinned)  # every group went through pinned buffers
    runner.close()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits.float().cpu()
    real = mask.bool()
    assert torch.equal(logits.topk(8, -1).indices[real], ref.topk(8, -1).indices[real])
    assert torch.allclose(logits[real], ref[real], atol=1e-2, rtol=1e-2)


def test_kd_step_in_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    V, T, b, k = 512, 64, 4, 16
    cfg = mf.make_config("llama", vocab_size=V, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, max_pos=128)
    model = mf.build_model(cfg).cuda().train()
    ids = torch.randint(0, V, (b, T), device="cuda")
    mask = torch.ones(b, T, dtype=torch.long, device="cuda")
    lp = torch.log_softmax(torch.randn(b, T, V, device="cuda") * 3, -1)
    top_v, top_i = lp.topk(k, -1)
    targets = [kd_loss.TeacherTargets(1.0, top_i, top_v.half(), kd_loss.log1mexp(torch.logsumexp(top_v, -1)))]
    kd_m, ce_m = kd_loss.masks(mask)
    grads, losses = {}, {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sums = kd_loss.loss_sums(logits, ids, mask, targets, 1.0, 0.9, V)
        loss = kd_loss.combine(sums, int(kd_m.sum()), int(ce_m.sum()), 0.9, 1.0)
        loss.backward()
        losses[name] = float(loss)
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert torch.isfinite(grads["bf16"]).all()
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 2e-2
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos > 0.98
