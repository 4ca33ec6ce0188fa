"""Released quantised weight formats: DeepSeek-V3's FP8 with per-128x128-block `weight_scale_inv`, gpt-oss's MXFP4.

The test writes such a checkpoint itself from a tiny deepseek_v3 model whose sides are not multiples of
128 (edge blocks are partial, as in the real kv_a_proj_with_mqa: 576 rows), plus the reference: the same
FP8 weights dequantised (weight * scale, block-wise: DeepSeek's inference/kernel.py weight_dequant)
saved as an ordinary float32 checkpoint and loaded by transformers. Streamed (`--sli always`) and full
(`--sli never`) loads of the FP8 folder must equal it: same top-k ids, log-probs equal to the bit on
CPU fp32 (tolerance 0: the dequantised values and the module code are the same). gpt-oss's MXFP4 experts
(packed e2m1 + E8M0 exponents, tests/quantised_files.py) are checked the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from nexus_core.config import Settings
from nexus_core.demo import model_factory as mf
from nexus_core.errors import NexusError
from nexus_core.records.registry import Teacher
from nexus_core.teachers.mode import choose_mode
from nexus_core.teachers.runner import FullRunner
from nexus_core.teachers.sli import StreamingRunner, sli_support
from nexus_core.teachers.weights import SafetensorsStore
from tests.helpers import setup_home
from tests.quantised_files import write_fp8_teacher, write_mxfp4_teacher

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(120)]
K = 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tok = mf.train_tokenizer(TEXTS, vocab_size=300)
    return write_fp8_teacher(tmp_path_factory.mktemp("fp8"), tok, TEXTS)


def _chunk(vocab: int, n: int = 3, T: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if n > 1:  # left and right padding, so the masks are not trivial
        mask[1, :4] = 0
        mask[-1, T - 3:] = 0
    return ids, mask


def _topk(runner, ids, mask):
    out = runner.forward(ids, mask)
    lp = torch.log_softmax(runner.logits(out.final_hidden).float(), dim=-1)
    runner.close()
    return lp.topk(K, dim=-1)


@torch.no_grad()
def _reference(ref, ids, mask):
    model = AutoModelForCausalLM.from_pretrained(ref).eval()
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    return lp.topk(K, dim=-1)


def test_checkpoint_is_in_the_released_format(teacher):
    fp8, _ = teacher
    raw = load_file(str(fp8 / "model.safetensors"))
    kv = raw["model.layers.1.self_attn.kv_b_proj.weight"]
    assert kv.dtype == torch.float8_e4m3fn and raw["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"].dtype == torch.float32
    assert raw["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    store = SafetensorsStore(fp8)
    assert not any(k.endswith("_scale_inv") for k in store.meta.tensors)  # hidden, their bytes on their weight
    assert store.meta.main_dtype == "F8_E4M3"
    ok, why = sli_support(AutoConfig.from_pretrained(fp8))
    assert ok and "FP8" in why


@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_fp8_equals_the_dequantised_full_load(teacher, lazy):
    """Every layer dequantised as it streams (lazy: only the routed experts read, dequantised on demand)."""
    fp8, ref = teacher
    ids, mask = _chunk(300, n=1, T=2) if lazy else _chunk(300)
    runner = StreamingRunner(fp8, moe_lazy=lazy)
    (v1, i1), (v2, i2) = _topk(runner, ids, mask), _reference(ref, ids, mask)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    if lazy:
        assert 0 < runner.stats["expert_tensors_read"] <= 2 * 2 * 2 * 2  # 2 tokens x 2 experts, 2 tensors, 2 layers


def test_full_load_of_fp8_equals_the_dequantised_reference(teacher):
    """--sli never: dequantised by the same store (transformers' CPU fallback gets partial blocks wrong)."""
    fp8, ref = teacher
    ids, mask = _chunk(300)
    (v1, i1), (v2, i2) = _topk(FullRunner(fp8), ids, mask), _reference(ref, ids, mask)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_sli_always_profile_names_the_mode_and_other_quantisations_are_refused(tmp_path, teacher):
    fp8, _ = teacher
    _, _, _, paths = setup_home(tmp_path / "home", fp8, run={"sli": "always"})
    profile = json.loads(paths.profile("tiny").read_text())
    assert profile["mode"] == "sli" and profile["mode_reason"].startswith("--sli always; DeepSeek-V3")
    assert "FP8" in profile["mode_reason"] and profile["dtypes"].get("F8_E4M3")
    # A quantisation SLI does not dequantise: named, with what to do, never a silent full load.
    cfg = AutoConfig.from_pretrained(fp8)
    cfg.quantization_config = {"quant_method": "awq", "bits": 4}
    ok, why = sli_support(cfg)
    assert not ok and "awq" in why and "--sli never" in why and "bf16" in why
    settings = Settings()
    settings.run.sli = "always"
    with pytest.raises(NexusError, match="--sli always, but SLI cannot stream it"):
        choose_mode(settings, Teacher("q", str(fp8), "ready", ""), cfg, SafetensorsStore(fp8).meta, "cpu",
                    torch.float32)


# --- gpt-oss's MXFP4 experts ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    tok = mf.train_tokenizer(TEXTS, vocab_size=300)
    return write_mxfp4_teacher(tmp_path_factory.mktemp("mxfp4"), tok, TEXTS)


@pytest.mark.parametrize("runner", [StreamingRunner, FullRunner])
def test_mxfp4_experts_equal_the_dequantised_reference(gpt_oss, runner):
    """Streamed and full loads of the MXFP4 folder = its experts dequantised (which transformers' own CPU
    dequantisation of the same folder also equals), bit for bit on CPU fp32."""
    q, ref = gpt_oss
    ids, mask = _chunk(300)
    (v1, i1), (v2, i2) = _topk(runner(q), ids, mask), _reference(ref, ids, mask)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    store = SafetensorsStore(q)
    assert store.meta.tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == "MXFP4"
    assert not any(k.endswith(("_blocks", "_scales")) for k in store.meta.tensors)
    ok, why = sli_support(AutoConfig.from_pretrained(q))
    assert ok and "MXFP4" in why


def test_a_quantised_teacher_seeds_a_full_precision_student(tmp_path, gpt_oss):
    """gpt-oss (no dense sibling): the depth-pruned MoE student holds the dequantised experts and no
    quantization_config, so the release loads as an ordinary model."""
    from nexus_core.kd.student import build_student
    from nexus_core.records.plan import DistillPlan
    from nexus_core.storage.profiles import read_profile

    q, ref = gpt_oss
    cfg, teacher, data_ref, paths = setup_home(tmp_path / "home", q)
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(data_ref.key,))
    student, info = build_student(cfg, plan, paths, "cpu", read_profile(paths, "tiny"))
    assert "quantization_config" not in student.config.to_dict()
    plain = AutoModelForCausalLM.from_pretrained(ref)
    k = info["kept_layers"][0]
    assert torch.equal(student.model.layers[0].mlp.experts.gate_up_proj, plain.model.layers[k].mlp.experts.gate_up_proj)
