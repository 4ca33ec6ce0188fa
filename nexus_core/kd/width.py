"""Width pruning (Minitron-style): a student of the size the user asks for (`--student-params`).

The depth-pruned seed (student.py: the kept layers at the teacher's full width) is narrowed until it
has at most the target number of parameters, in this order, each only as far as needed:
  1. MLP intermediate channels, down to a quarter of the teacher's;
  2. attention heads, in whole KV groups (a KV head with the query heads that read it), down to half;
  3. hidden (embedding) channels, down to a quarter; past that the target is an error.
What is kept is ranked by activations measured on a few calibration rows run through the seed:
MLP channels by mean |act(gate) * up| (the down projection's input), KV groups by the summed L2 norm
of their heads' attention outputs (the o projection's input), hidden channels by mean |hidden state|
over every layer's output. Every tensor is then sliced consistently (q/k/v/o rows and columns,
gate/up/down, norms, embeddings and head; a tied head stays tied). Llama-style dense layers only
(llama, mistral, qwen2, qwen3, and the dense siblings of MoE teachers).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from nexus_core.config import parse_count
from nexus_core.errors import BadInputError

MLP_FLOOR, GROUP_FLOOR, HIDDEN_FLOOR = 0.25, 0.5, 0.25  # the narrowest share of the teacher each step may reach


@dataclass(frozen=True)
class Shape:
    """The widths of a llama-style student (its depth is fixed by then)."""
    intermediate: int
    kv_groups: int
    hidden: int


def target_params(text: str, teacher_params: int) -> int | None:
    """'60M' -> 60e6; a bare number up to 1 ('0.5') is a share of the teacher; '' -> None."""
    if not text:
        return None
    n = parse_count(text)
    has_unit = bool(re.search(r"[KMBT]\s*$", text.strip().upper()))
    return int(n * teacher_params) if not has_unit and n <= 1 else int(n)


def teacher_shape(config) -> Shape:
    return Shape(config.intermediate_size, config.num_key_value_heads, config.hidden_size)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shaped_config(config, shape: Shape):
    """The seed's config at `shape`; head_dim is pinned so that narrowing hidden keeps the heads whole."""
    out = copy.deepcopy(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    out.head_dim = head_dim(config)
    out.intermediate_size = shape.intermediate
    out.num_key_value_heads = shape.kv_groups
    out.num_attention_heads = shape.kv_groups * per_group
    out.hidden_size = shape.hidden
    return out


def _unit(width: int) -> int:
    """Channels are removed in steps that keep GPU-friendly multiples when the teacher has them."""
    for u in (64, 8):
        if width % u == 0 and width >= 4 * u:
            return u
    return 1


def _largest_fitting(lo: int, hi: int, unit: int, fits) -> int | None:
    """The largest width in [lo, hi] (multiples of unit, plus hi) for which fits(width); None if none."""
    candidates = sorted({hi, *range(-(-lo // unit) * unit, hi, unit)}, reverse=True)
    if not candidates or not fits(candidates[-1]):
        return None
    a, b = 0, len(candidates) - 1  # fits(candidates[b]); find the first index that fits
    while a < b:
        mid = (a + b) // 2
        if fits(candidates[mid]):
            b = mid
        else:
            a = mid + 1
    return candidates[a]


def choose_shape(config, target: int, count) -> Shape:
    """The widest shape, narrowing MLP, then KV groups, then hidden, with count(config) <= target."""
    full = teacher_shape(config)
    params = lambda s: count(shaped_config(config, s))  # noqa: E731
    if params(full) <= target:
        return full
    floor_i = max(1, int(full.intermediate * MLP_FLOOR))
    i = _largest_fitting(floor_i, full.intermediate, _unit(full.intermediate),
                         lambda w: params(Shape(w, full.kv_groups, full.hidden)) <= target)
    if i is not None:
        return Shape(i, full.kv_groups, full.hidden)
    floor_g = max(1, int(full.kv_groups * GROUP_FLOOR))
    g = _largest_fitting(floor_g, full.kv_groups, 1, lambda w: params(Shape(floor_i, w, full.hidden)) <= target)
    if g is not None:
        return Shape(floor_i, g, full.hidden)
    floor_h = max(1, int(full.hidden * HIDDEN_FLOOR))
    h = _largest_fitting(floor_h, full.hidden, _unit(full.hidden),
                         lambda w: params(Shape(floor_i, floor_g, w)) <= target)
    if h is None:
        smallest = params(Shape(floor_i, floor_g, floor_h))
        raise BadInputError(f"--student-params {target:,}: even the narrowest width-pruned student has "
                            f"{smallest:,} parameters; lower --student-layer-ratio (or --student-layers) too")
    return Shape(floor_i, floor_g, h)


# --- importance on calibration rows ------------------------------------------------------------------

@dataclass
class Importance:
    mlp: list[torch.Tensor]     # per layer, (I,) mean |act(gate) * up|
    groups: list[torch.Tensor]  # per layer, (n_kv,) summed head-output norms of each KV group
    hidden: torch.Tensor        # (H,) mean |hidden state| over all layers' outputs


def measure(model, rows: torch.Tensor | None, mask: torch.Tensor | None) -> Importance:
    """Run calibration rows (b, T) through the seed with hooks; without rows every channel ties (kept in order)."""
    cfg, layers = model.config, _layers(model)
    n_rep, hd = cfg.num_attention_heads // cfg.num_key_value_heads, head_dim(cfg)
    mlp = [torch.zeros(cfg.intermediate_size) for _ in layers]
    heads = [torch.zeros(cfg.num_attention_heads) for _ in layers]
    hidden = torch.zeros(cfg.hidden_size)
    if rows is None or rows.numel() == 0:
        return Importance(mlp, [h.view(-1, n_rep).sum(1) for h in heads], hidden)
    weight = (mask if mask is not None else torch.ones_like(rows)).float().unsqueeze(-1)  # (b, T, 1)
    tokens = weight.sum().clamp_min(1.0)

    def on_down(j):
        def hook(_module, args):
            mlp[j] += (args[0].detach().float().abs() * weight).sum((0, 1)) / tokens
        return hook

    def on_o(j):
        def hook(_module, args):
            x = args[0].detach().float()  # (b, T, nH * hd)
            norms = x.view(*x.shape[:2], -1, hd).norm(dim=-1)  # (b, T, nH)
            heads[j] += (norms * weight).sum((0, 1)) / tokens
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(on_down(j)) for j, layer in enumerate(layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(on_o(j)) for j, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=rows, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for h in out.hidden_states:  # (b, T, H) each: the embeddings and every layer's output
        hidden += (h.float().abs() * weight).sum((0, 1)) / tokens
    return Importance(mlp, [h.view(-1, n_rep).sum(1) for h in heads], hidden)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: the first ones)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


# --- slicing -----------------------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def narrow(seed, shape: Shape, imp: Importance):
    """A new model at `shape` holding the seed's kept channels. Returns (model, kept indices)."""
    from transformers import AutoModelForCausalLM

    cfg = seed.config
    n_rep, hd = cfg.num_attention_heads // cfg.num_key_value_heads, head_dim(cfg)
    keep_h = top(imp.hidden, shape.hidden)
    keep_i = [top(s, shape.intermediate) for s in imp.mlp]
    keep_g = [top(s, shape.kv_groups) for s in imp.groups]
    kv_rows = [(g.unsqueeze(1) * hd + torch.arange(hd)).flatten() for g in keep_g]
    q_rows = [((g.unsqueeze(1) * n_rep + torch.arange(n_rep)).flatten().unsqueeze(1) * hd
               + torch.arange(hd)).flatten() for g in keep_g]
    model = AutoModelForCausalLM.from_config(shaped_config(cfg, shape)).to(torch.float32)
    seed_state, state = seed.state_dict(), model.state_dict()
    sliced = {}
    for key, want in state.items():
        m = _LAYER.search(key)
        j = int(m.group(1)) if m else None
        t = _slice(key, seed_state[key], j, keep_h, keep_i, q_rows, kv_rows)
        if tuple(t.shape) != tuple(want.shape):
            raise BadInputError(f"width pruning does not know how to narrow {key} {tuple(seed_state[key].shape)} "
                                f"to {tuple(want.shape)} ({cfg.model_type}); leave --student-params empty")
        sliced[key] = t
    model.load_state_dict(sliced)
    return model, {"hidden": keep_h.tolist(), "mlp": [k.tolist() for k in keep_i],
                   "kv_groups": [g.tolist() for g in keep_g]}


def _slice(key: str, t: torch.Tensor, j, keep_h, keep_i, q_rows, kv_rows) -> torch.Tensor:
    """One seed tensor cut to the kept channels; tensors no rule names are returned whole."""
    name = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    bias = key.endswith(".bias")
    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
        return t[:, keep_h]
    if name in ("q_proj", "k_proj", "v_proj"):
        rows = q_rows[j] if name == "q_proj" else kv_rows[j]
        return t[rows] if bias else t[rows][:, keep_h]
    if name == "o_proj":
        return t[keep_h] if bias else t[keep_h][:, q_rows[j]]
    if name in ("gate_proj", "up_proj"):
        return t[keep_i[j]] if bias else t[keep_i[j]][:, keep_h]
    if name == "down_proj":
        return t[keep_h] if bias else t[keep_h][:, keep_i[j]]
    if key.endswith("norm.weight") and not key.endswith(("q_norm.weight", "k_norm.weight")):
        return t[keep_h]
    return t


def _layers(model):
    return getattr(model, model.base_model_prefix).layers


def supports(config) -> bool:
    """Llama-style dense layers: the only ones narrow() knows how to slice."""
    keys = ("intermediate_size", "num_key_value_heads", "num_attention_heads", "hidden_size")
    return all(isinstance(getattr(config, k, None), int) for k in keys) and \
        config.model_type in ("llama", "mistral", "qwen2", "qwen3")
