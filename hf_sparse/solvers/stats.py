"""Input statistics of a linear layer, accumulated in fp32 over calibration tokens.

``H = (2 / n) * sum_t x_t x_t^T`` is the layerwise Hessian of ``||W X - W' X||^2`` (SparseGPT/OBC);
its diagonal gives Wanda's squared column norms, so one accumulator serves every method.
"""

from __future__ import annotations

import torch

__all__ = ["HessianStats"]


class HessianStats:
    """Running mean of ``2 x x^T`` over the tokens seen so far (fp32, on ``device``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", full: bool = True):
        self.in_features = in_features
        self.full = full
        self.nsamples = 0
        shape = (in_features, in_features) if full else (in_features,)
        self._sum = torch.zeros(shape, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of layer inputs ``[..., in_features]`` (any dtype)."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(device=self._sum.device, dtype=torch.float32)
        if self.full:
            self._sum.addmm_(x.t(), x)
        else:
            self._sum.add_((x * x).sum(0))
        self.nsamples += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X X^T`` ``[in, in]``; requires ``full=True``."""
        if not self.full:
            raise RuntimeError("this accumulator keeps only column norms; create it with full=True")
        return self._sum * (2.0 / max(self.nsamples, 1))

    @property
    def sq_col_norms(self) -> torch.Tensor:
        """``||X_j||_2^2 / n`` per input feature (Wanda's scaler), i.e. ``diag(H) / 2``."""
        diag = self._sum.diagonal() if self.full else self._sum
        return diag / max(self.nsamples, 1)
