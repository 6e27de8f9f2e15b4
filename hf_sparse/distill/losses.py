"""Pure distillation losses: tensors in, tensors out, no model and no Trainer.

Everything here works on *sums over target tokens*; the caller divides by the number of target
tokens of the whole (accumulated, possibly multi-process) batch. That is what makes the loss
exact under gradient accumulation and data parallelism (see ``docs/distillation.md``).

Conventions (causal language modelling):

* the hidden state / logits at position ``i`` predict ``labels[i + 1]``;
* a position takes part iff its *next* label is not ``-100`` and (when an attention mask is
  given) the next token is not padding -- the same rule for the KD, CE and hidden-state losses.

The KD divergences are computed on temperature-scaled logits, in fp32, and multiplied by
``T**2`` (Hinton et al. 2015) so that their gradient scale does not shrink with the temperature:

* forward KL  ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` (mode covering);
* reverse KL  ``KL(p_s || p_t)`` (mode seeking);
* generalized JSD(beta) as in GKD (Agarwal et al. 2024): with the mixture
  ``m = beta * p_t + (1 - beta) * p_s``, ``JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``;
  ``beta = 0`` and ``beta = 1`` are taken to mean forward and reverse KL (the TRL convention).

Memory: :func:`distillation_loss_sums` never materialises the ``tokens x vocab`` logits of the
whole batch. It keeps only the (small) hidden states, and for ``chunk_size`` tokens at a time
applies the output heads, takes the fp32 log-softmax of both models and reduces. Each chunk runs
under activation checkpointing, so autograd stores only the chunk's hidden rows, and the logits
are recomputed one chunk at a time in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "KD_LOSSES",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "token_kd_loss",
    "causal_target_mask",
    "count_target_tokens",
    "DistillLossSums",
    "distillation_loss_sums",
    "naive_distillation_loss_sums",
    "squarehead_loss_sum",
    "check_vocab_sizes",
]

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
"""Accepted values of ``kd_loss``."""

Head = Callable[[torch.Tensor], torch.Tensor]


def forward_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(teacher || student)`` from log-probabilities over the last dim."""
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)


def reverse_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(student || teacher)`` from log-probabilities over the last dim."""
    return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)


def generalized_jsd(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Per-row generalized Jensen-Shannon divergence with mixture ``beta * p_t + (1 - beta) * p_s``.

    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``; ``beta = 0.5`` is the symmetric JSD.
    The endpoints ``beta = 0`` / ``1`` return forward / reverse KL (where the formula itself would
    vanish), following TRL's GKD convention.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    mixture = torch.logsumexp(
        torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log1p(-beta)]), dim=0
    )
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_loss: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-token KD divergence ``T**2 * D(softmax(t / T), softmax(s / T))`` in fp32, shape ``logits.shape[:-1]``."""
    check_vocab_sizes(student_logits.shape[-1], teacher_logits.shape[-1])
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kd_loss == "forward_kl":
        div = forward_kl(s, t)
    elif kd_loss == "reverse_kl":
        div = reverse_kl(s, t)
    elif kd_loss == "jsd":
        div = generalized_jsd(s, t, jsd_beta)
    else:
        raise ValueError(f"unknown kd_loss {kd_loss!r}; use one of {', '.join(KD_LOSSES)}")
    return div * (temperature**2)


def check_vocab_sizes(student_vocab: int, teacher_vocab: int) -> None:
    """Raise a clear error when student and teacher logits have different vocabulary sizes."""
    if int(student_vocab) != int(teacher_vocab):
        raise ValueError(
            f"student and teacher vocabulary sizes differ: student {int(student_vocab)}, teacher "
            f"{int(teacher_vocab)}; token-level distillation needs the same vocabulary (same tokenizer)"
        )


def causal_target_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[batch, seq - 1]``: position ``i`` is a target iff ``labels[i + 1] != -100`` (and not padding)."""
    mask = labels[..., 1:] != -100
    if attention_mask is not None:
        mask = mask & (attention_mask[..., 1:] != 0)
    return mask


def count_target_tokens(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of target tokens in a batch under the causal shift (a 0-dim long tensor)."""
    return causal_target_mask(labels, attention_mask).sum()


class DistillLossSums(NamedTuple):
    """Sums over target tokens (divide by the token count of the accumulated batch)."""

    kd: torch.Tensor
    ce: torch.Tensor
    num_tokens: int


def _chunk_sums(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    targets: torch.Tensor,
    student_head: Head | None,
    teacher_head: Head | None,
    kd_loss: str,
    temperature: float,
    jsd_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KD and CE sums for one chunk of rows; logits exist (in fp32) for this chunk only."""
    student_logits = (student_head(student_rows) if student_head is not None else student_rows).float()
    with torch.no_grad():
        teacher_logits = (teacher_head(teacher_rows) if teacher_head is not None else teacher_rows).float()
    kd = token_kd_loss(student_logits, teacher_logits, kd_loss, temperature, jsd_beta).sum()
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    return kd, ce


def _select_targets(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of both models at target positions, flattened to ``[n, dim]``, and their target ids."""
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden/logit shapes {tuple(student_hidden.shape)} (student), {tuple(teacher_hidden.shape)} "
            f"(teacher) do not match labels {tuple(labels.shape)}"
        )
    mask = causal_target_mask(labels, attention_mask)
    return student_hidden[..., :-1, :][mask], teacher_hidden[..., :-1, :][mask], labels[..., 1:][mask]


