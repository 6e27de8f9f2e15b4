"""Sparsity patterns (unstructured, N:M) and the mask selection that every method shares.

Convention: ``N:M`` means *at most N non-zeros in every group of M consecutive input weights* (NVIDIA's
2:4 keeps 2 of 4), so its sparsity is ``1 - N/M``. Masks are boolean tensors where ``True`` marks a
weight to **prune** (set to zero).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "Unstructured",
    "NM",
    "Pattern",
    "parse_pattern",
    "lowest_k_mask",
    "prune_count",
    "nm_mask",
    "unstructured_mask",
]


@dataclass(frozen=True)
class Unstructured:
    """Any weights may be zeroed; ``sparsity`` is the fraction that is."""

    sparsity: float

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"sparsity must be a fraction in [0, 1), got {self.sparsity!r}; "
                "use e.g. 0.5 for 50% of the weights set to zero"
            )
        object.__setattr__(self, "sparsity", float(self.sparsity))

    def __str__(self) -> str:
        return f"{self.sparsity:g}"

    def validate_for(self, in_features: int, name: str = "layer") -> None:
        """Unstructured sparsity fits every shape."""


@dataclass(frozen=True)
class NM:
    """Semi-structured sparsity: at most ``n`` non-zeros in each group of ``m`` consecutive inputs."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.n < 1 or self.m <= 0:
            raise ValueError(
                f"N:M needs integers 1 <= N < M (N weights kept in every M), got {self.n}:{self.m}; e.g. 2:4 or 4:8"
            )
        if self.n >= self.m:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} keeps N={self.n} of every M={self.m} weights, so N must be "
                f"smaller than M (e.g. 2:4 or 4:8)"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def validate_for(self, in_features: int, name: str = "layer") -> None:
        """N:M groups run along the input dimension, which must be a multiple of M."""
        if in_features % self.m:
            raise ValueError(
                f"{name}: input dimension {in_features} is not divisible by M={self.m} of the {self} pattern; "
                f"choose an M that divides {in_features}, or exclude this layer with ignore=[...]"
            )


Pattern = Union[Unstructured, NM]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(spec: "Pattern | float | int | str") -> Pattern:
    """Read ``0.5``, ``"0.5"``, ``"50%"``, ``"2:4"`` or a pattern object into a pattern object."""
    if isinstance(spec, (Unstructured, NM)):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"invalid sparsity {spec!r}: give a fraction like 0.5 or an N:M pattern like '2:4'")
    if isinstance(spec, (int, float)):
        return Unstructured(float(spec))
    if isinstance(spec, str):
        text = spec.strip()
        match = _NM_RE.match(text)
        if match:
            return NM(int(match.group(1)), int(match.group(2)))
        try:
            if text.endswith("%"):
                return Unstructured(float(text[:-1]) / 100.0)
            return Unstructured(float(text))
        except ValueError as err:
            if "sparsity must be" in str(err):
                raise
    raise ValueError(
        f"invalid sparsity {spec!r}: give a fraction in [0, 1) like 0.5 or '50%', or an N:M pattern like '2:4'"
    )


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity prunes: ``floor(total * s)``, robust to float error (0.29 * 100 = 28.999...)."""
    return int(math.floor(total * sparsity + 1e-9))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask the ``k`` lowest scores of each row (ties broken by position, so the count is exact)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    idx = torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices
    return mask.scatter_(-1, idx, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask the ``m - n`` lowest scores in every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(groups, m - n).reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Mask the lowest ``sparsity`` fraction of scores, per row or over the whole matrix."""
    if per_row:
        return lowest_k_mask(scores, prune_count(scores.shape[-1], sparsity))
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, prune_count(flat.numel(), sparsity)).reshape(scores.shape)


def select_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """Mask for ``pattern`` from importance ``scores`` (higher = more important)."""
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity, per_row=per_row)
