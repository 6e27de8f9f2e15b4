"""Per-step overhead of the hf_sparse Trainer callbacks, as a ratio to plain Trainer steps.

    python eval/bench_callbacks.py                               # "demo" model, 2 threads
    python eval/bench_callbacks.py --models demo bench --rounds 8 --steps 40 --threads 2

Variants (each run starts from the same 50%-magnitude-pruned copy of the small model, same data order):

- ``plain``: no callback;
- ``constant``: ``ConstantSparsityCallback`` (mask keeping: gradients and weights masked every step);
- ``gradual-magnitude``: ``GradualPruningCallback`` 0.5 -> 0.75, magnitude criterion, an event every
  ``--frequency`` steps;
- ``gradual-<criterion>``: the same with a gradient criterion (``--grad-criterion``, default taylor),
  which accumulates scores every step.

The time of one optimizer step is measured by a ``TrainerCallback`` from ``on_step_begin`` to
``on_step_end`` (forward, backward, clipping, the callbacks' hooks, optimizer, scheduler). The first
``--warmup`` steps of every run are dropped. The variants are interleaved (A/B/C/D, A/B/C/D, ...,
``--rounds`` times) so that drift on a shared machine hits them alike. The table gives the median
step time (pruning events of the gradual variants are mostly excluded by the median; the mean
includes them) and two ratios to plain: of the pooled medians, and the median over rounds of the
per-round ratio (paired, the more robust to drift).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_sparse import prune
from hf_sparse.demo.model import demo_texts, load_small_model
from hf_sparse.training import ConstantSparsityCallback, GradualPruningCallback


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, ``on_step_begin`` -> ``on_step_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
            self._start = None


def make_callback(variant: str, steps: int, frequency: int):
    if variant == "plain":
        return None
    if variant == "constant":
        return ConstantSparsityCallback(log_sparsity=False)
    if variant.startswith("gradual-"):
        return GradualPruningCallback(
            final=0.75,
            initial=0.5,
            start_step=0,
            end_step=steps,
            frequency=frequency,
            criterion=variant.split("-", 1)[1],
            log_sparsity=False,
        )
    raise ValueError(variant)


def run_once(base, dataset, variant: str, args, output_dir: str) -> list[float]:
    model = copy.deepcopy(base)
    model.train()
    timer = StepTimer()
    callback = make_callback(variant, args.steps, args.frequency)
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        callbacks=[c for c in (callback, timer) if c is not None],
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table
    trainer.train()
    del trainer, model
    gc.collect()
    return timer.times[args.warmup :]


def bench_model(name: str, args) -> list[dict]:
    base, tokenizer = load_small_model(name, progress=False)
    prune(base, None, method="magnitude", sparsity=0.5, progress=False)  # an already-sparse model to keep sparse
    stream = torch.tensor(tokenizer("\n\n".join(demo_texts("train", 400)), add_special_tokens=False)["input_ids"])
    n = stream.numel() // args.seqlen
    windows = stream[: n * args.seqlen].view(n, args.seqlen)
    dataset = [{"input_ids": w, "labels": w} for w in windows]
    variants = ["plain", "constant", "gradual-magnitude", f"gradual-{args.grad_criterion}"]
    times = {v: [] for v in variants}
    round_medians = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as output_dir:
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # A/B/C/D then D/C/B/A: no variant always first
            for variant in order:
                t = run_once(base, dataset, variant, args, output_dir)
                times[variant].extend(t)
                round_medians[variant].append(statistics.median(t))
            print(
                f"[{name}] round {r + 1}/{args.rounds}: "
                + ", ".join(f"{v} {round_medians[v][-1] * 1e3:.2f} ms" for v in variants),
                file=sys.stderr,
            )
    plain_median = statistics.median(times["plain"])
    rows = []
    for v in variants:
        paired = statistics.median(a / b for a, b in zip(round_medians[v], round_medians["plain"]))
        rows.append(
            {
                "model": name,
                "variant": v,
                "steps": len(times[v]),
                "median_ms": statistics.median(times[v]) * 1e3,
                "mean_ms": statistics.fmean(times[v]) * 1e3,
                "ratio": statistics.median(times[v]) / plain_median,
                "paired": paired,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo"], choices=["demo", "bench"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (one run of every variant each)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--frequency", type=int, default=10, help="steps between pruning events (gradual)")
    parser.add_argument("--grad-criterion", default="taylor", choices=["taylor", "movement", "fisher"])
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("hf_sparse").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    rows = [row for name in args.models for row in bench_model(name, args)]
    print(
        f"machine: {os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} threads; batch {args.batch_size} x {args.seqlen} tokens, {args.rounds} interleaved rounds "
        f"x {args.steps} steps (first {args.warmup} of each run dropped)"
    )
    print()
    print("| model | variant | steps | median ms/step | ratio to plain | paired ratio | mean ms/step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['variant']} | {row['steps']} | {row['median_ms']:.2f} | {row['ratio']:.3f}x "
            f"| {row['paired']:.3f}x | {row['mean_ms']:.2f} |"
        )
    for row in rows:
        if row["variant"] == "constant":
            verdict = "meets" if row["paired"] <= 1.05 else "misses"
            print(f"{row['model']}: mask keeping {row['paired']:.3f}x plain ({verdict} the <= 1.05x target)")


if __name__ == "__main__":
    main()
