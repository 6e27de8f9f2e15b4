"""Wanda (Sun et al. 2024): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

With the layerwise Hessian ``H = 2 X X^T``, OBD's saliency ``1/2 h_jj w_ij^2 = ||X_j||^2 w_ij^2``
is exactly the square of Wanda's score, so both rank weights identically (see tests/test_solvers.py).
"""

from __future__ import annotations

import torch

from ..patterns import Pattern, select_mask

__all__ = ["wanda", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` where ``||X_j||^2 / n = diag(H) / 2`` (``hessian`` may be the full matrix or its diagonal)."""
    diag = torch.diagonal(hessian) if hessian.dim() == 2 else hessian
    return weight.abs().float() * torch.sqrt(diag.float().clamp_min(0) / 2).unsqueeze(0)


@torch.no_grad()
def wanda(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, name: str = "layer") -> torch.Tensor:
    """Zero the lowest-scoring weights of each row (or of each N:M group); no weight update."""
    pattern.validate_for(weight.shape[1], name)
    scores = wanda_scores(weight, hessian)
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name}: NaN/inf in the input statistics; the calibration activations overflowed or are NaN")
    mask = select_mask(scores, pattern, per_row=True)
    return weight.float().masked_fill(mask, 0.0)
