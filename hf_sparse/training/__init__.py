"""Sparse fine-tuning with ``transformers.Trainer`` callbacks (also under accelerate DDP/FSDP2 and with PEFT).

- :class:`OneShotPruningCallback`: prune at the start of training with SparseGPT/Wanda/..., keep the masks.
- :class:`ConstantSparsityCallback`: keep the zeros of an already-sparse model zero.
- :class:`GradualPruningCallback`: cubic/linear schedule with magnitude/movement/taylor/fisher criteria.
- :class:`RigLCallback`: dynamic sparse training (RigL / SET) at fixed sparsity.
- :func:`merge_lora`: merge LoRA adapters into a sparse base without losing its zeros.
"""

from .callbacks import ConstantSparsityCallback, GradualPruningCallback, OneShotPruningCallback, RigLCallback
from .base import SparsityCallback
from .criteria import CRITERIA, get_criterion, select_prune_masks
from .lora import merge_lora
from .masks import MaskSet
from .schedules import SparsitySchedule, cubic_sparsity, linear_sparsity

__all__ = [
    "OneShotPruningCallback",
    "ConstantSparsityCallback",
    "GradualPruningCallback",
    "RigLCallback",
    "SparsityCallback",
    "MaskSet",
    "SparsitySchedule",
    "cubic_sparsity",
    "linear_sparsity",
    "CRITERIA",
    "get_criterion",
    "select_prune_masks",
    "merge_lora",
]
