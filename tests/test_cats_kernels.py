"""CATS kernels: every kernel equals the reference math, including batch > 1 and odd sizes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_sparse.cats.kernels import cats_mlp_cpu, cats_mlp_cpu_torch, cats_mlp_reference, compiled_cpu_kernel
from hf_sparse.cats.kernels.cpu import NO_COMPILE_ENV

SHAPES = [(1, 37, 53), (3, 64, 130), (5, 129, 257)]  # (batch, H, I): not multiples of any block size


def case(b: int, h: int, i: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, generator=g).to(dtype)
    v = torch.randn(b, i, generator=g).to(dtype)
    w_up = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
    w_down_t = (torch.randn(i, h, generator=g) / i**0.5).to(dtype)
    return x, v, 0.8, w_up, w_down_t


def test_reference_is_the_masked_dense_math():
    x, v, t, w_up, w_down_t = case(2, 16, 24)
    h = v * (v.abs() >= t)
    torch.testing.assert_close(cats_mlp_reference(x, v, t, w_up, w_down_t), (h * (x @ w_up.t())) @ w_down_t)
    assert (v.abs() < t).any() and (v.abs() >= t).any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_torch_path_equals_reference(shape, dtype):
    args = case(*shape, dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(cats_mlp_cpu_torch(*args).float(), cats_mlp_reference(*args).float(), **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_cpu_kernel_equals_reference_and_fallback(shape, monkeypatch):
    monkeypatch.delenv(NO_COMPILE_ENV, raising=False)
    if compiled_cpu_kernel() is None:
        pytest.skip("no C++ compiler/ninja: the compiled CPU kernel is unavailable")
    args = case(*shape)
    compiled = compiled_cpu_kernel().cats_mlp_decode(*args)
    torch.testing.assert_close(compiled, cats_mlp_reference(*args), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cats_mlp_cpu(*args), compiled)
    # forcing the fallback by env var gives the same numbers through the pure-torch path
    monkeypatch.setenv(NO_COMPILE_ENV, "1")
    assert compiled_cpu_kernel() is None
    torch.testing.assert_close(cats_mlp_cpu(*args), compiled, rtol=1e-4, atol=1e-5)


def test_compiled_kernel_reads_strided_rows_and_all_masked():
    """Phi-3's W_up is a row slice of gate_up_proj (row stride != H); an all-masked batch gives zeros."""
    if compiled_cpu_kernel() is None:
        pytest.skip("no compiled CPU kernel")
    x, v, t, w_up, w_down_t = case(2, 40, 70)
    padded = torch.randn(70, 48)[:, :40]
    padded.copy_(w_up)
    assert padded.stride(0) == 48
    want = cats_mlp_reference(x, v, t, w_up, w_down_t)
    torch.testing.assert_close(cats_mlp_cpu(x, v, t, padded, w_down_t), want, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(cats_mlp_cpu(x, v, 1e9, w_up, w_down_t)) == 0


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from hf_sparse.cats.kernels.triton import cats_mlp_triton, triton_available
    from hf_sparse.cats.kernels.reference import cats_mlp_reference
    assert triton_available(torch.device("cpu"))
    checked = 0
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 3e-2)]:
        for b, h, i in [(1, 37, 53), (3, 64, 130), (2, 130, 70)]:
            g = torch.Generator().manual_seed(b * h + i)
            x = torch.randn(b, h, generator=g).to(dtype)
            v = torch.randn(b, i, generator=g).to(dtype)
            w_up = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
            w_dt = (torch.randn(i, h, generator=g) / i**0.5).to(dtype)
            want = cats_mlp_reference(x, v, 0.8, w_up, w_dt).float()
            got = cats_mlp_triton(x, v, 0.8, w_up, w_dt, block_i=16, block_h=32)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
            checked += 1
    print("TRITON_OK", checked)
    """
)


def test_triton_kernel_under_interpreter_equals_reference():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRITON_OK 9" in proc.stdout
