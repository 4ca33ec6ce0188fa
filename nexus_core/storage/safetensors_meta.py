"""What a model folder's weights hold, read from safetensors headers alone (no tensor is loaded).

A safetensors file starts with an 8-byte little-endian header length and a JSON header
{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}. Sharded checkpoints
list their files in `model.safetensors.index.json` ("weight_map": name -> file).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from nexus_core.errors import CorruptArtifactError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the format caps headers at 100 MB

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
               "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}

# Routed-expert tensors: "...mlp.experts.3.w1.weight" or fused "...mlp.experts.gate_up_proj".
# Shared experts ("shared_expert", "shared_experts") run for every token and are not matched.
_EXPERT_RE = re.compile(r"(^|\.)experts\.")


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str
    stored_bytes: int | None = None  # bytes on disk where the dtype alone does not say (GGUF's quantised blocks)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        return int(self.numel * DTYPE_BYTES.get(self.dtype, 0))


@dataclass
class WeightsMeta:
    files: list[str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Stored dtype -> parameters held in it."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return dict(sorted(out.items()))

    @property
    def main_dtype(self) -> str:
        d = self.dtypes
        return max(d, key=d.get) if d else "F32"

    @property
    def expert_params(self) -> int:
        return sum(t.numel for n, t in self.tensors.items() if _EXPERT_RE.search(n))

    def active_params(self, experts: int | None, experts_per_tok: int | None) -> int:
        """Parameters used per token: routed experts count only experts_per_tok / experts of theirs."""
        if not experts or not experts_per_tok:
            return self.params
        expert = self.expert_params
        return int(self.params - expert + round(expert * experts_per_tok / experts))

    def find(self, suffix: str) -> TensorInfo | None:
        """First tensor whose name ends with `suffix` (e.g. 'embed_tokens.weight')."""
        for name in sorted(self.tensors):
            if name.endswith(suffix):
                return self.tensors[name]
        return None


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file; CorruptArtifactError when it is not one."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            body = fh.read(n)
            if len(body) != n:
                raise ValueError("header truncated")
        header = json.loads(body)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{path}: not a readable safetensors file ({exc}); re-save or re-download it") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The files that make up the checkpoint: the index's files when there is one, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"{index}: unreadable index ({exc}); re-save the model") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CorruptArtifactError(f"{index} lists missing file(s) {', '.join(missing)}; copy them into {model_dir}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CorruptArtifactError(f"{model_dir}: no *.safetensors weights")
    return files


def scan(model_dir: Path) -> WeightsMeta:
    """Every tensor's dtype and shape over the checkpoint's files."""
    files = weight_files(model_dir)
    meta = WeightsMeta(files=[f.name for f in files])
    for f in files:
        for name, info in read_header(f).items():
            if name == "__metadata__":
                continue
            meta.tensors[name] = TensorInfo(info["dtype"], tuple(info["shape"]), f.name)
    return meta
