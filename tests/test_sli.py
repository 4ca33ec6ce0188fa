"""SLI (nexus_core.sli): streaming one layer at a time gives exactly what a full load gives.

Each test builds a tiny teacher, runs a plain AutoModelForCausalLM.from_pretrained forward and
a StreamingRunner forward over the same padded chunk, and compares bit for bit (CPU, fp32).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from nexus_core.config import Settings
from nexus_core.demo import model_factory as mf
from nexus_core.errors import NexusError
from nexus_core.records.registry import Teacher
from nexus_core.storage.safetensors_meta import scan
from nexus_core.teachers.mode import choose_mode
from nexus_core.teachers.runner import block_influence
from nexus_core.teachers.sli import SLIUnsupportedError, StreamingRunner, sli_support

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(120)]
SIZES = dict(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48, max_pos=64)
K = 8


@pytest.fixture(scope="module")
def tok():
    return mf.train_tokenizer(TEXTS, vocab_size=300)


def _chunk(vocab: int, n: int = 3, T: int = 12, seed: int = 0):
    """(n, T) ids and a mask with left and right padding, so masks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if n > 1:
        mask[1, :4] = 0
    if n > 2:
        mask[2, T - 3:] = 0
    return ids, mask


@torch.no_grad()
def _full(model_dir, ids, mask, keep=()):
    """Reference: logits, final hidden, kept layer outputs and block influence from a plain full load."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = model.base_model.layers
    seen, hooks = {}, []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x, out[0] if isinstance(out, tuple) else out)
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    for h in hooks:
        h.remove()
    infl = torch.stack([block_influence(x, y, mask) for x, y in (seen[i] for i in range(len(layers)))])
    final = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return out.logits, final, {i: seen[i][1] for i in keep}, infl


def _topk(logits):
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(K, dim=-1)
    return idx, vals


def _assert_same(model_dir, runner_kwargs=None, n=3, T=12, keep=(0, 2)):
    runner = StreamingRunner(model_dir, **(runner_kwargs or {}))
    ids, mask = _chunk(runner.head_vocab, n, T)
    ref_logits, ref_final, ref_hidden, ref_infl = _full(model_dir, ids, mask, keep)
    out = runner.forward(ids, mask, keep_layers=keep, influence=True)
    logits = runner.logits(out.final_hidden)
    runner.close()
    assert torch.equal(out.final_hidden, ref_final)
    assert torch.equal(logits, ref_logits.float())
    (i1, v1), (i2, v2) = _topk(logits), _topk(ref_logits)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert sorted(out.hidden) == sorted(keep)
    for i in keep:
        assert torch.equal(out.hidden[i], ref_hidden[i]), f"layer {i} output differs"
    assert torch.allclose(out.influence, ref_infl, atol=1e-6)
    return runner


@pytest.mark.parametrize("arch", mf.ARCHS + mf.FAMILIES)
def test_matches_full_load_bit_for_bit(tmp_path, tok, arch):
    """Same top-k ids and log-probs, bit for bit, for every architecture the generic path streams (CPU fp32)."""
    d = mf.make_teacher(tmp_path / arch, TEXTS, arch=arch, tokenizer=tok, **SIZES)
    if arch == "deepseek_v3":  # routing bias is a persistent buffer in the checkpoint: it must be streamed too
        _randomise_routing_bias(d)
    runner = _assert_same(d)
    assert runner.stats["bytes_read"] == sum(f.stat().st_size for f in d.glob("*.safetensors")) - _headers(d)


def _randomise_routing_bias(d):
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for k in [k for k in sd if k.endswith("e_score_correction_bias")]:
        sd[k] = torch.rand(sd[k].shape, generator=g)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _headers(d):
    total = 0
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def test_gemma2_softcap_sliding_window_and_tied_head(tmp_path, tok):
    """Final logit soft-capping, alternating sliding/full attention layers, a head tied to the embedding."""
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          max_position_embeddings=64, final_logit_softcapping=5.0, tie_word_embeddings=True)
    d = mf.save_model(mf.build_model(cfg), tok, tmp_path / "g2")
    assert not any("lm_head" in k for k in _keys(d))
    _assert_same(d, T=10)


def _keys(d):
    from safetensors import safe_open

    out = []
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out += list(fh.keys())
    return out


def test_sharded_checkpoint(tmp_path, tok):
    d = mf.make_teacher(tmp_path / "sh", TEXTS, arch="llama", tokenizer=tok, max_shard_size="20KB", **SIZES)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 4
    layer1 = {f for k, f in index["weight_map"].items() if ".layers.1." in k}
    assert len(layer1) >= 2, "a layer should straddle files for this test to mean something"
    _assert_same(d)


def test_mixtral_per_expert_and_fused_checkpoints(tmp_path, tok):
    d = mf.make_teacher(tmp_path / "mx", TEXTS, arch="mixtral", tokenizer=tok, experts=4, experts_per_tok=2,
                        max_shard_size="40KB", **SIZES)
    keys = _keys(d)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys  # transformers saves per expert
    _assert_same(d)
    # The same weights saved in the fused in-memory layout (mlp.experts.gate_up_proj) stream too.
    fused = tmp_path / "mx_fused"
    model = AutoModelForCausalLM.from_pretrained(d)
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in _keys(fused)
    _assert_same(fused)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_reads_only_routed_experts(tmp_path, tok, arch):
    """A short chunk over many experts reads only the experts it routes to, and still matches."""
    d = mf.make_teacher(tmp_path / "mx8", TEXTS, arch=arch, tokenizer=tok, experts=8, experts_per_tok=1,
                        **SIZES)
    runner = _assert_same(d, n=1, T=3, keep=(1,))
    assert 0 < runner.stats["expert_tensors_read"] <= 3 * 3 * 2  # ≤ 3 tokens' experts × 3 layers × (gate_up, down)
    total = sum(f.stat().st_size for f in d.glob("*.safetensors")) - _headers(d)
    assert runner.stats["bytes_read"] < 0.75 * total


def test_micro_batches_spill_and_no_prefetch(tmp_path, tok):
    """A tiny budget forces one sequence per layer call and a memory-mapped scratch store."""
    d = mf.make_teacher(tmp_path / "mb", TEXTS, arch="qwen2", tokenizer=tok, **SIZES)
    runner = StreamingRunner(d, memory_budget_bytes=50_000, prefetch=False)
    ids, mask = _chunk(runner.head_vocab)
    out = runner.forward(ids, mask, keep_layers=[1], influence=True)
    assert runner.stats["spilled"] and runner.stats["micro_batch"] == 1
    logits = runner.logits(out.final_hidden)
    # Reference: the full model run over the same micro-batches (one sequence each).
    for s in range(ids.shape[0]):
        ref_logits, ref_final, ref_hidden, _ = _full(d, ids[s:s + 1], mask[s:s + 1], keep=(1,))
        assert torch.equal(logits[s:s + 1], ref_logits)
        assert torch.equal(out.hidden[1][s:s + 1], ref_hidden[1])
    plain = StreamingRunner(d)
    ref = plain.forward(ids, mask, influence=True)
    assert torch.allclose(out.influence, ref.influence, atol=1e-6)
    runner.close()
    plain.close()


def test_unsupported_architecture_is_named_and_falls_back(tmp_path, tok):
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ok, why = sli_support(cfg)
    assert not ok and "gpt2" in why.lower()
    d = mf.save_model(mf.build_model(cfg), tok, tmp_path / "gpt2")
    with pytest.raises(SLIUnsupportedError, match="gpt2"):
        StreamingRunner(d)
    # --sli always on an architecture SLI cannot stream: refused by name, never a silent full load
    settings = Settings()
    settings.run.sli, settings.memory.budget = "always", "1GB"
    teacher = Teacher("gpt2", str(d), "ready", "")
    with pytest.raises(NexusError, match="--sli always, but SLI cannot stream it: use --sli auto or never.*gpt2"):
        choose_mode(settings, teacher, cfg, scan(d), "cpu", torch.float32)
    # --sli auto over the budget: loaded whole when it fits, refused when not
    settings.run.sli = "auto"
    settings.memory.sli_params_threshold = 1
    mode, reason, sli_ok, _, _ = choose_mode(settings, teacher, cfg, scan(d), "cpu", torch.float32)
    assert (mode, sli_ok) == ("full", False) and "cannot stream" in reason
    settings.memory.budget = "1KB"
    with pytest.raises(NexusError, match="budget"):
        choose_mode(settings, teacher, cfg, scan(d), "cpu", torch.float32)
    assert sli_support(mf.make_config("mixtral", vocab_size=300))[0]


def test_mismatched_config_lists_missing_tensors(tmp_path, tok):
    d = mf.make_teacher(tmp_path / "bad", TEXTS, arch="llama", tokenizer=tok, **SIZES)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SLIUnsupportedError, match="model.layers.3"):
        StreamingRunner(d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_prefetch_matches_full_load(tmp_path, tok):
    d = mf.make_teacher(tmp_path / "cuda", TEXTS, arch="mixtral", tokenizer=tok, **SIZES)
    runner = StreamingRunner(d, device="cuda", dtype=torch.float32)
    ids, mask = _chunk(runner.head_vocab)
    out = runner.forward(ids, mask, keep_layers=[1])
    logits = runner.logits(out.final_hidden).cpu()
    runner.close()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits.float().cpu()
    (i1, v1), (i2, v2) = _topk(logits), _topk(ref)
    assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-5)
