"""Reference CATS MLP math: masked dense GEMVs, any batch, any sequence length.

Every kernel in this package computes, for each token row ``b``::

    y[b] = sum_i  keep[b, i] * v[b, i] * <W_up[i], x[b]> * W_down_t[i]      keep = |v| >= t

where ``v = act(x W_gate)`` (computed by the caller), ``W_up`` is ``up_proj.weight`` ``[I, H]``
and ``W_down_t`` is ``down_proj.weight.T`` made row-contiguous ``[I, H]``. This module is the
definition the fast kernels are tested against; it accumulates in fp32.
"""

from __future__ import annotations

import torch

__all__ = ["cats_mlp_reference"]


def cats_mlp_reference(
    x: torch.Tensor, v: torch.Tensor, threshold: float, w_up: torch.Tensor, w_down_t: torch.Tensor
) -> torch.Tensor:
    """``(keep(v) * v * (x @ W_up^T)) @ W_down_t`` in fp32, returned in ``x``'s dtype.

    ``x``: ``[B, H]``, ``v``: ``[B, I]``, ``w_up`` and ``w_down_t``: ``[I, H]``.
    """
    v32 = v.float()
    h = torch.where(v32.abs() >= threshold, v32, torch.zeros((), dtype=torch.float32, device=v.device))
    up = x.float() @ w_up.float().t()
    return ((h * up) @ w_down_t.float()).to(x.dtype)
