"""CATS activation sparsity (Lee et al. 2024) and a TEAL-style variant, with decode kernels.

``apply_cats(model, sparsity, calibration)`` patches every gated MLP in place; ``remove_cats``
undoes it; ``apply_cats_from_config`` re-applies it from ``model.config.cats_config`` after
loading; ``measure_cats_sparsity`` reports per-layer sparsity on held-out tokens;
``CATSCallback`` fine-tunes with frozen thresholds in a ``Trainer``; ``apply_teal`` thresholds
the inputs of every linear layer instead. See docs/cats.md.
"""

from .callback import CATSCallback
from .patch import (
    SparsityReport,
    apply_cats,
    apply_cats_from_config,
    cats_thresholds,
    is_cats_applied,
    measure_cats_sparsity,
    remove_cats,
)
from .teal import apply_teal

__all__ = [
    "CATSCallback",
    "SparsityReport",
    "apply_cats",
    "apply_cats_from_config",
    "apply_teal",
    "cats_thresholds",
    "is_cats_applied",
    "measure_cats_sparsity",
    "remove_cats",
]
