"""The ``sparsity_config`` metadata of a model: measure it, make sure it exists, and check that it holds.

``hf_sparse.prune`` writes ``model.config.sparsity_config``; a model pruned elsewhere gets one here,
measured from its zeros (method ``"unknown"``). After loading, :func:`check_sparsity` verifies every
recorded module against the weights actually loaded, so a checkpoint whose zeros were filled in (or
whose metadata was edited) fails loudly instead of passing for a sparse model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..modules import TRANSPOSED_WEIGHT_TYPES, find_decoder_blocks, find_linears, weight_matrix
from ..patterns import NM, parse_pattern

logger = logging.getLogger(__name__)

__all__ = ["SparsityMismatchError", "check_sparsity", "ensure_sparsity_config", "measure_sparsity", "module_sizes"]

SPARSITY_TOLERANCE = 1e-5
"""Allowed shortfall of measured vs recorded sparsity (the record is rounded to 6 digits)."""


class SparsityMismatchError(ValueError):
    """The weights of a module do not have the sparsity its metadata records."""


def _candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linears inside the decoder blocks (what ``prune`` targets), or every linear without blocks."""
    try:
        prefix, blocks = find_decoder_blocks(model)
    except ValueError:
        return find_linears(model)
    found: dict[str, nn.Module] = {}
    for index, block in enumerate(blocks):
        found.update(find_linears(block, f"{prefix}.{index}"))
    return found


def _is_nm(matrix: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = matrix.shape
    if cols % m:
        return False
    return bool(((matrix != 0).reshape(rows, cols // m, m).sum(dim=-1) <= n).all())


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"pattern", "sparsity"}}`` for every decoder-block linear with zero weights.

    The pattern is ``"2:4"`` when every group of 4 consecutive inputs holds at most 2 non-zeros,
    otherwise the measured fraction (as ``prune`` would write it).
    """
    per_module: dict[str, dict[str, Any]] = {}
    for name, module in _candidate_linears(model).items():
        matrix = weight_matrix(module).detach()
        sparsity = float((matrix == 0).float().mean())
        if sparsity == 0:
            continue
        pattern = "2:4" if _is_nm(matrix, 2, 4) else f"{round(sparsity, 4):g}"
        per_module[name] = {"pattern": pattern, "sparsity": round(sparsity, 6)}
    return per_module


def module_sizes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Number of weights of each named module that exists in ``model``."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.numel() for n in names if n in modules and hasattr(modules[n], "weight")}


def ensure_sparsity_config(model: nn.Module) -> dict[str, Any]:
    """Return ``model.config.sparsity_config``, measuring and recording it first if it is missing."""
    from .. import __version__

    config = getattr(model, "config", None)
    existing = getattr(config, "sparsity_config", None) if config is not None else None
    if existing:
        return existing
    per_module = measure_sparsity(model)
    if not per_module:
        logger.warning("the model has no zero weights in its linear layers; recording an empty sparsity_config")
    sizes = module_sizes(model, list(per_module))
    total = sum(sizes.values())
    zeros = sum(per_module[n]["sparsity"] * sizes[n] for n in per_module)
    patterns = {entry["pattern"] for entry in per_module.values()}
    overall = zeros / total if total else 0.0
    record = {
        "library": "hf_sparse",
        "version": __version__,
        "method": "unknown",
        "pattern": "2:4" if patterns == {"2:4"} else f"{round(overall, 4):g}",
        "overall_sparsity": round(overall, 6),
        "per_module": per_module,
        "targets": None,
        "ignore": [],
        "overrides": {},
        "calibration": {},
        "solver_options": {},
    }
    if config is not None:
        config.sparsity_config = record
    logger.info("measured the sparsity of %d linear layers (method 'unknown')", len(per_module))
    return record


@torch.no_grad()
def check_sparsity(model: nn.Module, sparsity_config: dict[str, Any] | None = None) -> None:
    """Raise :class:`SparsityMismatchError` naming every module whose weights break the recorded sparsity.

    For an N:M entry every group of M consecutive inputs must hold at most N non-zeros; for an
    unstructured entry the fraction of zeros must reach the recorded ``sparsity`` (within
    ``SPARSITY_TOLERANCE``). A recorded module missing from the model is an error too.
    """
    record = sparsity_config if sparsity_config is not None else getattr(model.config, "sparsity_config", None)
    if not record:
        return
    modules = dict(model.named_modules())
    problems: list[str] = []
    for name, entry in (record.get("per_module") or {}).items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            problems.append(f"{name}: recorded in sparsity_config but not found in the loaded model")
            continue
        matrix = (
            weight_matrix(module).detach()
            if isinstance(module, (nn.Linear, *TRANSPOSED_WEIGHT_TYPES))
            else module.weight
        )
        pattern = parse_pattern(entry.get("pattern", entry.get("sparsity", 0.0)))
        measured = float((matrix == 0).float().mean())
        if isinstance(pattern, NM):
            cols = matrix.shape[-1]
            if cols % pattern.m:
                problems.append(f"{name}: input dimension {cols} is not a multiple of M={pattern.m} of {pattern}")
                continue
            over = int(((matrix != 0).reshape(-1, cols // pattern.m, pattern.m).sum(dim=-1) > pattern.n).sum())
            if over:
                problems.append(
                    f"{name}: {over} group(s) of {pattern.m} hold more than {pattern.n} non-zeros ({pattern} recorded)"
                )
                continue
        expected = float(entry.get("sparsity", pattern.sparsity))
        if measured < expected - SPARSITY_TOLERANCE:
            problems.append(f"{name}: measured sparsity {measured:.4%} is below the recorded {expected:.4%}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SparsityMismatchError(
            f"the loaded weights do not match the checkpoint's sparsity_config ({len(problems)} module(s)):\n  {shown}\n"
            "The checkpoint was modified after pruning or its metadata is wrong; pass check_sparsity=False to load it anyway."
        )
