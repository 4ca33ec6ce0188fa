"""Tiny GGUF files for the tests, written with the `gguf` package's writer the way llama.cpp's
convert_hf_to_gguf.py writes them: llama.cpp tensor names, Q/K rows permuted, norms in F32, the
tokenizer as metadata. gguf-py quantises F16/BF16/Q8_0/Q4_0/Q4_1 itself but not the K-quants, so
Q4_K and Q6_K blocks are packed here (the inverse of gguf-py's dequantisers; `quantize` checks
the round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _q4_k(rows: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles."""
    n = rows.shape[0]
    x = rows.reshape(n, 8, 32)
    lo = np.minimum(x.min(-1), 0)
    scale, off = (x.max(-1) - lo) / 15, -lo                           # (n, 8) each
    d, dmin = _f16(scale.max(-1) / 63), _f16(off.max(-1) / 63)        # (n,)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(off, dmf, out=np.zeros_like(off), where=dmf > 0)), 0, 63).astype(np.uint8)
    step, base = (df * sc)[..., None], (dmf * mn)[..., None]
    q = np.clip(np.round(np.divide(x + base, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    q = q.reshape(n, 4, 2, 32)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, nibbles], 1)


def _q6_k(rows: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d."""
    n = rows.shape[0]
    x = rows.reshape(n, 16, 16)
    s = np.abs(x).max(-1) / 31                                        # (n, 16)
    d = _f16(s.max(-1) / 127)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(s, df, out=np.zeros_like(s), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.clip(np.round(np.divide(x, step, out=np.zeros_like(x), where=step > 0)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 256)
    low = (q & 0xF).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], 1)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """x (float32, last dim a multiple of the block) in the GGUF layout of `qtype` (F32/F16 values, else bytes)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import dequantize
    from gguf import quantize as gguf_quantize

    q = Q[qtype]
    if q in (Q.Q4_K, Q.Q6_K):
        rows = x.reshape(-1, 256).astype(np.float32)
        out = (_q4_k if q == Q.Q4_K else _q6_k)(rows).reshape(*x.shape[:-1], -1)
    else:
        out = gguf_quantize(x.astype(np.float32), q)
    back = dequantize(out, q).reshape(x.shape)
    assert np.abs(back - x).max() <= 0.2 * np.abs(x).max() + 1e-6, f"{qtype} round trip is off"
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved rotary halves), as convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, qtype: str = "F32", types: dict[str, str] | None = None,
               add_bos: bool = False, chat_template: str | None = None, rope_freqs: np.ndarray | None = None,
               rope_scaling: dict | None = None, arch: str = "llama", pre: str = "default") -> Path:
    """`model` (an HF Llama/Qwen2) + `tokenizer` (byte-level BPE) as one GGUF file. Matrices are stored as
    `qtype` unless `types` names another for a GGUF tensor name; 1-D tensors stay F32."""
    import gguf

    cfg = model.config
    L, H, heads, kv = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(H // heads)
    w.add_vocab_size(cfg.vocab_size)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        w.add_rope_scaling_factor(float(rope_scaling["factor"]))
    _write_tokenizer(w, tokenizer, cfg.vocab_size, add_bos, chat_template, pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], L)
    tied = cfg.tie_word_embeddings
    for hf, t in model.state_dict().items():
        if tied and hf == "lm_head.weight":
            continue
        stem, suffix = hf.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = _permute(a, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = _permute(a, kv)
        kind = "F32" if a.ndim == 1 else (types or {}).get(name, qtype)
        data = quantize(a, kind)
        w.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _write_tokenizer(w, tokenizer, vocab_size: int, add_bos: bool, chat_template: str | None, pre: str) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer model: tokens by id, merges, control tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # rows past the tokenizer: padding
    special = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else (1 if i in by_id else 5) for i in range(vocab_size)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
