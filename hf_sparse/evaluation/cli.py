"""lm-eval's command line with the ``hf-sparse`` model type registered.

lm-evaluation-harness 0.4 has no plugin discovery for model types, so ``lm_eval --model hf-sparse``
cannot find it on its own. This wrapper imports :mod:`hf_sparse.evaluation.lm_eval_model` (which
registers ``hf-sparse``) and then runs lm-eval's own CLI with the same arguments::

    python -m hf_sparse.evaluation.cli --model hf-sparse \\
        --model_args pretrained=meta-llama/Llama-2-7b-hf,dtype=bfloat16,prune=sparsegpt:2:4 \\
        --tasks winogrande,piqa --batch_size 16 --output_path results/
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lm_eval`` with ``argv`` (default: this process's arguments) after registering ``hf-sparse``."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the "hf-sparse" model type)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
