"""Damped inverses of layer Hessians, with retries instead of silent failure."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["prepare_hessian", "damped_inverse", "CholeskyError"]


class CholeskyError(RuntimeError):
    """The Hessian stayed indefinite even after the largest damping we try."""


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy ``W`` and ``H`` and handle dead inputs: a column whose input is always zero has ``H_jj = 0``;
    its weights never matter, so they are zeroed and ``H_jj`` set to 1 to keep ``H`` invertible."""
    W = weight.clone()
    H = hessian.clone()
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    return W, H, dead


def damped_inverse(
    H: torch.Tensor, percdamp: float, *, upper_cholesky: bool = False, max_tries: int = 6, name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """``(H + damp*I)^-1`` (or its upper Cholesky factor), with ``damp = percdamp * mean(diag H)``.

    If the Cholesky factorisation fails the damping is multiplied by 10 and retried, with a warning that
    names the value used; after ``max_tries`` a :class:`CholeskyError` is raised. Never falls back to
    an identity (which would silently prune without the OBS update).
    """
    if percdamp < 0:
        raise ValueError(f"dampening must be >= 0, got {percdamp}")
    if not torch.isfinite(H).all():
        raise CholeskyError(
            f"{name}: the Hessian has NaN/inf entries: the calibration activations of this layer overflowed or are NaN "
            "(try float32/bfloat16 instead of float16, or check the calibration data)"
        )
    mean_diag = torch.diagonal(H).mean().item()
    scale = mean_diag if mean_diag > 0 else 1.0
    frac = percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        damp = frac * scale
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            if upper_cholesky:
                U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info2.item() != 0:
                    frac = max(frac * 10, 1e-6)
                    continue
                Hinv = U
            if attempt:
                logger.warning(
                    "%s: Hessian not positive definite with dampening %.3g; succeeded with %.3g of the mean diagonal "
                    "(damp=%.3g). Consider more calibration samples.",
                    name,
                    percdamp,
                    frac,
                    damp,
                )
            return Hinv, damp
        frac = max(frac * 10, 1e-6)
    raise CholeskyError(
        f"{name}: the Hessian is not positive definite even with dampening {frac / 10:.3g} x mean diagonal; "
        "check the calibration data (NaN/inf activations?) or raise dampening="
    )
