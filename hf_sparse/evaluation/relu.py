"""The ReLUification baseline of the CATS paper: SiLU -> ReLU in every gated MLP, without fine-tuning.

``apply_relu(model)`` swaps the activation module of each gated MLP (``act_fn`` on Llama/Mistral,
whatever attribute :func:`hf_sparse.modules.find_gated_mlps` finds) for :class:`torch.nn.ReLU`
and keeps the original beside it, so ``remove_relu(model)`` restores the model exactly.
The model's config is not changed (``hidden_act`` still names the original activation), so a
ReLUified model must not be saved as if it were a ReLU checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..modules import find_gated_mlps

logger = logging.getLogger(__name__)

__all__ = ["apply_relu", "is_relu_applied", "relufied", "remove_relu"]

_ORIGINAL_ACT = "_hf_sparse_relu_original_act"
"""Attribute (in the module's ``__dict__``) holding ``(attribute name, original activation)``."""


def apply_relu(model: nn.Module) -> nn.Module:
    """Replace the activation of every gated MLP of ``model`` by ReLU, in place; returns ``model``.

    Idempotent: MLPs already ReLUified are left alone. Raises ``ValueError`` if ``model`` has no
    gated MLPs (GPT-2/OPT-style models already use a plain activation; there is nothing to swap).
    """
    mlps = find_gated_mlps(model)
    if not mlps:
        raise ValueError(
            f"{type(model).__name__} has no gated MLPs (gate/up/down projections with an activation): "
            "ReLUification applies to SwiGLU-style models such as Llama and Mistral"
        )
    swapped = 0
    for mlp in mlps.values():
        module = mlp.module
        if _ORIGINAL_ACT in module.__dict__:
            continue
        original = getattr(module, mlp.act)
        module.__dict__[_ORIGINAL_ACT] = (mlp.act, original)
        # a module stays a module (it is registered as a child); a plain function stays a function
        setattr(module, mlp.act, nn.ReLU() if isinstance(original, nn.Module) else torch.relu)
        swapped += 1
    logger.info("ReLUification: activation of %d gated MLPs replaced by ReLU", swapped)
    return model


def remove_relu(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_relu`: every ReLUified MLP gets its original activation back."""
    restored = 0
    for module in model.modules():
        saved = module.__dict__.pop(_ORIGINAL_ACT, None)
        if saved is None:
            continue
        attr, original = saved
        setattr(module, attr, original)
        restored += 1
    if restored:
        logger.info("ReLUification removed: %d gated MLPs restored", restored)
    return model


def is_relu_applied(model: nn.Module) -> bool:
    """Does ``model`` carry ReLUified MLPs?"""
    return any(_ORIGINAL_ACT in module.__dict__ for module in model.modules())


@contextlib.contextmanager
def relufied(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` ReLUified inside the block, restored on exit (even on error)."""
    apply_relu(model)
    try:
        yield model
    finally:
        remove_relu(model)
