"""TEAL-style activation sparsity (Liu et al. 2024): threshold the *input* of every linear layer.

Each linear layer of each decoder block (q/k/v, o, gate/up, down) gets one per-tensor magnitude
threshold, the ``sparsity``-quantile of ``|x|`` of its input over calibration tokens; at run time a
forward pre-hook zeroes the entries of its input below it. It shares CATS's machinery: the same
observer and quantile code for calibration, ``measure_cats_sparsity`` for measuring,
``model.config.cats_config`` (``method: "teal"``) for persistence and ``remove_cats`` to undo it.
It uses the masked dense path only (no input-sparse GEMV kernel here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modules import find_decoder_blocks, find_linears
from .calibrate import ActivationObserver, normalize_tokens, run_batches, threshold_for_sparsity

logger = logging.getLogger(__name__)

__all__ = ["apply_teal", "is_teal_applied", "remove_teal", "set_teal_observer"]

TEAL_ATTR = "_hf_sparse_teal"


@dataclass
class TEALState:
    name: str
    threshold: float
    handle: Any = None
    observer: ActivationObserver | None = None


def _teal_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    st: TEALState = module.__dict__[TEAL_ATTR]
    x = args[0]
    if st.observer is not None:
        st.observer.observe(st.name, x, st.threshold if st.threshold > 0 else None)
    if st.threshold > 0:
        return (x * (x.abs() >= st.threshold).to(x.dtype),) + tuple(args[1:])
    return None


def _teal_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if TEAL_ATTR in m.__dict__}


def is_teal_applied(model: nn.Module) -> bool:
    """Does ``model`` carry TEAL input thresholds?"""
    return bool(_teal_modules(model))


def set_teal_observer(model: nn.Module, observer: ActivationObserver | None) -> None:
    for m in _teal_modules(model).values():
        m.__dict__[TEAL_ATTR].observer = observer


def remove_teal(model: nn.Module) -> None:
    """Remove TEAL hooks (``remove_cats`` calls this too)."""
    for m in _teal_modules(model).values():
        st = m.__dict__.pop(TEAL_ATTR)
        st.handle.remove()


def _install(model_linears: dict[str, nn.Module], thresholds: dict[str, float]) -> None:
    for name, linear in model_linears.items():
        st = TEALState(name=name, threshold=float(thresholds[name]))
        linear.__dict__[TEAL_ATTR] = st
        st.handle = linear.register_forward_pre_hook(_teal_pre_hook)


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    prefix, blocks = find_decoder_blocks(model)
    linears: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        linears.update(find_linears(block, f"{prefix}.{i}"))
    return {(n.removeprefix("base_model.model.")): m for n, m in linears.items()}


def apply_teal(
    model: nn.Module,
    sparsity: float = 0.5,
    calibration: Any = None,
    *,
    batch_size: int = 8,
    thresholds: dict[str, float] | None = None,
    max_values: int = 2**23,
    seed: int = 0,
) -> nn.Module:
    """Zero the entries of every block linear's input below a per-tensor threshold (TEAL).

    ``sparsity`` in ``[0, 1)`` is the target fraction of zeroed input entries per linear layer;
    ``calibration`` as for ``apply_cats`` (token ids ``[N, T]`` or a dict with an attention mask).
    Works for any decoder-only model with linear layers (also GPT-2/OPT). Returns the model.
    """
    from .patch import CATS_CONFIG_VERSION, is_cats_applied, remove_cats

    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if is_cats_applied(model) or is_teal_applied(model):
        logger.info("TEAL: removing the previous activation-sparsity patch first")
        remove_cats(model)
    linears = _block_linears(model)
    if thresholds is None and sparsity > 0:
        if calibration is None:
            raise ValueError("apply_teal needs calibration tokens (or thresholds=...) for sparsity > 0")
        ids, _ = normalize_tokens(calibration)
        n_batches = max(1, -(-ids.shape[0] // batch_size))
        observer = ActivationObserver(
            collect_values=True, max_values_per_call=max(1, max_values // n_batches), seed=seed
        )
        _install(linears, {n: 0.0 for n in linears})
        set_teal_observer(model, observer)
        try:
            run_batches(model, calibration, batch_size)
        finally:
            remove_teal(model)
        thresholds = {n: threshold_for_sparsity(torch.cat(observer.values[n]), sparsity) for n in linears}
    elif thresholds is None:
        thresholds = {n: 0.0 for n in linears}
    missing = sorted(set(linears) - set(thresholds))
    if missing:
        raise ValueError(f"no TEAL threshold for {missing}")
    _install(linears, thresholds)
    if getattr(model, "config", None) is not None:
        model.config.cats_config = {
            "version": CATS_CONFIG_VERSION,
            "method": "teal",
            "sparsity": float(sparsity),
            "kernel": "reference",
            "thresholds": {k: float(v) for k, v in thresholds.items()},
        }
    logger.info("TEAL: thresholded the inputs of %d linear layers at sparsity %.2f", len(linears), sparsity)
    return model
