"""The embedded demo: prune the project's small model with every method and compare perplexities."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from ..calibration import calibration_data, tokenize_stream
from ..engine import prune
from ..metrics import perplexity
from .model import demo_texts, load_small_model

__all__ = ["run_demo", "DEMO_METHODS", "DEMO_PATTERNS"]

DEMO_METHODS = ("sparsegpt", "obc", "wanda", "magnitude")
DEMO_PATTERNS = ("0.5", "2:4")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_demo(
    model_name: str = "demo",
    methods: Sequence[str] = DEMO_METHODS,
    patterns: Sequence[str] = DEMO_PATTERNS,
    nsamples: int = 64,
    seqlen: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Rows of ``method, pattern, sparsity, ppl before/after, seconds`` on the cached small model."""
    model, tokenizer = load_small_model(model_name, progress=progress)
    heldout = tokenize_stream(demo_texts("heldout", 300), tokenizer)
    calibration = calibration_data(
        demo_texts("calibration", 400), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed
    )
    dense_ppl = perplexity(model, heldout, seqlen=seqlen)
    rows = [
        {
            "method": "dense",
            "pattern": "-",
            "sparsity": 0.0,
            "ppl_before": dense_ppl,
            "ppl_after": dense_ppl,
            "seconds": 0.0,
        }
    ]
    for pattern in patterns:
        for method in methods:
            student = copy.deepcopy(model)
            torch.manual_seed(seed)
            start = time.perf_counter()
            report = prune(student, calibration, method=method, sparsity=pattern, progress=False)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "sparsity": report.overall_sparsity,
                    "ppl_before": dense_ppl,
                    "ppl_after": perplexity(student, heldout, seqlen=seqlen),
                    "seconds": seconds,
                }
            )
    return rows
