"""The ``hf-sparse`` model type of lm-evaluation-harness, and :func:`evaluate_model` for in-memory models.

Importing this module registers ``HFSparseLM`` under the name ``hf-sparse``. It is lm-eval's
``HFLM`` (all of its ``--model_args`` work: ``pretrained``, ``dtype``, ``device``, ``batch_size``,
``parallelize``, ``peft``, ...) plus:

- checkpoints saved by ``hf_sparse.save_sparse`` load, compressed ones included, and a saved
  ``cats_config`` is re-applied;
- ``config=cats50`` (any name of :func:`hf_sparse.evaluation.configs.parse_configuration`), or the
  parts: ``cats=0.5``, ``prune=sparsegpt:2:4`` / ``prune=wanda:0.5``, ``relu=True``;
- calibration for CATS and pruning: ``calibration=c4`` (alias, local file, Hub dataset or ``demo``),
  ``calibration_config``, ``calibration_split``, ``nsamples=128``, ``seqlen=2048``, ``calibration_seed=0``.

lm-eval 0.4 discovers no model plugins, so run its command line through
``python -m hf_sparse.evaluation.cli`` (which imports this module first), e.g.::

    python -m hf_sparse.evaluation.cli --model hf-sparse \\
        --model_args pretrained=mistralai/Mistral-7B-v0.1,dtype=bfloat16,cats=0.5 \\
        --tasks piqa,arc_easy --batch_size 16
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from .configs import Configuration, apply_configuration, calibration_tokens, parse_configuration
from .loading import default_device, is_hf_sparse_checkpoint, resolve_dtype
from .tasks import get_task_manager, task_specs

logger = logging.getLogger(__name__)

__all__ = ["HFSparseLM", "evaluate_model", "scores_from_results"]

MODEL_NAME = "hf-sparse"


@register_model(MODEL_NAME)
class HFSparseLM(HFLM):
    """lm-eval's ``HFLM`` on a model made sparse by hf_sparse (see the module docstring for arguments)."""

    def __init__(
        self,
        pretrained: str | nn.Module = "",
        *,
        config: str | None = None,
        cats: float | None = None,
        prune: str | None = None,
        relu: bool = False,
        calibration: str = "c4",
        calibration_config: str | None = None,
        calibration_split: str = "train",
        nsamples: int = 128,
        seqlen: int = 2048,
        calibration_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if config is not None and (cats is not None or prune or relu):
            raise ValueError("pass either config=NAME or its parts (cats=, prune=, relu=), not both")
        configuration = (
            parse_configuration(str(config))
            if config is not None
            else Configuration.from_parts(cats=cats, prune=prune, relu=relu)
        )
        if isinstance(pretrained, str) and pretrained:
            pretrained, kwargs = self._load_if_compressed(pretrained, kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        self.configuration = configuration
        self._restore_saved_cats()
        if not configuration.is_dense:
            max_len = self.max_length
            window = min(int(seqlen), int(max_len)) if max_len else int(seqlen)

            def tokens() -> torch.Tensor:
                return calibration_tokens(
                    self.tokenizer,
                    calibration,
                    int(nsamples),
                    window,
                    int(calibration_seed),
                    dataset_config=calibration_config,
                    split=calibration_split,
                )

            logger.info("hf-sparse: applying %s (%s)", configuration.name, configuration.describe())
            apply_configuration(self.model, configuration, tokens, restore=False)

    @staticmethod
    def _load_if_compressed(pretrained: str, kwargs: dict[str, Any]) -> tuple[str | nn.Module, dict[str, Any]]:
        """Compressed hf_sparse checkpoints are loaded here (``HFLM`` cannot read them); others by ``HFLM``."""
        _, compressed = is_hf_sparse_checkpoint(pretrained, kwargs.get("revision"))
        if not compressed:
            return pretrained, kwargs
        from ..persistence import load_sparse

        device = kwargs.pop("device", None) or default_device()
        load_kwargs = {"dtype": resolve_dtype(kwargs.pop("dtype", "auto"))}
        if kwargs.get("revision"):
            load_kwargs["revision"] = kwargs.pop("revision")
        if kwargs.get("trust_remote_code"):
            load_kwargs["trust_remote_code"] = True
        logger.info("hf-sparse: %s is a compressed hf_sparse checkpoint; decompressing", pretrained)
        model = load_sparse(pretrained, **load_kwargs).to(device)
        kwargs.setdefault("tokenizer", pretrained)
        return model, kwargs

    def _restore_saved_cats(self) -> None:
        """A checkpoint saved with ``cats_config`` gets its CATS thresholds back (idempotent)."""
        if not getattr(getattr(self.model, "config", None), "cats_config", None):
            return
        from ..cats import apply_cats_from_config, is_cats_applied

        if not is_cats_applied(self.model):
            apply_cats_from_config(self.model)
            logger.info("hf-sparse: re-applied CATS from the checkpoint's cats_config")


def scores_from_results(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``task -> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` from lm-eval's results dict.

    Only the metrics a task reports appear (BoolQ and WinoGrande have no ``acc_norm``).
    """
    scores: dict[str, dict[str, float]] = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if filt != "none" or metric not in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                continue
            row[metric] = float(value)
        if task in n_samples:
            row["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        if row:
            scores[task] = row
    return scores


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int = 0,
    batch_size: int | str = 8,
    limit: float | None = None,
    data_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    task_manager: Any = None,
    return_raw: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory ``model`` (as it is: dense, pruned, CATS-patched, ...) on lm-eval ``tasks``.

    Args:
        model: a ``transformers`` causal LM, already on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task names (``["piqa", "arc_easy"]``).
        num_fewshot: few-shot examples (the CATS tables are 0-shot).
        batch_size: lm-eval batch size (an int or ``"auto"``).
        limit: evaluate only the first ``limit`` documents (or fraction) of each task: for smoke tests.
        data_dir: read each task's documents from ``<data_dir>/<task>.jsonl`` (official schema) instead
            of the Hub; see :func:`hf_sparse.evaluation.tasks.task_specs`.
        max_length: context length for lm-eval (default: the model's).
        bootstrap_iters: bootstrap resamples for the stderr of non-mean metrics (0: skip; ``acc``
            stderr is analytic anyway).
        task_manager: an ``lm_eval.tasks.TaskManager`` to reuse (building one takes ~10 s).
        return_raw: return ``{"scores": ..., "raw": <lm-eval results>}`` instead of the scores alone.
        simple_evaluate_kwargs: passed on to ``lm_eval.simple_evaluate``.

    Returns:
        ``task -> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` (see :func:`scores_from_results`).
    """
    import lm_eval

    task_manager = task_manager or get_task_manager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_specs(tasks, data_dir, task_manager),
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        task_manager=task_manager,
        log_samples=simple_evaluate_kwargs.pop("log_samples", False),
        **simple_evaluate_kwargs,
    )
    if results is None:  # non-zero ranks under accelerate
        return {}
    scores = scores_from_results(results)
    missing = [t for t in tasks if t not in scores]
    if missing:
        logger.warning("lm-eval returned no acc for %s", ", ".join(missing))
    return {"scores": scores, "raw": results} if return_raw else scores
