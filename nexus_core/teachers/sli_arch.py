"""Per-architecture glue for SLI: which model types stream, and how checkpoint keys map onto modules.

Checkpoints name tensors as they were saved (`model.layers.3.block_sparse_moe.experts.5.w1.weight`),
while transformers 5.x modules may hold them renamed and fused (`model.layers.3.mlp.experts.gate_up_proj`,
one (E, 2I, H) tensor for all experts). `WeightIndex` resolves every parameter of the skeleton to
its source tensors, so a group (embeddings, one decoder layer, final norm + head) can be read alone.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nexus_core.errors import NexusError
from nexus_core.storage.safetensors_meta import WeightsMeta

# model_type -> what the streaming code has been checked against (tests/test_sli.py builds each).
SUPPORTED = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3 (Llama-style)",
    "gemma": "Gemma", "gemma2": "Gemma 2 (soft-capped)", "gpt_neox": "GPT-NeoX", "mixtral": "Mixtral MoE",
    "qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3/R1 (MLA, shared + group-routed experts)",
    "gemma3_text": "Gemma 3 text (interleaved sliding/global layers)", "phi3": "Phi-3/4 (fused qkv and gate_up)",
    "gpt_oss": "gpt-oss (experts with biases, attention sinks)",
    "step3p5": "Step3-VL's language model (gated attention, clamped experts with a shared one)",
}

# Quantisation formats whose tensors the weight store dequantises one tensor at a time (teachers/weights.py),
# by config.json's quantization_config.quant_method; any other is named and refused.
STREAMED_QUANT = {"fp8": "block-scaled FP8 (weight_scale_inv), dequantised per layer",
                  "mxfp4": "MXFP4 experts (_blocks + _scales), dequantised per layer"}

# Checkpoint-name -> module-name renamings used when transformers' own mapping cannot be read.
RENAMES = {"mixtral": [(".block_sparse_moe.", ".mlp.")], "gpt_neox": [("embed_out.", "lm_head.")]}

# Per-expert checkpoint tensors: "<prefix>.experts.<e>.<w1|w2|w3|gate_proj|up_proj|down_proj>.weight".
_EXPERT_KEY = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_GATE, _UP, _DOWN = {"w1", "gate_proj"}, {"w3", "up_proj"}, {"w2", "down_proj"}


class SLIUnsupportedError(NexusError):
    """Raised when SLI cannot stream a teacher (architecture, quantised or remote-code weights, key mismatch)."""


def sli_support(config) -> tuple[bool, str]:
    """(True, why) when SLI can stream this architecture; (False, reason naming it) when it cannot."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    mt = getattr(cfg, "model_type", None) or getattr(config, "model_type", "?")
    archs = ",".join(getattr(config, "architectures", None) or []) or mt
    quant = getattr(config, "quantization_config", None)
    method = _quant_method(quant)
    if quant and (method not in STREAMED_QUANT or (method == "fp8" and not _block_scaled(quant))):
        return False, (f"{archs}: {method or 'quantised'} weights cannot be streamed layer by layer (SLI dequantises "
                       f"only {', '.join(STREAMED_QUANT.values())}); convert the checkpoint to safetensors bf16 "
                       f"(e.g. AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16).save_pretrained(...)) "
                       f"or use --sli never on a machine whose memory holds it whole")
    if mt not in SUPPORTED:
        return False, (f"{archs} (model_type {mt!r}) is not an architecture SLI streams "
                       f"(supported: {', '.join(sorted(SUPPORTED))}); it needs a full load")
    if getattr(config, "auto_map", None) and not type(config).__module__.startswith("transformers.models."):
        # custom code in use; an auto_map beside a model_type transformers ships (DeepSeek-V3's release) is
        # ignored without trust_remote_code, and then the native modules run, streamed or not
        return False, f"{archs}: custom modelling code (auto_map) is not streamed; load it in full"
    how = f"; {STREAMED_QUANT[method]}" if quant else ""
    return True, f"{SUPPORTED[mt]}: decoder layers stream one at a time from the safetensors files{how}"


def _quant_method(quant) -> str | None:
    if quant is None:
        return None
    q = quant if isinstance(quant, dict) else quant.to_dict()
    return str(q.get("quant_method") or "").lower() or None


def _block_scaled(quant) -> bool:
    q = quant if isinstance(quant, dict) else quant.to_dict()
    return bool(q.get("weight_block_size"))


@dataclass
class Source:
    """Where one module parameter comes from: a checkpoint tensor, or per-expert tensors to fuse."""
    key: str | None = None                                  # direct: one checkpoint tensor
    experts: list[list[str]] = field(default_factory=list)  # fused: per expert, its tensors (cat on dim 0)

    @property
    def keys(self) -> list[str]:
        return [self.key] if self.key else [k for ks in self.experts for k in ks]


