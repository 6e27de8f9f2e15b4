"""Knowledge distillation to recover sparse models: chunked KD losses and a drop-in Trainer."""

from .losses import (
    KD_LOSSES,
    causal_target_mask,
    count_target_tokens,
    distillation_loss_sums,
    forward_kl,
    generalized_jsd,
    naive_distillation_loss_sums,
    reverse_kl,
    squarehead_loss_sum,
    token_kd_loss,
)
from .trainer import DistillationArguments, DistillationTrainer

__all__ = [
    "DistillationArguments",
    "DistillationTrainer",
    "KD_LOSSES",
    "causal_target_mask",
    "count_target_tokens",
    "distillation_loss_sums",
    "forward_kl",
    "generalized_jsd",
    "naive_distillation_loss_sums",
    "reverse_kl",
    "squarehead_loss_sum",
    "token_kd_loss",
]