def distillation_loss_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_head: Head | None = None,
    teacher_head: Head | None = None,
    attention_mask: torch.Tensor | None = None,
    kd_loss: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int | None = 1024,
) -> DistillLossSums:
    """Chunked KD and CE sums over the target tokens of a causal-LM batch.

    ``student_hidden``/``teacher_hidden`` are ``[batch, seq, dim]``: the inputs of the output heads
    (``student_head``/``teacher_head``, e.g. the ``lm_head`` modules), or the logits themselves
    when the heads are ``None``. ``chunk_size`` target tokens are processed at a time (``None`` or
    ``0``: all at once, no checkpointing); when gradients are needed each chunk is checkpointed so
    that only one chunk's fp32 logits are ever alive, in the forward and in the backward pass.
    The teacher side never receives gradients.
    """
    if kd_loss not in KD_LOSSES:
        raise ValueError(f"unknown kd_loss {kd_loss!r}; use one of {', '.join(KD_LOSSES)}")
    s_rows, t_rows, targets = _select_targets(student_hidden, teacher_hidden, labels, attention_mask)
    t_rows = t_rows.detach()
    n = targets.numel()
    kd = s_rows.new_zeros((), dtype=torch.float32)
    ce = s_rows.new_zeros((), dtype=torch.float32)
    if n == 0:
        # Keep the graph connected (DDP and ZeRO expect every step to produce gradients).
        zero = s_rows.sum().float() * 0.0
        return DistillLossSums(kd + zero, ce + zero, 0)
    step = n if not chunk_size else int(chunk_size)
    use_checkpoint = bool(chunk_size) and torch.is_grad_enabled() and s_rows.requires_grad
    for start in range(0, n, step):
        args = (
            s_rows[start : start + step],
            t_rows[start : start + step],
            targets[start : start + step],
            student_head,
            teacher_head,
            kd_loss,
            temperature,
            jsd_beta,
        )
        if use_checkpoint:
            kd_c, ce_c = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            kd_c, ce_c = _chunk_sums(*args)
        kd = kd + kd_c
        ce = ce + ce_c
    return DistillLossSums(kd, ce, n)


def naive_distillation_loss_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_head: Head | None = None,
    teacher_head: Head | None = None,
    attention_mask: torch.Tensor | None = None,
    kd_loss: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> DistillLossSums:
    """Reference implementation: full fp32 logits of both models at once, masked afterwards.

    Used by the tests and the memory benchmark to check the chunked version; do not train with it.
    """
    s_logits = (student_head(student_hidden) if student_head is not None else student_hidden).float()
    with torch.no_grad():
        t_logits = (teacher_head(teacher_hidden) if teacher_head is not None else teacher_hidden).float()
    mask = causal_target_mask(labels, attention_mask)
    kd_tok = token_kd_loss(s_logits[..., :-1, :], t_logits[..., :-1, :], kd_loss, temperature, jsd_beta)
    ce_tok = F.cross_entropy(
        s_logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten(), reduction="none", ignore_index=-100
    ).view_as(mask)
    kd = (kd_tok * mask).sum()
    ce = (ce_tok * mask).sum()
    return DistillLossSums(kd, ce, int(mask.sum()))


def squarehead_loss_sum(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SquareHead intermediate-layer loss (Kurtic et al. 2023), summed over target tokens.

    For each layer ``l`` and target token, ``mean_d (h_s - h_t)**2 / (mean_d h_t**2 + eps)``: the
    MSE normalised by the teacher's second moment, so that every layer counts the same whatever
    its activation scale. Averaged over layers and *summed* over tokens (divide by the token
    count). The paper normalises by the teacher's second moment over the whole batch; we
    normalise per token so that the loss is a sum over tokens and hence exact under gradient
    accumulation and data parallelism (a batch-level statistic is not).

    ``*_hidden_states`` are ``[batch, seq, dim]`` per layer (same number of layers in both).
    """
    if len(student_hidden_states) != len(teacher_hidden_states):
        raise ValueError(
            f"SquareHead needs the same number of layers: student has {len(student_hidden_states)} "
            f"hidden states, teacher {len(teacher_hidden_states)}"
        )
    if len(student_hidden_states) == 0:
        raise ValueError("SquareHead needs at least one hidden state per model")
    mask = causal_target_mask(labels, attention_mask)
    total = None
    for h_s, h_t in zip(student_hidden_states, teacher_hidden_states):
        if h_s.shape != h_t.shape:
            raise ValueError(f"hidden state shapes differ: student {tuple(h_s.shape)}, teacher {tuple(h_t.shape)}")
        s = h_s[..., :-1, :][mask].float()
        t = h_t[..., :-1, :][mask].detach().float()
        per_token = (s - t).pow(2).mean(-1) / (t.pow(2).mean(-1) + eps)
        layer = per_token.sum()
        total = layer if total is None else total + layer
    return total / len(student_hidden_states)
