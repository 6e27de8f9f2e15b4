"""Perplexity of one model under several configurations (WikiText-2 style: non-overlapping windows)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..metrics import perplexity
from ..report import markdown_table
from .configs import Configuration, applied, parse_configuration

logger = logging.getLogger(__name__)

__all__ = ["PERPLEXITY_DATASETS", "perplexity_table", "perplexity_tokens", "run_perplexity"]

PERPLEXITY_DATASETS: dict[str, dict[str, str]] = {
    "wikitext2": {"source": "wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test"},
}
"""Short names of evaluation sets: ``wikitext2`` is WikiText-2 (raw) test, as in the SparseGPT/Wanda papers."""


def perplexity_tokens(
    tokenizer: Any,
    source: str = "wikitext2",
    *,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str = "text",
) -> torch.Tensor:
    """The evaluation text as one token stream (documents joined by blank lines, as for WikiText-2).

    ``source``: an alias of :data:`PERPLEXITY_DATASETS`, a local ``.txt/.jsonl/...`` file, a Hub
    dataset name (with ``dataset_config``/``split``/``text_column``) or ``"demo"``.
    """
    from ..calibration import load_texts, tokenize_stream

    alias = PERPLEXITY_DATASETS.get(source.lower())
    if alias is not None:
        source, dataset_config, split = alias["source"], alias["dataset_config"], alias["split"]
    texts = load_texts(source, dataset_config=dataset_config, split=split, text_column=text_column)
    return tokenize_stream(texts, tokenizer)


def run_perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    configs: Sequence[str | Configuration],
    *,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    seqlen: int = 2048,
    batch_size: int = 4,
    prune_options: dict[str, Any] | None = None,
    cats_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``configuration name -> perplexity`` of ``model`` on the 1-D ``tokens`` stream (windows of ``seqlen``).

    Each configuration is applied, measured and undone in turn (see :func:`hf_sparse.evaluation.applied`);
    ``calibration`` (tokens or a zero-argument callable) is computed once, if a configuration needs it.
    """
    from .zero_shot import _cached

    calibration = _cached(calibration)
    results: dict[str, float] = {}
    for config in configs:
        config = parse_configuration(config) if isinstance(config, str) else config
        start = time.perf_counter()
        with applied(model, config, calibration, prune_options=prune_options, cats_options=cats_options):
            results[config.name] = perplexity(model, tokens, seqlen=seqlen, batch_size=batch_size)
        logger.info("perplexity: %s = %.3f (%.1f s)", config.name, results[config.name], time.perf_counter() - start)
    return results


def perplexity_table(results: Mapping[str, float], *, dense: str = "dense") -> str:
    """Markdown table: configuration, perplexity, and the change relative to ``dense`` when it was measured."""
    from .zero_shot import config_label

    base = results.get(dense)
    rows = []
    for name, ppl in results.items():
        row = [config_label(name), f"{ppl:.3f}"]
        if base is not None:
            row.append("-" if name == dense else f"{ppl - base:+.3f}")
        rows.append(row)
    headers = ["Method", "perplexity"] + (["vs dense"] if base is not None else [])
    return markdown_table(headers, rows)
