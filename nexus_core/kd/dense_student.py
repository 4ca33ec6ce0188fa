"""A dense student for a mixture-of-experts teacher: the teacher's dense sibling, seeded from its busiest experts.

The choice (README "Your teachers"): a MoE primary teacher (Mixtral, Qwen3-MoE, DeepSeek-V3) seeds a
**dense** student of its family's dense architecture (DENSE_SIBLING), depth-pruned like any other
student. Attention, norms, embeddings and head are copied from the kept teacher layers. Each kept
layer's MLP, `intermediate_size` wide (the teacher's own dense width: one expert for Mixtral, the
experts a token uses for Qwen3-MoE and DeepSeek-V3), is filled with whole experts: the shared
experts first (they run for every token), then the routed experts in order of their routed load on
the calibration data (counted by the profile stage), until the width is full. Routed experts' down
projections are scaled by routed_scaling_factor / (routed experts taken), so the seeded MLP starts as
the mean of the busiest experts' outputs; rows left over (if any) keep their random gate/up and a
zero down projection, so they start silent. A teacher layer that is dense already is copied as is.

A dense student trains and serves like any other (fewer parameters per token than the teacher's
total, no routing to learn from 0.1% of the data), which is why it is the choice here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from nexus_core.errors import BadInputError

# MoE model_type -> the dense model_type whose layers hold the same attention and norms under the same names.
# DeepSeek-V3 is its own sibling: with first_k_dense_replace = every layer, all its layers are dense.
DENSE_SIBLING = {"mixtral": "mistral", "qwen3_moe": "qwen3", "deepseek_v3": "deepseek_v3"}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_SHARED = re.compile(r"\.shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def is_moe(config) -> bool:
    return config.get_text_config().model_type in DENSE_SIBLING


def dense_config(teacher_config, kept: list[int]):
    """The dense sibling's config with the teacher's sizes, `len(kept)` layers (per-layer types kept)."""
    from transformers import CONFIG_MAPPING

    tcfg = teacher_config.get_text_config()
    target = CONFIG_MAPPING[DENSE_SIBLING[tcfg.model_type]]
    known = set(target().to_dict())
    src = {k: copy.deepcopy(v) for k, v in tcfg.to_dict().items()
           if k in known and k not in ("model_type", "architectures", "transformers_version", "quantization_config")}
    types = src.pop("layer_types", None)
    src["num_hidden_layers"] = len(kept)  # in the constructor: derived fields (layer_types) follow it
    if isinstance(types, list) and len(types) == tcfg.num_hidden_layers:
        src["layer_types"] = [types[i] for i in kept]
    if "first_k_dense_replace" in known:  # DeepSeek-V3: every layer dense
        src["first_k_dense_replace"] = len(kept)
    cfg = target(**src)
    cfg.architectures = None
    return cfg


@dataclass
class _LayerExperts:
    """Where one teacher layer's expert tensors are in the checkpoint."""
    per_expert: dict[int, dict[str, str]] = field(default_factory=dict)  # expert -> role -> key
    fused: dict[str, str] = field(default_factory=dict)                  # "gate_up_proj"/"down_proj" -> key
    shared: dict[str, str] = field(default_factory=dict)                 # role -> key

    def count(self, meta) -> int:
        if self.fused:
            return int(meta.tensors[self.fused["down_proj"]].shape[0])
        return len(self.per_expert)


def _expert_keys(names) -> dict[int, _LayerExperts]:
    out: dict[int, _LayerExperts] = {}
    for key in names:
        layer = _LAYER.search(key)
        if layer is None:
            continue
        slot = None
        if m := _PER_EXPERT.search(key):
            slot = out.setdefault(int(layer.group(1)), _LayerExperts())
            slot.per_expert.setdefault(int(m.group(1)), {})[_ROLE[m.group(2)]] = key
        elif m := _FUSED.search(key):
            out.setdefault(int(layer.group(1)), _LayerExperts()).fused[m.group(1)] = key
        elif m := _SHARED.search(key):
            out.setdefault(int(layer.group(1)), _LayerExperts()).shared[_ROLE[m.group(1)]] = key
    return out


