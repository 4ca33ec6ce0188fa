"""Sequential layer ingestion (SLI): run a teacher one decoder layer at a time from its safetensors files.

The model's skeleton is built on the meta device (no weights). A forward over a chunk of n
sequences then: (1) runs the skeleton's own forward with recording stand-ins for the decoder
layers, so the attention masks, position ids and rotary embeddings each layer receives are
exactly the ones the model computes; (2) reads the embeddings, embeds the chunk, frees them;
(3) for each layer in order reads its tensors (only that layer's keys), runs it over the whole
chunk (in micro-batches of sequences when a memory budget asks for it), frees it; (4) reads
the final norm + LM head. A background thread reads the next group while the current one
computes (on CUDA into pinned buffers, copied on a side stream), so at most two groups are
resident. With a memory budget, each layer runs over the chunk in micro-batches and the chunk's
hidden states spill to a memory-mapped scratch file when they outgrow it. Mixture-of-experts
layers read only the routed experts when a chunk is too small to route to most of them. Numbers are bit-identical to a full load on CPU
because the very same module code runs on the very same inputs.

A group holds a module's parameters and the persistent buffers the checkpoint stores (DeepSeek-V3's routing
bias). Tensors come through the weight store (teachers/weights.py), which dequantises released formats
(block-FP8, MXFP4, GGUF) one tensor at a time and shows a vision-language checkpoint's language model alone;
what is per-architecture is one table (sli_arch.SUPPORTED, STREAMED_QUANT).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from nexus_core.teachers.loading import config_from
from nexus_core.teachers.runner import (
    _TORCH_DTYPES,
    ForwardOutput,
    block_influence,
    default_dtype,
    head_logits,
)
from nexus_core.teachers.sli_arch import (
    Recorder,
    SLIUnsupportedError,
    Source,
    Stop,
    WeightIndex,
    expert_modules,
    keep_fp32,
    renamer,
    return_freed_memory,
    sli_support,
    slice_calls,
    trim_heap,
    write_rows,
)
from nexus_core.teachers.weights import open_weights

__all__ = ["StreamingRunner", "sli_support", "SLIUnsupportedError"]


@dataclass
class _Param:
    owner: nn.Module       # the submodule holding the parameter
    attr: str              # its attribute name there
    name: str              # full name in the model (e.g. model.layers.3.mlp.experts.gate_up_proj)
    src: Source
    meta: nn.Parameter     # the meta placeholder put back when the group is freed
    dtype: torch.dtype
    buffer: bool = False   # a persistent buffer the checkpoint stores (DeepSeek-V3's e_score_correction_bias)


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]    # full name -> tensor on the device
    event: object = None                # CUDA event recorded on the copy stream after the copies
    lazy: bool = False                  # routed experts left unread (filled on demand)


def _persistent(module: nn.Module, local: str) -> bool:
    owner_name, _, attr = local.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return attr not in owner._non_persistent_buffers_set


def _most_heads(text) -> int:
    """The most attention heads any layer has (Step3-VL's differ by layer; its config refuses a global read)."""
    per_layer = getattr(text, "per_layer_config", None)
    if per_layer is None:
        return int(text.num_attention_heads)
    return max(int(per_layer[i].num_attention_heads) for i in range(text.num_hidden_layers))


class StreamingRunner:
    """TeacherRunner that streams decoder layers from the safetensors files (see module docstring)."""

    def __init__(self, model_dir, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, prefetch: bool = True, memory_budget_bytes: int | None = None,
                 micro_batch: int | None = None, moe_lazy: bool | None = None, scratch_dir: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.model_dir, self.device = Path(model_dir), torch.device(device)
        self.config = config_from(model_dir, trust_remote_code)
        ok, why = sli_support(self.config)
        if not ok:
            raise SLIUnsupportedError(f"{model_dir}: {why}. Run it with --sli never (full load) if it fits in memory.")
        text = self.config.get_text_config()
        self.store = open_weights(self.model_dir, self.config)  # safetensors, or a GGUF file dequantised
        self.dtype = dtype or default_dtype(str(device), self.store.meta.main_dtype)
        with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) real, as from_pretrained makes them
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code)
        self.model.eval()
        self.index = WeightIndex(self.store.meta, self.model_dir, renamer(self.model))
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.layers = self.base.layers
        self.num_layers = len(self.layers)
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.norm = self._final_norm()
        self.head_vocab = int(self.head.weight.shape[0])
        self.memory_budget, self.micro_batch, self.moe_lazy = memory_budget_bytes, micro_batch, moe_lazy
        self.scratch_dir = scratch_dir
        self.stats = {"bytes_read": 0, "expert_tensors_read": 0, "spilled": False, "micro_batch": 0}
        for m in self.model.modules():  # non-persistent buffers to the device once
            for k, b in m._buffers.items():
                if b is not None and not b.is_meta:
                    m._buffers[k] = b.to(self.device)
        tie = bool(getattr(text, "tie_word_embeddings", False) or getattr(self.config, "tie_word_embeddings", False))
        names = {id(m): n for n, m in self.model.named_modules()}
        self._tied = {f"{names[id(self.head)]}.weight": f"{names[id(self.embed)]}.weight"} if tie else {}
        self.groups: dict = {"embed": self._group(self.embed, names), "tail": self._group(self.norm, names)
                             + self._group(self.head, names)}
        for i, layer in enumerate(self.layers):
            self.groups[i] = self._group(layer, names)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        return_freed_memory()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sli-prefetch") if prefetch else None
        self._tail: _Loaded | None = None
        self._hooks: list = []
        self._have: dict[str, set[int]] = {}

    # --- structure ---------------------------------------------------------------------------

    def _final_norm(self) -> nn.Module:
        """The base model's one child with weights that is neither the embedding nor the layer list."""
        cands = [m for n, m in self.base.named_children() if m is not self.embed and m is not self.layers
                 and any(True for _ in m.parameters())]
        if len(cands) != 1:
            raise SLIUnsupportedError(f"{self.model_dir}: cannot tell the final norm among {len(cands)} modules; "
                                      "use --sli never")
        return cands[0]

    def _group(self, module: nn.Module, names: dict) -> list[_Param]:
        """The module's parameters, and the persistent buffers the checkpoint stores, with their sources."""
        prefix = names[id(module)]
        params = [(local, p, False) for local, p in module.named_parameters()]
        params += [(local, b, True) for local, b in module.named_buffers()
                   if f"{prefix}.{local}" in self.index.ckpt_of and _persistent(module, local)]
        full = [f"{prefix}.{local}" for local, _, _ in params]
        sources = self.index.resolve(full, self._tied)
        out = []
        for (local, p, buffer), name in zip(params, full):
            owner_name, _, attr = local.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            dtype = torch.float32 if keep_fp32(self.model, name) or buffer else self.dtype
            out.append(_Param(owner, attr, name, sources[name], p, dtype if p.is_floating_point() else p.dtype,
                              buffer))
        return out

    # --- reading (runs on the prefetch thread) -------------------------------------------------

    def _submit(self, key, lazy: bool = False) -> Future:
        if self._pool is not None:
            return self._pool.submit(self._read, key, lazy)
        fut: Future = Future()
        fut.set_result(self._read(key, lazy))
        return fut

    def _read(self, key, lazy: bool = False) -> _Loaded:
        """One group's tensors, on the device; routed experts left empty when `lazy`."""
        tensors = {}
        with self.store.reading() as read:
            for p in self.groups[key]:
                if lazy and p.src.experts:  # filled on demand by _expert_hook; untouched rows cost no RAM
                    tensors[p.name] = torch.empty(p.meta.shape, dtype=p.dtype, device=self.device)
                else:  # decoder layers are read ahead in full; embedding rows fault in as the lookup needs them
                    tensors[p.name] = self._host_tensor(p, read, touch=isinstance(key, int))
        return self._to_device(tensors, lazy)

    def _get(self, key: str, read) -> torch.Tensor:
        t = read(key)
        self.stats["bytes_read"] += t.numel() * t.element_size()
        return t

    def _host_tensor(self, p: _Param, read, experts: set[int] | None = None, touch: bool = True):
        """(shape of p) in p.dtype on the host (pinned on CUDA); fused experts filled for `experts` (None: all)."""
        pin = self.device.type == "cuda"
        if p.src.key is not None:
            raw = self._get(p.src.key, read)
            if tuple(raw.shape) != tuple(p.meta.shape):
                raise SLIUnsupportedError(f"{self.model_dir}: {p.src.key} has shape {tuple(raw.shape)}, the model "
                                          f"expects {tuple(p.meta.shape)}; config.json does not match the weights")
            if raw.dtype == p.dtype and not pin:  # zero-copy view of the mapping: fault its pages in here,
                if touch:                         # on the prefetch thread, not mid-compute
                    raw.reshape(-1).view(torch.uint8)[::4096].sum()
                return raw
            return torch.empty(raw.shape, dtype=p.dtype, pin_memory=pin).copy_(raw)
        out = torch.empty(p.meta.shape, dtype=p.dtype, pin_memory=pin)  # (E, rows, cols); untouched rows stay unpaged
        for e in range(len(p.src.experts)) if experts is None else sorted(experts):
            self._fill_expert(out, e, p.src.experts[e], read)
        return out

    def _fill_expert(self, out: torch.Tensor, e: int, keys: list[str], read) -> None:
        row = 0
        for k in keys:  # gate rows then up rows: MergeModulelist(dim=0) + Concatenate(dim=1) in transformers
            part = self._get(k, read)
            out[e, row:row + part.shape[0]].copy_(part)
            row += part.shape[0]
        if row != out.shape[1]:
            raise SLIUnsupportedError(f"{self.model_dir}: expert {e} tensors {keys} give {row} rows, the model "
                                      f"expects {out.shape[1]}; config.json does not match the weights")

    def _to_device(self, tensors: dict[str, torch.Tensor], lazy: bool) -> _Loaded:
        if self.device.type != "cuda":
            return _Loaded({k: t.to(self.device) for k, t in tensors.items()}, None, lazy)
        with torch.cuda.stream(self._copy_stream):  # overlaps the compute stream; pinned source => async DMA
            dev = {k: t.to(self.device, non_blocking=True) for k, t in tensors.items()}
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return _Loaded(dev, (event, tensors), lazy)  # keep the pinned buffers alive until the copy is waited on

    # --- materialising -----------------------------------------------------------------------

    def _assign(self, key, loaded: _Loaded) -> None:
        if loaded.event is not None:
            event, _ = loaded.event
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in loaded.tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        for p in self.groups[key]:
            if p.buffer:
                p.owner._buffers[p.attr] = loaded.tensors[p.name].to(p.meta.dtype)
            else:
                p.owner._parameters[p.attr] = nn.Parameter(loaded.tensors[p.name], requires_grad=False)
        if loaded.lazy and isinstance(key, int):
            self._hooks = [m.register_forward_pre_hook(self._expert_hook(key), with_kwargs=True)
                           for _, m in expert_modules(self.layers[key])]
            self._have = {}

    def _free(self, key) -> None:
        for p in self.groups[key]:
            if p.buffer:
                p.owner._buffers[p.attr] = p.meta
            else:
                p.owner._parameters[p.attr] = p.meta
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        trim_heap()

    def _expert_hook(self, key: int):
        """Forward pre-hook on a fused experts module: read the experts this call routes to, once each."""

        def hook(module, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (tokens, k) routed expert ids
            routed = {int(e) for e in idx.unique().tolist()}
            for p in self.groups[key]:
                if not p.src.experts or p.owner is not module:
                    continue
                have = self._have.setdefault(p.name, set())
                want = {e for e in routed if 0 <= e < len(p.src.experts)} - have
                with self.store.reading() as read:
                    for e in sorted(want):  # straight into the fused parameter's row e
                        self._fill_expert(getattr(module, p.attr).data, e, p.src.experts[e], read)
                have |= want
                self.stats["expert_tensors_read"] += len(want)
        return hook

    # --- forward -------------------------------------------------------------------------------

    def _skeleton_calls(self, stop_at: int, **inputs) -> dict:
        """Run the model's own forward with recorders in place of the layers; layer idx -> (hidden, args, kwargs)."""
        calls: dict = {}
        real = self.base.layers
        self.base.layers = nn.ModuleList([Recorder(i, calls, stop_at) for i in range(self.num_layers)])
        try:
            self.base(**inputs, use_cache=False)
        except Stop:
            pass
        finally:
            self.base.layers = real
        assert stop_at in calls, "the skeleton forward did not reach the recording layer"
        return calls

    def _plan(self, n: int, T: int, kept: int) -> tuple[int, bool]:
        """(sequences per layer call, whether hidden states spill to a memory-mapped scratch file)."""
        if self.micro_batch and not self.memory_budget:
            return min(self.micro_batch, n), False
        if not self.memory_budget:
            return n, False
        text = self.config.get_text_config()
        elt = torch.finfo(self.dtype).bits // 8
        H = text.hidden_size
        inter = getattr(text, "intermediate_size", 4 * H) * max(1, getattr(text, "num_experts_per_tok", 1) or 1)
        # While layers run, two decoder-layer groups are resident (the one computing, the one read ahead). The
        # embedding and the head are not resident then (the embedding is freed before layer 0; the head is read
        # ahead as a view of the mapping and faults in only in logits(), whose chunk size bounds that phase), so
        # they do not shrink the micro-batches: with a large vocabulary they would force one sequence per call.
        size = {k: sum(p.meta.numel() * elt for p in g) for k, g in self.groups.items()}
        layer = max(v for k, v in size.items() if isinstance(k, int))
        # ... unless the head is copied when read (onto the GPU, or into another dtype): then it is resident
        # beside the last layer.
        copied = self.device.type == "cuda" or _TORCH_DTYPES.get(self.store.meta.main_dtype) != self.dtype
        free = max(self.memory_budget - max(2 * layer, layer + size["tail"] * copied), self.memory_budget // 8)
        store = n * T * H * elt * (1 + kept)
        spill = store > free // 2
        # One sequence through one layer: residual, normed copy, q/k/v/o, MLP intermediates, attention scores.
        per_seq = T * elt * (8 * H + 4 * inter) + T * T * _most_heads(text) * 4
        mb = max(1, min(n, (free - (0 if spill else store)) // per_seq))
        return int(min(mb, self.micro_batch or n)), spill

    def _alloc(self, shape, spill: bool) -> torch.Tensor:
        if not spill:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        numel = int(torch.Size(shape).numel())
        fd, path = tempfile.mkstemp(prefix="nexus-sli-", suffix=".bin", dir=self.scratch_dir)
        try:
            os.ftruncate(fd, numel * (torch.finfo(self.dtype).bits // 8))
            t = torch.from_file(path, shared=True, size=numel, dtype=self.dtype).view(shape)
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping stays valid; the file vanishes with the last reference
        return t

    def _moe_lazy(self, tokens: int) -> bool:
        """Read only routed experts when a chunk this size is expected to leave >25% of them unused."""
        text = self.config.get_text_config()
        E, k = getattr(text, "num_local_experts", 0) or 0, getattr(text, "num_experts_per_tok", 0) or 0
        if not E or not k:
            return False
        if self.moe_lazy is not None:
            return self.moe_lazy
        return 1 - (1 - k / E) ** tokens < 0.75

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, keep_layers: Sequence[int] = (),
                influence: bool = False) -> ForwardOutput:
        """One pass of every layer over the chunk; see TeacherRunner. Bit-identical to a full load of the
        same chunk when it runs in one micro-batch (no budget); with micro-batches, to a full load run on
        those micro-batches (MoE expert matmuls group tokens differently otherwise)."""
        ids = input_ids.to(self.device, torch.long)               # (n, T)
        mask = attention_mask.to(self.device, torch.long)         # (n, T)
        n, T = ids.shape
        keep = sorted(set(int(i) for i in keep_layers))
        if any(not 0 <= i < self.num_layers for i in keep):
            raise ValueError(f"keep_layers {keep} outside 0..{self.num_layers - 1}")
        mb, spill = self._plan(n, T, len(keep))
        self.stats.update(micro_batch=mb, spilled=spill)
        spans = [(s, min(s + mb, n)) for s in range(0, n, mb)]
        lazy = self._moe_lazy(int(mask.sum()))
        if self._tail is not None:  # the head of the previous chunk: free it before reading layers
            self._free("tail")
            self._tail = None

        # 1. Per-layer call arguments for the whole chunk (masks, position ids, rotary cos/sin), from the
        #    model's own forward; a zero-stride stand-in for the embeddings costs no memory.
        H = self.config.get_text_config().hidden_size
        fake = torch.zeros((), dtype=self.dtype, device=self.device).expand(n, T, H)
        calls = self._skeleton_calls(self.num_layers - 1, inputs_embeds=fake, attention_mask=mask)

        # 2. Embeddings, per micro-batch, through the same forward up to layer 0's input.
        fut = self._submit("embed")
        loaded = fut.result()
        fut = self._submit(0, lazy)
        self._assign("embed", loaded)
        del loaded
        h = self._alloc((n, T, H), spill)                          # (n, T, H) the chunk's hidden states
        for s, e in spans:
            x = self._skeleton_calls(0, input_ids=ids[s:e], attention_mask=mask[s:e])[0][0]
            h = x if mb == n and not spill else write_rows(h, s, e, x)
        self._free("embed")

        # 3. Decoder layers, in order; the next group is read while this one computes.
        hidden: dict[int, torch.Tensor] = {}
        infl = torch.zeros(self.num_layers, dtype=torch.float32)
        for i in range(self.num_layers):
            loaded = fut.result()
            fut = self._submit(i + 1, lazy) if i + 1 < self.num_layers else self._submit("tail")
            self._assign(i, loaded)
            del loaded
            _, args, kwargs = calls[i]
            num, den = 0.0, 0.0
            for s, e in spans:
                x = h[s:e].to(self.device) if spill or mb < n else h
                y = self.layers[i](x, *slice_calls(args, s, e, n, mb), **slice_calls(kwargs, s, e, n, mb))
                y = y[0] if isinstance(y, (tuple, list)) else y   # (mb, T, H)
                if influence and mb == n:
                    infl[i] = block_influence(x, y, mask).cpu()
                elif influence:  # token-weighted mean over the micro-batches
                    w = float(mask[s:e].sum())
                    num, den = num + float(block_influence(x, y, mask[s:e])) * w, den + w
                h = y if mb == n and not spill else write_rows(h, s, e, y)
            if influence and mb < n:
                infl[i] = num / max(den, 1.0)
            if i in keep:
                hidden[i] = h if mb == n and not spill else write_rows(self._alloc((n, T, H), spill), 0, n, h)
            self._free(i)

        # 4. Final norm (the head stays resident for logits() until the next forward).
        self._tail = fut.result()
        self._assign("tail", self._tail)
        if mb == n and not spill:
            h = self.norm(h)
        else:
            for s, e in spans:
                write_rows(h, s, e, self.norm(h[s:e].to(self.device)))
        return ForwardOutput(final_hidden=h, hidden=hidden, influence=infl if influence else None)

    @torch.no_grad()
    def logits(self, final_hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """(b, T, H) -> (b, T, V) float32 through the LM head (V: its `rows` when given), with any final
        scaling/soft-capping."""
        if self._tail is None:
            self._tail = self._submit("tail").result()
            self._assign("tail", self._tail)
        return head_logits(self.config, self.head, final_hidden.to(self.device), rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._tail is not None:
            self._free("tail")
            self._tail = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