class WeightIndex:
    """Checkpoint tensors (by name, from the store's headers) and the source of each skeleton parameter."""

    def __init__(self, meta: WeightsMeta, model_dir: Path, rename: Callable[[str], str]):
        self.model_dir = Path(model_dir)
        self.meta = meta
        self.ckpt_of: dict[str, str] = {}      # module name -> checkpoint name (direct tensors)
        self.fused: dict[str, list[list[str]]] = {}  # module name of a fused expert tensor -> sources
        per_expert: dict[tuple[str, str], dict[int, list[str]]] = {}
        for key in self.meta.tensors:
            name = rename(key)
            m = _EXPERT_KEY.match(name)
            if m is None:
                self.ckpt_of[name] = key
                continue
            w = m["w"]
            target = "gate_up_proj" if w in _GATE | _UP else "down_proj"
            slot = per_expert.setdefault((m["pre"], target), {}).setdefault(int(m["e"]), [None, None])
            slot[0 if w in _GATE | _DOWN else 1] = key  # gate rows first, then up (Concatenate dim=1)
        for (pre, target), by_e in per_expert.items():
            self.fused[f"{pre}.{target}"] = [[k for k in by_e[e] if k] for e in sorted(by_e)]

    def resolve(self, names: list[str], tied: dict[str, str]) -> dict[str, Source]:
        """Module parameter name -> Source; one SLIUnsupportedError listing every name with no source."""
        out, missing = {}, []
        for name in names:
            src = tied.get(name, name)  # a tied head reads the embedding, as from_pretrained ties them
            if src in self.ckpt_of or name in self.ckpt_of:
                out[name] = Source(key=self.ckpt_of.get(src) or self.ckpt_of[name])
            elif name in self.fused:
                out[name] = Source(experts=self.fused[name])
            else:
                missing.append(name)
        if missing:
            raise SLIUnsupportedError(
                f"{self.model_dir}: the checkpoint has no tensor for {len(missing)} parameter(s) of the model "
                f"({', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}); config.json does not match "
                f"the weights, or the key layout is one SLI does not convert; re-save the model or use --sli never")
        return out


def renamer(model) -> Callable[[str], str]:
    """Checkpoint name -> module name: transformers' WeightRenamings for this model (as from_pretrained applies
    them before converters), then the base-model prefix added or stripped to match the skeleton."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        base = lambda key: apply_renamings(key, renamings)  # noqa: E731
    except ImportError:  # another transformers layout: the table above
        pairs = RENAMES.get(model.config.model_type, [])
        base = lambda key: functools.reduce(lambda k, p: k.replace(*p), pairs, key)  # noqa: E731
    names = {n for n, _ in model.named_parameters()}
    prefix = model.base_model_prefix

    def rename(key: str) -> str:
        name = base(key)
        if name not in names and f"{prefix}.{name}" in names:
            return f"{prefix}.{name}"
        if name.startswith(prefix + ".") and name not in names and name[len(prefix) + 1:] in names:
            return name[len(prefix) + 1:]
        return name
    return rename


def expert_modules(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each fused routed-experts module in a decoder layer (3-D gate_up/down tensors)."""
    found = []
    for name, mod in layer.named_modules():
        p = getattr(mod, "down_proj", None)
        if isinstance(p, torch.nn.Parameter) and p.dim() == 3 and hasattr(mod, "num_experts"):
            found.append((name, mod))
    return found


def keep_fp32(model, name: str) -> bool:
    """Whether from_pretrained keeps this parameter in float32 whatever the dtype (_keep_in_fp32_modules)."""
    mods = set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    parts = name.split(".")
    return any(m in parts for m in mods)


# --- forward glue: recording the model's own layer calls, cutting them into micro-batches --------

class Stop(Exception):
    """Raised by the last recording stand-in: the skeleton forward has handed over what we need."""


class Recorder(nn.Module):
    """Stands in for decoder layer `idx` in a skeleton forward: records (hidden, args, kwargs)."""

    def __init__(self, idx: int, calls: dict, stop_at: int):
        super().__init__()
        self.idx, self.calls, self.stop_at = idx, calls, stop_at

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls[self.idx] = (hidden, args[1:], kwargs)
        if self.idx == self.stop_at:
            raise Stop
        return hidden


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


_LIBC = _libc()
MMAP_THRESHOLD = 16 << 20  # host allocations this size and up are mmap'd (see return_freed_memory)


def return_freed_memory() -> None:
    """Serve host allocations ≥ 16 MiB from mmap so freed layer copies and logits chunks go back to the OS at once.

    glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB) and keeps later
    freed blocks in the heap, so a stream of layer-sized tensors and 32 MiB logits chunks ratchets RSS
    upward. Not lower: at 1 MiB every activation tensor was a fresh mapping whose pages fault in on first
    write, and the element-wise ops of a layer pass ran ~2x slower (SmolLM2 fp32, 8 x 512 tokens per call:
    524 tok/s at 1 MiB, 618 at 16 MiB, peak RSS within 4 %; bench/bench_malloc.py, BENCHMARKS.md).
    Below LOGIT_CHUNK_BYTES (32 MiB), so the head's logits chunks stay mappings; `trim_heap` between
    layers returns what the heap frees."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed => no dynamic raise)
        _LIBC.mallopt(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: glibc's own ratio, fixed


def trim_heap() -> None:
    """Give the free pages inside malloc's heaps back to the OS (every thread's arena, not only the top).

    The smaller (< 16 MiB) allocations of a layer pass are freed in an order that leaves holes the
    automatic trim (top of the main heap only) never returns; run between layers, this keeps the
    resident size to what is live (~1 ms per call)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def write_rows(dst: torch.Tensor, s: int, e: int, src: torch.Tensor) -> torch.Tensor:
    dst[s:e].copy_(src)
    return dst


def slice_calls(obj, s: int, e: int, n: int, mb: int):
    """Cut per-sequence tensors (leading dim n) of a layer's call arguments down to sequences s:e."""
    if mb == n:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[s:e] if obj.dim() and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_calls(o, s, e, n, mb) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_calls(v, s, e, n, mb) for k, v in obj.items()}
    return obj
