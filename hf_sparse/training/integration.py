"""The small, Trainer-specific glue the callbacks need: targets, distributed helpers, checkpoints.

Kept apart from the callbacks so that the parts that depend on ``transformers``/``accelerate``
internals (the callback order, where a resumed checkpoint lives) are in one place.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import torch
from torch import nn

from ..modules import NameMatcher, TRANSPOSED_WEIGHT_TYPES, find_decoder_blocks, find_linears

logger = logging.getLogger(__name__)

MASKS_FILE = "hf_sparse_masks.pt"
"""File written into every ``checkpoint-{step}`` folder with the masks and the callback state."""


# --- models and targets ---------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP / ``DataParallel`` wrappers (their parameters are the same tensors)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def find_targets(
    model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The prunable linears of the decoder blocks (PEFT ``base_layer``s included, adapters excluded).

    ``targets``/``ignore`` take names, globs or ``re:`` regexes (see ``hf_sparse.modules.name_matches``);
    an entry that matches nothing is reported, and no layer at all is an error.
    """
    blocks_name, blocks = find_decoder_blocks(unwrap_model(model))
    target_matcher = NameMatcher(targets) if targets else None
    ignore_matcher = NameMatcher(ignore)
    chosen: dict[str, nn.Module] = {}
    for index, block in enumerate(blocks):
        for name, module in find_linears(block, f"{blocks_name}.{index}").items():
            if target_matcher is not None and target_matcher.first_match(name) is None:
                continue
            if ignore_matcher.first_match(name) is not None:
                continue
            chosen[name] = module
    for unused in ignore_matcher.unused():
        logger.warning("ignore entry %r matched no module", unused)
    if target_matcher is not None:
        for unused in target_matcher.unused():
            logger.warning("targets entry %r matched no module", unused)
    if not chosen:
        raise ValueError("no layer to sparsify: every linear layer was excluded by targets/ignore")
    return chosen


def is_transposed(module: nn.Module) -> bool:
    """Does ``module.weight`` store ``[in, out]`` (GPT-2 ``Conv1D``)?"""
    return isinstance(module, TRANSPOSED_WEIGHT_TYPES)


# --- distributed ----------------------------------------------------------------------------

def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if dist_ready() else 1


def rank() -> int:
    return torch.distributed.get_rank() if dist_ready() else 0


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of plain tensors into every rank (no-op on one process)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=src)


def refuse_deepspeed(args) -> None:
    """Raise if the run uses DeepSpeed: its ZeRO partitions hide the weights from the callbacks.

    DeepSpeed keeps flattened fp32 master partitions inside its engine and copies them into the
    module after each step, so masks applied to the module's parameters would be overwritten and the
    model would silently train dense. Refusing is better than a dense model that claims to be sparse.
    """
    reason = None
    if getattr(args, "deepspeed", None):
        reason = "TrainingArguments(deepspeed=...) is set"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        reason = "ACCELERATE_USE_DEEPSPEED is set"
    else:
        try:
            from accelerate.state import AcceleratorState
            from accelerate.utils import DistributedType

            shared = AcceleratorState._shared_state
            if shared.get("distributed_type") == DistributedType.DEEPSPEED or shared.get("deepspeed_plugins"):
                reason = "accelerate runs with a DeepSpeed plugin"
        except Exception:  # accelerate absent or not initialised: nothing to detect
            pass
    if reason:
        raise RuntimeError(
            f"hf_sparse training callbacks do not support DeepSpeed ({reason}): ZeRO keeps its own copies of "
            "the weights, so masks cannot be enforced and the model would silently train dense. Use DDP or "
            "FSDP2 (accelerate launch --config_file examples/accelerate_fsdp.yaml) instead."
        )


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise for FSDP1 (``FullyShardedDataParallel``): its flat parameters do not map to weights."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise RuntimeError(
            "hf_sparse training callbacks support FSDP2 (fsdp_version: 2, per-parameter DTensor shards), not "
            "FSDP1's flattened parameters; set fsdp_version: 2 in the accelerate config"
        )


# --- the Trainer around us (best effort, documented fallbacks) --------------------------------

def _caller_locals():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame.f_locals
        frame = frame.f_back


def callback_handler_of_caller():
    """The ``CallbackHandler`` that is calling us (found on the call stack), or ``None``."""
    from transformers.trainer_callback import CallbackHandler

    for local in _caller_locals():
        candidate = local.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
    return None


def move_before_reporters(callback, handler) -> bool:
    """Put ``callback`` before the reporting integrations (TensorBoard, W&B, ...) in ``handler``.

    The Trainer runs callbacks in list order and adds user callbacks *after* the reporters, so
    values a callback adds to ``logs`` in ``on_log`` would never reach TensorBoard or W&B.
    """
    if handler is None or callback not in handler.callbacks:
        return False
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        reporter_types = tuple(set(INTEGRATION_TO_CALLBACK.values()))
    except Exception:  # pragma: no cover
        return False
    callbacks = handler.callbacks
    first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, reporter_types)), None)
    mine = callbacks.index(callback)
    if first is not None and first < mine:
        callbacks.insert(first, callbacks.pop(mine))
    return True


def resume_checkpoint_of_caller(args, state) -> str | None:
    """The checkpoint folder this run resumed from, if any.

    Looks for (1) the ``resume_from_checkpoint`` the Trainer is using (on the call stack), (2)
    ``args.resume_from_checkpoint``, (3) ``{output_dir}/checkpoint-{global_step}``.
    """
    if not state.global_step:
        return None
    candidates = []
    for local in _caller_locals():
        value = local.get("resume_from_checkpoint")
        if isinstance(value, str):
            candidates.append(value)
            break
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(args.resume_from_checkpoint)
    candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, MASKS_FILE)):
            return folder
    return None


def save_payload(folder: str, key: str, payload: dict) -> None:
    """Add ``payload`` under ``key`` to ``folder/hf_sparse_masks.pt`` (several callbacks may share it)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MASKS_FILE)
    content = torch.load(path, weights_only=True) if os.path.isfile(path) else {}
    content[key] = payload
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(content, tmp)
    os.replace(tmp, path)


def load_payload(folder: str, key: str) -> dict | None:
    path = os.path.join(folder, MASKS_FILE)
    if not os.path.isfile(path):
        return None
    return torch.load(path, weights_only=True).get(key)
