"""Pruning solvers: pure functions ``(W [out, in], H [in, in], pattern) -> W_pruned``, and their registry."""

from __future__ import annotations

from typing import Callable

import torch

from .magnitude import magnitude
from .obc import OBCTooLargeError, obc
from .sparsegpt import sparsegpt
from .stats import HessianStats
from .wanda import wanda, wanda_scores
from ._linalg import CholeskyError

Solver = Callable[..., torch.Tensor]

SOLVERS: dict[str, Solver] = {
    "sparsegpt": sparsegpt,
    "obc": obc,
    "wanda": wanda,
    "magnitude": magnitude,
}
"""Method name -> solver. Register a new method by adding it here (or with :func:`register_solver`)."""

NEEDS_CALIBRATION = {"sparsegpt", "obc", "wanda"}


def register_solver(name: str, solver: Solver, needs_calibration: bool = True) -> None:
    """Make ``solver`` available as ``prune(..., method=name)``."""
    SOLVERS[name] = solver
    if needs_calibration:
        NEEDS_CALIBRATION.add(name)


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; a clear error listing the known methods otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "NEEDS_CALIBRATION",
    "register_solver",
    "get_solver",
    "sparsegpt",
    "obc",
    "wanda",
    "wanda_scores",
    "magnitude",
    "HessianStats",
    "CholeskyError",
    "OBCTooLargeError",
]
