"""Export 2:4 weights to PyTorch semi-structured sparse tensors for sparse tensor-core inference.

``torch.sparse.to_sparse_semi_structured`` stores a 2:4 matrix as its kept half plus compact
metadata and dispatches ``F.linear`` to cuSPARSELt/CUTLASS kernels. Those kernels exist only on
CUDA GPUs of compute capability 8.0 or newer (Ampere, Hopper, ...) and for fp16/bf16 (and int8)
weights; everywhere else this module raises a clear error instead of silently doing nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..modules import TRANSPOSED_WEIGHT_TYPES

logger = logging.getLogger(__name__)

__all__ = ["SEMI_STRUCTURED_DTYPES", "export_semi_structured"]

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def _two_four_modules(model: nn.Module) -> dict[str, nn.Module]:
    record = getattr(getattr(model, "config", None), "sparsity_config", None) or {}
    modules = dict(model.named_modules())
    chosen = {
        name: modules[name]
        for name, entry in (record.get("per_module") or {}).items()
        if str(entry.get("pattern")).replace(" ", "") == "2:4" and name in modules
    }
    if not chosen:
        raise ValueError(
            "export_semi_structured: no 2:4 layer recorded in model.config.sparsity_config; prune with "
            "sparsity='2:4' first (semi-structured tensors only represent the 2:4 pattern)"
        )
    return chosen


def _check_device(name: str, weight: torch.Tensor) -> None:
    if weight.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"export_semi_structured needs the model on a CUDA GPU with compute capability >= 8.0; {name} is on "
            f"{weight.device} (CUDA available: {torch.cuda.is_available()}). Move the model with model.to('cuda') first."
        )
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < MIN_CAPABILITY:
        raise RuntimeError(
            f"export_semi_structured needs compute capability >= 8.0 (Ampere or newer); {weight.device} has "
            f"{capability[0]}.{capability[1]}"
        )


@torch.no_grad()
def export_semi_structured(model: nn.Module) -> nn.Module:
    """Replace the weight of every 2:4 ``nn.Linear`` recorded in ``sparsity_config`` by a semi-structured sparse tensor.

    Requires CUDA with compute capability >= 8.0 and fp16/bf16 weights; the model is changed in
    place (inference only: the sparse weights are frozen) and returned.

    Raises:
        ValueError: no 2:4 layer, a GPT-2 ``Conv1D`` layer (transposed weight, not a ``F.linear``),
            or a dtype other than fp16/bf16.
        RuntimeError: no CUDA, the layer is not on a CUDA device, or compute capability < 8.0.
    """
    targets = _two_four_modules(model)
    for name, module in targets.items():
        if isinstance(module, TRANSPOSED_WEIGHT_TYPES) or not isinstance(module, nn.Linear):
            raise ValueError(
                f"export_semi_structured: {name} is a {type(module).__name__}; only nn.Linear weights can become "
                "semi-structured sparse tensors"
            )
        if module.weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(
                f"export_semi_structured: {name} is {module.weight.dtype}; semi-structured sparse kernels need "
                "float16 or bfloat16 (e.g. model.to(torch.float16))"
            )
        _check_device(name, module.weight)
    from torch.sparse import to_sparse_semi_structured

    for name, module in targets.items():
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    logger.info("exported %d 2:4 linear layers to semi-structured sparse tensors", len(targets))
    return model
