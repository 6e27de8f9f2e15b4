"""The four Trainer callbacks: one-shot pruning, constant sparsity, gradual pruning, RigL.

Add one to an existing fine-tuning script::

    trainer = Trainer(..., callbacks=[OneShotPruningCallback(method="sparsegpt", sparsity="2:4", calibration=ids)])

Each callback finds its target linears at ``on_train_begin`` and from then on keeps their masks
applied after every optimizer step (see :mod:`hf_sparse.training.base`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..engine import prune
from ..patterns import NM, parse_pattern
from .base import SparsityCallback
from .criteria import count_for, get_criterion, lowest_k_mask, select_prune_masks
from .integration import broadcast_tensors
from .masks import MaskSet, gather_like, is_dtensor, local_tensor, shard_like
from .schedules import SparsitySchedule

logger = logging.getLogger(__name__)

__all__ = ["ConstantSparsityCallback", "OneShotPruningCallback", "GradualPruningCallback", "RigLCallback"]


class ConstantSparsityCallback(SparsityCallback):
    """Keep the zeros of an already-sparse model exactly zero through fine-tuning.

    At ``on_train_begin`` the zero entries of every target linear become its mask (for example a
    model pruned by ``hf_sparse.prune`` or downloaded sparse from the Hub); they are re-zeroed after
    every optimizer step. Takes the arguments of :class:`SparsityCallback`.
    """

    def initial_masks(self, args, state, model, **kwargs) -> MaskSet:
        masks = MaskSet.from_zeros(self.weights())
        if masks.sparsity() == 0:
            logger.warning("ConstantSparsityCallback: the target weights have no zeros; there is nothing to keep")
        return masks


def _batches_from_dataloader(dataloader, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches (``input_ids``/``attention_mask`` only), without disturbing training.

    Iterates the underlying ``DataLoader`` (not accelerate's wrapper, whose iteration state the
    Trainer tracks) and restores the global RNG, so the training order and dropout are unchanged.
    """
    if dataloader is None:
        raise ValueError("OneShotPruningCallback: no calibration given and the Trainer passed no train_dataloader")
    loader = getattr(dataloader, "base_dataloader", dataloader)
    batches = []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            batches.append({"input_ids": ids.cpu(), **({"attention_mask": mask.cpu()} if mask is not None else {})})
            if len(batches) >= count:
                break
    if not batches:
        raise ValueError("OneShotPruningCallback: the train dataloader yielded no batch for calibration")
    return batches


