"""Where a teacher's tensors come from, one tensor at a time: the one reading interface for SLI, the
profile's checks and the student's seeding.

A `WeightStore` lists the checkpoint's tensors under their checkpoint names with dtype and shape
(`meta`, read from file headers alone) and reads them on demand inside `reading()`, which keeps the
files it opened mapped until the block ends (SLI reads one layer group per block, so pages of
earlier layers are unmapped as it goes). Weight formats plug in here: safetensors folders
(`SafetensorsStore`) and GGUF files (`teachers.gguf.GGUFStore`, dequantised); other formats add their own
store and register in `open_weights`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from nexus_core.storage.safetensors_meta import WeightsMeta, scan

Reader = Callable[[str], torch.Tensor]  # checkpoint name -> tensor (as stored, on the CPU)


class WeightStore(Protocol):
    path: Path
    meta: WeightsMeta  # every tensor a model parameter can come from, by checkpoint name

    @contextmanager
    def reading(self) -> Iterator[Reader]: ...


class SafetensorsStore:
    """A Hugging Face folder's *.safetensors files (sharded or not), memory-mapped."""

    def __init__(self, model_dir: Path):
        self.path = Path(model_dir)
        self.meta = scan(self.path)
        self.bytes_read = 0

    @contextmanager
    def reading(self) -> Iterator[Reader]:
        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[str, object] = {}

            def read(name: str) -> torch.Tensor:
                file = self.meta.tensors[name].file
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(self.path / file), framework="pt", device="cpu"))
                t = handles[file].get_tensor(name)  # a view of the mapping: its pages fault in when touched
                self.bytes_read += t.numel() * t.element_size()
                return t
            yield read


def open_weights(path, config=None) -> WeightStore:
    """The store for a teacher's weights at `path`: a model folder, or a GGUF file (or a folder holding one),
    whose store needs the model's config to name its tensors (read from the file when not given)."""
    from nexus_core.teachers.gguf import GGUFStore, gguf_file

    file = gguf_file(Path(path))
    return GGUFStore(file, config) if file is not None else SafetensorsStore(Path(path))
