"""hf_sparse: make Hugging Face causal LMs sparse without losing their quality.

One-shot layerwise pruning (SparseGPT, OBC, Wanda, magnitude; unstructured and N:M) driven by
calibration data, with reports and metadata that travel with the checkpoint.
"""

__version__ = "0.1.0"

from .calibration import calibration_data
from .cats import (
    CATSCallback,
    SparsityReport,
    apply_cats,
    apply_cats_from_config,
    apply_teal,
    cats_thresholds,
    is_cats_applied,
    measure_cats_sparsity,
    remove_cats,
)
from .distill import DistillationArguments, DistillationTrainer
from .estimate import MemoryEstimate, estimate_memory
from .engine import prune
from .metrics import perplexity
from .modules import find_gated_mlps
from .patterns import NM, Unstructured, parse_pattern
from .persistence import (
    CompressedCheckpointError,
    SparsityMismatchError,
    export_semi_structured,
    from_pretrained,
    load_sparse,
    push_to_hub,
    save_sparse,
)
from .report import LayerResult, PruningReport
from .solvers import SOLVERS, get_solver, register_solver
from .training import (
    ConstantSparsityCallback,
    GradualPruningCallback,
    MaskSet,
    OneShotPruningCallback,
    RigLCallback,
    merge_lora,
)

__all__ = [
    "__version__",
    "calibration_data",
    "apply_cats",
    "remove_cats",
    "apply_cats_from_config",
    "measure_cats_sparsity",
    "CATSCallback",
    "apply_teal",
    "SparsityReport",
    "is_cats_applied",
    "cats_thresholds",
    "find_gated_mlps",
    "DistillationArguments",
    "DistillationTrainer",
    "MemoryEstimate",
    "estimate_memory",
    "prune",
    "perplexity",
    "NM",
    "Unstructured",
    "parse_pattern",
    "save_sparse",
    "load_sparse",
    "from_pretrained",
    "push_to_hub",
    "export_semi_structured",
    "CompressedCheckpointError",
    "SparsityMismatchError",
    "LayerResult",
    "PruningReport",
    "OneShotPruningCallback",
    "ConstantSparsityCallback",
    "GradualPruningCallback",
    "RigLCallback",
    "MaskSet",
    "merge_lora",
    "SOLVERS",
    "get_solver",
    "register_solver",
]

_LAZY = {
    "evaluate_model": "hf_sparse.evaluation",
    "run_zero_shot": "hf_sparse.evaluation",
    "apply_relu": "hf_sparse.evaluation",
    "remove_relu": "hf_sparse.evaluation",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    """Evaluation helpers load on first use (they pull in lm-eval and matplotlib)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_sparse' has no attribute {name!r}")
