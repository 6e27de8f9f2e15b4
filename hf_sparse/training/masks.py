"""``MaskSet``: the boolean keep-masks of a model's pruned weights, and the one place that applies them.

A mask is stored per parameter in the parameter's *local* layout: for an ordinary tensor it has the
weight's shape; for an FSDP2 parameter (a ``DTensor`` sharded over ranks) it has the shape of
``param.to_local()``, i.e. this rank's shard (uneven shards included). Applying a mask is then an
in-place ``local.mul_(keep)`` with no communication, which is what keeps mask keeping cheap.
Full (unsharded) masks are only built when saving or when a criterion needs a whole matrix.

``True`` in a keep-mask means *keep*; ``hf_sparse.patterns`` returns the opposite (``True`` = prune),
so :meth:`MaskSet.set_from_prune_mask` does the conversion.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["MaskSet", "local_tensor", "is_dtensor", "full_tensor", "shard_like", "gather_like", "layer_group", "target_weights"]

try:  # DTensor (FSDP2, tensor parallel); absent from very old torch
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = None, None


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Is ``tensor`` a sharded/replicated ``DTensor`` (an FSDP2 parameter or gradient)?"""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``tensor``: ``to_local()`` for a ``DTensor``, the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@torch.no_grad()
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) tensor; an all-gather for a sharded ``DTensor`` (every rank must call it)."""
    return tensor.full_tensor().detach() if is_dtensor(tensor) else tensor.detach()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cut a full tensor the way ``like`` is sharded and return this rank's piece.

    For a ``DTensor`` this goes through ``distribute_tensor``, which takes the data of rank 0, so every
    rank ends with a piece of the *same* mask even if their inputs differed.
    """
    if not is_dtensor(like):
        return full.to(like.device)
    if full.dtype == torch.bool:  # gloo cannot scatter bool tensors
        return shard_like(full.to(torch.uint8), like).bool()
    return distribute_tensor(full.to(like.to_local().device), like.device_mesh, like.placements).to_local()


@torch.no_grad()
def gather_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor whose local piece is ``local``, sharded like ``like`` (identity for plain tensors)."""
    if not is_dtensor(like):
        return local
    if local.dtype == torch.bool:  # gloo cannot all-gather bool tensors
        return gather_like(local.to(torch.uint8), like).bool()
    spec = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())
    return spec.full_tensor()


_NOT_A_GROUP = {"weight", "base_layer", "default", "linear", "module"}


def layer_group(name: str) -> str:
    """Short group name of a weight for logging: ``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = [p for p in name.split(".") if p not in _NOT_A_GROUP and not re.fullmatch(r"\d+", p)]
    return parts[-1] if parts else name


