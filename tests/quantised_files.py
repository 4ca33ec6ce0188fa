"""Released quantised weight formats, written by the tests themselves, each beside the same weights
dequantised into a float32 reference folder: DeepSeek-V3's FP8 (float8_e4m3fn weights with per-128x128-block
float32 `weight_scale_inv`) and gpt-oss's MXFP4 experts (`_blocks` of packed e2m1 nibbles + E8M0 `_scales`)."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nexus_core.demo import model_factory as mf

BLOCK = 128
# hidden 144 and expert width 80: every projection has partial 128-blocks on at least one side
SIZES = dict(hidden=144, layers=3, heads=4, kv_heads=4, intermediate=80, max_pos=64, experts=8, experts_per_tok=2)


def _quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) float -> (FP8 (M, N), float32 scale_inv (ceil(M/128), ceil(N/128))), amax/448 per block."""
    M, N = w.shape
    sm, sn = math.ceil(M / BLOCK), math.ceil(N / BLOCK)
    padded = torch.zeros(sm * BLOCK, sn * BLOCK)
    padded[:M, :N] = w
    blocks = padded.view(sm, BLOCK, sn, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view(sm * BLOCK, sn * BLOCK)[:M, :N].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float()


def _dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 inference/kernel.py weight_dequant, written out: y = x * s for each 128x128 block."""
    M, N = q.shape
    y = torch.empty(M, N)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            y[rows, cols] = q[rows, cols].float() * scale[i, j]
    return y


def write_fp8_teacher(root, tok, texts, sizes=None) -> tuple:
    """(FP8 folder in DeepSeek-V3's release format, the dequantised float32 reference folder)."""
    fp8 = mf.make_teacher(root / "ds-fp8", texts, arch="deepseek_v3", tokenizer=tok, **(sizes or SIZES))
    ref = mf.save_model(AutoModelForCausalLM.from_pretrained(fp8), tok, root / "ds-ref")
    state = load_file(str(fp8 / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    quant, plain = {}, {}
    for k, w in state.items():
        if k.endswith("e_score_correction_bias"):
            w = torch.rand(w.shape, generator=g)  # a real routing bias, so the buffer must be streamed
        if w.dim() == 2 and k.endswith("proj.weight") and ".layers." in k:  # every decoder linear, as released
            q, s = _quantise(w)
            quant[k], quant[k + "_scale_inv"] = q, s
            plain[k] = _dequantise(q, s)
        else:
            quant[k] = plain[k] = w
    save_file(quant, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK]}
    # as released: an auto_map to DeepSeek's own modelling code, which Nexus never runs (no trust_remote_code):
    # transformers' native deepseek_v3 runs instead, streamed or not
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                       "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    return fp8, ref


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantise_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, K, rows) module layout -> (blocks (E, rows, K/32, 16) uint8, scales (E, rows, K/32) uint8, the
    dequantised (E, K, rows) float32): groups of 32 along K, exponent so that amax fits FP4's 6, nearest value."""
    E, K, rows = w.shape
    g = w.transpose(1, 2).reshape(E, rows, K // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)  # (E, rows, G)
    q = g / torch.exp2(exp).unsqueeze(-1)
    idx = (q.unsqueeze(-1) - _FP4).abs().argmin(-1)  # nearest e2m1 value's nibble, (E, rows, G, 32)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    deq = torch.ldexp(_FP4[idx], exp.to(torch.int32).unsqueeze(-1))
    return blocks, (exp + 127).to(torch.uint8), deq.reshape(E, rows, K).transpose(1, 2).contiguous()


GPT_OSS = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=64, max_pos=64, experts=4, experts_per_tok=2)


def write_mxfp4_teacher(root, tok, texts) -> tuple:
    """(gpt-oss folder with MXFP4 experts as released, the dequantised float32 reference folder)."""
    q = mf.make_teacher(root / "oss-mxfp4", texts, arch="gpt_oss", tokenizer=tok, **GPT_OSS)
    ref = mf.save_model(AutoModelForCausalLM.from_pretrained(q), tok, root / "oss-ref")
    state = load_file(str(q / "model.safetensors"))
    quant, plain = {}, {}
    for k, w in state.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, plain[k] = quantise_mxfp4(w)
            quant[k + "_blocks"], quant[k + "_scales"] = blocks, scales
        else:
            quant[k] = plain[k] = w
    save_file(quant, str(q / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (q / "config.json").write_text(json.dumps(cfg))
    return q, ref
