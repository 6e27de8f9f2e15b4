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
    "LayerResult",
    "PruningReport",
    "SOLVERS",
    "get_solver",
    "register_solver",
]
