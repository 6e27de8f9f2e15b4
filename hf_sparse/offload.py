"""Reading and writing weights of models placed by accelerate's big-model utilities.

With a ``device_map`` that offloads to CPU or disk, a layer's parameters sit on the ``meta`` device
and accelerate's hook loads them for each forward from a weights map. Pruning must read them the
same way and write the pruned values back into that map (a fresh ``.dat`` file for disk offload,
never the user's original checkpoint file), so that later forwards and saves see the new weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .modules import TRANSPOSED_WEIGHT_TYPES, set_weight_matrix, weight_matrix

__all__ = ["is_offloaded", "execution_device", "read_weight_matrix", "write_weight_matrix"]


def is_offloaded(module: nn.Module) -> bool:
    """Does accelerate keep this module's own parameters off-device (loaded per forward)?"""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def any_offloaded(root: nn.Module) -> bool:
    return any(is_offloaded(m) for m in root.modules())


def execution_device(root: nn.Module) -> torch.device:
    """Where ``root`` computes: accelerate's execution device if hooked, else its parameters' device (not meta)."""
    for module in root.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for param in root.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def _materialized(module: nn.Module, device: torch.device) -> Iterator[None]:
    if is_offloaded(module):
        from accelerate.utils import align_module_device

        with align_module_device(module, device):
            yield
    else:
        yield


def read_weight_matrix(module: nn.Module, device: torch.device) -> torch.Tensor:
    """An fp32 copy of the ``[out, in]`` weight on ``device``, loading it first if it is offloaded."""
    with _materialized(module, device):
        return weight_matrix(module).detach().to(device=device, dtype=torch.float32, copy=True)


@torch.no_grad()
def write_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Store ``[out, in]`` ``matrix`` as the module's weight (in its dtype); returns the value as stored."""
    dtype = module.weight.dtype
    if not is_offloaded(module):
        set_weight_matrix(module, matrix)
        return weight_matrix(module).detach()
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    value = matrix.to(dtype=dtype, device="cpu")
    stored = value.t().contiguous() if isinstance(module, TRANSPOSED_WEIGHT_TYPES) else value.contiguous()
    weights_map = module._hf_hook.weights_map
    if isinstance(weights_map, PrefixedDataset):
        dataset, key = weights_map.dataset, weights_map.prefix + "weight"
    else:
        dataset, key = weights_map, "weight"
    if isinstance(dataset, OffloadedWeightsLoader):
        if key not in dataset.state_dict and dataset.save_folder is not None:
            offload_weight(stored, key, dataset.save_folder, index=dataset.index)  # a new .dat; the index points to it
        else:
            dataset.state_dict[key] = stored
    elif isinstance(dataset, dict):
        dataset[key] = stored.to(dataset[key].device)
    else:
        raise TypeError(f"cannot write back an offloaded weight kept in a {type(dataset).__name__}")
    return value
