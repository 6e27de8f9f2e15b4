"""Evaluation: lm-eval zero-shot tasks and perplexity under sparsity configurations (CATS paper tables).

- :func:`evaluate_model` runs lm-eval tasks on an in-memory model; :class:`HFSparseLM` is the
  ``hf-sparse`` lm-eval model type (run lm-eval's CLI as ``python -m hf_sparse.evaluation.cli``);
- :mod:`.configs`: ``dense``, ``cats50``, ``relu``, ``sparsegpt2:4``, ... applied and undone in place;
- :func:`run_zero_shot`, :func:`zero_shot_table`, :func:`zero_shot_chart`: the paper's table layout;
- :func:`run_perplexity`: WikiText-2-style perplexity under the same configurations;
- :data:`PAPER_RESULTS`: the CATS paper's numbers; :func:`apply_relu`: the ReLUification baseline.

The lm-eval-dependent names (``HFSparseLM``, ``evaluate_model``, ``scores_from_results``) are imported
on first use, so this package imports without lm-eval installed (``pip install 'hf-sparse[eval]'``).
See docs/evaluation.md.
"""

from __future__ import annotations

from typing import Any

from .configs import Configuration, applied, apply_configuration, calibration_tokens, parse_configuration
from .loading import load_model
from .paper import PAPER_MODELS, PAPER_RESULTS, PAPER_TASKS, TASK_LABELS, paper_results
from .perplexity import perplexity_table, perplexity_tokens, run_perplexity
from .relu import apply_relu, is_relu_applied, relufied, remove_relu
from .zero_shot import DEFAULT_CONFIGS, average, run_zero_shot, zero_shot_chart, zero_shot_table

_LM_EVAL_NAMES = ("HFSparseLM", "evaluate_model", "scores_from_results")

__all__ = [
    "DEFAULT_CONFIGS",
    "PAPER_MODELS",
    "PAPER_RESULTS",
    "PAPER_TASKS",
    "TASK_LABELS",
    "Configuration",
    "HFSparseLM",
    "applied",
    "apply_configuration",
    "apply_relu",
    "average",
    "calibration_tokens",
    "evaluate_model",
    "is_relu_applied",
    "load_model",
    "paper_results",
    "parse_configuration",
    "perplexity_table",
    "perplexity_tokens",
    "relufied",
    "remove_relu",
    "run_perplexity",
    "run_zero_shot",
    "scores_from_results",
    "zero_shot_chart",
    "zero_shot_table",
]


def __getattr__(name: str) -> Any:
    if name in _LM_EVAL_NAMES:
        try:
            from . import lm_eval_model
        except ImportError as err:
            raise ImportError(
                f"hf_sparse.evaluation.{name} needs lm-evaluation-harness: pip install 'hf-sparse[eval]' ({err})"
            ) from err
        return getattr(lm_eval_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