def _expert(read, src: _LayerExperts, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's (gate (I, H), up (I, H), down (H, I)) in float32."""
    if src.fused:
        gate_up = read(src.fused["gate_up_proj"])[e].float()  # (2I, H): gate rows, then up rows
        gate, up = gate_up.chunk(2, dim=0)
        return gate, up, read(src.fused["down_proj"])[e].float()
    keys = src.per_expert[e]
    return read(keys["gate"]).float(), read(keys["up"]).float(), read(keys["down"]).float()


def rank_experts(load: list[int] | None, n: int) -> list[int]:
    """Expert ids, busiest first (ties and a missing load: by id)."""
    counts = load if load and len(load) == n else [0] * n
    return sorted(range(n), key=lambda e: (-counts[e], e))


def seed_mlps(model, store, kept: list[int], teacher_config, expert_load: dict) -> dict:
    """Fill the MLP of each student layer whose teacher layer is MoE; returns {student layer: what was used}."""
    scaling = float(getattr(teacher_config.get_text_config(), "routed_scaling_factor", 1.0) or 1.0)
    sources = _expert_keys(store.meta.tensors)
    layers = getattr(model, model.base_model_prefix).layers
    used = {}
    with store.reading() as read, torch.no_grad():
        for j, k in enumerate(kept):
            if k not in sources:
                continue  # a dense teacher layer: copied by name with the rest
            order = rank_experts(expert_load.get(str(k)), sources[k].count(store.meta))
            taken = _seed_layer(layers[j].mlp, read, store.meta, sources[k], order, scaling)
            used[j] = {"teacher_layer": k, "shared": bool(sources[k].shared), "experts": taken,
                       "load": "calibration" if str(k) in expert_load else "none recorded (experts by id)"}
    return used


def _seed_layer(mlp, read, meta, src: _LayerExperts, order: list[int], scaling: float) -> list[int]:
    """One dense MLP from shared experts, then the busiest routed ones until its width is full; returns those."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (I_s, H), (I_s, H), (H, I_s)
    down.zero_()  # rows no expert fills start silent
    row = 0
    if src.shared:  # every token goes through them: weight 1
        row = _put(gate, up, down, row, *(read(src.shared[r]).float() for r in ("gate", "up", "down")), 1.0)
    width = int(meta.tensors[src.fused["down_proj"]].shape[-1]) if src.fused else \
        int(meta.tensors[src.per_expert[order[0]]["gate"]].shape[0])  # one expert's intermediate width
    taken = order[:max(0, min(len(order), -(-(gate.shape[0] - row) // width)))]
    for e in taken:
        row = _put(gate, up, down, row, *_expert(read, src, e), scaling / len(taken))
    return taken


def _put(gate, up, down, row: int, g, u, d, scale: float) -> int:
    """Write one expert's rows at `row` (truncated at the student's width); returns the next free row."""
    n = min(g.shape[0], gate.shape[0] - row)
    if n <= 0:
        return row
    gate[row:row + n].copy_(g[:n])
    up[row:row + n].copy_(u[:n])
    down[:, row:row + n].copy_(d[:, :n] * scale)
    return row + n


def check_complete(missing: list[str], used: dict, teacher_id: str) -> None:
    """Every student tensor filled: the MLPs by seed_mlps, everything else by name; else one error naming them."""
    left = [k for k in missing if _mlp_of(k) not in used]
    if left:
        raise BadInputError(f"teacher {teacher_id!r}: the dense student cannot be seeded from its checkpoint; no "
                            f"tensor for {', '.join(left[:8])}{' …' if len(left) > 8 else ''}")


def _mlp_of(student_key: str) -> int | None:
    m = _LAYER.search(student_key)
    return int(m.group(1)) if m and ".mlp." in student_key else None
