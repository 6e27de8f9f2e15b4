"""hf_sparse: make Hugging Face causal LMs sparse without losing their quality.

One-shot layerwise pruning (SparseGPT, OBC, Wanda, magnitude; unstructured and N:M) driven by
calibration data, with reports and metadata that travel with the checkpoint.
"""

__version__ = "0.1.0"

from .calibration import calibration_data
from .distill import DistillationArguments, DistillationTrainer
from .estimate import MemoryEstimate, estimate_memory
from .engine import prune
from .metrics import perplexity
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

__all__ = [
    "__version__",
    "calibration_data",
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
    "SOLVERS",
    "get_solver",
    "register_solver",
]
