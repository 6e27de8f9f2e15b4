"""Structural discovery: decoder blocks, prunable linear layers and name matching.

Models are found by structure, not by class name. The few places where architectures truly differ
live in the small tables below (GPT-2's ``Conv1D`` stores its weight transposed; PEFT adapter
matrices are never pruning targets).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "find_decoder_blocks",
    "find_linears",
    "is_prunable_linear",
    "weight_matrix",
    "set_weight_matrix",
    "name_matches",
    "NameMatcher",
]

try:  # transformers' GPT-2 style linear with a transposed weight [in, out]
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # pragma: no cover - older layouts
    _HFConv1D = None

TRANSPOSED_WEIGHT_TYPES: tuple[type, ...] = tuple(t for t in (_HFConv1D,) if t is not None)
"""Linear layers whose ``weight`` is stored as ``[in_features, out_features]``."""

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""Last name parts of MoE routers: linear in form, but they choose experts, so pruning them is never done."""

NEVER_TARGET_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
"""Module-name parts of adapter weights that belong to PEFT, not to the base model."""


ADAPTER_WRAPPED_SUFFIX = ".base_layer"
"""PEFT keeps the original linear as ``<name>.base_layer``; we prune it under ``<name>``."""


def is_prunable_linear(module: nn.Module) -> bool:
    """A dense 2-D linear map we can prune: ``nn.Linear`` or a transposed ``Conv1D``."""
    return isinstance(module, nn.Linear) or isinstance(module, TRANSPOSED_WEIGHT_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; transposed for ``Conv1D``)."""
    weight = module.weight
    return weight.t() if isinstance(module, TRANSPOSED_WEIGHT_TYPES) else weight


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write ``[out, in]`` ``matrix`` into the module's weight, keeping its dtype, device and layout."""
    target = weight_matrix(module)
    target.copy_(matrix.to(device=target.device, dtype=target.dtype))


def find_linears(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All prunable linears under ``root`` by full name, adapter weights excluded."""
    found = {}
    for name, module in root.named_modules():
        if not is_prunable_linear(module):
            continue
        if any(part in NEVER_TARGET_PARTS for part in name.split(".")):
            continue
        if name.endswith(ADAPTER_WRAPPED_SUFFIX):  # PEFT: report the wrapped layer under its original name
            name = name[: -len(ADAPTER_WRAPPED_SUFFIX)]
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        found[full] = module
    return found


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of repeated decoder blocks: the longest ``ModuleList`` of same-class modules with linears.

    Raises ``ValueError`` for a model without such a list (for example an encoder-only or a
    non-transformer model), naming what was searched.
    """
    best: tuple[str, nn.ModuleList] | None = None
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not find_linears(module[0]):
            continue
        if any(part in NEVER_TARGET_PARTS for part in name.split(".")):
            continue
        # a list as long as config.num_hidden_layers wins (a remote-code MoE may hold more experts than layers);
        # otherwise the longest list
        if best is None:
            better = True
        elif (len(module) == expected) != (len(best[1]) == expected):
            better = len(module) == expected
        else:
            better = len(module) > len(best[1])
        if better:
            best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks: found no nn.ModuleList of identical blocks containing "
            "linear layers. hf_sparse prunes decoder-only transformers (Llama, Mistral, Qwen2, GPT-2, OPT, ...); "
            "pass the causal LM itself, e.g. AutoModelForCausalLM.from_pretrained(...)"
        )
    return best


_GLOB_CHARS = set("*?[")


