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
from .modules import ROUTER_NAMES, NameMatcher, find_decoder_blocks, find_linears, resolve_override, weight_matrix
from .patterns import Pattern, parse_pattern
from .report import LayerResult, PruningReport
from .collect import StatsCollector
from .experts import ExpertParam, ExpertStatsCollector, find_expert_params
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
        if p.kind == inspect.Parameter.KEYWORD_ONLY and name not in ("name", "row_groups")
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"method {method!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    return options


@torch.no_grad()
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

    def choose(name: str, in_features: int) -> Pattern | None:
        """The pattern for this layer, or ``None`` (with the reason recorded) when it is left dense."""
        if name.rsplit(".", 1)[-1] in ROUTER_NAMES:
            report.skipped[name] = "MoE router (kept dense: it decides which experts run)"
            return None
        if target_matcher is not None and target_matcher.first_match(name) is None:
            report.skipped[name] = "not in targets"
            return None
        hit = ignore_matcher.first_match(name)
        if hit is not None:
            report.skipped[name] = f"ignored by {hit!r}"
            return None
        pattern = next((p for k, p in override_patterns.items() if resolve_override(name, {k: p})), default_pattern)
        pattern.validate_for(in_features, name)
        if pattern.sparsity == 0:
            report.skipped[name] = "sparsity 0"
            return None
        return pattern

    # Per block: ordinary linears {name: (module, pattern)} and 3-D MoE expert weights {name: (ExpertParam, pattern)}
    plan: list[dict[str, tuple[nn.Module, Pattern]]] = []
    expert_plan: list[dict[str, tuple[ExpertParam, Pattern]]] = []
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        chosen = {}
        for name, module in find_linears(block, prefix).items():
            pattern = choose(name, weight_matrix(module).shape[1])
            if pattern is not None:
                chosen[name] = (module, pattern)
        plan.append(chosen)
        experts = {}
        for name, param in find_expert_params(block, prefix).items():
            pattern = choose(name, param.in_features)
            if pattern is not None:
                experts[name] = (param, pattern)
        expert_plan.append(experts)
    for name, module in model.named_modules():
        if name and not name.startswith(blocks_name + ".") and isinstance(module, (nn.Linear, nn.Embedding)):
            report.skipped.setdefault(name, "outside the decoder blocks (embeddings/lm_head are never pruned)")
    known = {name for block_experts in expert_plan for name in block_experts} | set(report.skipped)
    unknown = [f"{blocks_name}.{n}" for n, p in blocks.named_parameters() if p.dim() == 3]
    unknown = [n for n in unknown if n not in known]
    for name in unknown:
        report.skipped[name] = "3-D parameter of an unrecognised expert layout (only gate_up_proj/down_proj experts)"
    if unknown:
        logger.warning(
            "%d 3-D parameters (e.g. %s) have an unrecognised layout and are left dense", len(unknown), unknown[0]
        )
    all_names = [n for chosen in plan + expert_plan for n in chosen] + list(report.skipped)
    for key in override_patterns:
        if not any(resolve_override(n, {key: True}) for n in all_names):
            logger.warning("overrides entry %r matched no module; it changes nothing", key)
    for unused in ignore_matcher.unused():
        logger.warning("ignore entry %r matched no module; nothing was excluded by it", unused)
    if target_matcher is not None:
        for unused in target_matcher.unused():
            logger.warning("targets entry %r matched no module", unused)
    if not any(plan) and not any(expert_plan):
        if default_pattern.sparsity == 0 and not override_patterns:
            raise ValueError("sparsity 0 prunes nothing: give a sparsity in (0, 1) or an N:M pattern")
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
                batch_size=batch_size,
            ).describe()
        )
    was_training = model.training
    model.eval()
    compute = torch.device(device) if device is not None else None
    store = torch.device("cpu") if offload_activations else (compute or input_device(model))
    try:
        calls = capture_block_calls(model, blocks, batches, store) if batches else None
        hidden = calls.hidden if calls else []
        if calls is not None:
            calls.hidden = []  # the list above is the only reference, so block 0's inputs are freed after block 0
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
                if targets_here or expert_plan[index]:
                    _prune_block(
                        block,
                        targets_here,
                        batches,
                        run,
                        solver,
                        solver_options,
                        report,
                        block_device,
                        rank,
                        world,
                        expert_plan[index],
                    )
                if calls is not None and index + 1 < len(blocks):
                    hidden = run(range(len(batches)), keep=True)
            bar.set_postfix(layers=len(report.layers))
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start_time
    report.calibration = calibration_info
    _record_metadata(model, report, targets, ignore, overrides, solver_options)
    return report


def _all_reduce_stats(stats: dict[str, HessianStats], collector: StatsCollector, linears: dict[str, nn.Module]) -> None:
    """Sum every rank's Hessian sums and token counts, so all ranks hold the statistics of all samples.

    The order is the block's layer order on every rank (not the order layers happened to be called), and a
    layer a rank never saw gets an empty accumulator, so the collectives always match across ranks.
    """
    for name in linears:
        leader = collector.leader_of(name)
        if leader != name:
            continue
        if name not in stats:
            device = next(iter(stats.values()))._sum.device if stats else "cpu"
            stats[name] = HessianStats(weight_matrix(linears[name]).shape[1], device=device)
        _all_reduce_accumulator(stats[name])


