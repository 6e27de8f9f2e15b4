"""Zero-shot evaluation of one model under several configurations, with the CATS paper's table and a chart.

:func:`run_zero_shot` loads nothing: it takes an in-memory model and, for each configuration
(``dense``, ``cats50``, ``relu``, ``sparsegpt2:4``, ...), applies it, evaluates the lm-eval tasks
and undoes it. :func:`zero_shot_table` lays the results out like the paper's tables (one row per
configuration, the eight tasks and their average), with the paper's value and our difference beside
each number when a paper model is given; :func:`zero_shot_chart` draws them as grouped bars.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..report import markdown_table
from .configs import Configuration, applied, parse_configuration
from .paper import PAPER_TASKS, TASK_LABELS, paper_results

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIGS",
    "ZeroShotResults",
    "average",
    "config_label",
    "run_zero_shot",
    "zero_shot_chart",
    "zero_shot_table",
]

DEFAULT_CONFIGS: tuple[str, ...] = ("dense", "cats50", "cats70", "cats90", "relu")
"""The configurations of the CATS paper's tables."""

ZeroShotResults = dict[str, dict[str, dict[str, float]]]
"""``configuration name -> task -> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``."""


def _cached(calibration: torch.Tensor | Callable[[], torch.Tensor] | None):
    """A zero-argument callable computing the calibration tokens once, on first use."""
    if calibration is None or not callable(calibration):
        return calibration
    cache: list[torch.Tensor] = []

    def get() -> torch.Tensor:
        if not cache:
            cache.append(calibration())
        return cache[0]

    return get


def run_zero_shot(
    model: nn.Module,
    tokenizer: Any,
    configs: Sequence[str | Configuration] = DEFAULT_CONFIGS,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    data_dir: str | os.PathLike | None = None,
    num_fewshot: int = 0,
    batch_size: int | str = 8,
    limit: float | None = None,
    prune_options: dict[str, Any] | None = None,
    cats_options: dict[str, Any] | None = None,
    task_manager: Any = None,
    on_result: Callable[[str, dict[str, dict[str, float]]], None] | None = None,
) -> ZeroShotResults:
    """Evaluate ``model`` on ``tasks`` under each configuration in turn; the model is left as it came.

    Args:
        model, tokenizer: the dense model (on its device) and its tokenizer.
        configs: configuration names (see :mod:`hf_sparse.evaluation.configs`) or objects.
        tasks: lm-eval task names (default: the paper's eight).
        calibration: token ids ``[N, T]`` for CATS and data-aware pruning, or a zero-argument callable
            returning them (called once, only if some configuration needs data).
        data_dir: local task documents (``<task>.jsonl``), see :func:`hf_sparse.evaluation.evaluate_model`.
        num_fewshot, batch_size, limit: as for :func:`hf_sparse.evaluation.evaluate_model`.
        prune_options, cats_options: extra arguments of ``hf_sparse.prune`` / ``apply_cats``.
        task_manager: an ``lm_eval.tasks.TaskManager`` to reuse.
        on_result: called with ``(configuration name, scores)`` after each configuration (e.g. to save
            partial results of a long run).
    """
    from .lm_eval_model import evaluate_model
    from .tasks import get_task_manager

    parsed = [parse_configuration(c) if isinstance(c, str) else c for c in configs]
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate configurations in {names}")
    task_manager = task_manager or get_task_manager()
    calibration = _cached(calibration)
    results: ZeroShotResults = {}
    for config in parsed:
        start = time.perf_counter()
        logger.info("zero-shot: %s (%s) on %s", config.name, config.describe(), ", ".join(tasks))
        with applied(model, config, calibration, prune_options=prune_options, cats_options=cats_options):
            applied_at = time.perf_counter()
            scores = evaluate_model(
                model,
                tokenizer,
                tasks,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                limit=limit,
                data_dir=data_dir,
                task_manager=task_manager,
            )
        results[config.name] = scores
        logger.info(
            "zero-shot: %s done (apply %.1f s, evaluate %.1f s), avg acc %.4f",
            config.name,
            applied_at - start,
            time.perf_counter() - applied_at,
            average(scores, tasks),
        )
        if on_result is not None:
            on_result(config.name, scores)
    return results


