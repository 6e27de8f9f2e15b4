"""The CATS paper's zero-shot tables (Lee et al. 2024, Tables 1-2) as data.

Accuracy (lm-eval ``acc``, 0-shot) per task; ``avg`` is the paper's stated average, which equals the
plain mean of the eight tasks. Configuration names match :mod:`hf_sparse.evaluation.configs`
(``dense``, ``cats50``, ``cats70``, ``cats90``, ``relu``).
"""

from __future__ import annotations

__all__ = [
    "PAPER_MODELS",
    "PAPER_RESULTS",
    "PAPER_TASKS",
    "TASK_LABELS",
    "paper_results",
]

PAPER_TASKS: tuple[str, ...] = (
    "winogrande",
    "piqa",
    "sciq",
    "openbookqa",
    "hellaswag",
    "boolq",
    "arc_easy",
    "arc_challenge",
)
"""The eight lm-eval task names, in the paper's column order."""

TASK_LABELS: dict[str, str] = {
    "winogrande": "WG",
    "piqa": "PIQA",
    "sciq": "SciQ",
    "openbookqa": "OBQA",
    "hellaswag": "HS",
    "boolq": "BoolQ",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
}
"""Short column labels, as in the paper."""

PAPER_MODELS: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
}
"""The paper's models: ``--paper`` key -> Hugging Face Hub id."""


def _row(values: tuple[float, ...], avg: float) -> dict[str, float]:
    row = dict(zip(PAPER_TASKS, values, strict=True))
    row["avg"] = avg
    return row


PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "mistral-7b": {
        "dense": _row((0.7419, 0.8069, 0.959, 0.3260, 0.6128, 0.8370, 0.8085, 0.5034), 0.6994),
        "cats50": _row((0.7245, 0.8009, 0.948, 0.3200, 0.6097, 0.8193, 0.7849, 0.5043), 0.6890),
        "cats70": _row((0.7190, 0.8003, 0.929, 0.292, 0.6057, 0.8028, 0.7492, 0.4693), 0.6709),
        "cats90": _row((0.5627, 0.6001, 0.422, 0.212, 0.3359, 0.7086, 0.3754, 0.2773), 0.4368),
        "relu": _row((0.5043, 0.5092, 0.236, 0.142, 0.2580, 0.4208, 0.2723, 0.2415), 0.3230),
    },
    "llama2-7b": {
        "dense": _row((0.6906, 0.7807, 0.94, 0.314, 0.5715, 0.7774, 0.7630, 0.4343), 0.6589),
        "cats50": _row((0.6748, 0.7693, 0.927, 0.322, 0.5711, 0.7263, 0.7441, 0.4121), 0.6433),
        "cats70": _row((0.6693, 0.7584, 0.902, 0.294, 0.5500, 0.6590, 0.7008, 0.3805), 0.6143),
        "cats90": _row((0.5738, 0.6627, 0.611, 0.212, 0.3848, 0.6284, 0.4566, 0.2816), 0.4764),
        "relu": _row((0.4893, 0.5408, 0.2570, 0.154, 0.2586, 0.6003, 0.2795, 0.2406), 0.3525),
    },
}
"""``model key -> configuration -> task (or "avg") -> accuracy`` from the CATS paper."""


def paper_results(model: str) -> dict[str, dict[str, float]]:
    """The paper's table for ``model`` (``"mistral-7b"`` or ``"llama2-7b"``, case-insensitive)."""
    key = model.lower()
    if key not in PAPER_RESULTS:
        raise ValueError(f"no paper results for {model!r}; known: {', '.join(sorted(PAPER_RESULTS))}")
    return PAPER_RESULTS[key]
