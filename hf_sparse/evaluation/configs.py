"""Evaluation configurations: how a dense model is made sparse before it is measured.

A configuration is named by a short string, as on the command line of ``eval/zero_shot.py``:

- ``dense``: the model as loaded;
- ``relu``: the ReLUification baseline (SiLU -> ReLU, no fine-tuning), see :mod:`.relu`;
- ``cats50``, ``cats70``, ...: CATS activation sparsity calibrated to 50 %, 70 %, ... (``hf_sparse.cats``);
- ``sparsegpt50``, ``wanda50``, ``magnitude60``, ``obc50``: one-shot unstructured pruning to 50 %, ...;
- ``sparsegpt2:4``, ``wanda4:8``: N:M semi-structured pruning;
- combinations joined by ``+``: ``sparsegpt2:4+cats50`` (weights pruned first, then CATS calibrated).

:func:`applied` applies one configuration to an in-memory model for the duration of a ``with``
block and undoes it afterwards (CATS and ReLU are removed, pruned weights are restored from a
CPU copy), so a single loaded model can be measured under many configurations.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..patterns import parse_pattern
from .relu import apply_relu, remove_relu

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_ALIASES",
    "Configuration",
    "applied",
    "apply_configuration",
    "calibration_tokens",
    "parse_configuration",
    "parse_prune_spec",
]

_PRUNE_RE = re.compile(r"^(?P<method>[a-z_]+?)(?P<spec>\d+(?:\.\d+)?|\d+:\d+)$")

CALIBRATION_ALIASES: dict[str, dict[str, Any]] = {
    "c4": {
        "path": "allenai/c4",
        "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
        "split": "train",
    },
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"},
}
"""Short names for the usual calibration sets: ``c4`` is the first C4 shard, as in the SparseGPT and
Wanda code; ``wikitext2`` is WikiText-2's training split."""


@dataclass(frozen=True)
class Configuration:
    """One way of making a model sparse for evaluation.

    Attributes:
        name: the configuration's name (a table row label).
        cats: CATS activation sparsity in ``(0, 1)``, or ``None``.
        relu: replace the gated MLPs' activation by ReLU (the ReLUification baseline).
        prune_method: a pruning method of :data:`hf_sparse.solvers.SOLVERS`, or ``None``.
        prune_sparsity: its sparsity: ``"0.5"`` or an N:M pattern ``"2:4"``.
    """

    name: str
    cats: float | None = None
    relu: bool = False
    prune_method: str | None = None
    prune_sparsity: str | None = None

    @property
    def needs_calibration(self) -> bool:
        """Does applying it need calibration tokens (CATS thresholds, data-aware pruning)?"""
        return self.cats is not None or (self.prune_method not in (None, "magnitude"))

    @property
    def is_dense(self) -> bool:
        return self.cats is None and not self.relu and self.prune_method is None

    def describe(self) -> str:
        """A human-readable label: ``"SparseGPT 2:4 + CATS 50%"``."""
        parts = []
        if self.prune_method is not None:
            pattern = parse_pattern(self.prune_sparsity)
            shown = f"{pattern.n}:{pattern.m}" if hasattr(pattern, "m") else f"{pattern.sparsity:.0%}"
            parts.append(f"{_METHOD_LABELS.get(self.prune_method, self.prune_method)} {shown}")
        if self.relu:
            parts.append("ReLUification")
        if self.cats is not None:
            parts.append(f"CATS {self.cats:.0%}")
        return " + ".join(parts) or "Dense"

    @classmethod
    def from_parts(
        cls,
        *,
        cats: float | None = None,
        prune: str | None = None,
        relu: bool = False,
        name: str | None = None,
    ) -> Configuration:
        """Build a configuration from lm-eval-style arguments: ``cats=0.5``, ``prune="sparsegpt:2:4"``, ``relu=True``."""
        method, sparsity = parse_prune_spec(prune) if prune else (None, None)
        config = cls(
            name="",
            cats=_check_cats(cats, percent_ok=True),
            relu=bool(relu),
            prune_method=method,
            prune_sparsity=sparsity,
        )
        return replace(config, name=name or _default_name(config))


_METHOD_LABELS = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "Magnitude", "obc": "OBC"}


