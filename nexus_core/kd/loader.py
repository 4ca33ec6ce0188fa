"""Micro-batches from verified teacher streams (kd.streams), in a seeded order, read lazily from the
memory-mapped shards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from nexus_core.kd.loss import AlignedTargets, TeacherTargets
from nexus_core.kd.streams import AlignedSource, Source, Stream


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (b, T) long
    attention_mask: torch.Tensor  # (b, T) long
    targets: list[TeacherTargets]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # primary teacher layer -> (b, T, H)
    aligned: list[AlignedTargets] = field(default_factory=list)  # teachers with another tokenizer

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: slice) -> "MicroBatch":
        """Rows `idx` of this micro-batch (for out-of-memory splitting)."""
        t = [TeacherTargets(x.weight, x.topk_ids[idx], x.topk_logprobs[idx], x.tail_logmass[idx]) for x in self.targets]
        return MicroBatch(self.input_ids[idx], self.attention_mask[idx], t, {k: v[idx] for k, v in self.hidden.items()},
                          [a.select(idx) for a in self.aligned])

    def to(self, device) -> "MicroBatch":
        t = [TeacherTargets(x.weight, x.topk_ids.to(device), x.topk_logprobs.to(device), x.tail_logmass.to(device))
             for x in self.targets]
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), t,
                          {k: v.to(device) for k, v in self.hidden.items()}, [a.to(device) for a in self.aligned])


class ShardLoader:
    """Micro-batches in a seeded order: an endless sequence, epoch after epoch.

    Micro-batch m of the run is batch m % M of epoch m // M (M micro-batches per epoch), so the
    data position is a single integer and resuming at step s reads exactly what an
    uninterrupted run would have read.
    """

    def __init__(self, streams: list[Stream], batch_size: int, seed: int, hidden_layers: list[int] = (),
                 primary: str = ""):
        self.streams = streams
        self.primary = primary  # hidden states are read only from the primary teacher (its layer numbers)
        self.batch_size = batch_size
        self.seed = seed
        self.hidden_layers = list(hidden_layers)
        self.per_epoch = sum(math.ceil(s.n / batch_size) for s in streams)
        self._epoch, self._order = -1, []
        self._handles: dict[Path, object] = {}

    def _epoch_order(self, epoch: int) -> list[tuple[int, list[int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        chunks = []
        for si, s in enumerate(self.streams):
            perm = torch.randperm(s.n, generator=g).tolist()
            chunks += [(si, perm[i:i + self.batch_size]) for i in range(0, s.n, self.batch_size)]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")  # memory-mapped; rows are sliced on demand
        return self._handles[f]

    def _row(self, src: Source, row: int, name: str) -> torch.Tensor:
        f, r = src.locate(row)
        return self._handle(f).get_slice(name)[r:r + 1]

    def micro_batch(self, m: int) -> MicroBatch:
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        si, rows = self._order[pos]
        stream = self.streams[si]
        first = stream.sources[0]
        ids = torch.cat([self._row(first, r, "input_ids") for r in rows]).long()  # (b, T)
        mask = torch.cat([self._row(first, r, "attention_mask") for r in rows]).long()  # (b, T)
        targets = [TeacherTargets(
            src.weight,
            torch.cat([self._row(src, r, "topk_ids") for r in rows]).long(),  # (b, T, k)
            torch.cat([self._row(src, r, "topk_logprobs") for r in rows]),  # (b, T, k) fp16
            torch.cat([self._row(src, r, "tail_logmass") for r in rows]),  # (b, T)
        ) for src in stream.sources]
        aligned = [self._aligned(a, rows) for a in stream.aligned]
        hidden = {}
        for layer in (self.hidden_layers if first.teacher_id == self.primary else ()):
            name = f"hidden.{layer}"
            if name in self._handle(first.files[0]).keys():
                hidden[layer] = torch.cat([self._row(first, r, name) for r in rows])  # (b, T, H)
        return MicroBatch(ids, mask, targets, hidden, aligned)

    def _aligned(self, a: AlignedSource, rows: list[int]) -> AlignedTargets:
        """A cross-tokenizer teacher's targets for stream rows `rows`, gathered onto their positions."""
        idx = a.table[rows]  # (b, T) teacher flat positions, -1 = not aligned
        b, T = idx.shape
        present = idx >= 0
        safe = idx.clamp(min=0)
        trows = torch.unique(safe[present] // T) if present.any() else torch.zeros(1, dtype=torch.long)
        ids = torch.cat([self._row(a.source, int(r), "topk_ids") for r in trows]).long()  # (m, T, k)
        lp = torch.cat([self._row(a.source, int(r), "topk_logprobs") for r in trows])  # (m, T, k)
        tail = torch.cat([self._row(a.source, int(r), "tail_logmass") for r in trows])  # (m, T)
        k = ids.shape[-1]
        flat = torch.searchsorted(trows, safe // T) * T + safe % T  # (b, T) index into the m*T gathered positions
        t_ids = ids.view(-1, k)[flat]  # (b, T, k)
        sids = torch.where(present[..., None], a.id_map[t_ids], -1)
        return AlignedTargets(a.source.weight, sids, lp.reshape(-1, k)[flat], tail.reshape(-1)[flat], present)

    def close(self) -> None:
        self._handles.clear()