def average(
    scores: Mapping[str, Mapping[str, float]], tasks: Sequence[str], metric: str = "acc", *, require_all: bool = True
) -> float:
    """Mean of ``metric`` over ``tasks`` (the paper's "Avg" column); NaN if a task lacks it.

    With ``require_all=False`` the mean is over the tasks that report ``metric`` (``acc_norm``: all
    but BoolQ and WinoGrande).
    """
    values = [scores.get(task, {}).get(metric) for task in tasks]
    if require_all and any(v is None for v in values):
        return math.nan
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def config_label(name: str) -> str:
    """The table label of a configuration name (``"cats50"`` -> ``"CATS 50%"``); unknown names unchanged."""
    try:
        return parse_configuration(name).describe()
    except ValueError:
        return name


def _paper_table(paper: str | Mapping[str, Mapping[str, float]] | None) -> Mapping[str, Mapping[str, float]]:
    if paper is None:
        return {}
    return paper_results(paper) if isinstance(paper, str) else paper


def _paper_value(ref: Mapping[str, float], column: str, tasks: Sequence[str]) -> float | None:
    """The paper's value of ``column`` (a task or ``"avg"``); its average is over ``tasks`` when they differ."""
    if column != "avg":
        return ref.get(column)
    if set(tasks) == set(PAPER_TASKS) and "avg" in ref:
        return ref["avg"]
    if tasks and all(t in ref for t in tasks):
        return sum(ref[t] for t in tasks) / len(tasks)
    return None


def zero_shot_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    paper: str | Mapping[str, Mapping[str, float]] | None = None,
    metric: str = "acc",
) -> str:
    """A Markdown table in the paper's layout: one row per configuration, one column per task, then Avg.

    With ``paper`` (``"mistral-7b"``, ``"llama2-7b"`` or a table of the same shape), each cell reads
    ``ours (paper, ours - paper)`` for configurations and tasks the paper reports. Tasks without
    ``metric`` (BoolQ and WinoGrande have no ``acc_norm``) show ``-``.
    """
    reference = _paper_table(paper) if metric == "acc" else {}
    headers = ["Method"] + [TASK_LABELS.get(t, t) for t in tasks] + ["Avg"]
    rows = []
    for name, scores in results.items():
        ref = reference.get(name, {})
        cells = [config_label(name)]
        for task in [*tasks, "avg"]:
            ours = (
                average(scores, tasks, metric, require_all=metric == "acc")
                if task == "avg"
                else scores.get(task, {}).get(metric)
            )
            if ours is None or (isinstance(ours, float) and math.isnan(ours)):
                cells.append("-")
                continue
            theirs = _paper_value(ref, task, tasks)
            cells.append(f"{ours:.4f} ({theirs:.4f}, {ours - theirs:+.4f})" if theirs is not None else f"{ours:.4f}")
        rows.append(cells)
    table = markdown_table(headers, rows)
    caption = f"{metric}, 0-shot"
    if metric != "acc":
        caption += f"; Avg over the tasks that report {metric}"
    if reference:
        caption += "; cells: ours (paper, ours - paper)"
    return f"{caption}\n\n{table}"


def zero_shot_chart(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | os.PathLike,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    paper: str | Mapping[str, Mapping[str, float]] | None = None,
    metric: str = "acc",
    title: str | None = None,
) -> str:
    """Grouped bar chart (PNG) of ``metric`` per task and the average, one bar per configuration.

    With ``paper``, the paper's value for each configuration is drawn as a black tick over its bar.
    Returns the path written. Needs matplotlib (the ``eval`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the zero-shot chart needs matplotlib: pip install 'hf-sparse[eval]'") from err

    reference = _paper_table(paper) if metric == "acc" else {}
    columns = [*tasks, "avg"]
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, 2.0 + len(columns) * (0.3 + 0.18 * len(names))), 5.0))
    paper_drawn = False
    for i, name in enumerate(names):
        scores = results[name]
        values = [
            average(scores, tasks, metric, require_all=metric == "acc")
            if col == "avg"
            else scores.get(col, {}).get(metric, math.nan)
            for col in columns
        ]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=config_label(name))
        ref = reference.get(name, {})
        for x, col in zip(xs, columns):
            theirs = _paper_value(ref, col, tasks)
            if theirs is not None:
                ax.hlines(
                    theirs,
                    x - width / 2,
                    x + width / 2,
                    colors="black",
                    linewidth=2,
                    label="paper" if not paper_drawn else None,
                )
                paper_drawn = True
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([TASK_LABELS.get(c, "Avg" if c == "avg" else c) for c in columns])
    ax.set_ylabel(f"{metric} (0-shot)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title or f"Zero-shot {metric}")
    ax.legend(fontsize="small", ncol=min(len(names) + 1, 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("zero-shot chart written to %s", path)
    return path
