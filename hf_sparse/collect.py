"""Forward hooks that accumulate the input Hessians of a block's linears, once per shared input.

Layers that receive the very same tensor object in a forward pass (q/k/v after one layer norm,
gate/up) share one accumulator: the grouping is discovered on the first batch, so no extra forward
pass is spent on it. Padding positions (attention mask 0) are left out of the statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import weight_matrix
from .solvers import HessianStats

__all__ = ["StatsCollector"]


class StatsCollector:
    """``with StatsCollector(linears, device) as c: run batches`` then ``c.stats``, ``c.leaders``."""

    def __init__(self, linears: dict[str, nn.Module], device: torch.device):
        self.linears = linears
        self.device = device
        self.leaders: dict[str, str] = {}  # layer name -> the layer whose accumulator it shares
        self.stats: dict[str, HessianStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current (first) batch, for grouping
        self._grouped = False
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if not self._grouped and name not in self.leaders:  # a layer's first call decides its group
                leader = next((owner for tensor, owner in self._seen if tensor is x), None)
                if leader is None:
                    self._seen.append((x, name))
                    leader = name
                self.leaders[name] = leader
            if self.leaders.get(name, name) != name:
                return
            if self.token_mask is not None and x.dim() == 3:
                x = x[self.token_mask.to(x.device).bool()]
            if name not in self.stats:  # first called after the first batch (e.g. a rarely routed expert)
                self.stats[name] = HessianStats(weight_matrix(module).shape[1], device=self.device)
            self.stats[name].add(x)

        return hook

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self.token_mask = attention_mask

    def end_batch(self) -> None:
        if self._seen:
            self._grouped = True
            self._seen.clear()

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def leader_of(self, name: str) -> str:
        return self.leaders.get(name, name)