def _check_cats(cats: float | None, *, percent_ok: bool = False) -> float | None:
    """Validate a CATS sparsity; with ``percent_ok`` a value above 1 is a percentage (``50`` -> ``0.5``)."""
    if cats is None:
        return None
    cats = float(cats)
    if percent_ok and cats > 1.0:
        cats /= 100.0
    if not 0.0 < cats < 1.0:
        raise ValueError(f"CATS sparsity must be in (0, 1), got {cats}")
    return cats


def _check_method(method: str) -> str:
    from ..solvers import SOLVERS

    if method not in SOLVERS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {sorted(SOLVERS)}")
    return method


def _default_name(config: Configuration) -> str:
    parts = []
    if config.prune_method is not None:
        pattern = parse_pattern(config.prune_sparsity)
        shown = f"{pattern.n}:{pattern.m}" if hasattr(pattern, "m") else f"{round(pattern.sparsity * 100):d}"
        parts.append(f"{config.prune_method}{shown}")
    if config.relu:
        parts.append("relu")
    if config.cats is not None:
        parts.append(f"cats{round(config.cats * 100):d}")
    return "+".join(parts) or "dense"


def parse_prune_spec(spec: str) -> tuple[str, str]:
    """``"sparsegpt:2:4"``, ``"wanda:0.5"``, ``"wanda:50%"`` or ``"sparsegpt50"`` -> ``(method, sparsity)``.

    The sparsity is returned as a string that :func:`hf_sparse.patterns.parse_pattern` reads
    (``"2:4"``, ``"0.5"``).
    """
    text = spec.strip().lower()
    if ":" in text and not _PRUNE_RE.match(text):
        method, _, sparsity = text.partition(":")
    else:
        match = _PRUNE_RE.match(text)
        if match is None:
            raise ValueError(
                f"cannot read pruning spec {spec!r}: use METHOD:SPARSITY (sparsegpt:0.5, wanda:2:4) or "
                "METHOD<percent> (sparsegpt50)"
            )
        method, sparsity = match.group("method"), match.group("spec")
        if ":" not in sparsity:
            sparsity = str(float(sparsity) / 100.0)
    parse_pattern(sparsity)  # validate now, not after the model is loaded
    return _check_method(method), sparsity


def parse_configuration(name: str) -> Configuration:
    """A configuration from its name (see the module docstring); raises ``ValueError`` if unknown."""
    config = Configuration(name=name)
    for part in name.strip().lower().split("+"):
        if part == "dense":
            continue
        if part == "relu":
            config = replace(config, relu=True)
            continue
        match = re.fullmatch(r"cats(\d+(?:\.\d+)?)", part)
        if match:
            if config.cats is not None:
                raise ValueError(f"configuration {name!r} sets CATS twice")
            config = replace(config, cats=_check_cats(float(match.group(1)) / 100.0))
            continue
        match = _PRUNE_RE.match(part)
        if match is None:
            raise ValueError(
                f"unknown configuration {part!r} in {name!r}: use dense, relu, catsNN, METHODNN or METHODN:M "
                "(e.g. cats50, sparsegpt50, wanda2:4), joined by '+'"
            )
        if config.prune_method is not None:
            raise ValueError(f"configuration {name!r} prunes twice")
        method, sparsity = parse_prune_spec(part)
        config = replace(config, prune_method=method, prune_sparsity=sparsity)
    return config


def calibration_tokens(
    tokenizer: Any,
    source: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    max_documents: int | None = None,
) -> torch.Tensor:
    """Calibration windows ``[nsamples, seqlen]`` from ``source``.

    ``source`` is an alias of :data:`CALIBRATION_ALIASES` (``"c4"``, ``"wikitext2"``) or anything
    :func:`hf_sparse.calibration_data` reads (a local file, a Hub dataset name, ``"demo"``). For Hub
    datasets only a seeded random subset of ``max_documents`` documents (default ``8 * nsamples``)
    is tokenized, so that a large shard such as C4's does not have to be tokenized whole.
    """
    from ..calibration import calibration_data

    alias = CALIBRATION_ALIASES.get(source.lower()) if isinstance(source, str) else None
    data: Any = source
    if alias is not None:
        import datasets

        alias = dict(alias)
        split = alias.pop("split", split)
        data = datasets.load_dataset(**alias, split=split)
        dataset_config = None
    if hasattr(data, "column_names") and hasattr(data, "shuffle"):  # a datasets.Dataset: subsample documents
        limit = max_documents or 8 * nsamples
        if len(data) > limit:
            data = data.shuffle(seed=seed).select(range(limit))
    logger.info("calibration: %d x %d tokens from %s (seed %d)", nsamples, seqlen, source, seed)
    return calibration_data(
        data, tokenizer, nsamples, seqlen, seed, dataset_config=dataset_config, split=split, text_column=text_column
    )


