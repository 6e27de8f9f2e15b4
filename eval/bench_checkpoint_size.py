"""Checkpoint size per storage format at 50% unstructured and 2:4 sparsity (the table in docs/persistence.md).

Uses the project's small "bench" Llama (trained once and cached; see hf_sparse.demo.model), casts it
to fp16 and bf16, prunes with magnitude (quick; the format does not depend on the method), saves it
dense and compressed, checks that the compressed round trip is bit-exact, and prints a Markdown table.

    python eval/bench_checkpoint_size.py [--dtypes float16 bfloat16] [--patterns 0.5 2:4]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import hf_sparse
from hf_sparse.demo.model import load_small_model
from hf_sparse.persistence import load_sparse, save_sparse
from hf_sparse.report import markdown_table


def weight_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def pruned_linear_bytes(model) -> tuple[int, int]:
    """(bytes of the pruned linear weights, bytes of all parameters) at the model's dtype."""
    record = model.config.sparsity_config["per_module"]
    modules = dict(model.named_modules())
    pruned = sum(modules[n].weight.numel() * modules[n].weight.element_size() for n in record)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return pruned, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    args = parser.parse_args()

    rows = []
    for dtype_name in args.dtypes:
        for pattern in args.patterns:
            model, _ = load_small_model("bench", progress=False)
            model = model.to(getattr(torch, dtype_name))
            hf_sparse.prune(model, None, "magnitude", pattern, progress=False)
            pruned, total = pruned_linear_bytes(model)
            with tempfile.TemporaryDirectory() as tmp:
                sizes = {}
                for fmt in ("dense", "compressed"):
                    path = os.path.join(tmp, fmt)
                    save_sparse(model, path, format=fmt, model_card=False)
                    sizes[fmt] = weight_bytes(path)
                loaded = load_sparse(os.path.join(tmp, "compressed"))
                exact = all(
                    torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                    for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
                )
            saved = sizes["dense"] - sizes["compressed"]
            rows.append(
                [
                    dtype_name,
                    pattern,
                    f"{sizes['dense'] / 2**20:.2f}",
                    f"{sizes['compressed'] / 2**20:.2f}",
                    f"{sizes['compressed'] / sizes['dense']:.1%}",
                    f"{(pruned - saved) / pruned:.1%}",
                    f"{pruned / total:.0%}",
                    "yes" if exact else "NO",
                ]
            )
    print(
        markdown_table(
            [
                "dtype",
                "pattern",
                "dense (MiB)",
                "compressed (MiB)",
                "compressed / dense",
                "pruned layers: compressed / dense",
                "pruned share of params",
                "bit-exact",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
