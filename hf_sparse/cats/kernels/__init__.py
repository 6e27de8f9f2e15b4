"""CATS MLP kernels and the choice between them.

All kernels share one signature ``fn(x [B, H], v [B, I], threshold, w_up [I, H], w_down_t [I, H]) -> [B, H]``
and compute the reference math of :func:`cats_mlp_reference`:

- ``reference``: masked dense math (fp32), any shape: the definition the others are tested against;
- ``cpu``: decode on CPU, reading only the active rows in place (compiled C++ with a torch fallback);
- ``triton``: the fused GPU kernel (paper's Kernel 1).

``select_kernel`` picks one from the requested name, the device, dtype and number of tokens.
The patched model itself uses the model's own modules (so LoRA and biases work) whenever no
decode kernel applies, for example for prefill and training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .cpu import cats_mlp_cpu, cats_mlp_cpu_torch, compiled_cpu_kernel
from .reference import cats_mlp_reference
from .triton import cats_mlp_triton, triton_available

logger = logging.getLogger(__name__)

__all__ = [
    "KERNELS",
    "KernelFn",
    "cats_mlp_cpu",
    "cats_mlp_cpu_torch",
    "cats_mlp_reference",
    "cats_mlp_triton",
    "compiled_cpu_kernel",
    "select_kernel",
]

KernelFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor], torch.Tensor]

KERNELS = ("auto", "reference", "cpu", "triton")
"""Kernel names accepted by ``apply_cats(kernel=...)``."""

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def select_kernel(
    name: str, device: torch.device, dtype: torch.dtype, n_tokens: int, max_tokens: int
) -> KernelFn | None:
    """The decode kernel to use, or ``None`` for the masked dense path through the model's modules.

    ``auto``: Triton on CUDA, the compiled CPU kernel on CPU for fp32 models, when
    ``n_tokens <= max_tokens`` (decode); prefill and long batches use the dense path, where skipping
    rows cannot pay off. ``cpu`` forces the CPU kernel (its pure-torch path when nothing is compiled).
    """
    if name not in KERNELS:
        raise ValueError(f"unknown CATS kernel {name!r}; use one of {KERNELS}")
    if name == "reference" or n_tokens > max_tokens:
        return None
    if device.type == "cpu":
        if name == "triton" and triton_available(device):
            return cats_mlp_triton
        if name == "triton":
            _warn_once("CATS: the Triton kernel needs a CUDA device; using the CPU kernel")
        if name == "auto" and (dtype != torch.float32 or compiled_cpu_kernel() is None):
            # the pure-torch gather path is slower than dense GEMVs at moderate sparsity (docs/cats.md)
            _warn_once("CATS: no compiled fp32 CPU kernel for this model; decoding uses the dense masked path")
            return None
        return cats_mlp_cpu
    if device.type == "cuda":
        if triton_available(device) and dtype in (torch.float16, torch.bfloat16, torch.float32):
            return cats_mlp_triton
        _warn_once("CATS: Triton is not available for this GPU/dtype; using the dense masked path")
        return None
    return None
