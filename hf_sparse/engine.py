"""The layerwise engine: walk a causal LM one decoder block at a time and prune its linear layers.

1. Capture the real call arguments of every decoder block (attention mask, position ids/embeddings,
   ...) with a cheap pass in which the blocks are replaced by identity stubs.
2. For each block: hook its target linears, run the block on the current inputs to accumulate each
   input group's Hessian (once for layers reading the same tensor: q/k/v, gate/up), call the
   solver, write the weights back in the model's dtype, and re-run the pruned block to produce the
   next block's inputs (sequential error propagation).

Only the current block and its activations need to be on the compute device.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import (
    as_batches,
    block_output,
    capture_block_calls,
    check_calibration,
    input_device,
    to_device,
)
from .offload import any_offloaded, execution_device, read_weight_matrix, write_weight_matrix
from .modules import NameMatcher, find_decoder_blocks, find_linears, resolve_override, weight_matrix
from .patterns import Pattern, parse_pattern
from .report import LayerResult, PruningReport
from .solvers import HessianStats, get_solver

logger = logging.getLogger(__name__)

__all__ = ["prune"]


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device):
    """Move ``block`` to ``device`` for the duration, then back to where it was."""
    params = list(block.parameters())
    original = params[0].device if params else device
    if any_offloaded(block):  # accelerate's hooks load the weights onto their execution device per forward
        original = device
    if original != device:
        block.to(device)
    try:
        yield
    finally:
        if original != device:
            block.to(original)


def _group_by_shared_input(block: nn.Module, linears: dict[str, nn.Module], run_once) -> dict[str, str]:
    """``name -> leader``: layers that receive the very same input tensor share their leader's statistics."""
    received: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in linears.items():

        def hook(mod, args, name=name):
            received[name] = args[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run_once()
    finally:
        for h in handles:
            h.remove()
    leaders: dict[str, str] = {}
    for name in linears:
        leader = next((other for other in leaders.values() if received.get(other) is received.get(name)), name)
        leaders[name] = leader if name in received else name
    return leaders


def _relative_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W')X|| / ||WX||`` from ``H = 2XX^T/n``: ``sqrt(tr(D H D^T) / tr(W H W^T))``."""
    delta = original - pruned
    num = torch.einsum("ij,jk,ik->", delta, hessian, delta)
    den = torch.einsum("ij,jk,ik->", original, hessian, original)
    return float(torch.sqrt(num.clamp_min(0) / den.clamp_min(1e-30)))


def _solver_options(solver, options: dict[str, Any], method: str) -> dict[str, Any]:
    accepted = {
        name
        for name, p in inspect.signature(solver).parameters.items()
        if p.kind == inspect.Parameter.KEYWORD_ONLY and name != "name"
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"method {method!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    return options


def prune(
    model: nn.Module,
    calibration: Any = None,
    method: str = "sparsegpt",
    sparsity: "Pattern | float | str" = 0.5,
    *,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: "str | torch.device | None" = None,
    batch_size: int = 8,
    offload_activations: bool = False,
    progress: bool = True,
    distributed: bool = True,
    **solver_options: Any,
) -> PruningReport:
    """Prune the linear layers of ``model``'s decoder blocks in place, one block at a time.

    Args:
        model: any decoder-only ``transformers`` causal LM (or its base model).
        calibration: token ids ``[nsamples, seqlen]`` (see :func:`hf_sparse.calibration_data`), a list of
            such tensors or of dicts with ``input_ids``/``attention_mask``. Optional for ``magnitude``.
        method: ``"sparsegpt"``, ``"obc"``, ``"wanda"`` or ``"magnitude"`` (see ``hf_sparse.solvers.SOLVERS``).
        sparsity: a fraction (``0.5``), ``"50%"``, or an N:M pattern (``"2:4"``: at most 2 non-zeros in 4).
        targets: names/globs/``re:`` regexes of the layers to prune (default: every linear in the blocks).
        ignore: names/globs/``re:`` regexes of layers to leave dense; an entry matching nothing warns.
        overrides: ``{pattern: sparsity}`` per-module sparsity; the first matching pattern wins.
        device: where each block is processed (default: where the block already is).
        batch_size: calibration samples per forward pass.
        offload_activations: keep the calibration activations on CPU between blocks.
        distributed: under ``torchrun``/``accelerate launch`` (an initialised process group), split the
            calibration batches and the layers' solvers across ranks; every rank ends with the same weights.
        solver_options: passed to the solver (e.g. ``blocksize=128, dampening=0.01`` for SparseGPT).

    Returns:
        a :class:`PruningReport`; the model also gets ``config.sparsity_config`` describing the run.
    """
    start_time = time.perf_counter()
    solver = get_solver(method)
    solver_options = _solver_options(solver, solver_options, method)
    default_pattern = parse_pattern(sparsity)
    override_patterns = {k: parse_pattern(v) for k, v in (overrides or {}).items()}
    blocks_name, blocks = find_decoder_blocks(model)
    if calibration is None and method != "magnitude":
        as_batches(None, batch_size)  # raises the clear error
    if calibration is None:  # magnitude needs no data; statistics only feed the error column
        batches = []
    else:
        batches = as_batches(calibration, batch_size)
        check_calibration(model, batches)
    calibration_info = (
        {"nsamples": sum(b.input_ids.shape[0] for b in batches), "seqlen": max(b.input_ids.shape[1] for b in batches)}
        if batches
        else {}
    )
    rank, world = _process_group() if distributed else (0, 1)
    if world > 1 and batches:
        if len(batches) < world:
            raise ValueError(
                f"{len(batches)} calibration batches cannot be shared by {world} processes; "
                f"use more samples or a smaller batch_size"
            )
        batches = batches[rank::world]  # each rank runs its share; the statistics are all-reduced per block

    target_matcher = NameMatcher(targets) if targets else None
    ignore_matcher = NameMatcher(ignore)
    report = PruningReport(method=method, pattern=str(default_pattern))
    plan: list[dict[str, tuple[nn.Module, Pattern]]] = []
    for index, block in enumerate(blocks):
        chosen = {}
        for name, module in find_linears(block, f"{blocks_name}.{index}").items():
            if target_matcher is not None and target_matcher.first_match(name) is None:
                report.skipped[name] = "not in targets"
                continue
            hit = ignore_matcher.first_match(name)
            if hit is not None:
                report.skipped[name] = f"ignored by {hit!r}"
                continue
            pattern = next((p for k, p in override_patterns.items() if resolve_override(name, {k: p})), default_pattern)
            pattern.validate_for(weight_matrix(module).shape[1], name)
            if pattern.sparsity == 0:
                report.skipped[name] = "sparsity 0"
                continue
            chosen[name] = (module, pattern)
        plan.append(chosen)
    for name, module in model.named_modules():
        if name and not name.startswith(blocks_name + ".") and isinstance(module, (nn.Linear, nn.Embedding)):
            report.skipped.setdefault(name, "outside the decoder blocks (embeddings/lm_head are never pruned)")
    for unused in ignore_matcher.unused():
        logger.warning("ignore entry %r matched no module; nothing was excluded by it", unused)
    if target_matcher is not None:
        for unused in target_matcher.unused():
            logger.warning("targets entry %r matched no module", unused)
    if not any(plan):
        raise ValueError("no layer to prune: every linear layer was excluded by targets/ignore/overrides")

    if batches:
        from .estimate import estimate_memory

        logger.info(
            estimate_memory(
                model,
                calibration_info["nsamples"],
                calibration_info["seqlen"],
                offload_activations=offload_activations,
                world_size=world,
            ).describe()
        )
    was_training = model.training
    model.eval()
    compute = torch.device(device) if device is not None else None
    store = torch.device("cpu") if offload_activations else (compute or input_device(model))
    calls = capture_block_calls(model, blocks, batches, store) if batches else None

    hidden = calls.hidden if calls else []
    bar = tqdm(list(enumerate(blocks)), desc=f"{method} {default_pattern}", disable=not progress or rank != 0)
    for index, block in bar:
        block_device = compute or execution_device(block)
        with _on_device(block, block_device):
            args_for = calls.args[index] if calls else []
            kwargs_for = calls.kwargs[index] if calls else []

            def run(batch_indices: Iterable[int], keep: bool) -> list[torch.Tensor]:
                outputs = []
                for b in batch_indices:
                    out = block(
                        hidden[b].to(block_device),
                        *to_device(args_for[b], block_device),
                        **to_device(kwargs_for[b], block_device),
                    )
                    if keep:
                        outputs.append(block_output(out).detach().to(store))
                return outputs

            targets_here = plan[index]
            if targets_here:
                _prune_block(
                    block, targets_here, batches, run, solver, solver_options, report, block_device, rank, world
                )
            if calls is not None and index + 1 < len(blocks):
                hidden = run(range(len(batches)), keep=True)
        bar.set_postfix(layers=len(report.layers))

    model.train(was_training)
    report.seconds = time.perf_counter() - start_time
    report.calibration = calibration_info
    _record_metadata(model, report, targets, ignore, overrides, solver_options)
    return report


def _all_reduce_stats(stats: dict[str, HessianStats]) -> None:
    """Sum every rank's Hessian sums and token counts, so all ranks hold the statistics of all samples."""
    for acc in stats.values():
        torch.distributed.all_reduce(acc._sum)
        count = torch.tensor([acc.nsamples], dtype=torch.float64, device=acc._sum.device)
        torch.distributed.all_reduce(count)
        acc.nsamples = int(count.item())


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _prune_block(
    block, targets_here, batches, run, solver, solver_options, report, device, rank: int = 0, world: int = 1
) -> None:
    """Accumulate the Hessians of this block's target linears, solve each layer and write it back."""
    linears = {name: module for name, (module, _) in targets_here.items()}
    stats: dict[str, HessianStats] = {}
    if batches:
        leaders = _group_by_shared_input(block, linears, lambda: run([0], keep=False))
        token_mask: dict[str, torch.Tensor | None] = {"mask": None}
        handles = []
        for name, module in linears.items():
            if leaders[name] != name:
                continue
            stats[name] = HessianStats(weight_matrix(module).shape[1], device=device)

            def hook(mod, args, name=name):
                x = args[0]
                mask = token_mask["mask"]
                if mask is not None and x.dim() == 3:
                    x = x[mask.to(x.device).bool()]
                stats[name].add(x)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            for b, batch in enumerate(batches):
                token_mask["mask"] = batch.attention_mask
                run([b], keep=False)
        finally:
            for h in handles:
                h.remove()
    else:
        leaders = {name: name for name in linears}
    if world > 1:
        _all_reduce_stats(stats)
    # Layers are split across ranks (round robin); each result is then broadcast so every rank holds all weights.
    items = list(targets_here.items())
    for i, (name, (module, pattern)) in enumerate(items):
        t0 = time.perf_counter()
        original = read_weight_matrix(module, device)
        group = stats.get(leaders[name])
        if group is not None and group.nsamples == 0:
            report.skipped[name] = "received no calibration tokens (never called in the forward pass)"
            logger.warning("%s received no calibration tokens and was left dense", name)
            continue
        hessian = group.hessian if group is not None else None
        if world > 1:
            owner = i % world
            pruned = (
                solver(original, hessian, pattern, name=name, **solver_options)
                if rank == owner
                else torch.empty_like(original)
            )
            torch.distributed.broadcast(pruned, src=owner)
        else:
            pruned = solver(original, hessian, pattern, name=name, **solver_options)
        written = write_weight_matrix(module, pruned).to(device)
        error = _relative_error(original, written.float(), hessian) if hessian is not None else float("nan")
        report.layers.append(
            LayerResult(
                name=name,
                shape=tuple(original.shape),
                pattern=str(pattern),
                sparsity=float((written == 0).float().mean()),
                rel_error=error,
                seconds=time.perf_counter() - t0,
            )
        )
    stats.clear()


def _record_metadata(model, report: PruningReport, targets, ignore, overrides, solver_options) -> None:
    """Write what was done into ``model.config.sparsity_config`` so that ``save_pretrained`` keeps it."""
    from . import __version__

    config = getattr(model, "config", None)
    if config is None:
        return
    config.sparsity_config = {
        "library": "hf_sparse",
        "version": __version__,
        "method": report.method,
        "pattern": report.pattern,
        "overall_sparsity": round(report.overall_sparsity, 6),
        "per_module": {r.name: {"pattern": r.pattern, "sparsity": round(r.sparsity, 6)} for r in report.layers},
        "targets": list(targets) if targets else None,
        "ignore": list(ignore) if ignore else [],
        "overrides": {k: str(v) for k, v in (overrides or {}).items()},
        "calibration": report.calibration,
        "solver_options": {k: v for k, v in solver_options.items() if isinstance(v, (int, float, str, bool))},
    }
