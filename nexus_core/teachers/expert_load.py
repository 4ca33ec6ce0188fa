"""Routed load per expert: how many token slots each expert of each MoE layer receives on a sample.

The profile stage counts it on the calibration data while it measures block influence (the same
forward, in the teacher's own mode), and the dense student is seeded from the most-used experts.
Counting hooks the fused experts module of each decoder layer, whose call receives the routed ids
(`top_k_index`, (tokens, k)) in transformers 5.x for every MoE family, so it works on the full load
and on SLI alike. Padding positions route too and are counted (the calibration sample is packed,
so they are few).
"""

from __future__ import annotations

import torch

from nexus_core.teachers.sli_arch import expert_modules


class ExpertLoad:
    """Context manager: while open, counts routed token slots per (layer, expert) over `layers`' forwards."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.counts: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "ExpertLoad":
        for i, layer in enumerate(self.layers):
            for _, module in expert_modules(layer):
                self._handles.append(module.register_forward_pre_hook(self._hook(i, module), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int, module):
        n = int(module.num_experts)

        def hook(mod, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if idx is None:
                return
            ids = idx.reshape(-1).long().cpu()  # (tokens * k,)
            ids = ids[(ids >= 0) & (ids < n)]   # some kernels mark dropped slots with id n
            self.counts[i] = self.counts.get(i, torch.zeros(n, dtype=torch.long)) + torch.bincount(ids, minlength=n)
        return hook

    def by_layer(self) -> dict[str, list[int]]:
        """{"<layer>": [slots routed to expert 0, 1, ...]} for the MoE layers (JSON keys are strings)."""
        return {str(i): c.tolist() for i, c in sorted(self.counts.items())}
