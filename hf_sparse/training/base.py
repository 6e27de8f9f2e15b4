"""``SparsityCallback``: what every hf_sparse training callback shares.

Mask keeping, in the Trainer's order of events for one optimizer step::

    forward/backward (per micro-batch)  ->  clip  ->  on_pre_optimizer_step  ->  optimizer.step()
                                                        |  (subclass: read dense grads, update masks)
                                                        |  mask the gradients (optional)
    on_optimizer_step  ->  (subclass: pruning events)  ->  mask the weights  ->  scheduler, zero_grad, on_step_end

The weights are masked right after every ``optimizer.step()``, so no forward pass (of any
micro-batch of the next step, with or without mixed precision) ever sees an unmasked weight.
Masking the gradients as well keeps the optimizer's moments of pruned weights at zero; it does not
change the weights (they are masked anyway). Gradient clipping runs before our hook, so the logged
``grad_norm`` includes the pruned entries' gradients.

Persistence: the small state goes through ``ExportableState`` (``trainer_state.json``); the masks
(and any score accumulators) go to ``checkpoint-{step}/hf_sparse_masks.pt`` at ``on_save`` and
are read back at ``on_train_begin`` when the run resumes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .integration import (
    callback_handler_of_caller,
    find_targets,
    is_transposed,
    load_payload,
    move_before_reporters,
    refuse_deepspeed,
    refuse_fsdp1,
    resume_checkpoint_of_caller,
    save_payload,
    unwrap_model,
)
from .masks import MaskSet, gather_like, shard_like

logger = logging.getLogger(__name__)

__all__ = ["SparsityCallback"]


class SparsityCallback(TrainerCallback, ExportableState):
    """Base class: finds the target linears, keeps their masks applied, logs and checkpoints them.

    Subclasses set the masks (``initial_masks``) and may change them during training
    (``before_optimizer_step`` / ``after_optimizer_step``). ``init_args`` lists the constructor
    arguments saved in ``trainer_state.json`` (JSON values only) and ``state_attributes`` the
    attributes restored on resume.

    Args:
        targets: names/globs/``re:`` regexes of the linears to sparsify (default: all linears of the
            decoder blocks; embeddings and ``lm_head`` are never touched).
        ignore: names/globs/``re:`` regexes of linears to leave alone.
        mask_gradients: also zero the gradients of pruned weights before ``optimizer.step()``.
        log_sparsity: add ``sparsity/overall`` and ``sparsity/<group>`` to the Trainer logs.
    """

    init_args: tuple[str, ...] = ("targets", "ignore", "mask_gradients", "log_sparsity")
    state_attributes: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        mask_gradients: bool = True,
        log_sparsity: bool = True,
    ) -> None:
        self.targets = list(targets) if targets else None
        self.ignore = list(ignore) if ignore else None
        self.mask_gradients = mask_gradients
        self.log_sparsity = log_sparsity
        self.masks: MaskSet | None = None
        self.modules: dict[str, nn.Module] = {}
        self.transposed: dict[str, bool] = {}
        self.restored_from: str | None = None

    # --- ExportableState -----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {name: getattr(self, name) for name in self.init_args},
            "attributes": {name: getattr(self, name) for name in self.state_attributes},
        }

    def _restore_attributes(self, saved: dict | list | None) -> None:
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        for name, value in ((saved or {}).get("attributes") or {}).items():
            if name in self.state_attributes:
                setattr(self, name, value)

    # --- hooks for subclasses ----------------------------------------------------------------
    def initial_masks(self, args, state, model: nn.Module, **kwargs: Any) -> MaskSet:
        """The masks at the start of a fresh run (default: keep the weights that are non-zero)."""
        return MaskSet.from_zeros(self.weights())

    def setup(self, args, state, model: nn.Module, **kwargs: Any) -> None:
        """Resolve settings that need the run (``max_steps``); called before masks are made or loaded."""

    def after_begin(self, args, state, model: nn.Module, **kwargs: Any) -> None:
        """Called once the masks are in place at ``on_train_begin``."""

    def before_optimizer_step(self, step: int, args, state, **kwargs: Any) -> None:
        """Gradients of optimizer step ``step`` exist (after accumulation, all-reduce and clipping)."""

    def after_optimizer_step(self, step: int, args, state, **kwargs: Any) -> None:
        """``optimizer.step()`` of step ``step`` is done; the masks are applied right after this."""

    def extra_state(self) -> dict[str, Any]:
        """Tensors to save beside the masks (collective for sharded weights)."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved."""

    # --- helpers -----------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        return {name: module.weight for name, module in self.modules.items()}

    def full_matrix(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole ``[out, in]`` matrix of a local per-parameter tensor of ``name``."""
        full = gather_like(local, self.modules[name].weight)
        return full.t() if self.transposed[name] else full

    def set_prune_matrix(self, name: str, prune: torch.Tensor) -> None:
        """Set the mask of ``name`` from a full ``[out, in]`` ``True = prune`` matrix."""
        self.masks.set_from_prune_mask(name, prune.t() if self.transposed[name] else prune)

    def local_from_matrix(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """This rank's piece (parameter layout) of a full ``[out, in]`` matrix of ``name``."""
        return shard_like(matrix.t() if self.transposed[name] else matrix, self.modules[name].weight)

    def sparsity_logs(self) -> dict[str, float]:
        """``sparsity/overall`` and ``sparsity/<group>`` of the masks, rounded for the logs."""
        values = {"sparsity/overall": round(self.masks.sparsity(), 6)}
        for group, value in sorted(self.masks.group_sparsity().items()):
            values[f"sparsity/{group}"] = round(value, 6)
        return values

    # --- TrainerCallback events --------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        refuse_deepspeed(args)
        move_before_reporters(self, callback_handler_of_caller())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(f"{type(self).__name__} needs the model (the Trainer passes it to callbacks)")
        refuse_deepspeed(args)
        refuse_fsdp1(model)
        move_before_reporters(self, callback_handler_of_caller())
        model = unwrap_model(model)
        self.modules = find_targets(model, self.targets, self.ignore)
        self.transposed = {name: is_transposed(module) for name, module in self.modules.items()}
        resumed_from = resume_checkpoint_of_caller(args, state)
        payload = load_payload(resumed_from, type(self).__name__) if resumed_from else None
        if state.global_step > 0:
            self._restore_attributes(state.stateful_callbacks.get(type(self).__name__))
        self.setup(args, state, model, **kwargs)
        if payload is not None:
            self._restore_attributes(payload.get("state"))
            self.masks = MaskSet()
            for name, weight in self.weights().items():
                self.masks.add(name, weight)
            self.masks.load_state_dict(payload["masks"])
            self.load_extra_state(payload.get("extra") or {})
            self.restored_from = resumed_from
            logger.info("%s: restored masks from %s", type(self).__name__, resumed_from)
        elif state.global_step > 0:
            logger.warning(
                "%s: resuming at step %d but no %s was found; rebuilding the masks from the zeros of the weights",
                type(self).__name__,
                state.global_step,
                "hf_sparse_masks.pt",
            )
            self.masks = MaskSet.from_zeros(self.weights())
        else:
            self.masks = self.initial_masks(args, state, model, **kwargs)
        self.masks.broadcast()
        self.masks.apply()
        self.after_begin(args, state, model, **kwargs)
        logger.info(
            "%s: %d layers, sparsity %.4f", type(self).__name__, len(self.masks), self.masks.sparsity()
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is None:
            return
        self.before_optimizer_step(state.global_step + 1, args, state, **kwargs)
        if self.mask_gradients:
            self.masks.apply_to_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is None:
            return
        self.after_optimizer_step(state.global_step + 1, args, state, **kwargs)
        self.masks.apply()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_sparsity or self.masks is None:
            return
        values = self.sparsity_logs()
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if self.masks is None:
            return
        payload = {"masks": self.masks.state_dict(), "state": self.state(), "extra": self.extra_state()}
        if args.should_save:
            import os

            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_payload(folder, type(self).__name__, payload)
