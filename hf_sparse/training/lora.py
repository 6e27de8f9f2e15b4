"""``merge_lora``: merge LoRA adapters into a sparse base model without losing its sparsity.

A LoRA update ``scale * B @ A`` is dense, so PEFT's ``merge_and_unload`` fills every zero of a
pruned base weight: a 50%-sparse model comes out 0% sparse. ``merge_lora`` merges and then
re-applies each base weight's mask::

    W' = (W + scale * B @ A) * mask

The mask is the base weight's zero pattern before merging (or the masks of a training callback,
which also covers weights that were kept but happen to be zero).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .masks import MaskSet

logger = logging.getLogger(__name__)

__all__ = ["merge_lora"]


def _lora_base_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> base layer`` of every PEFT tuner layer (modules with a ``base_layer``)."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_base_layer"):
            found[name] = module.get_base_layer()
    return found


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    masks: MaskSet | None = None,
    *,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    """Merge the LoRA adapters of a PEFT ``model`` into its base, keeping each base weight's zeros.

    Args:
        model: a ``peft.PeftModel`` (or a model with PEFT tuner layers and ``merge_and_unload``).
        masks: keep-masks from a training callback (``callback.masks``); default: the current zeros of
            each adapted base weight.
        safe_merge, adapter_names: passed to PEFT's ``merge_and_unload``.

    Returns:
        the merged base model (PEFT wrappers removed), with every adapted weight as sparse as before.
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge_lora expects a PEFT model with merge_and_unload(), got {type(model).__name__}")
    by_param = {id(p): masks.full_mask(n) for n, p in masks.params.items()} if masks is not None else {}
    keep: list[tuple[nn.Module, torch.Tensor]] = []
    for name, base in _lora_base_layers(model).items():
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        mask = by_param.get(id(weight))
        if mask is None:
            mask = weight != 0
        if not bool(mask.all()):
            keep.append((base, mask.to(weight.device)))
    merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    refilled = 0
    for base, mask in keep:
        refilled += int((base.weight[~mask] != 0).sum())
        base.weight.mul_(mask)
    logger.info("merge_lora: merged %d sparse layers; re-zeroed %d entries the dense LoRA update had filled",
                len(keep), refilled)
    return merged