def name_matches(name: str, pattern: str) -> bool:
    """Does module ``name`` match ``pattern``?

    - ``"re:<regex>"``: the regex must match the *whole* name (anchored);
    - a glob (``*``, ``?``, ``[``): matched against the whole name;
    - otherwise an exact full name, or a dotted suffix of it (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


class NameMatcher:
    """Matches names against a list of patterns and remembers which patterns matched anything."""

    def __init__(self, patterns: Iterable[str] | None):
        self.patterns: list[str] = list(patterns or [])
        for pattern in self.patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"invalid regex in {pattern!r}: {err}") from err
        self.used: set[str] = set()

    def first_match(self, name: str) -> str | None:
        for pattern in self.patterns:
            if name_matches(name, pattern):
                self.used.add(pattern)
                return pattern
        return None

    def __contains__(self, name: str) -> bool:
        return self.first_match(name) is not None

    def unused(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]


def resolve_override(name: str, overrides: dict[str, object] | Sequence[tuple[str, object]] | None):
    """The value of the first override whose pattern matches ``name`` (``None`` if none)."""
    items = overrides.items() if isinstance(overrides, dict) else (overrides or [])
    for pattern, value in items:
        if name_matches(name, pattern):
            return value
    return None


# --- gated MLPs (CATS / activation sparsity) ---------------------------------------------------

GATED_MLP_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("split", ("gate_proj", "up_proj", "down_proj")),  # Llama, Mistral, Qwen2, Gemma, Qwen2-MoE shared expert
    ("split", ("w1", "w3", "w2")),  # Mixtral-style (older layouts), DBRX-like experts
    ("fused", ("gate_up_proj", "down_proj")),  # Phi-3: one Linear producing [gate; up]
)
"""``(kind, child names)`` of the gated-MLP layouts we recognise by structure.

``split``: ``down(act(gate(x)) * up(x))`` with three child modules; ``fused``: one child produces
``[gate; up]`` along the last dimension (first half gate); ``experts`` (found separately): a module
holding 3-D parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (transformers 5 MoE).
"""

GATED_MLP_ACT_ATTRS = ("act_fn", "activation_fn", "act")
"""Attribute names under which gated MLPs keep their activation function."""


class GatedMLP:
    """One gated MLP found in a model: where it is, its layout, and the names of its parts.

    ``kind`` is ``"split"``, ``"fused"`` or ``"experts"``; ``gate``/``up``/``down`` are child
    attribute names (``gate`` and ``up`` both name the fused projection for ``"fused"``; for
    ``"experts"`` ``gate``/``up`` name the 3-D ``gate_up_proj`` parameter), ``act`` the activation attribute.
    """

    __slots__ = ("act", "down", "gate", "kind", "module", "name", "up")

    def __init__(self, name: str, module: nn.Module, kind: str, gate: str, up: str, down: str, act: str):
        self.name, self.module, self.kind = name, module, kind
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def __repr__(self) -> str:
        return f"GatedMLP({self.name!r}, kind={self.kind!r}, {type(self.module).__name__})"


def _gated_mlp_of(name: str, module: nn.Module) -> GatedMLP | None:
    act = next((a for a in GATED_MLP_ACT_ATTRS if callable(getattr(module, a, None))), None)
    if act is None:
        return None
    for kind, parts in GATED_MLP_LAYOUTS:
        children = [getattr(module, part, None) for part in parts]
        if all(isinstance(child, nn.Module) for child in children):
            if kind == "split":
                return GatedMLP(name, module, kind, parts[0], parts[1], parts[2], act)
            return GatedMLP(name, module, kind, parts[0], parts[0], parts[1], act)
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3:
        return GatedMLP(name, module, "experts", "gate_up_proj", "gate_up_proj", "down_proj", act)
    return None


def find_gated_mlps(model: nn.Module) -> dict[str, GatedMLP]:
    """All gated MLPs in ``model`` by full module name, found by structure (see ``GATED_MLP_LAYOUTS``).

    A gated MLP is a module with an activation attribute and gate/up/down projections (separate,
    Phi-3's fused ``gate_up_proj``, or transformers-5 MoE experts stored as 3-D parameters).
    Modules nested inside a found MLP (PEFT wrappers of its projections) are not reported again.
    Returns an empty dict for models without gated MLPs (GPT-2, OPT).
    """
    found: dict[str, GatedMLP] = {}
    for name, module in model.named_modules():
        if any(part in NEVER_TARGET_PARTS for part in name.split(".")):
            continue
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        mlp = _gated_mlp_of(name, module)
        if mlp is not None:
            found[name] = mlp
    return found
