"""Calibration batches and the capture of every decoder block's real call arguments.

Blocks are temporarily replaced by identity stubs, so one cheap pass through the model (embeddings
and mask construction only) records the hidden states entering block 0 and, for every block, the
exact positional and keyword arguments the model passes it (attention masks, position ids, rotary
embeddings, per-layer sliding-window masks). Nothing is hard-coded per architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "CalibrationBatch",
    "as_batches",
    "max_sequence_length",
    "check_calibration",
    "BlockCalls",
    "capture_block_calls",
    "to_device",
    "input_device",
    "block_output",
]


@dataclass
class CalibrationBatch:
    """Token ids ``[B, T]`` and an optional 0/1 attention mask (padding excluded from statistics)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


def as_batches(calibration: Any, batch_size: int) -> list[CalibrationBatch]:
    """Normalise calibration input: a ``[N, T]`` tensor, a list of tensors, or dicts/batches with ``input_ids``."""
    if calibration is None:
        raise ValueError(
            "calibration data is required for this method: pass token ids [nsamples, seqlen], e.g. "
            "hf_sparse.calibration_data(texts, tokenizer, nsamples=128, seqlen=2048)"
        )
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise ValueError(
                f"calibration token ids must be a non-empty [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}"
            )
        if calibration.is_floating_point():
            raise ValueError("calibration must hold integer token ids, got a floating-point tensor")
        return [CalibrationBatch(chunk) for chunk in calibration.split(batch_size)]
    batches = []
    for item in calibration:
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"calibration batches need 'input_ids' (got keys {sorted(item)})")
            ids, mask = torch.as_tensor(item["input_ids"]), item.get("attention_mask")
        else:
            ids, mask = torch.as_tensor(item), None
        if ids.is_floating_point():
            raise ValueError("calibration must hold integer token ids, got a floating-point tensor")
        mask = None if mask is None else torch.as_tensor(mask)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}"
            )
        if ids.numel() == 0:
            continue
        masks = [None] * len(ids.split(batch_size)) if mask is None else list(mask.split(batch_size))
        batches += [CalibrationBatch(chunk.long(), m) for chunk, m in zip(ids.split(batch_size), masks)]
    if not batches:
        raise ValueError("calibration data is empty: no token ids were given")
    return batches


def max_sequence_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow (``None`` when the config does not say)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_calibration(model: nn.Module, batches: list[CalibrationBatch]) -> None:
    limit = max_sequence_length(model)
    longest = max(b.input_ids.shape[1] for b in batches)
    if limit is not None and longest > limit:
        raise ValueError(
            f"calibration sequences have {longest} tokens but {type(model).__name__} allows at most {limit} "
            f"positions; use seqlen <= {limit}"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        top = max(int(b.input_ids.max()) for b in batches)
        low = min(int(b.input_ids.min()) for b in batches)
        if top >= vocab or low < 0:
            raise ValueError(
                f"calibration token ids range over [{low}, {top}] but the model's vocabulary has {vocab} entries; "
                "tokenize with the model's own tokenizer"
            )


class _StopForward(Exception):
    """Raised by a stub to end the capture pass early."""


@dataclass
class BlockCalls:
    """Per calibration batch: the hidden states entering block 0, and every block's other arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)  # [block][batch] -> positional args after hidden
    kwargs: list[list[dict]] = field(default_factory=list)  # [block][batch] -> keyword args
    returns_tuple: bool = False


def _dedup(value: Any, seen: list[torch.Tensor]) -> Any:
    """Share equal tensors (masks, rotary tables) between batches and blocks instead of storing copies."""
    if isinstance(value, torch.Tensor):
        for other in seen:
            if other.shape == value.shape and other.dtype == value.dtype and other.device == value.device:
                if other is value or torch.equal(other, value):
                    return other
        seen.append(value)
        return value
    if isinstance(value, tuple):
        return tuple(_dedup(v, seen) for v in value)
    if isinstance(value, list):
        return [_dedup(v, seen) for v in value]
    if isinstance(value, dict):
        return {k: _dedup(v, seen) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    from .offload import execution_device

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


def _model_inputs(batch: CalibrationBatch, device: torch.device) -> dict[str, Any]:
    inputs = {"input_ids": batch.input_ids.to(device), "use_cache": False}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask.to(device)
    return inputs


@torch.no_grad()
def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, batches: list[CalibrationBatch], store: torch.device
) -> BlockCalls:
    """Run the model with identity stubs for blocks, recording every block's real call arguments."""
    calls = BlockCalls(args=[[] for _ in blocks], kwargs=[[] for _ in blocks])
    device = input_device(model)
    seen: list[torch.Tensor] = []

    # Block 0's real output type (tensor, or a tuple in older/remote-code models) decides the stubs' return.
    first: dict[str, Any] = {}

    def grab_first(module, args, kwargs):
        first["args"], first["kwargs"] = args, kwargs
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab_first, with_kwargs=True)
    try:
        model(
            **_model_inputs(CalibrationBatch(batches[0].input_ids[:1], _first_row(batches[0].attention_mask)), device)
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in first:
        raise RuntimeError("the model's forward never reached its first decoder block")
    calls.returns_tuple = isinstance(blocks[0](*first["args"], **first["kwargs"]), tuple)

    def make_stub(index: int):
        def stub(*args, **kwargs):
            hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                calls.hidden.append(hidden.detach().to(store))
            calls.args[index].append(_dedup(to_device(rest, store), seen))
            calls.kwargs[index].append(_dedup(to_device(kwargs, store), seen))
            if index == len(blocks) - 1:
                raise _StopForward
            return (hidden,) if calls.returns_tuple else hidden

        return stub

    # A block may already carry an instance-level forward (accelerate's offload hooks wrap it so); keep it.
    wrapped = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = make_stub(index)
    try:
        for batch in batches:
            try:
                model(**_model_inputs(batch, device))
            except _StopForward:
                pass
    finally:
        for block, previous in zip(blocks, wrapped):
            if previous is not None:
                block.forward = previous
            else:
                del block.forward  # drop the instance attribute; the class's forward is back
    return calls


def _first_row(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[:1]


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
