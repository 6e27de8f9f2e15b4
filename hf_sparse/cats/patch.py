"""CATS patcher: threshold ``act(x W_gate)`` in every gated MLP, in place, reversibly.

``apply_cats`` finds gated MLPs by structure (``hf_sparse.modules.find_gated_mlps``), calibrates
one threshold per MLP (per expert for MoE experts) as the ``sparsity``-quantile of
``|act(x W_gate)|`` on calibration tokens, and replaces each MLP's ``forward`` with::

    v = act(gate(x));  h = v * (|v| >= t);  y = down(h * up(x))

through the model's own sub-modules, so LoRA-wrapped projections and biases work and gradients
flow through the kept entries only (a masked neuron's gate and up rows get zero gradient). When no
gradient is needed and few tokens are decoded, a kernel that reads only the active rows of
``W_up`` and ``W_down^T`` replaces the two GEMVs (see ``hf_sparse.cats.kernels``).

Settings and thresholds are stored in ``model.config.cats_config`` (a plain dict), so they travel
with ``save_pretrained``; ``apply_cats_from_config`` re-applies them after loading. A checkpoint
loaded without this plugin is simply the dense model. ``remove_cats`` restores the original
forwards exactly.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import GatedMLP, find_gated_mlps
from .calibrate import ActivationObserver, run_batches, threshold_for_sparsity
from .kernels import KERNELS, select_kernel

logger = logging.getLogger(__name__)

__all__ = [
    "CATS_CONFIG_VERSION",
    "SparsityReport",
    "apply_cats",
    "apply_cats_from_config",
    "cats_thresholds",
    "is_cats_applied",
    "measure_cats_sparsity",
    "remove_cats",
    "set_observer",
]

CATS_CONFIG_VERSION = 1
STATE_ATTR = "_hf_sparse_cats"
_PEFT_PREFIX = "base_model.model."


def _config_name(name: str) -> str:
    """Module name as stored in ``cats_config``: without a PEFT wrapper's prefix."""
    return name.removeprefix(_PEFT_PREFIX)


@dataclass
class CATSState:
    """What a patched MLP needs: its layout, threshold(s), kernel choice and an optional observer."""

    name: str
    kind: str
    gate: str
    up: str
    down: str
    act: str
    threshold: float | list[float]
    kernel: str = "auto"
    max_decode_tokens: int = 8
    observer: ActivationObserver | None = None
    previous_forward: Any = None  # an instance-level forward that was there before (accelerate hooks), or None
    w_down_t: torch.Tensor | None = field(default=None, repr=False)
    w_down_key: tuple | None = field(default=None, repr=False)


def _state(module: nn.Module) -> CATSState | None:
    return module.__dict__.get(STATE_ATTR)


def _dense_forward(module: nn.Module, *args, **kwargs):
    st = _state(module)
    if st is not None and st.previous_forward is not None:
        return st.previous_forward(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _plain_linear(module: Any) -> bool:
    return type(module) is nn.Linear and module.bias is None


def _needs_grad(x: torch.Tensor, *modules: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())


def _decode_weights(module: nn.Module, st: CATSState) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W_up [I, H], W_down^T [I, H] row-contiguous)`` for the decode kernels, or ``None`` if not applicable.

    The transposed copy of ``W_down`` is made once and remade only if the weight changed (training
    updates it in place, which bumps its version counter).
    """
    down = getattr(module, st.down)
    if st.kind == "split":
        up = getattr(module, st.up)
        if not (_plain_linear(up) and _plain_linear(down)):
            return None
        w_up = up.weight
    elif st.kind == "fused":
        gate_up = getattr(module, st.gate)
        if not (_plain_linear(gate_up) and _plain_linear(down)):
            return None
        inter = gate_up.weight.shape[0] // 2
        w_up = gate_up.weight[inter:]
    else:
        return None
    w = down.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    if st.w_down_key != key:
        with torch.no_grad():
            st.w_down_t = w.detach().t().contiguous()
        st.w_down_key = key
    return w_up.detach(), st.w_down_t


def _cats_mlp_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Patched forward of a split (gate/up/down) or fused (gate_up/down) gated MLP."""
    st: CATSState = self.__dict__[STATE_ATTR]
    t = float(st.threshold)
    if st.observer is None and t <= 0.0:
        return _dense_forward(self, x, *args, **kwargs)  # sparsity 0: bit-identical to the original
    act = getattr(self, st.act)
    down = getattr(self, st.down)
    n_tokens = x.numel() // x.shape[-1]

    if st.observer is None and st.kernel != "reference" and n_tokens <= st.max_decode_tokens:
        parts = [getattr(self, st.gate), getattr(self, st.up), down]
        if not _needs_grad(x, *parts):
            kernel = select_kernel(st.kernel, x.device, x.dtype, n_tokens, st.max_decode_tokens)
            weights = _decode_weights(self, st) if kernel is not None else None
            if weights is not None:
                w_up, w_down_t = weights
                x2 = x.reshape(n_tokens, x.shape[-1])
                if st.kind == "split":
                    v = act(getattr(self, st.gate)(x2))
                else:
                    gate_up = getattr(self, st.gate)
                    v = act(F.linear(x2, gate_up.weight[: w_up.shape[0]]))
                y = kernel(x2, v, t, w_up, w_down_t)
                return y.reshape(*x.shape[:-1], y.shape[-1])

    if st.kind == "split":
        v = act(getattr(self, st.gate)(x))
        u = getattr(self, st.up)(x)
    else:
        gate_states, u = getattr(self, st.gate)(x).chunk(2, dim=-1)
        v = act(gate_states)
    if st.observer is not None:
        st.observer.observe(st.name, v, t if t > 0 else None)
    if t > 0.0:
        v = v * (v.abs() >= t).to(v.dtype)  # masked entries: zero output and zero gradient
    return down(v * u)


