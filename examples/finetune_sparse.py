"""Fine-tune a causal LM with the Hugging Face Trainer, adding sparsity with one flag.

An ordinary Trainer script (``datasets.Dataset`` of token windows, ``TrainingArguments``,
``DataCollatorForLanguageModeling(mlm=False)``); the sparsity comes from one hf_sparse callback::

    # the project's small demo model and generated texts (no download), one-shot SparseGPT 2:4 then fine-tuning
    python examples/finetune_sparse.py --oneshot sparsegpt --sparsity 2:4 --max-steps 100
    # gradual magnitude pruning to 50% between steps 10 and 80, an event every 10 steps
    python examples/finetune_sparse.py --gradual magnitude --final 0.5 --start-step 10 --end-step 80 --frequency 10
    # RigL at a fixed 50% sparsity
    python examples/finetune_sparse.py --rigl 0.5
    # keep the zeros of an already-sparse model (e.g. one saved by hf-sparse)
    python examples/finetune_sparse.py --model ./my-sparse-model --constant
    # a Hub model and dataset
    python examples/finetune_sparse.py --model facebook/opt-125m --dataset wikitext --dataset-config \\
        wikitext-2-raw-v1 --oneshot wanda --sparsity 0.5
    # DDP, 2 CPU processes (gloo); on GPUs drop --cpu
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/finetune_sparse.py --cpu \\
        --oneshot sparsegpt --sparsity 2:4 --max-steps 20

Prints the held-out perplexity before fine-tuning (dense, and after pruning for ``--oneshot``),
after fine-tuning, and the final sparsity of the decoder linears; saves the model and tokenizer to
``--output-dir`` (checkpoints hold ``hf_sparse_masks.pt`` for resuming with the same flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse import perplexity
from hf_sparse.calibration import load_texts, tokenize_stream
from hf_sparse.training import (
    ConstantSparsityCallback,
    GradualPruningCallback,
    OneShotPruningCallback,
    RigLCallback,
)

SMALL_MODELS = ("demo", "bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="demo",
        help="'demo'/'bench' (the project's small cached models), a Hub name or a local folder",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset name, local dataset folder or .txt/.json/.jsonl/.parquet/.csv file "
        "(default: the generated demo texts)",
    )
    g.add_argument("--dataset-config", default=None)
    g.add_argument("--split", default="train")
    g.add_argument(
        "--eval-split",
        default=None,
        help="held-out split of --dataset (default: the last --heldout-fraction of its documents)",
    )
    g.add_argument("--heldout-fraction", type=float, default=0.05)
    g.add_argument("--text-column", default="text")
    g.add_argument("--train-docs", type=int, default=2000, help="demo texts: documents for training")
    g.add_argument("--heldout-docs", type=int, default=300, help="demo texts: held-out documents")
    g.add_argument("--max-eval-tokens", type=int, default=200_000, help="cap of the held-out token stream")
    g.add_argument("--seqlen", type=int, default=128)

    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default="finetune_sparse_output")
    g.add_argument("--max-steps", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=8, help="per device")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--logging-steps", type=int, default=None, help="default: a tenth of --max-steps")
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    g.add_argument("--resume", default=None, help="checkpoint folder, or 'last' for the latest in --output-dir")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--cpu", action="store_true", help="train on CPU: use_cpu=True and ddp_backend='gloo' (needed for DDP on CPU)"
    )
    g.add_argument("--bf16", action="store_true")

    g = p.add_argument_group("sparsity (choose at most one)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--oneshot",
        metavar="METHOD",
        choices=["sparsegpt", "obc", "wanda", "magnitude"],
        help="prune once at the start of training, then keep the masks",
    )
    mode.add_argument(
        "--gradual",
        metavar="CRITERION",
        choices=["magnitude", "movement", "taylor", "fisher"],
        help="gradual pruning (Zhu & Gupta) ranked by this criterion",
    )
    mode.add_argument("--rigl", metavar="SPARSITY", type=float, help="RigL dynamic sparse training at this sparsity")
    mode.add_argument("--constant", action="store_true", help="keep the zeros of an already-sparse model")
    g.add_argument("--sparsity", default="0.5", help="--oneshot: 0.5, 50%% or N:M such as 2:4")
    g.add_argument(
        "--calibration-batches", type=int, default=8, help="--oneshot: train batches used for calibration (per process)"
    )
    g.add_argument("--final", default="0.5", help="--gradual: final sparsity or N:M pattern")
    g.add_argument("--initial", type=float, default=0.0, help="--gradual: sparsity of the first event")
    g.add_argument("--start-step", type=int, default=0, help="--gradual: step of the first event")
    g.add_argument("--end-step", type=int, default=None, help="--gradual/--rigl: last event (default: 75%% of steps)")
    g.add_argument("--frequency", type=int, default=None, help="--gradual: steps between events")
    g.add_argument("--schedule", default="cubic", choices=["cubic", "linear"])
    g.add_argument("--ranking", default="layer", choices=["layer", "row", "global"])
    g.add_argument("--rigl-update-frequency", type=int, default=None, help="default: a tenth of --max-steps")
    g.add_argument("--rigl-alpha", type=float, default=0.3)
    g.add_argument("--rigl-regrowth", default="gradient", choices=["gradient", "random"])
    g.add_argument("--targets", nargs="*", default=None, help="linears to sparsify (names, globs, re:...)")
    g.add_argument("--ignore", nargs="*", default=None, help="linears to leave dense")
    return p.parse_args(argv)


def load_model(name: str, bf16: bool):
    if name in SMALL_MODELS:
        from hf_sparse.demo.model import load_small_model

        model, tokenizer = load_small_model(name, progress=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16 if bf16 else torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_train_eval_texts(args) -> tuple[list[str], list[str]]:
    if args.dataset is None:
        from hf_sparse.demo.model import demo_texts

        return demo_texts("train", args.train_docs), demo_texts("heldout", args.heldout_docs)
    opts = {"dataset_config": args.dataset_config, "text_column": args.text_column}
    texts = [t for t in load_texts(args.dataset, split=args.split, **opts) if t and t.strip()]
    if args.eval_split:
        return texts, [t for t in load_texts(args.dataset, split=args.eval_split, **opts) if t and t.strip()]
    if len(texts) < 2:
        raise ValueError("need at least two documents to hold some out; pass --eval-split")
    n_eval = max(1, round(len(texts) * args.heldout_fraction))
    return texts[:-n_eval], texts[-n_eval:]


def make_callback(args, max_steps: int):
    common = {"targets": args.targets, "ignore": args.ignore}
    if args.oneshot:
        return OneShotPruningCallback(
            method=args.oneshot,
            sparsity=args.sparsity,
            num_calibration_batches=args.calibration_batches,
            batch_size=args.batch_size,
            **common,
        )
    if args.gradual:
        return GradualPruningCallback(
            final=args.final,
            initial=args.initial,
            start_step=args.start_step,
            end_step=args.end_step,
            frequency=args.frequency,
            schedule=args.schedule,
            criterion=args.gradual,
            ranking=args.ranking,
            **common,
        )
    if args.rigl is not None:
        return RigLCallback(
            sparsity=args.rigl,
            update_frequency=args.rigl_update_frequency or max(1, max_steps // 10),
            alpha=args.rigl_alpha,
            end_step=args.end_step,
            regrowth=args.rigl_regrowth,
            **common,
        )
    if args.constant:
        return ConstantSparsityCallback(**common)
    return None


class PerplexityAtBegin(TrainerCallback):
    """Held-out perplexity once the sparsity callback has set its masks (after one-shot pruning)."""

    def __init__(self, tokens: torch.Tensor, seqlen: int) -> None:
        self.tokens, self.seqlen, self.value = tokens, seqlen, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.value = perplexity(model, self.tokens.to(next(model.parameters()).device), seqlen=self.seqlen)


def decoder_linear_sparsity(model: nn.Module) -> tuple[float, int]:
    """Fraction of zeros over the linears of the decoder blocks (embeddings and lm_head excluded), and their count."""
    zeros = total = count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name and ".layers." in f".{name}.":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
            count += 1
    return (zeros / total if total else 0.0), count


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    model, tokenizer = load_model(args.model, args.bf16)
    train_texts, eval_texts = load_train_eval_texts(args)
    stream = tokenize_stream(train_texts, tokenizer)
    n = stream.numel() // args.seqlen
    if n < 1:
        raise ValueError(f"the training texts hold {stream.numel()} tokens, fewer than one window of {args.seqlen}")
    import datasets

    train_dataset = datasets.Dataset.from_dict({"input_ids": stream[: n * args.seqlen].view(n, args.seqlen).tolist()})
    heldout = tokenize_stream(eval_texts, tokenizer)[: args.max_eval_tokens]

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20),
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps or max(1, args.max_steps // 10),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.cpu,
        ddp_backend="gloo" if args.cpu else None,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    main_process = training_args.process_index == 0
    device = training_args.device
    model.to(device)
    ppl_dense = perplexity(model, heldout.to(device), seqlen=args.seqlen)

    callback = make_callback(args, args.max_steps)
    at_begin = PerplexityAtBegin(heldout, args.seqlen)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[c for c in (callback, at_begin) if c is not None],
    )
    resume = args.resume
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    ppl_after = perplexity(model, heldout.to(device), seqlen=args.seqlen)
    trainer.save_model(args.output_dir)

    if main_process:
        sparsity, n_linear = decoder_linear_sparsity(model)
        mode = callback.__class__.__name__ if callback else "dense (no sparsity flag)"
        print(
            f"model {args.model}, {n} train windows x {args.seqlen} tokens, {args.max_steps} steps x batch "
            f"{args.batch_size} x {training_args.world_size} process(es), {mode}, "
            f"train loss {result.training_loss:.4f}"
        )
        print(f"held-out perplexity ({heldout.numel()} tokens): before {ppl_dense:.3f}", end="")
        if args.oneshot and at_begin.value is not None:
            print(f", after {args.oneshot} {args.sparsity} pruning {at_begin.value:.3f}", end="")
        print(f", after fine-tuning {ppl_after:.3f}")
        print(
            f"final sparsity of the {n_linear} decoder linears: {sparsity:.4f}"
            + (f" (callback masks: {callback.masks.sparsity():.4f})" if callback and callback.masks else "")
        )
        print(f"saved to {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
