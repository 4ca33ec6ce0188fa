"""Where a teacher's tensors come from, one tensor at a time: the one reading interface for SLI, the
profile's checks and the student's seeding.

A `WeightStore` lists the checkpoint's tensors under their checkpoint names with dtype and shape
(`meta`, read from file headers alone) and reads them on demand inside `reading()`, which keeps the
files it opened mapped until the block ends (SLI reads one layer group per block, so pages of
earlier layers are unmapped as it goes). Weight formats plug in here: safetensors folders
(`SafetensorsStore`, including DeepSeek-V3's released block-scaled FP8 and gpt-oss's MXFP4 experts,
dequantised tensor by tensor) and
GGUF files (`teachers.gguf.GGUFStore`, dequantised); other formats add their own store and register in
`open_weights`.
"""

from __future__ import annotations

import functools
import json
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from nexus_core.errors import CorruptArtifactError
from nexus_core.storage.safetensors_meta import TensorInfo, WeightsMeta, scan

Reader = Callable[[str], torch.Tensor]  # checkpoint name -> tensor (as stored, on the CPU)


class WeightStore(Protocol):
    path: Path
    meta: WeightsMeta  # every tensor a model parameter can come from, by checkpoint name

    @contextmanager
    def reading(self) -> Iterator[Reader]: ...


class SafetensorsStore:
    """A Hugging Face folder's *.safetensors files (sharded or not), memory-mapped.

    Block-scaled FP8 (DeepSeek-V3/R1's release: `X.weight` in float8_e4m3fn beside `X.weight_scale_inv`,
    one float32 scale per block of config.json's quantization_config.weight_block_size, 128x128) is
    dequantised as each tensor is read, into float32 (DeepSeek's own `weight_dequant`: weight * scale,
    block-wise); the scale tensors are hidden from `meta` (their bytes counted with their weight's)."""

    def __init__(self, model_dir: Path):
        self.path = Path(model_dir)
        self.meta = scan(self.path)
        self.bytes_read = 0
        files = {n: t.file for n, t in self.meta.tensors.items()}  # every stored name -> its file
        self.scales = _split_scales(self.meta)  # FP8 weight name -> its scale tensor's name
        self.block = _block_size(self.path) if self.scales else None
        self.mxfp4 = _split_mxfp4(self.meta)  # MXFP4 tensor name -> (its _blocks, its _scales)
        self.files = files
        # A vision-language checkpoint: only its language model, under a text model's names
        self.view = language_model_view(self.meta, _config_json(self.path))
        self.stored_name, self.meta = self.view.stored_name, self.view.meta
        self.language_model_only = bool(self.stored_name)

    @contextmanager
    def reading(self) -> Iterator[Reader]:
        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[str, object] = {}

            def raw(name: str) -> torch.Tensor:
                file = self.files[name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(self.path / file), framework="pt", device="cpu"))
                t = handles[file].get_tensor(name)  # a view of the mapping: its pages fault in when touched
                self.bytes_read += t.numel() * t.element_size()
                return t

            def stored(name: str) -> torch.Tensor:
                if name in self.mxfp4:
                    blocks, scales = self.mxfp4[name]
                    return dequantise_mxfp4(raw(blocks), raw(scales))
                if name in self.scales:
                    return dequantise_block_fp8(raw(name), raw(self.scales[name]), self.block, name)
                return raw(name)

            def read(name: str) -> torch.Tensor:
                if name in self.view.fused:  # (E, rows_a + rows_b, cols) from its stacked parts
                    return torch.cat([stored(part) for part in self.view.fused[name]], dim=1)
                t = stored(self.stored_name.get(name, name))
                return t.transpose(1, 2).contiguous() if name in self.view.transposed else t  # stored (E, b, a)
            yield read


# Where vision-language checkpoints keep their language model (transformers' save layout and the original
# releases: Gemma 3, LLaVA, Mistral 3, Qwen3-VL), and the text model's name for it.
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."), ("language_model.", ""))


