"""SparseGPT (Frantar & Alistarh 2023): blocked OBS pruning with lazy batch updates.

For columns ``i`` left to right, with ``U`` the upper Cholesky factor of ``H^-1``::

    mask chosen from  w^2 / U_ii^2          (per block of columns: adaptive unstructured, or N:M groups)
    err_i = (w_i - q_i) / U_ii              (q_i = 0 where pruned, w_i elsewhere)
    W[:, i:] -= err_i  U[i, i:]             (OBS update of the not-yet-processed columns)

Updates inside a block are immediate; those to later blocks are applied once per block (lazy batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..patterns import NM, Pattern, lowest_k_mask, prune_count
from ._linalg import damped_inverse, prepare_hessian

__all__ = ["sparsegpt"]


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    name: str = "layer",
    row_groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Prune ``weight [out, in]`` to ``pattern`` minimising ``||(W - W') X||`` given ``H = 2XX^T/n``; fp32 math.

    ``row_groups`` (row counts summing to ``out``) marks several layers stacked along the rows that share
    ``H`` (q/k/v, gate/up): they share one factorisation and one column sweep, while each layer still
    gets exactly its own sparsity (the adaptive unstructured mask is chosen per layer).
    """
    pattern.validate_for(weight.shape[1], name)
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    W, H, _ = prepare_hessian(weight.float(), hessian.float())
    rows, cols = W.shape
    U, _ = damped_inverse(H, dampening, upper_cholesky=True, name=name)
    is_nm = isinstance(pattern, NM)
    if is_nm:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        count = end - start
        W1 = W[:, start:end].clone()
        U1 = U[start:end, start:end]
        d = torch.diagonal(U1)
        errors = torch.zeros_like(W1)
        if is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = W1**2 / d.unsqueeze(0) ** 2
            mask1 = torch.cat(
                [
                    lowest_k_mask(part.reshape(1, -1), prune_count(part.numel(), pattern.sparsity)).reshape(part.shape)
                    for part in scores.split(list(row_groups or [rows]))
                ]
            )
        # err_i = (w_i - q_i) / U_ii is w_i / U_ii where pruned and 0 where kept: one multiply by a scaled mask
        prune_scale = mask1.float() / d.unsqueeze(0)
        for i in range(count):
            if is_nm and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                mask1[:, i : i + pattern.m] = lowest_k_mask(group, pattern.m - pattern.n)
                prune_scale[:, i : i + pattern.m] = mask1[:, i : i + pattern.m] / d[i : i + pattern.m].unsqueeze(0)
            err = W1[:, i] * prune_scale[:, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # also turns column i into q_i (up to rounding)
            errors[:, i] = err
        W1.masked_fill_(mask1, 0.0)  # exact zeros
        W[:, start:end] = W1
        W[:, end:] -= errors @ U[start:end, end:]
    return W
