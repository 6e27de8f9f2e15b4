"""Memory and time estimates for a pruning run, printed before work starts.

The engine holds one decoder block's weights, the calibration activations entering and leaving it,
one fp32 Hessian per group of layers that share an input, and the solver's workspace for the
largest layer. The same function gives the written model for large models (docs/scaling.md), from a
model built on the ``meta`` device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modules import find_decoder_blocks, find_linears, weight_matrix

__all__ = ["MemoryEstimate", "estimate_memory"]


@dataclass
class MemoryEstimate:
    """Bytes of each part of the peak working set of :func:`hf_sparse.prune` on one process."""

    block_weights: int
    activations: int
    forward_workspace: int
    hessians: int
    solver_workspace: int
    blocks: int
    solver_flops: float

    @property
    def peak(self) -> int:
        return self.block_weights + self.activations + self.forward_workspace + self.hessians + self.solver_workspace

    def describe(self) -> str:
        gib = 2**30
        return (
            f"estimated peak {self.peak / gib:.2f} GiB on the compute device: one block's weights "
            f"{self.block_weights / gib:.2f} GiB, activations {self.activations / gib:.2f} GiB, one batch's forward "
            f"{self.forward_workspace / gib:.2f} GiB, Hessians "
            f"{self.hessians / gib:.2f} GiB, solver workspace {self.solver_workspace / gib:.2f} GiB; "
            f"{self.blocks} blocks, {self.solver_flops / 1e12:.2f} TFLOP of solver work"
        )


def estimate_memory(
    model: nn.Module,
    nsamples: int,
    seqlen: int,
    *,
    activation_dtype: torch.dtype | None = None,
    offload_activations: bool = False,
    world_size: int = 1,
    batch_size: int = 8,
) -> MemoryEstimate:
    """Peak working set of pruning ``model`` with ``nsamples x seqlen`` calibration tokens.

    Works on a model on the ``meta`` device (nothing is allocated). With ``world_size`` processes, each
    holds ``1/world_size`` of the activations and solves ``1/world_size`` of the layers.
    """
    _, blocks = find_decoder_blocks(model)
    block = blocks[0]
    params = list(block.parameters())
    dtype = activation_dtype or (params[0].dtype if params else torch.float32)
    block_weights = sum(p.numel() * p.element_size() for p in params)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:  # no config: read the width off block 0's first linear
        hidden = weight_matrix(next(iter(find_linears(block).values()))).shape[1]
    per_rank_samples = -(-nsamples // world_size)
    one_copy = per_rank_samples * seqlen * hidden * torch.empty((), dtype=dtype).element_size()
    activations = 0 if offload_activations else 2 * one_copy  # inputs of the block and the outputs being built
    linears = find_linears(block)
    # One batch through the block: its input, the attention and MLP intermediates (the widest linear output,
    # three times for gated MLPs), and with eager attention its scores and probabilities (heads x T x T, twice).
    widest = max(weight_matrix(m).shape[0] for m in linears.values())
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    element = torch.empty((), dtype=dtype).element_size()
    batch = min(batch_size, per_rank_samples)
    forward_workspace = batch * seqlen * (4 * hidden + 3 * widest) * element
    if getattr(config, "_attn_implementation", "eager") == "eager":  # sdpa/flash never hold T x T scores
        forward_workspace += 2 * batch * heads * seqlen**2 * element
    # Layers that read the same input share a Hessian (q/k/v, gate/up): siblings with the same input size,
    # except the parent's last linear (o_proj, down_proj, c_proj, fc2), which reads the siblings' output.
    in_dims: dict[tuple[str, int], int] = {}
    names = list(linears)
    for name, module in linears.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        last_of_parent = not any(n.startswith(parent + ".") for n in names[names.index(name) + 1 :])
        cols = weight_matrix(module).shape[1]
        in_dims[(name if last_of_parent else parent, cols)] = cols
    hessians = sum(4 * c * c for c in in_dims.values())
    largest = max((weight_matrix(m).shape for m in linears.values()), key=lambda s: s[0] * s[1])
    solver_workspace = 4 * (2 * largest[1] * largest[1] + 2 * largest[0] * largest[1])  # H^-1, its factor, W copies
    flops = sum(
        2.0 * weight_matrix(m).shape[0] * weight_matrix(m).shape[1] ** 2 + weight_matrix(m).shape[1] ** 3
        for m in linears.values()
    )
    return MemoryEstimate(
        block_weights=block_weights,
        activations=activations,
        forward_workspace=forward_workspace,
        hessians=hessians,
        solver_workspace=solver_workspace,
        blocks=len(blocks),
        solver_flops=flops * len(blocks) / world_size,
    )
