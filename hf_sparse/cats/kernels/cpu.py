"""CPU decode kernel for CATS: read only the active rows of ``W_up`` and ``W_down^T``, in place.

Measurements (docs/cats.md, shared notes) showed that copying the active rows (``index_select``,
``F.embedding``) costs more than it saves on CPU, while a plain OpenMP + SIMD loop that reads the
active rows where they lie reaches the memory-bandwidth ceiling ``3 / (3 - 2s)``. That loop is
JIT-built once with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja) and
cached by torch under ``$TORCH_EXTENSIONS_DIR``. Without a compiler, or with
``HF_SPARSE_CATS_NO_COMPILE=1``, a pure-torch path computes the same numbers (up to fp32 rounding
order) by gathering the active rows.

Small batches use the union of the tokens' active neurons: each active row is read once for all
tokens, and each token's contribution keeps its own mask, so results are exact for any batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["NO_COMPILE_ENV", "cats_mlp_cpu", "cats_mlp_cpu_torch", "compiled_cpu_kernel"]

NO_COMPILE_ENV = "HF_SPARSE_CATS_NO_COMPILE"
"""Set to ``1`` to skip the C++ build and always use the pure-torch CPU path."""

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <cmath>
#include <vector>

// Four rows at a time: four dot products in one pass over x (independent partial sums hide the FMA
// latency), then one pass adding the four scaled W_down^T rows to y. Four concurrent row streams
// keep more memory requests in flight than one row at a time, and y is loaded and stored once per
// four rows.
static inline void dot4(const float* const* w, const float* __restrict x, int64_t n, float* out) {
  float a0[16] = {0.0f}, a1[16] = {0.0f}, a2[16] = {0.0f}, a3[16] = {0.0f};
  const float* __restrict w0 = w[0];
  const float* __restrict w1 = w[1];
  const float* __restrict w2 = w[2];
  const float* __restrict w3 = w[3];
  int64_t h = 0;
  for (; h + 16 <= n; h += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
      const float xv = x[h + j];
      a0[j] += w0[h + j] * xv;
      a1[j] += w1[h + j] * xv;
      a2[j] += w2[h + j] * xv;
      a3[j] += w3[h + j] * xv;
    }
  }
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (; h < n; ++h) {
    s0 += w0[h] * x[h]; s1 += w1[h] * x[h]; s2 += w2[h] * x[h]; s3 += w3[h] * x[h];
  }
  for (int j = 0; j < 16; ++j) { s0 += a0[j]; s1 += a1[j]; s2 += a2[j]; s3 += a3[j]; }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline void axpy4(float* __restrict y, const float* const* d, const float* c, int64_t n) {
  const float* __restrict d0 = d[0];
  const float* __restrict d1 = d[1];
  const float* __restrict d2 = d[2];
  const float* __restrict d3 = d[3];
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
  for (int64_t h = 0; h < n; ++h) y[h] += c0 * d0[h] + c1 * d1[h] + c2 * d2[h] + c3 * d3[h];
}

// y[b] = sum over active rows r: keep[b,r] * v[b,r] * <w_up[r], x[b]> * w_down_t[r]
// Rows are read in place (no copies), each once for all B tokens; threads share out the active rows
// and keep private accumulators that are summed at the end (H floats per token per thread).
torch::Tensor cats_mlp_decode(torch::Tensor x, torch::Tensor v, double threshold,
                              torch::Tensor w_up, torch::Tensor w_down_t) {
  TORCH_CHECK(x.dim() == 2 && v.dim() == 2 && x.size(0) == v.size(0), "x [B,H] and v [B,I] expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
              w_up.scalar_type() == torch::kFloat32 && w_down_t.scalar_type() == torch::kFloat32,
              "the compiled CATS kernel is fp32-only");
  TORCH_CHECK(w_up.stride(1) == 1 && w_down_t.stride(1) == 1, "weight rows must be contiguous");
  x = x.contiguous();
  v = v.contiguous();
  const int64_t B = x.size(0), H = x.size(1), I = v.size(1);
  TORCH_CHECK(w_up.size(0) == I && w_up.size(1) == H && w_down_t.size(0) == I && w_down_t.size(1) == H,
              "weight shapes must be [I, H]");
  const float t = static_cast<float>(threshold);
  const float* xp = x.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* dp = w_down_t.data_ptr<float>();
  const int64_t up_stride = w_up.stride(0), dn_stride = w_down_t.stride(0);

  std::vector<int64_t> active;
  active.reserve(I);
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t b = 0; b < B; ++b) {
      if (std::fabs(vp[b * I + i]) >= t) { active.push_back(i); break; }
    }
  }
  const int64_t n_active = static_cast<int64_t>(active.size());
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n_active + 63) / 64)));
  std::vector<float> acc(static_cast<size_t>(n_threads) * B * H, 0.0f);

  // Dynamic chunks of groups of four active rows: a core busy with other work does not hold the
  // others back. A short last group repeats its last row with a zero coefficient.
  const int64_t n_groups = (n_active + 3) / 4;
#pragma omp parallel num_threads(n_threads)
  {
    float* my = acc.data() + static_cast<int64_t>(omp_get_thread_num()) * B * H;
#pragma omp for schedule(dynamic, 8) nowait
    for (int64_t g = 0; g < n_groups; ++g) {
      int64_t rows[4];
      const float* wr[4];
      const float* dr[4];
      for (int q = 0; q < 4; ++q) {
        rows[q] = active[std::min<int64_t>(4 * g + q, n_active - 1)];
        wr[q] = up + rows[q] * up_stride;
        dr[q] = dp + rows[q] * dn_stride;
      }
      for (int64_t b = 0; b < B; ++b) {
        float dots[4], c[4];
        dot4(wr, xp + b * H, H, dots);
        for (int q = 0; q < 4; ++q) {
          const float vb = vp[b * I + rows[q]];
          c[q] = (4 * g + q < n_active && std::fabs(vb) >= t) ? dots[q] * vb : 0.0f;
        }
        axpy4(my + b * H, dr, c, H);
      }
    }
  }

  auto y = torch::empty({B, H}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * H, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float s = 0.0f;
      for (int64_t tid = 0; tid < n_threads; ++tid) s += acc[tid * B * H + j];
      yp[j] = s;
    }
  });
  return y;
}
"""