def _resolve(calibration: Any) -> torch.Tensor:
    if calibration is None:
        raise ValueError("this configuration needs calibration data (CATS or data-aware pruning); pass calibration=")
    return calibration() if callable(calibration) else calibration


def _import_cats():
    try:
        from ..cats import apply_cats, remove_cats
    except ImportError as err:  # pragma: no cover - depends on the build
        raise ImportError(
            f"CATS configurations need hf_sparse.cats, which could not be imported ({err}); "
            "use a build of hf_sparse that includes it"
        ) from err
    return apply_cats, remove_cats


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    from ..modules import find_decoder_blocks, find_linears

    blocks_name, blocks = find_decoder_blocks(model)
    return find_linears(blocks, prefix=blocks_name)


def apply_configuration(
    model: nn.Module,
    config: Configuration | str,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    *,
    restore: bool = True,
    prune_options: dict[str, Any] | None = None,
    cats_options: dict[str, Any] | None = None,
) -> Callable[[], None]:
    """Apply ``config`` to ``model`` in place; returns a function that undoes it.

    Order: pruning (weights), then ReLUification, then CATS (whose thresholds are calibrated on the
    model as it is at that point). ``calibration`` is a token tensor ``[N, T]`` or a zero-argument
    callable returning one (called only if the configuration needs data).

    With ``restore=True`` the weights of the pruned layers are copied to CPU first and written back
    by the undo function (for a 7B model in bf16: about 13 GB of CPU memory); with ``restore=False``
    pruning is permanent (the undo function still removes CATS and ReLU).
    """
    if isinstance(config, str):
        config = parse_configuration(config)
    tokens = _resolve(calibration) if config.needs_calibration else None
    cfg = getattr(model, "config", None)
    had_sparsity_config = cfg is not None and hasattr(cfg, "sparsity_config")
    old_sparsity_config = getattr(cfg, "sparsity_config", None)
    saved: dict[str, torch.Tensor] = {}
    undo_steps: list[Callable[[], None]] = []

    def undo() -> None:
        while undo_steps:
            undo_steps.pop()()

    def restore_weights() -> None:
        with torch.no_grad():
            for name, module in _block_linears(model).items():
                if name in saved:
                    module.weight.copy_(saved[name].to(module.weight.device))
        if cfg is not None:
            if had_sparsity_config:
                cfg.sparsity_config = old_sparsity_config
            elif hasattr(cfg, "sparsity_config"):
                delattr(cfg, "sparsity_config")
        saved.clear()
        logger.info("%s: dense weights restored", config.name)

    try:
        if config.prune_method is not None:
            from ..engine import prune

            if restore:
                saved.update(
                    {name: m.weight.detach().to("cpu", copy=True) for name, m in _block_linears(model).items()}
                )
                undo_steps.append(restore_weights)
            report = prune(
                model,
                tokens,
                method=config.prune_method,
                sparsity=config.prune_sparsity,
                progress=False,
                **(prune_options or {}),
            )
            logger.info(
                "%s: %d layers pruned, overall sparsity %.2f%%",
                config.name,
                len(report.layers),
                100 * report.overall_sparsity,
            )
        if config.relu:
            apply_relu(model)
            undo_steps.append(lambda: remove_relu(model))
        if config.cats is not None:
            apply_cats, remove_cats = _import_cats()
            apply_cats(model, sparsity=config.cats, calibration=tokens, **(cats_options or {}))
            undo_steps.append(lambda: remove_cats(model))
    except BaseException:
        undo()
        raise
    return undo


@contextlib.contextmanager
def applied(
    model: nn.Module,
    config: Configuration | str,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    *,
    restore: bool = True,
    prune_options: dict[str, Any] | None = None,
    cats_options: dict[str, Any] | None = None,
) -> Iterator[nn.Module]:
    """Context manager: ``model`` under ``config`` inside the block, undone on exit (see :func:`apply_configuration`)."""
    undo = apply_configuration(
        model, config, calibration, restore=restore, prune_options=prune_options, cats_options=cats_options
    )
    try:
        yield model
    finally:
        undo()
