"""CATS benchmark: MLP-block latency, generation tokens/s and perplexity, dense vs CATS vs TEAL.

    python eval/bench_cats.py            # full run (about 5-10 minutes on a 2-core CPU)
    python eval/bench_cats.py --quick    # fewer repetitions, no 7B-shape generation

Sections (each a Markdown table):
1. MLP block latency, one token (batch 1), at the Llama-7B MLP shape 4096 x 11008 and at the
   small "bench" model's shape, dense vs CATS at 50/70/90% sparsity. Beside each measured
   speed-up ``dense / cats`` the memory-bandwidth ceiling ``3 / (3 - 2s)`` is printed (the gate
   GEMV stays dense, up and down read a fraction ``1 - s`` of their rows) and the fraction of that
   ceiling reached. On a GPU the same is measured in fp16 with the Triton kernel.
2. End-to-end greedy generation decode tokens/s through ``generate`` (batch 1, KV cache, prefill
   excluded, median step time) on the "bench" model and on a 3-layer model with Llama-7B layer shapes (random
   weights, calibrated on random tokens).
3. Perplexity on held-out demo text: dense, CATS at each sparsity, TEAL at the same activation
   sparsity and TEAL at the same fraction of block weight reads skipped as CATS.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from hf_sparse.calibration import calibration_data
from hf_sparse.cats import apply_cats, apply_teal, measure_cats_sparsity, remove_cats
from hf_sparse.demo.model import demo_texts, load_small_model


def ceiling(s: float) -> float:
    """Bandwidth ceiling of the CATS MLP speed-up: 3 weight matrices dense, 3 - 2s with CATS."""
    return 3.0 / (3.0 - 2.0 * s)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Fastest of ``reps`` calls, in seconds: on a shared machine the minimum is the least disturbed."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def make_llama(hidden: int, inter: int, layers: int, heads: int, vocab: int, device, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def bench_mlp(model, label: str, sparsity: float, reps: int, device, calib, rounds: int = 5) -> str:
    """Latency of one MLP block for one token, dense vs CATS: one Markdown table row.

    Each measurement runs the MLPs of all the model's layers in turn (per-call time reported), so
    that, as in a real decode step, a layer's weights are not still in cache from its last call.
    """
    mlps = [layer.mlp for layer in model.model.layers]
    x = torch.randn(1, 1, mlps[0].gate_proj.in_features, device=device, dtype=mlps[0].gate_proj.weight.dtype)

    def run() -> None:
        for mlp in mlps:
            mlp(x)

    apply_cats(model, sparsity, calib, batch_size=4)
    thresholds = dict(model.config.cats_config["thresholds"])
    dense_times, cats_times = [], []
    for _ in range(rounds):  # interleaved rounds, so that background load hits both alike; best kept
        remove_cats(model)
        dense_times.append(time_call(run, device, reps) / len(mlps))
        apply_cats(model, sparsity, thresholds=thresholds)
        cats_times.append(time_call(run, device, reps) / len(mlps))
    remove_cats(model)
    dense, cats = min(dense_times), min(cats_times)
    ratio = dense / cats
    return (
        f"| {label} | {sparsity:.0%} | {dense * 1e3:.2f} | {cats * 1e3:.2f} | {ratio:.2f} | "
        f"{ceiling(sparsity):.2f} | {ratio / ceiling(sparsity):.2f} |"
    )


class _StepClock:
    """A logits processor that only timestamps each decoding step of ``generate``."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Decode tokens/s through ``model.generate`` (greedy, KV cache), prefill excluded.

    Each step is timestamped from inside ``generate``; the median step interval over ``reps`` runs
    is robust to the occasional step slowed down by other work on a shared machine.
    """
    from transformers import LogitsProcessorList

    intervals: list[float] = []
    for _ in range(reps):
        clock = _StepClock()
        model.generate(
            prompt,
            max_new_tokens=new_tokens + 1,
            min_new_tokens=new_tokens + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        intervals += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return 1.0 / statistics.median(intervals)


def model_ceiling(model, sparsity: float) -> float:
    """Bandwidth ceiling of a whole decode step: all weight reads (blocks + LM head) vs CATS's skipped ones."""
    total = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    total += model.lm_head.weight.numel()
    skipped = sum(layer.mlp.up_proj.weight.numel() + layer.mlp.down_proj.weight.numel() for layer in model.model.layers)
    return total / (total - sparsity * skipped)


