"""Importance criteria for gradual pruning and the mask selection that ranks their scores.

Every criterion gives a score per weight, *higher = more important = kept*:

- ``magnitude``: ``|w|``.
- ``movement`` (Sanh et al. 2020, "Movement Pruning"): ``S = -sum_t w_t * g_t``; weights that
  training pushes away from zero score high, weights pulled towards zero score low.
- ``taylor`` (first-order Taylor, Molchanov et al. 2019): ``mean_t |w_t * g_t|``, the estimated
  change of the loss if the weight were removed.
- ``fisher``: ``1/2 * E[g^2] * w^2``, the diagonal empirical-Fisher (OBD-style) estimate of the loss
  increase; ``E[g^2]`` is averaged over steps, ``w`` is the weight at pruning time.

Gradient criteria are accumulated once per optimizer step (the gradient that step applies, i.e.
after gradient accumulation and the DDP all-reduce) between two pruning events, then reset.
Everything works on each rank's local shard (the scores are elementwise), so FSDP2 is covered.
"""

from __future__ import annotations

import logging
import math

import torch

from ..patterns import NM, Pattern, lowest_k_mask

logger = logging.getLogger(__name__)

__all__ = ["Criterion", "CRITERIA", "get_criterion", "count_for", "select_prune_masks"]

EPS = 1e-6


class Criterion:
    """Magnitude: ``|w|``; base class of the gradient criteria (which add accumulation)."""

    name = "magnitude"
    needs_grad = False

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
        """Add one optimizer step's statistics; returns False (and adds nothing) on non-finite gradients."""
        if not self.needs_grad:
            return True
        increments = {}
        for name, grad in grads.items():
            inc = self._increment(weights[name].float(), grad.float())
            increments[name] = inc
        if not all(bool(torch.isfinite(inc).all()) for inc in increments.values()):
            logger.warning("%s criterion: skipped a step with non-finite gradients", self.name)
            return False
        for name, inc in increments.items():
            if name in self.buffers:
                self.buffers[name].add_(inc)
            else:
                self.buffers[name] = inc.clone()
        self.steps += 1
        return True

    def _increment(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every entry of ``weight`` (float32, same shape)."""
        return weight.detach().float().abs()

    def ready(self) -> bool:
        """Are there statistics to rank by? (Gradient criteria need at least one step.)"""
        return not self.needs_grad or self.steps > 0

    def reset(self) -> None:
        self.buffers.clear()
        self.steps = 0


class Movement(Criterion):
    """Movement pruning score ``-sum_t w_t * g_t`` (Sanh et al. 2020)."""

    name = "movement"
    needs_grad = True

    def _increment(self, weight, grad):
        return -(weight * grad)

    @torch.no_grad()
    def scores(self, name, weight):
        return self.buffers[name] if name in self.buffers else torch.zeros_like(weight, dtype=torch.float32)


class Taylor(Criterion):
    """First-order Taylor importance ``mean_t |w_t * g_t|`` (Molchanov et al. 2019)."""

    name = "taylor"
    needs_grad = True

    def _increment(self, weight, grad):
        return (weight * grad).abs()

    @torch.no_grad()
    def scores(self, name, weight):
        if name not in self.buffers:
            return torch.zeros_like(weight, dtype=torch.float32)
        return self.buffers[name] / max(self.steps, 1)


class Fisher(Criterion):
    """Diagonal empirical Fisher ``1/2 * E[g^2] * w^2`` with ``w`` at pruning time."""

    name = "fisher"
    needs_grad = True

    def _increment(self, weight, grad):
        return grad * grad

    @torch.no_grad()
    def scores(self, name, weight):
        if name not in self.buffers:
            return torch.zeros_like(weight, dtype=torch.float32)
        return 0.5 * (self.buffers[name] / max(self.steps, 1)) * weight.detach().float() ** 2


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Criterion, Movement, Taylor, Fisher)}


def get_criterion(name: str) -> Criterion:
    """A fresh criterion by name: ``magnitude``, ``movement``, ``taylor`` or ``fisher``."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]()


def count_for(sparsity: float, size: int) -> int:
    """How many of ``size`` entries a target ``sparsity`` prunes (floor, robust to float error)."""
    return max(0, min(size, math.floor(sparsity * size + EPS)))


def _prune_lowest(scores: torch.Tensor, sparsity: float, pattern: Pattern, ranking: str) -> torch.Tensor:
    """``True = prune`` mask of one ``[out, in]`` score matrix."""
    if isinstance(pattern, NM):
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        return lowest_k_mask(groups, count_for(sparsity, pattern.m)).reshape(rows, cols)
    if ranking == "row":
        return lowest_k_mask(scores, count_for(sparsity, scores.shape[1]))
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, count_for(sparsity, flat.numel())).reshape(scores.shape)


def select_prune_masks(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    pattern: Pattern,
    ranking: str = "layer",
    previous_keep: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``True = prune`` masks reaching ``sparsity`` from full ``[out, in]`` importance ``scores``.

    Args:
        scores: per layer, higher = keep.
        sparsity: target fraction (for ``NM`` patterns: ``floor(sparsity * M)`` pruned per group of M).
        pattern: ``Unstructured`` (any entry) or ``NM`` (groups of M consecutive inputs).
        ranking: ``"layer"`` (lowest of each matrix), ``"row"`` (of each output row) or ``"global"``
            (lowest over all layers together; unstructured only).
        previous_keep: keep-masks of the previous event; entries pruned then stay pruned (monotone).
    """
    if ranking not in ("layer", "row", "global"):
        raise ValueError(f"ranking must be 'layer', 'row' or 'global', got {ranking!r}")
    if ranking == "global" and isinstance(pattern, NM):
        raise ValueError("global ranking applies to unstructured sparsity; N:M is always ranked per group")
    ranked = {}
    for name, score in scores.items():
        score = score.float()
        if previous_keep is not None and name in previous_keep:
            score = score.masked_fill(~previous_keep[name].to(score.device), -math.inf)
        ranked[name] = score
    if ranking != "global":
        prune = {n: _prune_lowest(s, sparsity, pattern, ranking) for n, s in ranked.items()}
    else:
        names = list(ranked)
        flat = torch.cat([ranked[n].reshape(-1).cpu() for n in names])
        prune_flat = lowest_k_mask(flat.unsqueeze(0), count_for(sparsity, flat.numel())).squeeze(0)
        prune, offset = {}, 0
        for n in names:
            size = ranked[n].numel()
            prune[n] = prune_flat[offset : offset + size].reshape(ranked[n].shape).to(ranked[n].device)
            offset += size
    if previous_keep is not None:
        for name in prune:
            if name in previous_keep:
                prune[name] |= ~previous_keep[name].to(prune[name].device)
    return prune
