"""``CATSCallback``: fine-tune a CATS model in a ``Trainer`` with frozen thresholds (as the paper does).

At ``on_train_begin`` it applies CATS if the model is not patched yet (from calibration tokens, or
from ``model.config.cats_config``), then counts the zeroed activations of every training forward
and adds their fraction to the logs as ``cats_sparsity``. The thresholds are plain numbers, not
parameters, so the optimizer never changes them; gradients flow through the kept entries only.
Works with PEFT/LoRA models: the patch goes through the MLP's own (possibly wrapped) projections.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from .calibrate import ActivationObserver
from .patch import apply_cats, apply_cats_from_config, is_cats_applied, set_observer

logger = logging.getLogger(__name__)

__all__ = ["CATSCallback"]


class CATSCallback(TrainerCallback):
    """Keep CATS active during training and log the activation sparsity.

    Args:
        sparsity: target sparsity if the callback has to apply CATS itself.
        calibration: calibration tokens for that case (see ``apply_cats``); without them the
            callback re-applies ``model.config.cats_config``.
        kernel: kernel setting passed to ``apply_cats``.
        log_sparsity: count zeroed activations during training and log ``cats_sparsity``.
    """

    def __init__(
        self, sparsity: float = 0.5, calibration: Any = None, *, kernel: str = "auto", log_sparsity: bool = True
    ):
        self.sparsity = sparsity
        self.calibration = calibration
        self.kernel = kernel
        self.log_sparsity = log_sparsity
        self._observer: ActivationObserver | None = None
        self.last_sparsity: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("CATSCallback needs the model (Trainer passes it to callbacks)")
        if not is_cats_applied(model):
            if self.calibration is not None:
                apply_cats(model, self.sparsity, self.calibration, kernel=self.kernel)
            elif getattr(getattr(model, "config", None), "cats_config", None):
                apply_cats_from_config(model)
            else:
                raise ValueError(
                    "CATSCallback: the model has no CATS patch; pass calibration tokens to the callback, "
                    "call apply_cats before training, or load a model whose config has cats_config"
                )
        if self.log_sparsity:
            self._observer = ActivationObserver()
            set_observer(model, self._observer)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._observer is None or not self._observer.totals:
            return
        fractions = self._observer.fractions()
        zeros = sum(float(self._observer.zeros[k].item()) for k in self._observer.zeros)
        total = sum(self._observer.totals.values())
        self._observer.reset_counts()
        if not fractions or total == 0:
            return
        self.last_sparsity = zeros / total
        if logs is not None:
            logs["cats_sparsity"] = round(self.last_sparsity, 4)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["cats_sparsity"] = round(self.last_sparsity, 4)
        logger.info("CATS: activation sparsity %.3f over the last logging window", self.last_sparsity)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self._observer is not None:
            set_observer(model, None)
        self._observer = None
