"""Pruning quality, time and peak memory on the project's small model (no downloads).

Trains (once, cached) the "bench" small Llama on the generated corpus, then for each pattern and
method prunes a fresh copy in its own subprocess (so peak memory is that run's own) and prints:
dense perplexity, each method's perplexity on held-out text, its pruning time and peak memory.

    python eval/bench_pruning.py                      # 50% and 2:4, all methods
    python eval/bench_pruning.py --methods sparsegpt wanda --patterns 0.5
    python eval/bench_pruning.py --llmcompressor-python /path/to/venv/bin/python   # add the peer's SparseGPT

Peak memory: CUDA peak allocated on a GPU; otherwise the child process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_sparse.calibration import calibration_data, tokenize_stream  # noqa: E402
from hf_sparse.demo.model import demo_texts, load_small_model  # noqa: E402
from hf_sparse.report import markdown_table  # noqa: E402


def _data(model_name: str, nsamples: int, seqlen: int):
    model, tokenizer = load_small_model(model_name, progress=True)
    calib = calibration_data(demo_texts("calibration", 400), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    heldout = tokenize_stream(demo_texts("heldout", 300), tokenizer)
    return model, calib, heldout


def _run_one(args: tuple) -> dict:
    """Child process: prune one copy and measure perplexity, time and peak memory."""
    import resource

    import hf_sparse

    model_name, method, pattern, nsamples, seqlen, device, threads = args
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, calib, heldout = _data(model_name, nsamples, seqlen)
    if device.startswith("cuda"):
        model.to(device)
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = hf_sparse.prune(model, calib, method=method, sparsity=pattern, progress=False)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "pattern": pattern,
        "sparsity": report.overall_sparsity,
        "ppl": hf_sparse.perplexity(model, heldout.to(model.device), seqlen=seqlen),
        "seconds": seconds,
        "peak_mb": peak_mb,
        "rss_before_mb": rss_before / 1024,
    }


def _run_llmcompressor(python: str, model_name: str, pattern: str, nsamples: int, seqlen: int, threads: int) -> dict:
    """Run the peer's oneshot SparseGPT in its own virtual environment; measure our perplexity of its output."""
    import hf_sparse
    from transformers import AutoModelForCausalLM

    model, calib, heldout = _data(model_name, nsamples, seqlen)
    _, tokenizer = load_small_model(model_name, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        src, out, calib_path = os.path.join(tmp, "model"), os.path.join(tmp, "out"), os.path.join(tmp, "calib.pt")
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        torch.save(calib, calib_path)
        script = os.path.join(os.path.dirname(__file__), "llmcompressor_oneshot.py")
        result = subprocess.run(
            [python, script, "--model", src, "--calib", calib_path, "--sparsity", pattern, "--output", out],
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(result.stdout.strip().splitlines()[-1])
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return {
        "method": f"llm-compressor {info.get('llmcompressor', '')} sparsegpt",
        "pattern": pattern,
        "sparsity": float("nan"),
        "ppl": hf_sparse.perplexity(pruned, heldout, seqlen=seqlen),
        "seconds": info["seconds"],
        "peak_mb": float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", choices=["demo", "bench"])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "obc", "wanda", "magnitude"])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llmcompressor-python", default=None, help="python of a venv with llmcompressor installed")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    args = parser.parse_args()

    model, _, heldout = _data(args.model, args.nsamples, args.seqlen)  # trains and caches before the children start
    import hf_sparse

    dense_ppl = hf_sparse.perplexity(model, heldout, seqlen=args.seqlen)
    rows = []
    ctx = mp.get_context("spawn")
    for pattern in args.patterns:
        for method in args.methods:
            with ctx.Pool(1) as pool:
                row = pool.apply(
                    _run_one, ((args.model, method, pattern, args.nsamples, args.seqlen, args.device, args.threads),)
                )
            rows.append(row)
            print(f"{method:>10} {pattern:>4}: ppl {row['ppl']:.4f}  {row['seconds']:.2f} s", flush=True)
        if args.llmcompressor_python:
            rows.append(
                _run_llmcompressor(
                    args.llmcompressor_python, args.model, pattern, args.nsamples, args.seqlen, args.threads
                )
            )
    machine = f"{os.cpu_count()}-core CPU" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"\nsmall '{args.model}' Llama, {args.nsamples} x {args.seqlen} calibration tokens, "
        f"torch {torch.__version__}, {machine}, threads: {args.threads or torch.get_num_threads()}\n"
    )
    table = [["dense", "-", "0%", f"{dense_ppl:.4f}", "1.000", "-", "-"]]
    for r in rows:
        table.append(
            [
                r["method"],
                r["pattern"],
                "-" if r["sparsity"] != r["sparsity"] else f"{r['sparsity']:.1%}",
                f"{r['ppl']:.4f}",
                f"{r['ppl'] / dense_ppl:.3f}",
                f"{r['seconds']:.2f}",
                "-" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f}",
            ]
        )
    print(markdown_table(["method", "pattern", "sparsity", "perplexity", "ppl / dense", "time (s)", "peak MB"], table))
    ours = {(r["method"], r["pattern"]): r["seconds"] for r in rows}
    for r in rows:
        if r["method"].startswith("llm-compressor") and ("sparsegpt", r["pattern"]) in ours:
            print(
                f"\nspeed-up over llm-compressor at {r['pattern']}: {r['seconds'] / ours[('sparsegpt', r['pattern'])]:.1f}x"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"dense_ppl": dense_ppl, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
