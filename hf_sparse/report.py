"""What a pruning run did, per layer, as data and as a table (for the CLI and the model card)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerResult", "PruningReport", "markdown_table"]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are shown with 4 significant digits."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class LayerResult:
    """One pruned linear layer."""

    name: str
    shape: tuple[int, int]
    pattern: str
    sparsity: float
    rel_error: float
    seconds: float


@dataclass
class PruningReport:
    """Per-layer results of :func:`hf_sparse.prune`, the skipped modules with reasons, and totals."""

    method: str
    pattern: str
    layers: list[LayerResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zero weights over all pruned layers (weighted by size)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    def by_group(self) -> dict[str, float]:
        """Sparsity per layer type (the last part of the name: q_proj, down_proj, ...), weighted by size."""
        totals: dict[str, list[float]] = {}
        for r in self.layers:
            key = r.name.rsplit(".", 1)[-1]
            size = r.shape[0] * r.shape[1]
            acc = totals.setdefault(key, [0.0, 0.0])
            acc[0] += r.sparsity * size
            acc[1] += size
        return {k: z / n for k, (z, n) in totals.items()}

    def to_table(self, max_rows: int | None = None) -> str:
        rows = [
            [r.name, f"{r.shape[0]}x{r.shape[1]}", r.pattern, f"{r.sparsity:.2%}", r.rel_error, f"{r.seconds:.2f}"]
            for r in self.layers
        ]
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [["...", "", "", "", "", ""]]
        table = markdown_table(["layer", "shape", "pattern", "sparsity", "rel. error", "time (s)"], rows)
        summary = (
            f"\n{self.method}, {self.pattern}: {len(self.layers)} layers pruned, overall sparsity "
            f"{self.overall_sparsity:.2%}, {self.seconds:.1f} s"
        )
        if self.skipped:
            summary += f"; {len(self.skipped)} skipped:"
            reasons: dict[str, list[str]] = {}
            for name, reason in self.skipped.items():
                reasons.setdefault(reason, []).append(name)
            for reason, names in reasons.items():
                shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
                summary += f"\n  - {reason}: {shown}"
        return table + summary

    def __str__(self) -> str:
        return self.to_table()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overall_sparsity"] = self.overall_sparsity
        return data