def _all_reduce_accumulator(acc: HessianStats) -> None:
    """Sum one accumulator's Hessian sum and token count over all ranks."""
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
    block,
    targets_here,
    batches,
    run,
    solver,
    solver_options,
    report,
    device,
    rank: int = 0,
    world: int = 1,
    experts_here: dict | None = None,
) -> None:
    """Accumulate the Hessians of this block's target linears, solve each layer and write it back."""
    linears = {name: module for name, (module, _) in targets_here.items()}
    collector = StatsCollector(linears, device)
    expert_collector = ExpertStatsCollector({n: p for n, (p, _) in (experts_here or {}).items()}, device)
    if batches:
        with collector, expert_collector:
            for b, batch in enumerate(batches):
                collector.start_batch(batch.attention_mask)
                expert_collector.start_batch(batch.attention_mask)
                run([b], keep=False)
                collector.end_batch()
    stats = collector.stats
    if experts_here:
        _prune_experts(experts_here, expert_collector, bool(batches), solver, solver_options, report, device, world)
    if world > 1:
        _all_reduce_stats(stats, collector, linears)
    # Jobs: layers sharing a Hessian and a pattern are solved together when the solver can (one factorisation,
    # one column sweep for q/k/v or gate/up). Jobs are split across ranks round robin and broadcast.
    jobs: dict[tuple, list[str]] = {}
    joint = "row_groups" in inspect.signature(solver).parameters
    for name, (module, pattern) in targets_here.items():
        group = stats.get(collector.leader_of(name))
        if batches and (group is None or group.nsamples == 0):
            report.skipped[name] = "received no calibration tokens (never called in the forward pass)"
            logger.warning("%s received no calibration tokens and was left dense", name)
            continue
        key = (collector.leader_of(name), str(pattern)) if joint else (name,)
        jobs.setdefault(key, []).append(name)
    for index, names in enumerate(jobs.values()):
        t0 = time.perf_counter()
        modules = [targets_here[n][0] for n in names]
        pattern = targets_here[names[0]][1]
        group = stats.get(collector.leader_of(names[0]))
        hessian = group.hessian if group is not None else None
        originals = [read_weight_matrix(m, device) for m in modules]
        stacked = originals[0] if len(originals) == 1 else torch.cat(originals)
        options = dict(solver_options, row_groups=[o.shape[0] for o in originals]) if len(names) > 1 else solver_options
        owner = index % world
        if world == 1:
            pruned = solver(stacked, hessian, pattern, name=",".join(names), **options)
        else:
            pruned, failure = torch.empty_like(stacked), None
            if rank == owner:
                try:
                    pruned = solver(stacked, hessian, pattern, name=",".join(names), **options)
                except Exception as err:  # every rank must learn of it, or the others wait in broadcast forever
                    failure = err
            flag = torch.tensor([1.0 if failure is not None else 0.0], device=stacked.device)
            torch.distributed.all_reduce(flag)
            if flag.item():
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank {owner} failed to prune {', '.join(names)}; see its error message")
            torch.distributed.broadcast(pruned, src=owner)
        seconds = (time.perf_counter() - t0) / len(names)
        for name, module, original, part in zip(
            names, modules, originals, pruned.split([o.shape[0] for o in originals])
        ):
            written = write_weight_matrix(module, part).to(device)
            report.layers.append(_layer_result(name, original, written, hessian, pattern, seconds))


def _prune_experts(experts_here, collector, calibrated, solver, solver_options, report, device, world) -> None:
    """Solve every expert slice of the block's 3-D expert weights with the Hessian of its own routed tokens.

    Under several processes the per-expert statistics are all-reduced in a fixed order and every rank solves
    every expert (deterministic, so the ranks agree without a broadcast).
    """
    joint = "row_groups" in inspect.signature(solver).parameters
    for name, (param, pattern) in experts_here.items():
        for expert in range(param.num_experts):
            key = (name, expert)
            if world > 1:
                _all_reduce_accumulator(collector.stats.setdefault(key, HessianStats(param.in_features, device=device)))
            acc = collector.stats.get(key)
            label = f"{name}.{expert}"
            if calibrated and (acc is None or acc.nsamples == 0):
                report.skipped[label] = "expert received no calibration tokens (never routed to)"
                continue
            t0 = time.perf_counter()
            original = param.tensor[expert].detach().to(device=device, dtype=torch.float32, copy=True)
            hessian = acc.hessian if acc is not None else None
            options = dict(solver_options)
            if joint and param.param == "gate_up_proj":  # gate and up halves: each its own exact sparsity
                options["row_groups"] = [original.shape[0] // 2, original.shape[0] - original.shape[0] // 2]
            pruned = solver(original, hessian, pattern, name=label, **options)
            with torch.no_grad():
                param.tensor[expert].copy_(pruned.to(param.tensor.dtype))
            written = param.tensor[expert].detach().to(device)
            report.layers.append(_layer_result(label, original, written, hessian, pattern, time.perf_counter() - t0))


def _layer_result(name, original, written, hessian, pattern, seconds) -> LayerResult:
    """The report row of one pruned matrix: its sparsity as stored and its relative error on the calibration inputs."""
    error = _relative_error(original, written.float(), hessian) if hessian is not None else float("nan")
    return LayerResult(
        name=name,
        shape=tuple(original.shape),
        pattern=str(pattern),
        sparsity=float((written == 0).float().mean()),
        rel_error=error,
        seconds=seconds,
    )


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
