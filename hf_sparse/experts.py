"""MoE experts stored as 3-D parameters (transformers 5: Mixtral, Qwen2-MoE, ...), pruned expert by expert.

One experts module holds ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and is called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights)``. Each expert sees only the
tokens routed to it, so each slice gets its own Hessian from those tokens: ``x`` for ``gate_up_proj[e]``
and ``act(x W_gate^T) * (x W_up^T)`` for ``down_proj[e]``. A pre-hook on the experts module reads the
routing and accumulates them; the slices are then solved like any linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modules import find_gated_mlps
from .solvers import HessianStats

__all__ = ["ExpertParam", "find_expert_params", "ExpertStatsCollector"]


@dataclass
class ExpertParam:
    """One 3-D parameter of an experts module: ``module.<param>[e]`` is expert ``e``'s ``[out, in]`` matrix."""

    module: nn.Module
    param: str
    act: str

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def num_experts(self) -> int:
        return self.tensor.shape[0]

    @property
    def in_features(self) -> int:
        return self.tensor.shape[2]


def find_expert_params(block: nn.Module, prefix: str) -> dict[str, ExpertParam]:
    """``{full parameter name: ExpertParam}`` for the 3-D expert weights in ``block``."""
    found = {}
    for name, mlp in find_gated_mlps(block).items():
        if mlp.kind != "experts":
            continue
        for param in (mlp.gate, mlp.down):
            found[f"{prefix}.{name}.{param}"] = ExpertParam(mlp.module, param, mlp.act)
    return found


class ExpertStatsCollector:
    """Per-expert input Hessians of the experts modules of one block, from the tokens routed to each expert."""

    def __init__(self, params: dict[str, ExpertParam], device: torch.device):
        self.params = params
        self.device = device
        self.stats: dict[tuple[str, int], HessianStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []

    def _accumulate(self, name: str, expert: int, x: torch.Tensor) -> None:
        key = (name, expert)
        if key not in self.stats:
            self.stats[key] = HessianStats(x.shape[-1], device=self.device)
        self.stats[key].add(x)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        top_k_index = top_k_index.reshape(hidden.shape[0], -1)
        if self.token_mask is not None and self.token_mask.numel() == hidden.shape[0]:
            keep = self.token_mask.reshape(-1).to(hidden.device).bool()
            hidden, top_k_index = hidden[keep], top_k_index[keep]
        mine = {name: p for name, p in self.params.items() if p.module is module}
        gate_up = next((n for n, p in mine.items() if p.param == "gate_up_proj"), None)
        down = next((n for n, p in mine.items() if p.param == "down_proj"), None)
        weights = module.gate_up_proj
        act = getattr(module, next(iter(mine.values())).act)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < weights.shape[0]:
                continue  # some routers mark dropped tokens with an out-of-range index
            x = hidden[(top_k_index == expert).any(dim=-1)]
            if gate_up is not None:
                self._accumulate(gate_up, expert, x)
            if down is not None:
                gate, up = nn.functional.linear(x, weights[expert]).chunk(2, dim=-1)
                self._accumulate(down, expert, act(gate) * up)

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self.token_mask = attention_mask

    def __enter__(self) -> "ExpertStatsCollector":
        modules = {id(p.module): p.module for p in self.params.values()}
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules.values()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
