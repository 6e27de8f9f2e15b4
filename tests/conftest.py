"""Shared fixtures: tiny models built from configs (no downloads) and seeded calibration data."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config(arch: str, **overrides):
    """A tiny config of the named architecture (2 blocks, hidden 64, vocab 128)."""
    import transformers as tf

    common = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, sliding_window=16, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=1, head_dim=16, **common)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=8, **common
        )
    elif arch == "phi3":
        cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, pad_token_id=0, **common)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=0, eos_token_id=0)
    elif arch == "opt":
        cfg = tf.OPTConfig(
            hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=0, **common
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if hasattr(cfg, "bos_token_id") and getattr(cfg, "bos_token_id", None) is not None and cfg.bos_token_id >= 128:
        cfg.bos_token_id = 0
    if getattr(cfg, "eos_token_id", None) is not None and not isinstance(cfg.eos_token_id, list) and cfg.eos_token_id >= 128:
        cfg.eos_token_id = 0
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    return model.to(dtype).eval()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """16 seeded windows of 32 token ids drawn from a skewed distribution (so inputs are correlated)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((128,), 0.3)).sample()
    return torch.multinomial(probs, 16 * 32, replacement=True, generator=g).view(16, 32)