class OneShotPruningCallback(SparsityCallback):
    """Prune once at ``on_train_begin`` with any one-shot method, then keep the masks during fine-tuning.

    Args:
        method: ``"sparsegpt"``, ``"obc"``, ``"wanda"`` or ``"magnitude"`` (see ``hf_sparse.prune``).
        sparsity: ``0.5``, ``"50%"`` or an N:M pattern such as ``"2:4"``.
        calibration: token ids ``[N, T]``, a list of dicts with ``input_ids`` (a tokenized ``datasets``
            dataset works); default: the first ``num_calibration_batches`` batches of the train dataloader.
        num_calibration_batches: batches taken from the train dataloader when ``calibration`` is None.
        overrides: ``{pattern: sparsity}`` per-module sparsity, as in ``hf_sparse.prune``.
        batch_size: calibration samples per forward pass of the engine.
        solver_options: passed to the solver (e.g. ``{"dampening": 0.01}``).

    With DDP each rank calibrates on its own data shard; rank 0's pruned weights and masks are then
    broadcast so the replicas stay identical. Prune before sharding for FSDP (use
    ``hf_sparse.prune`` and then :class:`ConstantSparsityCallback`).
    """

    init_args = SparsityCallback.init_args + (
        "method",
        "sparsity",
        "num_calibration_batches",
        "overrides",
        "batch_size",
        "solver_options",
    )
    state_attributes = ("pruned",)

    def __init__(
        self,
        method: str = "sparsegpt",
        sparsity: float | str = 0.5,
        calibration: Any = None,
        *,
        num_calibration_batches: int = 8,
        overrides: dict[str, Any] | None = None,
        batch_size: int = 8,
        solver_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = method
        self.sparsity = str(parse_pattern(sparsity))
        self.calibration = calibration
        self.num_calibration_batches = num_calibration_batches
        self.overrides = {k: str(v) for k, v in (overrides or {}).items()} or None
        self.batch_size = batch_size
        self.solver_options = dict(solver_options or {})
        self.pruned = False
        self.report = None

    def initial_masks(self, args, state, model, train_dataloader=None, **kwargs) -> MaskSet:
        if any(is_dtensor(w) for w in self.weights().values()):
            raise RuntimeError(
                "OneShotPruningCallback cannot prune a sharded (FSDP) model: prune before sharding with "
                "hf_sparse.prune(...) and train with ConstantSparsityCallback"
            )
        calibration = self.calibration
        if calibration is None and self.method != "magnitude":
            calibration = _batches_from_dataloader(train_dataloader, self.num_calibration_batches)
        self.report = prune(
            model,
            calibration,
            method=self.method,
            sparsity=self.sparsity,
            targets=list(self.modules),
            overrides=self.overrides,
            batch_size=self.batch_size,
            progress=False,
            **self.solver_options,
        )
        broadcast_tensors([w for w in self.weights().values()])  # DDP: every replica takes rank 0's weights
        self.pruned = True
        logger.info("OneShotPruningCallback: %s %s, overall sparsity %.4f", self.method, self.sparsity,
                    self.report.overall_sparsity)
        return MaskSet.from_zeros(self.weights())


class GradualPruningCallback(SparsityCallback):
    """Raise sparsity from ``initial`` to ``final`` during training (Zhu & Gupta 2017), never un-pruning.

    A pruning event happens at ``start_step`` and every ``frequency`` steps until ``end_step``; it
    ranks the weights by ``criterion`` (scores accumulated since the previous event) and prunes the
    lowest until the scheduled sparsity is reached. Previously pruned weights stay pruned.

    Args:
        final: final sparsity (``0.8``) or an N:M pattern (``"2:4"``: groups go 0 -> 1 -> 2 pruned of 4).
        initial: sparsity of the first event.
        start_step, end_step: optimizer steps of the first and last events (``end_step`` default: 75% of
            ``max_steps``).
        frequency: steps between events (default: a tenth of the ramp).
        schedule: ``"cubic"`` or ``"linear"``.
        criterion: ``"magnitude"``, ``"movement"``, ``"taylor"`` or ``"fisher"`` (see ``criteria``).
        ranking: ``"layer"``, ``"row"`` or ``"global"`` (across all target layers).
    """

    init_args = SparsityCallback.init_args + (
        "final",
        "initial",
        "start_step",
        "end_step",
        "frequency",
        "schedule",
        "criterion",
        "ranking",
    )
    state_attributes = ("resolved", "current_sparsity", "last_event_step")

    def __init__(
        self,
        final: float | str = 0.5,
        initial: float = 0.0,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int | None = None,
        schedule: str = "cubic",
        criterion: str = "magnitude",
        ranking: str = "layer",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pattern = parse_pattern(final)
        self.final, self.initial = str(self.pattern), float(initial)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.schedule, self.criterion, self.ranking = schedule, criterion, ranking
        if isinstance(self.pattern, NM) and ranking == "global":
            raise ValueError("N:M patterns are ranked per group of M; use ranking='layer'")
        self.scorer = get_criterion(criterion)
        self.resolved: dict[str, int] | None = None
        self.current_sparsity = 0.0
        self.last_event_step = -1
        self.sched: SparsitySchedule | None = None
        if end_step is not None:
            self._make_schedule(start_step, end_step, frequency or max(1, (end_step - start_step) // 10))

    def _make_schedule(self, start: int, end: int, frequency: int) -> None:
        self.sched = SparsitySchedule(self.initial, self.pattern.sparsity, start, end, frequency, self.schedule)
        self.resolved = {"start_step": start, "end_step": end, "frequency": frequency}

    def setup(self, args, state, model, **kwargs) -> None:
        if self.resolved is None:
            end = self.end_step if self.end_step is not None else max(self.start_step, round(0.75 * state.max_steps))
            self._make_schedule(self.start_step, end, self.frequency or max(1, (end - self.start_step) // 10))
        else:
            self._make_schedule(self.resolved["start_step"], self.resolved["end_step"], self.resolved["frequency"])
        if self.scorer.needs_grad and not all(w.requires_grad for w in self.weights().values()):
            raise ValueError(
                f"criterion {self.criterion!r} needs gradients of the target weights, but some are frozen "
                "(e.g. a PEFT base model); use criterion='magnitude' or make them trainable"
            )

    def after_begin(self, args, state, model, **kwargs) -> None:
        if state.global_step == 0 and self.sched.is_pruning_step(0):
            self.prune_to(self.sched.sparsity_at(0), 0)

    def before_optimizer_step(self, step, args, state, **kwargs) -> None:
        if not self.scorer.needs_grad or step > self.sched.end_step:
            return
        weights = {n: local_tensor(w) for n, w in self.weights().items()}
        grads = {n: local_tensor(w.grad) for n, w in self.weights().items() if w.grad is not None}
        self.scorer.accumulate(weights, grads)

    def after_optimizer_step(self, step, args, state, **kwargs) -> None:
        if self.sched.is_pruning_step(step):
            self.prune_to(self.sched.sparsity_at(step), step)

    @torch.no_grad()
    def prune_to(self, sparsity: float, step: int) -> None:
        """One pruning event: rank by the criterion and prune up to ``sparsity`` (monotone)."""
        scorer = self.scorer if self.scorer.ready() else get_criterion("magnitude")
        if scorer is not self.scorer:
            logger.info("GradualPruningCallback: no gradient statistics yet at step %d; ranking by magnitude", step)
        scores, keep = {}, {}
        for name, weight in self.weights().items():
            scores[name] = self.full_matrix(name, scorer.scores(name, local_tensor(weight)))
            keep[name] = self.full_matrix(name, self.masks.masks[name])
        prune_masks = select_prune_masks(scores, sparsity, self.pattern, self.ranking, keep)
        for name, prune_mask in prune_masks.items():
            self.set_prune_matrix(name, prune_mask)
        self.masks.broadcast()
        self.scorer.reset()
        self.current_sparsity = round(self.masks.sparsity(), 6)
        self.last_event_step = step
        logger.info("GradualPruningCallback: step %d, target %.4f, sparsity %.4f", step, sparsity,
                    self.current_sparsity)

    def extra_state(self) -> dict[str, Any]:
        weights = self.weights()
        buffers = {n: gather_like(b, weights[n]).cpu() for n, b in self.scorer.buffers.items()}
        return {"scores": buffers, "score_steps": self.scorer.steps}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        weights = self.weights()
        self.scorer.reset()
        for name, full in (extra.get("scores") or {}).items():
            self.scorer.buffers[name] = shard_like(full, weights[name])
        self.scorer.steps = int(extra.get("score_steps", 0))


class RigLCallback(SparsityCallback):
    """Dynamic sparse training at fixed sparsity: RigL (Evci et al. 2020) or SET random regrowth.

    Every ``update_frequency`` steps until ``end_step``, each layer drops the fraction
    ``f(t) = alpha/2 * (1 + cos(pi t / end_step))`` of its active weights with the smallest
    magnitude and regrows as many inactive ones: those with the largest *dense* gradient magnitude
    (``regrowth="gradient"``, RigL) or random ones (``"random"``, SET). Regrown weights start at
    zero, with their optimizer moments reset.

    Dense gradients: pruned weights are stored as zeros in a dense matrix, so backward computes the
    gradient of every entry, active or not. The update reads those gradients at
    ``on_pre_optimizer_step`` *before* this callback masks them (same hook, fixed order), after
    gradient accumulation and the DDP all-reduce, so every rank sees the same dense gradient. Masked
    gradients only hide inactive entries from the optimizer, never from the RigL update.

    Args:
        sparsity: fixed fraction of pruned weights per layer.
        update_frequency: steps between mask updates (delta T).
        alpha: initial update fraction.
        end_step: last update step (default: 75% of ``max_steps``).
        regrowth: ``"gradient"`` (RigL) or ``"random"`` (SET).
        init: initial mask: ``"magnitude"`` (prune the smallest weights of each layer), ``"random"``,
            or ``"keep"`` (the model's existing zeros, e.g. after one-shot pruning).
        seed: seed of random masks and random regrowth (the same on every rank).
    """

    init_args = SparsityCallback.init_args + (
        "sparsity",
        "update_frequency",
        "alpha",
        "end_step",
        "regrowth",
        "init",
        "seed",
    )
    state_attributes = ("resolved_end_step", "updates")

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        update_frequency: int = 100,
        alpha: float = 0.3,
        end_step: int | None = None,
        regrowth: str = "gradient",
        init: str = "magnitude",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if regrowth not in ("gradient", "random"):
            raise ValueError(f"regrowth must be 'gradient' (RigL) or 'random' (SET), got {regrowth!r}")
        if init not in ("magnitude", "random", "keep"):
            raise ValueError(f"init must be 'magnitude', 'random' or 'keep', got {init!r}")
        pattern = parse_pattern(sparsity)
        if isinstance(pattern, NM):
            raise ValueError("RigLCallback supports unstructured sparsity only")
        if update_frequency < 1 or not 0 < alpha <= 1:
            raise ValueError("need update_frequency >= 1 and 0 < alpha <= 1")
        self.sparsity = pattern.sparsity
        self.update_frequency, self.alpha, self.end_step = update_frequency, alpha, end_step
        self.regrowth, self.init, self.seed = regrowth, init, seed
        self.resolved_end_step: int | None = end_step
        self.updates = 0
        self.last_drop_fraction = 0.0
        self._optimizer = None

    def setup(self, args, state, model, **kwargs) -> None:
        if self.resolved_end_step is None:
            self.resolved_end_step = self.end_step if self.end_step is not None else round(0.75 * state.max_steps)
        if not all(w.requires_grad for w in self.weights().values()):
            raise ValueError("RigLCallback needs trainable target weights (their dense gradients drive regrowth)")

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    @torch.no_grad()
    def initial_masks(self, args, state, model, **kwargs) -> MaskSet:
        if self.init == "keep":
            return MaskSet.from_zeros(self.weights())
        masks = self.masks = MaskSet.from_zeros(self.weights())
        for name, weight in self.weights().items():
            matrix = self.full_matrix(name, local_tensor(weight)).float()
            scores = matrix.abs() if self.init == "magnitude" else torch.rand(matrix.shape, generator=self._generator(0))
            scores = scores.to(matrix.device).masked_fill(matrix == 0, -math.inf)
            prune_mask = lowest_k_mask(scores.reshape(1, -1), count_for(self.sparsity, scores.numel()))
            self.set_prune_matrix(name, prune_mask.reshape(matrix.shape))
        return masks

    def drop_fraction(self, step: int) -> float:
        """Cosine-decayed update fraction ``alpha/2 * (1 + cos(pi * step / end_step))``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * min(step, self.resolved_end_step) / self.resolved_end_step))

    def before_optimizer_step(self, step, args, state, optimizer=None, **kwargs) -> None:
        if step % self.update_frequency or step > self.resolved_end_step:
            return
        self.update_masks(step, optimizer)

    @torch.no_grad()
    def update_masks(self, step: int, optimizer=None) -> None:
        """Drop the smallest active weights and regrow as many (dense-gradient or random) in every layer."""
        fraction = self.drop_fraction(step)
        generator = self._generator(step)
        for name, weight in self.weights().items():
            if weight.grad is None:
                continue
            keep = self.full_matrix(name, self.masks.masks[name])
            magnitude = self.full_matrix(name, local_tensor(weight)).float().abs()
            n = math.floor(fraction * int(keep.sum()))
            if n == 0:
                continue
            drop = lowest_k_mask(magnitude.masked_fill(~keep, math.inf).reshape(1, -1), n).reshape(keep.shape)
            after_drop = keep & ~drop
            if self.regrowth == "gradient":
                grow_scores = self.full_matrix(name, local_tensor(weight.grad)).float().abs()
            else:
                grow_scores = torch.rand(keep.shape, generator=generator).to(keep.device)
            grow_scores = grow_scores.masked_fill(after_drop, -math.inf)
            grow = lowest_k_mask((-grow_scores).reshape(1, -1), n).reshape(keep.shape)
            new_keep = after_drop | grow
            self.masks.set_full(name, new_keep.t() if self.transposed[name] else new_keep)
            grown_local = self.local_from_matrix(name, grow)
            local_tensor(weight).masked_fill_(grown_local, 0.0)  # regrown connections start at zero
            self._reset_optimizer_state(weight, grown_local, optimizer)
        self.masks.broadcast()
        self.updates += 1
        self.last_drop_fraction = fraction
        logger.info("RigLCallback: step %d, updated %.4f of the active weights", step, fraction)

    @staticmethod
    def _reset_optimizer_state(weight: nn.Parameter, where: torch.Tensor, optimizer) -> None:
        """Zero the optimizer moments (Adam's ``exp_avg``/``exp_avg_sq``, momentum) of regrown entries."""
        inner = getattr(optimizer, "optimizer", optimizer)
        state = getattr(inner, "state", {}).get(weight) if inner is not None else None
        for value in (state or {}).values():
            if isinstance(value, torch.Tensor) and local_tensor(value).shape == where.shape:
                local_tensor(value).masked_fill_(where, 0.0)

    def sparsity_logs(self) -> dict[str, float]:
        values = super().sparsity_logs()
        values["rigl/updates"] = self.updates
        return values
