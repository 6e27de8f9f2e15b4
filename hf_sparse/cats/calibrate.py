"""Threshold calibration for activation sparsity: observe activations, take per-layer quantiles.

CATS (Lee et al. 2024) sets one threshold ``t`` per MLP so that a target fraction ``s`` of the
entries of ``|act(x W_gate)|`` over calibration tokens is below ``t``: ``t`` is the ``s``-quantile.
TEAL (Liu et al. 2024) does the same per linear layer on ``|x|`` of its input. The patched
modules report what they see to an :class:`ActivationObserver`; this module feeds the tokens,
excludes padding, and turns the observed magnitudes into thresholds (fp32, exact ``kthvalue`` on a
seeded subsample when the calibration set is very large).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ActivationObserver",
    "normalize_tokens",
    "run_batches",
    "threshold_for_sparsity",
    "token_rows_mask",
]

_TOKEN_MASK: list[torch.Tensor | None] = [None]
"""Valid-token mask (flattened ``[B*T]`` bool) of the batch being run, or ``None``: padding is excluded."""


def token_rows_mask(n_rows: int, token_index: torch.Tensor | None = None) -> torch.Tensor | None:
    """The valid-token mask for ``n_rows`` activation rows of the current batch (``None`` = all valid).

    ``token_index`` selects rows of the flattened batch (MoE experts see a routed subset).
    """
    mask = _TOKEN_MASK[0]
    if mask is None:
        return None
    if token_index is not None:
        return mask[token_index]
    return mask if mask.numel() == n_rows else None


class ActivationObserver:
    """Collects activation magnitudes (for calibration) and/or counts of thresholded entries.

    ``collect_values``: keep ``|a|`` (fp32, on CPU, at most ``max_values_per_call`` random entries
    per call, seeded) for computing quantiles. Zero counts are always accumulated on the
    activations' device, so observing during training costs no host synchronisation.
    """

    def __init__(self, collect_values: bool = False, max_values_per_call: int | None = None, seed: int = 0):
        self.collect_values = collect_values
        self.max_values_per_call = max_values_per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.values: dict[Hashable, list[torch.Tensor]] = defaultdict(list)
        self.zeros: dict[Hashable, torch.Tensor] = {}
        self.totals: dict[Hashable, int] = defaultdict(int)

    @torch.no_grad()
    def observe(
        self,
        key: Hashable,
        act: torch.Tensor,
        threshold: float | None = None,
        token_index: torch.Tensor | None = None,
    ) -> None:
        """Record ``act`` (``[..., features]``) under ``key``; count entries ``< threshold`` if given."""
        a = act.detach().reshape(-1, act.shape[-1])
        mask = token_rows_mask(a.shape[0], token_index)
        if mask is not None:
            a = a[mask.to(a.device)]
        if a.numel() == 0:
            return
        mags = a.abs()
        if self.collect_values:
            flat = mags.float().flatten()
            cap = self.max_values_per_call
            if cap is not None and flat.numel() > cap:
                idx = torch.randint(0, flat.numel(), (cap,), generator=self.generator)
                flat = flat[idx.to(flat.device)]
            self.values[key].append(flat.cpu())
        if threshold is not None:
            zeros = (mags < threshold).sum()
            self.zeros[key] = zeros if key not in self.zeros else self.zeros[key] + zeros
        self.totals[key] += a.numel()

    def fractions(self) -> dict[Hashable, float]:
        """Fraction of observed entries below the threshold, per key."""
        return {k: float(self.zeros[k].item()) / self.totals[k] for k in self.zeros if self.totals[k]}

    def reset_counts(self) -> None:
        self.zeros.clear()
        self.totals.clear()


def threshold_for_sparsity(values: torch.Tensor, sparsity: float) -> float:
    """The ``t`` such that a fraction ``sparsity`` of ``values`` lies strictly below ``t``.

    ``sparsity == 0`` gives ``0.0`` (keep everything, outputs unchanged). Exact order statistic
    (``kthvalue``) rather than ``torch.quantile``, which is limited to 16M elements.
    """
    if sparsity <= 0:
        return 0.0
    flat = values.float().flatten()
    n = flat.numel()
    if n == 0:
        raise ValueError("no activations were observed for this layer; is it reached by the calibration tokens?")
    k = min(n, round(sparsity * n) + 1)
    return float(flat.kthvalue(k).values.item())


def normalize_tokens(tokens: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids [N, T], attention_mask [N, T] | None)`` from a LongTensor, a dict or a BatchEncoding."""
    if isinstance(tokens, torch.Tensor):
        ids, mask = tokens, None
    elif isinstance(tokens, Mapping) and "input_ids" in tokens:
        ids, mask = tokens["input_ids"], tokens.get("attention_mask")
    else:
        raise TypeError(
            "calibration must be a LongTensor of token ids [N, T] or a dict with 'input_ids' (and optionally "
            f"'attention_mask'), e.g. hf_sparse.calibration_data(...); got {type(tokens).__name__}"
        )
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError(f"calibration token ids must be an integer tensor [N, T], got {tuple(ids.shape)} {ids.dtype}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids.long(), mask


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def run_batches(model: nn.Module, tokens: Any, batch_size: int = 8) -> int:
    """Run ``model`` over ``tokens`` in eval mode and without grad, padding excluded from observers.

    Returns the number of batches run.
    """
    ids, mask = normalize_tokens(tokens)
    device = _model_device(model)
    n_batches = 0
    with _eval_mode(model):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            kwargs: dict[str, Any] = {"input_ids": batch, "use_cache": False}
            if mask is not None:
                m = mask[start : start + batch_size].to(device)
                kwargs["attention_mask"] = m
                _TOKEN_MASK[0] = m.bool().flatten()
            try:
                model(**kwargs)
            finally:
                _TOKEN_MASK[0] = None
            n_batches += 1
    return n_batches