def bench_generation(model, label: str, sparsities, calib, prompt, new_tokens: int, reps: int) -> list[str]:
    remove_cats(model)
    dense = tokens_per_second(model, prompt, new_tokens, reps)
    rows = [f"| {label} | dense | {dense:.1f} | 1.00 | - |"]
    for s in sparsities:
        apply_cats(model, s, calib, batch_size=4)
        tps = tokens_per_second(model, prompt, new_tokens, reps)
        rows.append(f"| {label} | CATS {s:.0%} | {tps:.1f} | {tps / dense:.2f} | {model_ceiling(model, s):.2f} |")
        remove_cats(model)
    return rows


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def block_read_fraction(model) -> float:
    """Fraction of a decoder block's weights that sit in the MLP's up and down projections."""
    block = model.model.layers[0]
    n_all = sum(p.numel() for n, p in block.named_parameters() if p.dim() == 2)
    n_ud = block.mlp.up_proj.weight.numel() + block.mlp.down_proj.weight.numel()
    return n_ud / n_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; skip 7B-shape generation")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    reps = 10 if args.quick else 30
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    print(
        f"# CATS benchmark\n\nmachine: {platform.machine()} {torch.get_num_threads()} threads (load average {os.getloadavg()[0]:.1f}), "
        f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, dtype {dtype}\n"
    )

    # 1. MLP block latency
    bench_model, tok = load_small_model("bench", progress=False)
    bench_model = bench_model.to(device=device, dtype=dtype)
    calib_small = calibration_data(demo_texts("calibration", 200), tok, nsamples=16, seqlen=128, seed=0)
    # 3 layers of Llama-7B shape (2.4 GB in fp32): more than the last-level cache, like a real model
    big = make_llama(4096, 11008, 3, 32, 512, device, dtype)
    calib_big = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    rows = [
        "| MLP shape | sparsity | dense ms | CATS ms | speed-up | ceiling 3/(3-2s) | of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, label, calib in (
        (big, "4096 x 11008 (Llama-7B)", calib_big),
        (bench_model, "256 x 704 (bench)", calib_small),
    ):
        if not args.skip_mlp:
            rows += [bench_mlp(model, label, s, reps, device, calib.to(device)) for s in sparsities]
    if not args.skip_mlp:
        print("## MLP block latency, batch 1, one token\n")
        print("\n".join(rows) + "\n")
    # 2. generation
    if not args.skip_generation:
        rows = ["| model | setting | decode tokens/s | vs dense | whole-step ceiling |", "|---|---|---|---|---|"]
        prompt = calib_small[:1, :16].to(device)
        rows += bench_generation(
            bench_model,
            "bench (256 x 4 layers)",
            sparsities,
            calib_small.to(device),
            prompt,
            new_tokens=64,
            reps=2,
        )
        if not args.quick:
            rows += bench_generation(
                big,
                "3 layers of Llama-7B shape",
                sparsities,
                calib_big.to(device),
                calib_big[:1, :8].to(device),
                new_tokens=16,
                reps=2,
            )
        print("## Greedy generation, batch 1\n")
        print("\n".join(rows) + "\n")
    del big

    # 3. perplexity
    if not args.skip_ppl:
        held = calibration_data(
            demo_texts("heldout", 200), tok, nsamples=16 if args.quick else 32, seqlen=128, seed=1
        ).to(device)
        frac = block_read_fraction(bench_model)
        rows = [
            "| method | activation sparsity | measured (held-out) | block weight reads skipped | perplexity |",
            "|---|---|---|---|---|",
        ]
        remove_cats(bench_model)
        rows.append(f"| dense | 0% | - | 0% | {perplexity(bench_model, held):.3f} |")
        for s in sparsities:
            for method, s_act, skipped in (
                ("CATS", s, s * frac),
                ("TEAL (same activation sparsity)", s, s),
                ("TEAL (same weight reads)", s * frac, s * frac),
            ):
                if method == "CATS":
                    apply_cats(bench_model, s_act, calib_small.to(device))
                else:
                    apply_teal(bench_model, s_act, calib_small.to(device))
                measured = measure_cats_sparsity(bench_model, held).mean
                rows.append(
                    f"| {method} | {s_act:.0%} | {measured:.1%} | {skipped:.0%} | {perplexity(bench_model, held):.3f} |"
                )
                remove_cats(bench_model)
        print(f"## Perplexity on held-out demo text (bench model; up+down are {frac:.0%} of a block's weights)\n")
        print("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