def _cats_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Patched forward of a transformers-5 MoE experts module (3-D ``gate_up_proj``/``down_proj``).

    The same routing loop as the original eager implementation, with one threshold per expert.
    """
    st: CATSState = self.__dict__[STATE_ATTR]
    thresholds = st.threshold
    if st.observer is None and all(t <= 0.0 for t in thresholds):
        return _dense_forward(self, hidden_states, top_k_index, top_k_weights)
    act = getattr(self, st.act)
    gate_up_w, down_w = getattr(self, st.gate), getattr(self, st.down)
    n_experts = gate_up_w.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        if expert == n_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        gate_states, up_states = F.linear(hidden_states[token_idx], gate_up_w[expert]).chunk(2, dim=-1)
        v = act(gate_states)
        t = float(thresholds[expert])
        if st.observer is not None:
            st.observer.observe((st.name, expert), v, t if t > 0 else None, token_index=token_idx)
        if t > 0.0:
            v = v * (v.abs() >= t).to(v.dtype)
        out = F.linear(v * up_states, down_w[expert]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _check_experts_layout(mlp: GatedMLP) -> None:
    m = mlp.module
    unsupported = [
        flag
        for flag, bad in (
            ("is_transposed", True),
            ("is_concatenated", False),
            ("has_bias", True),
            ("has_gate", False),
            ("has_post_expert_norm", True),
        )
        if getattr(m, flag, not bad) == bad
    ]
    gate_up, down = m.gate_up_proj, m.down_proj
    shapes_ok = (
        gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
    )
    if unsupported or not shapes_ok:
        raise NotImplementedError(
            f"CATS supports MoE experts stored as gate_up_proj [E, 2I, H] (gate first) and down_proj [E, H, I] "
            f"without bias (Mixtral, Qwen2-MoE); {mlp.name} ({type(m).__name__}) has "
            f"{', '.join(unsupported) or 'other shapes'} (gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)})"
        )


def _install(mlp: GatedMLP, threshold: float | list[float], kernel: str, max_decode_tokens: int) -> CATSState:
    module = mlp.module
    if mlp.kind == "experts":
        _check_experts_layout(mlp)
    st = CATSState(
        name=_config_name(mlp.name),
        kind=mlp.kind,
        gate=mlp.gate,
        up=mlp.up,
        down=mlp.down,
        act=mlp.act,
        threshold=threshold,
        kernel=kernel,
        max_decode_tokens=max_decode_tokens,
        previous_forward=module.__dict__.get("forward"),
    )
    module.__dict__[STATE_ATTR] = st
    fn = _cats_experts_forward if mlp.kind == "experts" else _cats_mlp_forward
    module.forward = types.MethodType(fn, module)
    if kernel != "reference" and mlp.kind != "experts":
        w = getattr(module, mlp.down).weight
        if select_kernel(kernel, w.device, w.dtype, 1, max_decode_tokens) is not None:
            _decode_weights(module, st)  # the row-contiguous W_down^T copy, once at patch time
    return st


def _uninstall(module: nn.Module) -> None:
    """Drop the patch of one module: its state, and the instance forward (restoring a previous one)."""
    st = module.__dict__.pop(STATE_ATTR, None)
    if st is None:
        return
    module.__dict__.pop("forward", None)
    if st.previous_forward is not None:
        module.forward = st.previous_forward


def _patched_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if _state(m) is not None}


def is_cats_applied(model: nn.Module) -> bool:
    """Does ``model`` carry CATS-patched MLPs?"""
    return bool(_patched_modules(model))


def cats_thresholds(model: nn.Module) -> dict[str, float | list[float]]:
    """The thresholds in use, by module name (a list per expert for MoE experts)."""
    return {st.name: st.threshold for st in (_state(m) for m in _patched_modules(model).values())}


def set_observer(model: nn.Module, observer: ActivationObserver | None) -> None:
    """Attach ``observer`` to every CATS-patched MLP and TEAL-patched linear (``None`` detaches)."""
    from .teal import set_teal_observer

    for module in _patched_modules(model).values():
        _state(module).observer = observer
    set_teal_observer(model, observer)


def remove_cats(model: nn.Module) -> nn.Module:
    """Undo ``apply_cats`` / ``apply_teal``: original forwards back, caches and ``cats_config`` dropped."""
    from .teal import remove_teal

    for module in _patched_modules(model).values():
        _uninstall(module)
    remove_teal(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "cats_config"):
        delattr(config, "cats_config")
    return model


def _validate(sparsity: float, kernel: str) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown CATS kernel {kernel!r}; use one of {KERNELS}")


def _gated_mlps_or_raise(model: nn.Module) -> dict[str, GatedMLP]:
    mlps = find_gated_mlps(model)
    if not mlps:
        raise ValueError(
            f"{type(model).__name__} has no gated MLP (a module with gate/up/down projections and an activation, "
            "e.g. Llama's gate_proj/up_proj/down_proj, Mixtral's w1/w3/w2, Phi-3's gate_up_proj). CATS thresholds "
            "act(x W_gate) and needs one; models with a plain MLP (GPT-2, OPT) can use apply_teal instead."
        )
    return mlps


def _write_config(
    model: nn.Module, method: str, sparsity: float, kernel: str, max_decode_tokens: int, thresholds: dict
) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.cats_config = {
        "version": CATS_CONFIG_VERSION,
        "method": method,
        "sparsity": float(sparsity),
        "kernel": kernel,
        "max_decode_tokens": int(max_decode_tokens),
        "thresholds": {
            k: (list(map(float, v)) if isinstance(v, (list, tuple)) else float(v)) for k, v in thresholds.items()
        },
    }


def apply_cats(
    model: nn.Module,
    sparsity: float = 0.5,
    calibration: Any = None,
    *,
    kernel: str = "auto",
    batch_size: int = 8,
    max_decode_tokens: int = 8,
    thresholds: dict[str, float | list[float]] | None = None,
    max_values: int = 2**23,
    seed: int = 0,
) -> nn.Module:
    """Make every gated MLP of ``model`` activation-sparse (CATS), calibrated to ``sparsity``.

    Args:
        model: a causal LM with gated MLPs (Llama, Mistral, Qwen2, Phi-3, Mixtral, Qwen2-MoE, ...),
            possibly PEFT-wrapped.
        sparsity: target fraction of ``act(x W_gate)`` entries set to zero, in ``[0, 1)``.
        calibration: token ids ``[N, T]`` (LongTensor) or a dict with ``input_ids`` and optionally
            ``attention_mask`` (padding is excluded); e.g. ``hf_sparse.calibration_data(...)``.
            Not needed when ``thresholds`` is given or ``sparsity`` is 0.
        kernel: ``"auto"`` (by device and shape), ``"reference"`` (masked dense math only),
            ``"cpu"`` or ``"triton"``; see ``hf_sparse.cats.kernels``.
        batch_size: calibration batch size.
        max_decode_tokens: calls with at most this many tokens use the decode kernel.
        thresholds: skip calibration and use these (module name -> threshold, a list per expert).
        max_values: cap on activation magnitudes kept per layer for the quantile (seeded subsample).
        seed: seed of that subsample.

    Returns the model, patched in place, with ``model.config.cats_config`` set.
    """
    _validate(sparsity, kernel)
    mlps = _gated_mlps_or_raise(model)
    if is_cats_applied(model):
        logger.info("CATS: model was already patched; removing the previous patch first")
        remove_cats(model)
    for mlp in mlps.values():
        if mlp.kind == "experts":
            _check_experts_layout(mlp)

    def zero(mlp: GatedMLP) -> float | list[float]:
        return [0.0] * mlp.module.gate_up_proj.shape[0] if mlp.kind == "experts" else 0.0

    if thresholds is None and sparsity > 0:
        if calibration is None:
            raise ValueError("apply_cats needs calibration tokens (or thresholds=...) for sparsity > 0")
        from .calibrate import normalize_tokens

        ids, _ = normalize_tokens(calibration)
        n_batches = max(1, -(-ids.shape[0] // batch_size))
        observer = ActivationObserver(
            collect_values=True, max_values_per_call=max(1, max_values // n_batches), seed=seed
        )
        try:
            for mlp in mlps.values():
                _install(mlp, zero(mlp), "reference", max_decode_tokens).observer = observer
            run_batches(model, calibration, batch_size)
        finally:
            for mlp in mlps.values():
                _uninstall(mlp.module)
        thresholds = {}
        for name, mlp in mlps.items():
            key = _config_name(name)
            if mlp.kind == "experts":
                per_expert = []
                for e in range(mlp.module.gate_up_proj.shape[0]):
                    vals = observer.values.get((key, e))
                    if not vals:
                        logger.warning(
                            "CATS: expert %d of %s saw no calibration tokens; its threshold is 0 (dense)", e, key
                        )
                        per_expert.append(0.0)
                    else:
                        per_expert.append(threshold_for_sparsity(torch.cat(vals), sparsity))
                thresholds[key] = per_expert
            else:
                thresholds[key] = threshold_for_sparsity(torch.cat(observer.values[key]), sparsity)
    elif thresholds is None:
        thresholds = {_config_name(name): zero(mlp) for name, mlp in mlps.items()}

    missing = [_config_name(n) for n in mlps if _config_name(n) not in thresholds]
    if missing:
        raise ValueError(f"no CATS threshold for {missing}; thresholds are given for {sorted(thresholds)}")
    for name, mlp in mlps.items():
        _install(mlp, thresholds[_config_name(name)], kernel, max_decode_tokens)
    _write_config(model, "cats", sparsity, kernel, max_decode_tokens, thresholds)
    logger.info("CATS: patched %d gated MLPs at sparsity %.2f (kernel=%s)", len(mlps), sparsity, kernel)
    return model


def apply_cats_from_config(model: nn.Module, *, kernel: str | None = None) -> nn.Module:
    """Re-apply CATS (or TEAL) from ``model.config.cats_config``, e.g. after ``from_pretrained``.

    No-op (returns the model unchanged) when the config has no ``cats_config``.
    """
    cfg = getattr(getattr(model, "config", None), "cats_config", None)
    if not cfg:
        return model
    if int(cfg.get("version", 1)) > CATS_CONFIG_VERSION:
        raise ValueError(
            f"cats_config version {cfg.get('version')} is newer than this hf_sparse supports ({CATS_CONFIG_VERSION})"
        )
    method = cfg.get("method", "cats")
    kernel = kernel or cfg.get("kernel", "auto")
    if method == "teal":
        from .teal import apply_teal

        return apply_teal(model, cfg["sparsity"], thresholds=dict(cfg["thresholds"]))
    if method != "cats":
        raise ValueError(f"unknown activation-sparsity method {method!r} in cats_config")
    return apply_cats(
        model,
        cfg["sparsity"],
        thresholds=dict(cfg["thresholds"]),
        kernel=kernel,
        max_decode_tokens=int(cfg.get("max_decode_tokens", 8)),
    )


@dataclass
class SparsityReport:
    """Measured fraction of zeroed activations per layer (MoE experts pooled per module)."""

    per_layer: dict[str, float]
    target: float | None = None

    @property
    def mean(self) -> float:
        return sum(self.per_layer.values()) / max(1, len(self.per_layer))

    def table(self) -> str:
        """A Markdown table of per-layer measured sparsity."""
        lines = ["| layer | measured sparsity |", "|---|---|"]
        lines += [f"| {name} | {frac:.3f} |" for name, frac in self.per_layer.items()]
        lines.append(f"| **mean** (target {self.target if self.target is not None else '-'}) | {self.mean:.3f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def measure_cats_sparsity(model: nn.Module, tokens: Any, *, batch_size: int = 8) -> SparsityReport:
    """Fraction of entries each patched layer zeroes on ``tokens`` (padding excluded), e.g. held-out text."""
    if not is_cats_applied(model) and not _teal_applied(model):
        raise ValueError("model has no CATS/TEAL patch; call apply_cats (or apply_teal) first")
    observer = ActivationObserver()
    set_observer(model, observer)
    try:
        run_batches(model, tokens, batch_size)
    finally:
        set_observer(model, None)
    pooled: dict[str, list[float]] = {}
    for key, total in observer.totals.items():
        name = key[0] if isinstance(key, tuple) else key
        zeros = float(observer.zeros[key].item()) if key in observer.zeros else 0.0
        acc = pooled.setdefault(name, [0.0, 0.0])
        acc[0] += zeros
        acc[1] += total
    cfg = getattr(getattr(model, "config", None), "cats_config", None) or {}
    return SparsityReport({k: z / n for k, (z, n) in pooled.items() if n}, cfg.get("sparsity"))


def _teal_applied(model: nn.Module) -> bool:
    from .teal import is_teal_applied

    return is_teal_applied(model)
