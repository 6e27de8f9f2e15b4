"""Magnitude pruning: zero the smallest ``|W_ij|``, over the whole layer or within each row."""

from __future__ import annotations

import torch

from ..patterns import Pattern, select_mask

__all__ = ["magnitude"]


@torch.no_grad()
def magnitude(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    pattern: Pattern,
    *,
    per_row: bool = False,
    name: str = "layer",
) -> torch.Tensor:
    """Calibration-free baseline; ``hessian`` is ignored. ``per_row=False`` ranks over the whole layer."""
    pattern.validate_for(weight.shape[1], name)
    mask = select_mask(weight.abs().float(), pattern, per_row=per_row)
    return weight.float().masked_fill(mask, 0.0)
