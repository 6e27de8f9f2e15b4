"""Perplexity over non-overlapping windows of a token stream (WikiText-2 style)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: torch.Tensor, seqlen: int = 512, batch_size: int = 8, progress: bool = False
) -> float:
    """``exp`` of the mean next-token loss over non-overlapping ``seqlen`` windows of the 1-D ``tokens`` stream.

    The tail shorter than one window is dropped, as in the SparseGPT/Wanda evaluation code.
    """
    tokens = tokens.reshape(-1)
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens to measure perplexity, got {tokens.numel()}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise ValueError(
            f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}; use the model's tokenizer"
        )
    windows = tokens[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for chunk in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += loss.item()
        total_tokens += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
