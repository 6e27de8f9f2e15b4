"""Exact OBS/OBC pruning (Frantar et al. 2022, "Optimal Brain Compression"), greedy per output row.

For each row, repeatedly (all rows at once, batched)::

    p   = argmin_p  w_p^2 / [H^-1]_pp               over prunable positions
    w  -= w_p / [H^-1]_pp * H^-1[:, p]              (optimal update of the remaining weights)
    H^-1 -= H^-1[:, p] H^-1[p, :] / [H^-1]_pp       (remove p from the inverse)

until the row reaches its sparsity (or each N:M group has M-N zeros). Each row keeps its own
``d x d`` inverse, so memory is ``rows x d^2`` and time ``~ k x rows x d^2``: affordable for small
layers only; larger ones are refused with an estimate (use SparseGPT there).
"""

from __future__ import annotations

import torch

from ..patterns import NM, Pattern, prune_count
from ._linalg import damped_inverse, prepare_hessian

__all__ = ["obc", "obc_cost", "OBCTooLargeError"]

DEFAULT_MAX_FLOPS = 2e12
DEFAULT_CHUNK_BYTES = 64 * 2**20
ASSUMED_FLOPS_PER_SECOND = 2e10  # a conservative figure for a 2-core CPU


class OBCTooLargeError(ValueError):
    """The exact solver would take too long or too much memory for this layer."""


def obc_cost(rows: int, cols: int, sparsity: float, dtype_bytes: int = 4) -> tuple[float, float]:
    """``(flops, bytes)``: the estimated work and the memory of one row's inverse times ``rows``."""
    steps = prune_count(cols, sparsity)
    return 2.0 * steps * rows * cols * cols, float(rows) * cols * cols * dtype_bytes


@torch.no_grad()
def obc(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    dampening: float = 0.01,
    max_flops: float = DEFAULT_MAX_FLOPS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    name: str = "layer",
) -> torch.Tensor:
    """Prune each row of ``weight [out, in]`` by exact greedy OBS under ``pattern`` (per-row sparsity)."""
    pattern.validate_for(weight.shape[1], name)
    rows, cols = weight.shape
    flops, total_bytes = obc_cost(rows, cols, pattern.sparsity)
    if flops > max_flops:
        raise OBCTooLargeError(
            f"{name}: exact OBC on a {rows}x{cols} layer needs about {flops / 1e12:.1f} TFLOP "
            f"(~{flops / ASSUMED_FLOPS_PER_SECOND / 60:.0f} min on a 2-core CPU) and {total_bytes / 2**30:.2f} GiB "
            f"of per-row inverses; the limit is max_flops={max_flops:.2g}. Use method='sparsegpt' for large layers, "
            "exclude this layer with ignore=[...], or raise max_flops"
        )
    W, H, _ = prepare_hessian(weight.float(), hessian.float())
    Hinv, _ = damped_inverse(H, dampening, name=name)
    chunk = max(1, int(chunk_bytes // (cols * cols * 4)))
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        W[start:end] = _obc_rows(W[start:end], Hinv, pattern)
    return W


def _obc_rows(W: torch.Tensor, Hinv: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    rows, cols = W.shape
    Hinv = Hinv.unsqueeze(0).repeat(rows, 1, 1)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    r = torch.arange(rows, device=W.device)
    if isinstance(pattern, NM):
        steps = cols // pattern.m * (pattern.m - pattern.n)
        group_budget = torch.full((rows, cols // pattern.m), pattern.m - pattern.n, device=W.device)
    else:
        steps = prune_count(cols, pattern.sparsity)
    inf = torch.tensor(float("inf"), device=W.device)
    for _ in range(steps):
        diag = torch.diagonal(Hinv, dim1=1, dim2=2)
        scores = torch.where(pruned, inf, W**2 / diag)
        if isinstance(pattern, NM):
            full = (group_budget == 0).repeat_interleave(pattern.m, dim=1)
            scores = torch.where(full, inf, scores)
        p = scores.argmin(dim=1)
        hrow = Hinv[r, p]  # [rows, cols]; H^-1 is symmetric, so this is also column p
        dp = hrow[r, p]
        W -= (W[r, p] / dp).unsqueeze(1) * hrow
        W[r, p] = 0.0
        pruned[r, p] = True
        Hinv.baddbmm_(hrow.unsqueeze(2), (hrow / dp.unsqueeze(1)).unsqueeze(1), alpha=-1.0)
        if isinstance(pattern, NM):
            group_budget[r, p // pattern.m] -= 1
    return W.masked_fill(pruned, 0.0)
