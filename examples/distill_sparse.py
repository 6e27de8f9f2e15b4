"""Prune a copy of a model to 2:4 with SparseGPT, then recover it by distillation from the dense original.

    python examples/distill_sparse.py            # the project's small demo model, about 3 minutes on 2 CPU cores
    python examples/distill_sparse.py --steps 300 --hidden-weight 1.0

Prints the held-out perplexity of the dense, the pruned and the recovered model. The pruning masks
are kept during training (zeros re-applied after every optimizer step), so the recovered model is
still exactly 2:4 sparse.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile

import torch
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse import calibration_data, perplexity, prune  # noqa: E402
from hf_sparse.demo.model import demo_texts, load_small_model  # noqa: E402
from hf_sparse.distill import DistillationArguments, DistillationTrainer  # noqa: E402


class KeepZerosCallback(TrainerCallback):
    """Records the zero weights of the pruned linears at train begin and re-zeroes them after each optimizer step.

    A stand-in for ``hf_sparse.training.ConstantSparsityCallback``, used when that is not available.
    """

    def __init__(self) -> None:
        self.masks: dict[nn.Parameter, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.masks = {
            module.weight: module.weight.detach() == 0
            for module in model.modules()
            if isinstance(module, nn.Linear) and bool((module.weight == 0).any())
        }

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        for weight, zeros in self.masks.items():
            weight.masked_fill_(zeros, 0.0)


def mask_callback() -> TrainerCallback:
    try:
        from hf_sparse.training import ConstantSparsityCallback
    except ImportError:
        return KeepZerosCallback()
    return ConstantSparsityCallback()


def token_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    stream = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = stream.numel() // seqlen
    return stream[: n * seqlen].view(n, seqlen)


def is_2_4(weight: torch.Tensor) -> bool:
    groups = weight.reshape(weight.shape[0], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    # alpha 1: pure KD. The demo model is small and under-trained, so CE on more data (alpha < 1)
    # makes the student *better* than the teacher, which hides what distillation recovers.
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--train-docs", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    teacher, tokenizer = load_small_model("demo")
    heldout = token_windows(tokenizer, demo_texts("heldout", 300), args.seqlen).reshape(-1)
    ppl_dense = perplexity(teacher, heldout, seqlen=args.seqlen)

    student = copy.deepcopy(teacher)
    calibration = calibration_data(demo_texts("calibration", 300), tokenizer, nsamples=64, seqlen=args.seqlen, seed=0)
    prune(student, calibration, method="sparsegpt", sparsity="2:4", progress=False)
    ppl_pruned = perplexity(student, heldout, seqlen=args.seqlen)

    windows = token_windows(tokenizer, demo_texts("train", args.train_docs), args.seqlen)
    train_dataset = [{"input_ids": w, "labels": w} for w in windows]
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = DistillationArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            disable_tqdm=True,
            alpha=args.alpha,
            temperature=args.temperature,
            kd_loss=args.kd_loss,
            hidden_weight=args.hidden_weight,
        )
        callback = mask_callback()
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=training_args,
            train_dataset=train_dataset,
            callbacks=[callback],
        )
        trainer.train()
    student.eval()
    ppl_recovered = perplexity(student, heldout, seqlen=args.seqlen)

    linears = [m for name, m in student.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"]
    sparse_ok = all(is_2_4(m.weight) for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)

    print(f"mask kept by {type(callback).__name__}; decoder linears 2:4: {sparse_ok} (zeros {zeros:.1%})")
    print(f"distillation: {args.steps} steps x batch {args.batch_size} x {args.seqlen} tokens, "
          f"alpha {args.alpha}, T {args.temperature}, {args.kd_loss}, hidden_weight {args.hidden_weight}")
    print("| model | held-out perplexity |")
    print("|---|---|")
    print(f"| dense (teacher) | {ppl_dense:.3f} |")
    print(f"| 2:4 SparseGPT | {ppl_pruned:.3f} |")
    print(f"| 2:4 + distillation | {ppl_recovered:.3f} |")
    gap_before, gap_after = abs(ppl_pruned - ppl_dense), abs(ppl_recovered - ppl_dense)
    print(f"|perplexity - dense|: pruned {gap_before:.3f}, recovered {gap_after:.3f}")


if __name__ == "__main__":
    main()
