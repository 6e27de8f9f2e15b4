"""The generated model card (README.md) of a sparse checkpoint: YAML front matter and a readable body.

Everything comes from ``sparsity_config`` (what was done), optional layer sizes (to weight the
per-group sparsity), and optional evaluation ``results``; nothing is invented when a piece is missing.
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import ModelCardData

from ..report import markdown_table

__all__ = ["build_model_card", "group_sparsity", "looks_like_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str | None) -> bool:
    """``"org/name"`` (a Hub id), as opposed to a local path or an empty name."""
    return bool(name) and _REPO_ID.match(name) is not None and not name.startswith((".", "/"))


def group_sparsity(
    per_module: dict[str, dict[str, Any]], sizes: dict[str, int] | None = None
) -> dict[str, tuple[str, float, int]]:
    """``{layer type: (patterns, sparsity, count)}`` grouped by the last name part (q_proj, down_proj, ...).

    Sparsity is weighted by layer size when ``sizes`` is given, else a plain mean.
    """
    acc: dict[str, list[Any]] = {}
    for name, entry in per_module.items():
        key = name.rsplit(".", 1)[-1]
        weight = float((sizes or {}).get(name, 1))
        slot = acc.setdefault(key, [set(), 0.0, 0.0, 0])
        slot[0].add(str(entry.get("pattern")))
        slot[1] += float(entry.get("sparsity", 0.0)) * weight
        slot[2] += weight
        slot[3] += 1
    return {k: (", ".join(sorted(p)), z / n if n else 0.0, c) for k, (p, z, n, c) in acc.items()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _results_table(section: dict[str, Any]) -> str:
    """A flat ``{name: number}`` becomes two columns; ``{name: {column: number}}`` a grid."""
    if all(isinstance(v, dict) for v in section.values()):
        columns: list[str] = []
        for row in section.values():
            columns += [c for c in row if c not in columns]
        rows = [[name] + [_fmt(row.get(c, "")) for c in columns] for name, row in section.items()]
        return markdown_table([""] + columns, rows)
    return markdown_table(["", "value"], [[k, _fmt(v)] for k, v in section.items()])


def build_model_card(
    sparsity_config: dict[str, Any],
    *,
    base_model: str | None = None,
    results: dict[str, Any] | None = None,
    sizes: dict[str, int] | None = None,
    storage_format: str = "dense",
    title: str | None = None,
) -> str:
    """The README.md text for a checkpoint described by ``sparsity_config``.

    Args:
        sparsity_config: the ``config.sparsity_config`` dict written by :func:`hf_sparse.prune`.
        base_model: the Hub id of the dense model, if known (goes into the front matter).
        results: ``{"perplexity": {...}, "zero_shot": {...}}``; each section a flat
            ``{name: value}`` or a grid ``{row: {column: value}}``.
        sizes: number of weights per module name, to weight the per-group sparsity.
        storage_format: ``"dense"`` or ``"compressed"`` (changes the loading instructions).
    """
    method = str(sparsity_config.get("method", "unknown"))
    pattern = str(sparsity_config.get("pattern", "?"))
    tags = ["sparse", "hf-sparse", method]
    if ":" in pattern:
        tags.append(f"{pattern}-sparsity")
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model if looks_like_repo_id(base_model) else None,
        tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-generation",
    )
    lines = ["---", data.to_yaml(), "---", ""]
    lines.append(f"# {title or (base_model + ' (sparse)' if base_model else 'Sparse model')}")
    lines.append("")
    origin = f" of [{base_model}](https://huggingface.co/{base_model})" if looks_like_repo_id(base_model) else ""
    lines.append(f"A pruned version{origin}, made with hf_sparse {sparsity_config.get('version', '')}.")
    lines.append("")
    lines.append(f"- **Method:** {method}")
    lines.append(
        f"- **Pattern:** {pattern}"
        + (" (at most N non-zeros in every M consecutive inputs)" if ":" in pattern else " (unstructured)")
    )
    overall = sparsity_config.get("overall_sparsity")
    if overall is not None:
        lines.append(f"- **Overall sparsity of the pruned layers:** {float(overall):.2%}")
    lines.append(f"- **Storage format:** {storage_format}")
    calibration = sparsity_config.get("calibration") or {}
    if calibration:
        lines.append("- **Calibration:** " + ", ".join(f"{k} = {v}" for k, v in calibration.items()))
    options = sparsity_config.get("solver_options") or {}
    if options:
        lines.append("- **Solver options:** " + ", ".join(f"{k} = {v}" for k, v in options.items()))
    if sparsity_config.get("ignore"):
        lines.append("- **Kept dense:** " + ", ".join(f"`{p}`" for p in sparsity_config["ignore"]))
    lines.append("")

    per_module = sparsity_config.get("per_module") or {}
    if per_module:
        lines += ["## Sparsity by layer group", ""]
        groups = group_sparsity(per_module, sizes)
        lines.append(
            markdown_table(
                ["layer", "pattern", "sparsity", "layers"],
                [[k, p, f"{s:.2%}", c] for k, (p, s, c) in groups.items()],
            )
        )
        lines.append("")

    results = dict(results or {})
    if "perplexity" not in results and isinstance(sparsity_config.get("perplexity"), dict):
        results["perplexity"] = sparsity_config["perplexity"]
    for key, heading in (("perplexity", "Perplexity"), ("zero_shot", "Zero-shot accuracy")):
        section = results.get(key)
        if section:
            lines += [f"## {heading}", "", _results_table(section), ""]

    lines += ["## How to load", ""]
    if storage_format == "compressed":
        lines += [
            "This checkpoint uses hf_sparse's compressed format (kept values plus a bitmask, or N:M values plus",
            "per-group metadata). It needs the plugin; plain `transformers` refuses it with an error naming `hf_sparse`.",
            "",
            "```python",
            "import hf_sparse",
            'model = hf_sparse.from_pretrained("<this repo>")  # decompresses, checks every CRC32 and the sparsity',
            "```",
            "",
            "To get a checkpoint that loads without the plugin, save it again in the dense format:",
            '`hf_sparse.save_sparse(model, "out", format="dense")`.',
        ]
    else:
        lines += [
            "The weights are stored dense with the zeros in place, so any `transformers` user can load them:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("<this repo>")',
            "```",
            "",
            "With the plugin, loading also checks the recorded sparsity and restores CATS activation sparsity if present:",
            "",
            "```python",
            "import hf_sparse",
            'model = hf_sparse.from_pretrained("<this repo>")',
            "```",
        ]
    if ":" in pattern:
        lines += [
            "",
            "On GPUs with compute capability 8.0 or newer, `hf_sparse.export_semi_structured(model)` (fp16/bf16, CUDA)",
            "turns the 2:4 weights into PyTorch semi-structured sparse tensors for faster inference.",
        ]
    lines += ["", "The full pruning record is in `config.json` under `sparsity_config`.", ""]
    return "\n".join(lines)
