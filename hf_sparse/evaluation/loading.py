"""Load a model for evaluation: a Hub id or directory, plain or saved by hf_sparse (compressed included)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["default_device", "is_hf_sparse_checkpoint", "load_model", "resolve_dtype"]


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None``/``"auto"``/a ``torch.dtype`` unchanged."""
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(f"unknown dtype {dtype!r}; use e.g. bfloat16, float16, float32 or auto")


def is_hf_sparse_checkpoint(pretrained: str, revision: str | None = None) -> tuple[bool, bool]:
    """``(saved by hf_sparse, compressed)`` for a local directory or Hub id, read from its ``config.json``."""
    from transformers import PretrainedConfig

    from ..persistence.compress import is_compressed_checkpoint

    try:
        config, _ = PretrainedConfig.get_config_dict(pretrained, revision=revision or "main")
    except (OSError, ValueError):
        return False, False
    ours = any(key in config for key in ("sparsity_config", "cats_config"))
    return ours, bool(is_compressed_checkpoint(config))


def load_model(
    pretrained: str,
    *,
    dtype: Any = "bfloat16",
    device: str | None = None,
    revision: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` ready for evaluation, in eval mode on ``device`` (default: GPU if any).

    Checkpoints saved by ``hf_sparse.save_sparse`` go through ``hf_sparse.load_sparse`` (which
    decompresses and re-applies a saved ``cats_config``); others through ``AutoModelForCausalLM``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if revision:
        kwargs["revision"] = revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    ours, compressed = is_hf_sparse_checkpoint(pretrained, revision)
    if ours:
        from ..persistence import load_sparse

        logger.info("loading %s with hf_sparse.load_sparse (%s)", pretrained, "compressed" if compressed else "dense")
        model = load_sparse(pretrained, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer or pretrained, revision=revision, trust_remote_code=trust_remote_code)
    return model, tok