_lock = threading.Lock()
_compiled: object | None = None
_compile_failed = False


def compiled_cpu_kernel():
    """The JIT-built C++ extension module, or ``None`` (no compiler/ninja, build error, or disabled by env)."""
    global _compiled, _compile_failed
    if os.environ.get(NO_COMPILE_ENV, "") not in ("", "0"):
        return None
    if _compiled is not None or _compile_failed:
        return _compiled
    with _lock:
        if _compiled is not None or _compile_failed:
            return _compiled
        try:
            from torch.utils.cpp_extension import load_inline

            logger.info("CATS: loading the C++ CPU kernel (built on first use, about a minute; then cached by torch)")
            flags = ["-O3", "-march=native", "-fopenmp"]
            digest = hashlib.sha1((_CPP_SOURCE + " ".join(flags) + torch.__version__).encode()).hexdigest()[:10]
            _compiled = load_inline(
                name=f"hf_sparse_cats_cpu_{digest}",
                cpp_sources=[_CPP_SOURCE],
                functions=["cats_mlp_decode"],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja or a build error: the torch path still works
            _compile_failed = True
            logger.warning("CATS: could not build the C++ CPU kernel (%s); using the pure-torch CPU path", err)
    return _compiled


def cats_mlp_cpu_torch(
    x: torch.Tensor, v: torch.Tensor, threshold: float, w_up: torch.Tensor, w_down_t: torch.Tensor
) -> torch.Tensor:
    """Pure-torch CPU path: gather the union of active rows, GEMV, mask per token, GEMV back.

    Same math as the compiled kernel (fp32 accumulation for low-precision inputs), any dtype.
    """
    keep = v.abs() >= threshold
    active = keep.any(dim=0).nonzero().squeeze(1)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    vs = v.index_select(1, active).to(compute)
    h = torch.where(keep.index_select(1, active), vs, torch.zeros((), dtype=compute))
    up = x.to(compute) @ w_up.index_select(0, active).to(compute).t()
    return ((h * up) @ w_down_t.index_select(0, active).to(compute)).to(x.dtype)


def cats_mlp_cpu(
    x: torch.Tensor, v: torch.Tensor, threshold: float, w_up: torch.Tensor, w_down_t: torch.Tensor
) -> torch.Tensor:
    """CATS decode MLP on CPU: the compiled in-place kernel for fp32, else the pure-torch path.

    ``x``: ``[B, H]``, ``v = act(x W_gate)``: ``[B, I]``, ``w_up``/``w_down_t``: ``[I, H]`` with contiguous rows.
    """
    ext = compiled_cpu_kernel() if x.dtype == torch.float32 and v.dtype == torch.float32 else None
    if ext is not None and w_up.dtype == torch.float32 and w_down_t.dtype == torch.float32:
        return ext.cats_mlp_decode(x, v, float(threshold), w_up, w_down_t)
    return cats_mlp_cpu_torch(x, v, threshold, w_up, w_down_t)
