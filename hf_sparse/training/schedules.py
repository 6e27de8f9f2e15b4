"""Sparsity schedules for gradual pruning: cubic (Zhu & Gupta 2017) and linear.

Zhu & Gupta, "To prune, or not to prune" (2017), eq. 1:

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3    for t in {t_0, t_0 + dt, ..., t_0 + n*dt}

Sparsity rises fast while there are many redundant weights and slowly near the end. Pruning events
happen at ``start_step`` and then every ``frequency`` steps; the last event is at ``end_step`` (always
included, even when ``end_step - start_step`` is not a multiple of ``frequency``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SparsitySchedule", "cubic_sparsity", "linear_sparsity"]


def cubic_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's cubic ramp from ``initial`` (at ``start_step``) to ``final`` (at ``end_step`` and after)."""
    if step < start_step:
        return 0.0
    if step >= end_step or end_step <= start_step:
        return final
    progress = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def linear_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """A straight ramp from ``initial`` (at ``start_step``) to ``final`` (at ``end_step`` and after)."""
    if step < start_step:
        return 0.0
    if step >= end_step or end_step <= start_step:
        return final
    progress = (step - start_step) / (end_step - start_step)
    return initial + (final - initial) * progress


_SHAPES = {"cubic": cubic_sparsity, "linear": linear_sparsity}


@dataclass(frozen=True)
class SparsitySchedule:
    """When to prune and to which sparsity.

    Args:
        initial: sparsity applied at the first pruning event (``start_step``).
        final: sparsity reached at ``end_step`` and kept afterwards.
        start_step: optimizer step of the first pruning event.
        end_step: optimizer step of the last pruning event.
        frequency: steps between pruning events.
        shape: ``"cubic"`` (Zhu & Gupta) or ``"linear"``.
    """

    initial: float
    final: float
    start_step: int
    end_step: int
    frequency: int = 1
    shape: str = "cubic"

    def __post_init__(self) -> None:
        if self.shape not in _SHAPES:
            raise ValueError(f"unknown schedule shape {self.shape!r}; use one of {sorted(_SHAPES)}")
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError(f"need 0 <= initial <= final < 1, got initial={self.initial}, final={self.final}")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got {self.start_step}, {self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def is_pruning_step(self, step: int) -> bool:
        """Is ``step`` a pruning event (``start_step + k * frequency``, or ``end_step``)?"""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def sparsity_at(self, step: int) -> float:
        """Target sparsity of the pruning event at ``step`` (the ramp value; 0 before ``start_step``)."""
        return _SHAPES[self.shape](step, self.initial, self.final, self.start_step, self.end_step)

    def events(self) -> list[tuple[int, float]]:
        """Every ``(step, sparsity)`` pruning event, in order."""
        return [(s, self.sparsity_at(s)) for s in range(self.start_step, self.end_step + 1) if self.is_pruning_step(s)]