@dataclass(frozen=True)
class _Release:
    """How a vision-language release stores its language model, where transformers' key conversions differ."""
    vision: tuple[str, ...] = ()  # the tower's prefixes, beside a language model under text-model names (model.*)
    renames: tuple[tuple[str, str], ...] = ()            # stored -> transformers' module name (substrings)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # module suffix <- stored suffixes, concatenated on dim 1
    # module suffix, the dim that holds hidden_size there: stored dims 1 and 2 swapped when hidden_size is not in
    # it (transformers' Transpose(1, 2, check_dims=True))
    transposed: tuple[tuple[str, int], ...] = ()


# By config.json's model_type (transformers saves them so too: its conversion_mapping runs backwards on save).
# Qwen2.5-VL keeps `model.layers.*` beside `visual.*`. Step3-VL keeps them beside `vision_model.*` and stacks each
# layer's experts as moe.{gate,up,down}_proj (E, rows, cols), held as gate_up_proj = cat(gate, up) on dim 1
# (conversion_mapping's "step3p7"). Qwen3-VL-MoE's release stores its fused experts (E, H, 2I) and (E, I, H).
_RELEASES = {
    "qwen2_5_vl": _Release(vision=("visual.",)),
    "step3p7": _Release(
        vision=("vision_model.", "vit_large_projector."),
        renames=((".moe.gate.weight", ".mlp.gate.weight"), (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
                 (".moe.down_proj.weight", ".mlp.experts.down_proj"), (".share_expert.", ".mlp.shared_experts.")),
        fused=((".mlp.experts.gate_up_proj", (".moe.gate_proj.weight", ".moe.up_proj.weight")),)),
    "qwen3_vl_moe": _Release(transposed=((".mlp.experts.gate_up_proj", 2), (".mlp.experts.down_proj", 1))),
}


@dataclass
class LanguageModelView:
    """A vision-language checkpoint's language model under the text model's names; empty for any other."""
    stored_name: dict[str, str]       # text-model name -> stored name
    fused: dict[str, list[str]]       # text-model name -> stored names to concatenate on dim 1
    transposed: set[str]              # text-model names stored with dims 1 and 2 swapped
    meta: WeightsMeta                 # the language model's tensors alone, as the modules hold them


def language_model_view(meta: WeightsMeta, config: dict) -> LanguageModelView:
    """The language model of a vision-language checkpoint (config: its config.json): the vision tower and
    projector are left out, so nothing ever reads them."""
    release = _RELEASES.get(str(config.get("model_type")), _Release())
    if not release.vision and not any(n.startswith(p) for n in meta.tensors for p, _ in _LM_PREFIXES):
        return LanguageModelView({}, {}, set(), meta)
    names = _text_names(meta, release)
    fused = {}
    for target, parts in release.fused:
        for head in [n[: -len(parts[0])] for n in names if n.endswith(parts[0])]:
            fused[head + target] = [names.pop(head + part) for part in parts]
    tensors = {new: meta.tensors[stored] for new, stored in names.items()}
    for new, stored in fused.items():  # (E, rows, cols) parts -> (E, sum of rows, cols)
        first = meta.tensors[stored[0]]
        rows = sum(meta.tensors[k].shape[1] for k in stored)
        tensors[new] = TensorInfo(first.dtype, (first.shape[0], rows, *first.shape[2:]), first.file,
                                  sum(meta.tensors[k].nbytes for k in stored))
    transposed = _transposed(tensors, release, (config.get("text_config") or config).get("hidden_size"))
    for n in transposed:
        t = tensors[n]
        tensors[n] = TensorInfo(t.dtype, (t.shape[0], t.shape[2], t.shape[1]), t.file, t.stored_bytes)
    files = sorted({t.file for t in tensors.values()})
    return LanguageModelView(names, fused, transposed, WeightsMeta(files=files, tensors=tensors))


def _text_names(meta: WeightsMeta, release: _Release) -> dict[str, str]:
    """{text-model name: stored name} for the language model's stored tensors (the tower's left out)."""
    names = {}
    for stored in meta.tensors:
        if release.vision and stored.startswith(release.vision):
            continue
        new = next((to + stored[len(p):] for p, to in _LM_PREFIXES if stored.startswith(p)), None)
        if new is None and (release.vision or stored.startswith("lm_head.")):
            new = stored
        if new is not None:
            names[functools.reduce(lambda k, r: k.replace(*r), release.renames, new)] = stored
    return names


def _transposed(tensors: dict[str, TensorInfo], release: _Release, hidden) -> set[str]:
    """Names of the 3-D tensors stored with dims 1 and 2 swapped: hidden_size not where the module holds it."""
    return {n for n, t in tensors.items() for suffix, dim in release.transposed
            if n.endswith(suffix) and t.shape[dim] != hidden and t.shape[3 - dim] == hidden}


def _split_scales(meta: WeightsMeta) -> dict[str, str]:
    """Take `*.weight_scale_inv` out of meta.tensors (their bytes go on their weight): weight -> scale name."""
    scales = {}
    for name in [n for n in meta.tensors if n.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        info = meta.tensors.pop(name)
        if weight in meta.tensors:
            w = meta.tensors[weight]
            meta.tensors[weight] = TensorInfo(w.dtype, w.shape, w.file, w.nbytes + info.nbytes)
            scales[weight] = name
    return scales


def _config_json(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _block_size(model_dir: Path) -> tuple[int, int]:
    """quantization_config.weight_block_size from config.json (DeepSeek-V3: [128, 128])."""
    q = _config_json(model_dir).get("quantization_config") or {}
    rows, cols = q.get("weight_block_size") or (128, 128)
    return int(rows), int(cols)


def _split_mxfp4(meta: WeightsMeta) -> dict[str, tuple[str, str]]:
    """gpt-oss's MXFP4 experts: `X_blocks` (..., rows, G, 16) uint8 + `X_scales` (..., rows, G) uint8 become
    one tensor `X` of shape (..., G*32, rows) in meta (the layout transformers' gpt-oss modules hold)."""
    out = {}
    for name in [n for n in meta.tensors if n.endswith("_blocks")]:
        base = name[: -len("_blocks")]
        if base + "_scales" not in meta.tensors:
            continue
        b, s = meta.tensors.pop(name), meta.tensors.pop(base + "_scales")
        *lead, rows, G, B = b.shape
        meta.tensors[base] = TensorInfo("MXFP4", (*lead, G * B * 2, rows), b.file, b.nbytes + s.nbytes)
        out[base] = (name, base + "_scales")
    return out


# FP4 (e2m1) values by nibble, as the OCP MX spec and gpt-oss's release define them
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantise_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., rows, G, 16) packed FP4 (low nibble first) and (..., rows, G) E8M0 exponents (bias 127)
    -> (..., G*32, rows) float32: each group of 32 values times 2**(scale - 127), then transposed."""
    lo, hi = _FP4[(blocks & 0x0F).long()], _FP4[(blocks >> 4).long()]      # (..., rows, G, 16) each
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)                        # (..., rows, G, 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))  # exact: a power of two
    return vals.flatten(-2).transpose(-1, -2).contiguous()                  # (..., G*32, rows)


def dequantise_block_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str = "") -> torch.Tensor:
    """(M, N) FP8 weight and its (ceil(M/b0), ceil(N/b1)) scales -> (M, N) float32 = weight * scale per block."""
    M, N = w.shape
    b0, b1 = block
    if tuple(scale.shape) != (math.ceil(M / b0), math.ceil(N / b1)):
        raise CorruptArtifactError(f"{name}: weight {list(w.shape)} with scales {list(scale.shape)} does not fit "
                                   f"{b0}x{b1} blocks (config.json quantization_config.weight_block_size)")
    s = scale.float().repeat_interleave(b0, 0)[:M].repeat_interleave(b1, 1)[:, :N]  # (M, N)
    return w.float() * s


def open_weights(path, config=None) -> WeightStore:
    """The store for a teacher's weights at `path`: a model folder, or a GGUF file (or a folder holding one),
    whose store needs the model's config to name its tensors (read from the file when not given)."""
    from nexus_core.teachers.gguf import GGUFStore, gguf_file

    file = gguf_file(Path(path))
    return GGUFStore(file, config) if file is not None else SafetensorsStore(Path(path))
