"""Persistence of sparse models: save (dense or compressed), load with checks, push to the Hub, export.

- :func:`save_sparse` / :func:`load_sparse` (alias :func:`from_pretrained`) / :func:`push_to_hub`: see :mod:`.hub`;
- the compressed format: :mod:`.codec` (tensors) and :mod:`.compress` (checkpoint files);
- ``sparsity_config`` measuring and checking: :mod:`.sparsity`; the model card: :mod:`.card`;
- :func:`export_semi_structured`: 2:4 weights to PyTorch semi-structured sparse tensors (CUDA, sm80+).

See docs/persistence.md.
"""

from .card import build_model_card
from .compress import CompressedCheckpointError
from .hub import FORMATS, from_pretrained, load_sparse, push_to_hub, save_sparse
from .semi_structured import export_semi_structured
from .sparsity import SparsityMismatchError, check_sparsity, ensure_sparsity_config, measure_sparsity

__all__ = [
    "FORMATS",
    "CompressedCheckpointError",
    "SparsityMismatchError",
    "build_model_card",
    "check_sparsity",
    "ensure_sparsity_config",
    "export_semi_structured",
    "from_pretrained",
    "load_sparse",
    "measure_sparsity",
    "push_to_hub",
    "save_sparse",
]
