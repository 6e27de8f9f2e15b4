"""Shared helpers of the training-callback tests and their multi-process scripts (no downloads)."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments


def tiny_llama(seed: int = 0, intermediate_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def token_dataset(n: int = 64, seqlen: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Skewed random token windows (so the model has something to learn), as Trainer examples."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.full((128,), 0.3)).sample()
    ids = torch.multinomial(probs, n * seqlen, replacement=True, generator=g).view(n, seqlen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def make_args(out: str, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class Probe(TrainerCallback):
    """Registered after the sparsity callback: records, at every step end, what the forward will see."""

    def __init__(self, sparsity_callback):
        self.cb = sparsity_callback
        self.violations: list[int] = []
        self.sparsity: dict[int, float] = {}
        self.layer_pruned: dict[int, dict[str, int]] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        masks = self.cb.masks
        self.violations.append(masks.violations())
        self.sparsity[state.global_step] = masks.sparsity()
        self.layer_pruned[state.global_step] = {n: p for n, (p, _) in masks.counts().items()}
        self.masks[state.global_step] = {n: k.clone() for n, k in masks.masks.items()}


def save_rank_masks(cb, out: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    torch.save({n: k.clone() for n, k in cb.masks.state_dict().items()}, os.path.join(out, f"masks{rank}.pt"))