class MaskSet:
    """Per-parameter boolean keep-masks, applied to weights (and optionally gradients) in place.

    ``MaskSet`` holds references to the parameters, so ``apply()`` needs no model argument. It is
    ``DTensor``-aware (masks live in each rank's local shard layout) and round-trips through
    ``state_dict()`` / ``load_state_dict()`` with full, layout-independent masks.
    """

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    # --- construction -----------------------------------------------------------------------
    def add(self, name: str, param: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Track ``param`` under ``name`` with local keep-mask ``keep`` (default: keep everything)."""
        local = local_tensor(param)
        if keep is None:
            keep = torch.ones_like(local, dtype=torch.bool)
        if keep.shape != local.shape:
            raise ValueError(f"{name}: mask shape {tuple(keep.shape)} != local weight shape {tuple(local.shape)}")
        self.params[name] = param
        self.masks[name] = keep.to(device=local.device, dtype=torch.bool)

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, weights: dict[str, torch.Tensor]) -> "MaskSet":
        """Masks that keep exactly the non-zero entries of each weight (no communication needed)."""
        masks = cls()
        for name, param in weights.items():
            masks.add(name, param, local_tensor(param) != 0)
        return masks

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def names(self) -> list[str]:
        return list(self.masks)

    # --- updates ---------------------------------------------------------------------------
    def set_local(self, name: str, keep: torch.Tensor) -> None:
        """Replace the mask of ``name`` by a mask already in the local layout."""
        self.add(name, self.params[name], keep)

    def set_full(self, name: str, keep_full: torch.Tensor) -> None:
        """Replace the mask of ``name`` by a full-shape mask (sharded like the parameter if it is a DTensor)."""
        self.set_local(name, shard_like(keep_full.to(torch.bool), self.params[name]))

    def set_from_prune_mask(self, name: str, prune_full: torch.Tensor) -> None:
        """Set from a full-shape ``True = prune`` mask, as returned by ``hf_sparse.patterns``."""
        self.set_full(name, ~prune_full.to(torch.bool))

    # --- application -----------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned entries of every tracked weight in place."""
        for name, keep in self.masks.items():
            local_tensor(self.params[name]).mul_(keep)

    @torch.no_grad()
    def apply_to_grads(self, names: Iterable[str] | None = None) -> None:
        """Zero the gradients of pruned entries (parameters without a gradient are skipped)."""
        for name in names if names is not None else self.masks:
            grad = self.params[name].grad
            if grad is not None:
                local_tensor(grad).mul_(self.masks[name])

    # --- statistics ------------------------------------------------------------------------
    def counts(self) -> dict[str, tuple[int, int]]:
        """``name -> (pruned, total)`` over the whole model (summed over ranks for sharded weights).

        A collective call when some weights are DTensors: every rank must call it.
        """
        names = list(self.masks)
        local = torch.tensor(
            [[int(self.masks[n].numel() - self.masks[n].sum()), self.masks[n].numel()] for n in names], dtype=torch.long
        ).reshape(-1, 2)
        sharded = torch.tensor([is_dtensor(self.params[n]) for n in names], dtype=torch.bool)
        if sharded.any():
            import torch.distributed as dist

            summed = local.clone()
            dist.all_reduce(summed)
            local = torch.where(sharded.unsqueeze(1), summed, local)
        return {n: (int(p), int(t)) for n, (p, t) in zip(names, local.tolist())}

    def sparsity(self) -> float:
        """Fraction of tracked entries that are pruned."""
        pruned = total = 0
        for p, t in self.counts().values():
            pruned, total = pruned + p, total + t
        return pruned / total if total else 0.0

    def group_sparsity(self) -> dict[str, float]:
        """Sparsity per layer group (``q_proj``, ``down_proj``, ...; see :func:`layer_group`)."""
        sums: dict[str, list[int]] = {}
        for name, (p, t) in self.counts().items():
            acc = sums.setdefault(layer_group(name), [0, 0])
            acc[0] += p
            acc[1] += t
        return {g: p / t for g, (p, t) in sums.items() if t}

    @torch.no_grad()
    def weight_sparsity(self) -> float:
        """Fraction of tracked *weights* that are exactly zero now (a check that the masks hold)."""
        zeros = total = 0
        for name in self.masks:
            local = local_tensor(self.params[name])
            zeros += int((local == 0).sum())
            total += local.numel()
        return zeros / total if total else 0.0

    @torch.no_grad()
    def violations(self) -> int:
        """Number of pruned entries whose weight is not exactly zero (0 when the masks hold)."""
        return sum(int((local_tensor(self.params[n])[~k] != 0).sum()) for n, k in self.masks.items())

    # --- distributed and persistence -------------------------------------------------------
    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Make the masks of plain (non-DTensor) weights identical on all ranks: rank ``src`` wins.

        Masks of DTensor weights are already consistent: they were cut by ``distribute_tensor``
        from rank 0's data, or computed from each rank's own shard.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for name, keep in self.masks.items():
            if is_dtensor(self.params[name]):
                continue
            buffer = keep.to(torch.uint8)
            dist.broadcast(buffer, src=src)
            self.masks[name] = buffer.bool()

    @torch.no_grad()
    def full_mask(self, name: str) -> torch.Tensor:
        """The whole keep-mask of ``name`` (an all-gather for DTensor weights: every rank must call it)."""
        return gather_like(self.masks[name], self.params[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``name -> full bool keep-mask`` on CPU (collective for DTensor weights)."""
        return {name: self.full_mask(name).cpu() for name in self.masks}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load full masks saved by :meth:`state_dict`, re-sharding them for DTensor weights."""
        missing = [n for n in self.masks if n not in state]
        unexpected = [n for n in state if n not in self.masks]
        if strict and (missing or unexpected):
            raise KeyError(f"mask names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, keep in state.items():
            if name not in self.params:
                continue
            if keep.shape != self.params[name].shape:
                raise ValueError(f"{name}: saved mask {tuple(keep.shape)} != weight {tuple(self.params[name].shape)}")
            self.set_full(name, keep)


def target_weights(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``module name -> weight parameter`` for the given linear modules."""
    return {name: module.weight for name, module in linears.items()}
