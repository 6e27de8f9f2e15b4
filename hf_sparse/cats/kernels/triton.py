"""Triton GPU kernel for CATS decode: the paper's fused Kernel 1.

One program handles one token row ``b`` and a block of ``BLOCK_I`` intermediate neurons: it
thresholds ``v = act(x W_gate)``, computes the GEMV of ``W_up`` over the *active* rows only
(masked loads: inactive rows are never read), multiplies by ``v``, and adds that block's
contribution ``c @ W_down_t[block]`` to the output with fp32 atomics (again reading only the
active rows of the row-contiguous ``W_down^T``). Every token row has its own mask, so batch > 1 is
exact. Accumulation is fp32 for fp16/bf16/fp32 inputs; the result is cast to ``x``'s dtype.

Tested on CPU with ``TRITON_INTERPRET=1`` (the interpreter runs the same kernel on CPU tensors).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "cats_mlp_triton", "triton_available"]


def triton_available(device: torch.device) -> bool:
    """Can the Triton kernel run on tensors on ``device``? (CUDA, or any device under ``TRITON_INTERPRET=1``.)"""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return device.type == "cpu"
    return device.type == "cuda"


if HAS_TRITON:

    @triton.jit
    def _cats_fused_kernel(
        x_ptr,
        v_ptr,
        w_up_ptr,
        w_dt_ptr,
        y_ptr,
        threshold,
        H,
        I,
        stride_xb,
        stride_vb,
        stride_up,
        stride_dt,
        stride_yb,
        BLOCK_I: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        in_i = offs_i < I
        v = tl.load(v_ptr + b * stride_vb + offs_i, mask=in_i, other=0.0).to(tl.float32)
        active = (tl.abs(v) >= threshold) & in_i
        # gather-GEMV of W_up over the active rows
        acc = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            x = tl.load(x_ptr + b * stride_xb + offs_h, mask=in_h, other=0.0).to(tl.float32)
            w = tl.load(
                w_up_ptr + offs_i[:, None] * stride_up + offs_h[None, :],
                mask=active[:, None] & in_h[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        c = tl.where(active, acc * v, 0.0)
        # GEMV of W_down over the same active rows, accumulated across programs
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            w = tl.load(
                w_dt_ptr + offs_i[:, None] * stride_dt + offs_h[None, :],
                mask=active[:, None] & in_h[None, :],
                other=0.0,
            ).to(tl.float32)
            part = tl.sum(w * c[:, None], axis=0)
            tl.atomic_add(y_ptr + b * stride_yb + offs_h, part, mask=in_h)


def cats_mlp_triton(
    x: torch.Tensor,
    v: torch.Tensor,
    threshold: float,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    block_i: int = 32,
    block_h: int = 128,
) -> torch.Tensor:
    """Fused CATS MLP for ``x [B, H]``, ``v [B, I]``, ``w_up``/``w_down_t [I, H]`` (rows contiguous).

    fp16, bf16 and fp32; any ``B`` (each token row keeps its own mask).
    """
    if not HAS_TRITON:
        raise RuntimeError("the CATS Triton kernel needs the `triton` package")
    if w_up.stride(1) != 1 or w_down_t.stride(1) != 1:
        raise ValueError("w_up and w_down_t must have contiguous rows")
    x = x.contiguous()
    v = v.contiguous()
    B, H = x.shape
    I = v.shape[1]
    y = torch.zeros(B, H, device=x.device, dtype=torch.float32)
    grid = (B, triton.cdiv(I, block_i))
    _cats_fused_kernel[grid](
        x,
        v,
        w_up,
        w_down_t,
        y,
        float(threshold),
        H,
        I,
        x.stride(0),
        v.stride(0),
        w_up.stride(0),
        w_down_t.stride(0),
        y.stride(0),
        BLOCK_I=block_i,
        BLOCK_H=block_h,
    )
    return y.to(x.dtype)
