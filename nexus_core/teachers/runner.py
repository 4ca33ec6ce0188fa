"""Running a teacher: the TeacherRunner protocol, the full-load runner, and loading helpers.

Two runners implement the protocol: FullRunner (the whole model on the device) and
nexus_core.sli.StreamingRunner (one decoder layer at a time from the safetensors files).
Both return the final hidden state; the LM head is applied separately, in chunks, by
`logits()` so that no caller ever holds more than one chunk of full-vocabulary logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from nexus_core.records.registry import Teacher
from nexus_core.teachers.loading import TeacherLoadError, load_config, load_model

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ForwardOutput:
    final_hidden: torch.Tensor  # (n, T, H) after the final norm: the LM head's input
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its output (n, T, H)
    influence: torch.Tensor | None = None  # (L,) float32 mean over real tokens of 1 - cos(in, out)


class TeacherRunner(Protocol):
    config: object
    num_layers: int
    head_vocab: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep_layers: Sequence[int] = (), influence: bool = False) -> ForwardOutput: ...

    def logits(self, final_hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


# --- shared numerics (SLI uses the same functions, so both paths give the same numbers) -----

def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of 1 - cos(x_in, x_out); x (n, T, H), mask (n, T) -> scalar float32."""
    cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (n, T)
    m = mask.to(cos.device, torch.float32)
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)


def apply_logit_transforms(config, logits: torch.Tensor) -> torch.Tensor:
    """Final-logit scaling/soft-capping some architectures apply after the LM head (float32 in, out)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    div = getattr(cfg, "logits_scaling", None)  # Granite divides
    if isinstance(div, (int, float)) and div != 1:
        logits = logits / div
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logits(config, head, hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """(..., H) -> (..., V) float32 through the LM head and any final scaling/soft-capping; `rows` computes
    only that slice of the head's rows (vocabulary entries): the transforms are element-wise, so the slice
    of the whole."""
    if rows is None:
        z = head(hidden)
    elif type(head) is torch.nn.Linear:
        z = F.linear(hidden, head.weight[rows], None if head.bias is None else head.bias[rows])
    else:  # a quantised or custom head: all of its rows, then the slice
        z = head(hidden)[..., rows]
    return apply_logit_transforms(config, z.float())


def default_dtype(device: str, stored_dtype: str = "F32") -> torch.dtype:
    """float32 on CPU (exact, and what the SLI parity checks use); the stored dtype on an accelerator."""
    if not str(device).startswith("cuda"):
        return torch.float32
    return _TORCH_DTYPES.get(stored_dtype, torch.bfloat16)


# --- loading helpers ----------------------------------------------------------------------


# --- full-load runner -----------------------------------------------------------------------

def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list (model.model.layers, gpt_neox.layers, transformer.h, ...)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise TeacherLoadError(f"{type(model).__name__}: no list of {n} decoder layers found; this architecture is not supported")


class FullRunner:
    """The whole teacher on one device (AutoModelForCausalLM from safetensors, or a GGUF file dequantised)."""

    def __init__(self, model_dir, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, teacher_id: str | None = None):
        teacher = Teacher(teacher_id or Path(model_dir).name, str(model_dir), "ready", "",
                          trust_remote_code=trust_remote_code)
        self.config = load_config(teacher)
        if dtype is None:
            from nexus_core.teachers.weights import open_weights

            dtype = default_dtype(device, open_weights(model_dir, self.config).meta.main_dtype)
        self._attach(load_model(teacher, dtype).to(device).eval(), device)

    @classmethod
    def of(cls, model, device: str) -> "FullRunner":
        """A runner over a causal LM already in memory on `device` (the student, as evaluation scores it):
        neither moved nor switched to eval mode, so the caller's training state is left alone."""
        runner = cls.__new__(cls)
        runner.config = model.config
        runner._attach(model, device)
        return runner

    def _attach(self, model, device: str) -> None:
        self.model = model
        self.device = device
        self.base = getattr(model, model.base_model_prefix)
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.head = model.get_output_embeddings()
        self.head_vocab = int(self.head.weight.shape[0])

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, keep_layers: Sequence[int] = (), influence: bool = False) -> ForwardOutput:
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        keep = set(keep_layers)
        hidden: dict[int, torch.Tensor] = {}
        infl = torch.zeros(self.num_layers, dtype=torch.float32)
        inputs: dict[int, torch.Tensor] = {}
        handles = []

        def pre_hook(i):
            def hook(module, args, kwargs):
                inputs[i] = args[0] if args else kwargs["hidden_states"]
            return hook

        def post_hook(i):
            def hook(module, args, kwargs, output):
                out = output[0] if isinstance(output, (tuple, list)) else output  # (n, T, H)
                if i in keep:
                    hidden[i] = out
                if influence:
                    infl[i] = block_influence(inputs.pop(i), out, attention_mask).cpu()
            return hook

        for i, layer in enumerate(self.layers):
            if influence:
                handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            if influence or i in keep:
                handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return ForwardOutput(final_hidden=out.last_hidden_state, hidden=hidden,
                             influence=infl if influence else None)

    @torch.no_grad()
    def logits(self, final_hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """(b, T, H) -> (b, T, V) float32 (V: the head's `rows` when given), with any final scaling/soft-capping."""
        return head_logits(self.config, self.head, final_hidden, rows)

    def close(self) -> None:
        self.model = self.base = self.layers = self.head = None
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()


