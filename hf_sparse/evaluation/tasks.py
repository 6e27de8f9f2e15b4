"""lm-eval task specifications: the official tasks, optionally reading their documents from local files.

:func:`task_specs` turns task names into what ``lm_eval.simple_evaluate(tasks=...)`` accepts. With
``data_dir``, each task's **official** configuration (prompt, choices, target, metrics,
``process_docs``: everything from lm-eval's own YAML) is kept and only its dataset is replaced by
``<data_dir>/<task>.jsonl``, a file in the official dataset's schema. This is how the offline tests
run the exact evaluation code path without a download (``eval/tasks/`` ships a few documents per task),
and how a machine without Hub access can evaluate on pre-exported task data.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["get_task_manager", "local_task_config", "official_task_config", "task_specs"]

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def get_task_manager(include_path: str | os.PathLike | None = None) -> Any:
    """A (cached) ``lm_eval.tasks.TaskManager``; building one indexes every lm-eval task (about 10 s)."""
    return _cached_task_manager(os.fspath(include_path) if include_path is not None else None)


def official_task_config(name: str, task_manager: Any = None) -> dict[str, Any]:
    """The full configuration of lm-eval task ``name``, as a dict (``include:`` and ``!function`` resolved)."""
    task_manager = task_manager or get_task_manager()
    entry = task_manager.task_index.get(name)
    if entry is None:
        raise KeyError(f"lm-eval has no task named {name!r}")
    if entry.yaml_path is None:
        if entry.cfg is None:
            raise ValueError(f"lm-eval task {name!r} has no YAML configuration to override")
        return dict(entry.cfg)
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as err:  # pragma: no cover - lm-eval moved its YAML loader
        raise ImportError(
            f"this lm-eval ({err}) has no lm_eval.tasks._yaml_loader.load_yaml; local task data needs lm-eval 0.4.9+"
        ) from err
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


def local_task_config(name: str, data_file: str | os.PathLike, task_manager: Any = None) -> dict[str, Any]:
    """Task ``name``'s official configuration reading all its splits from the local JSONL ``data_file``.

    Every split the task names (training/validation/test/few-shot) maps to the same file, so a
    0-shot run evaluates the file's documents whichever split the task evaluates.
    """
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"no local data for task {name!r}: {path} does not exist")
    cfg = official_task_config(name, task_manager)
    splits = {cfg[key] for key in _SPLIT_KEYS if cfg.get(key)}
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path.resolve()) for split in sorted(splits)}},
    )
    cfg.pop("custom_dataset", None)
    return cfg


def task_specs(
    tasks: Sequence[str], data_dir: str | os.PathLike | None = None, task_manager: Any = None
) -> list[str | dict[str, Any]]:
    """What to pass as ``tasks=`` to ``lm_eval.simple_evaluate``: names, or local configs when ``data_dir`` is given."""
    if data_dir is None:
        return list(tasks)
    task_manager = task_manager or get_task_manager()
    specs: list[str | dict[str, Any]] = []
    for name in tasks:
        specs.append(local_task_config(name, Path(data_dir) / f"{name}.jsonl", task_manager))
        logger.info("task %s: official configuration, documents from %s", name, Path(data_dir) / f"{name}.jsonl")
    return specs
