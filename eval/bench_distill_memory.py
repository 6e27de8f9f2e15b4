"""Peak memory of the chunked distillation loss vs the naive one (full fp32 logits), loss + backward.

Each variant runs in its own subprocess so that peaks do not mix. On CPU the peak is the growth
of the process's maximum resident set size (``resource.getrusage``) over its resident size just
before the loss; on CUDA it is ``torch.cuda.max_memory_allocated`` over the allocation before.

    python eval/bench_distill_memory.py                       # vocab 32000, seq 2048, batch 4
    python eval/bench_distill_memory.py --seq 512 --batch 2   # a quick run

Inputs: random student/teacher final hidden states ``[batch, seq, hidden]`` and output heads
``Linear(hidden, vocab)`` (the teacher's frozen), labels with about 10% ``-100``. The loss is
forward-KL KD plus CE, as the trainer computes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.distill.losses import distillation_loss_sums, naive_distillation_loss_sums  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(opts: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(opts.device)
    vocab, hidden = opts.vocab, opts.hidden
    student_head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    h_s = torch.randn(opts.batch, opts.seq, hidden, device=device, requires_grad=True)
    h_t = torch.randn(opts.batch, opts.seq, hidden, device=device)
    labels = torch.randint(0, vocab, (opts.batch, opts.seq), device=device)
    labels[torch.rand(labels.shape, device=device) < 0.1] = -100
    kwargs = dict(student_head=student_head, teacher_head=teacher_head, kd_loss=opts.kd_loss, temperature=opts.temperature)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    start = time.perf_counter()
    if opts.variant == "naive":
        sums = naive_distillation_loss_sums(h_s, h_t, labels, **kwargs)
    else:
        sums = distillation_loss_sums(h_s, h_t, labels, chunk_size=opts.chunk_size, **kwargs)
    loss = (sums.kd + sums.ce) / sums.num_tokens
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = _max_rss_mib() - before
    return {
        "variant": opts.variant,
        "peak_mib": peak,
        "loss": loss.item(),
        "grad_norm": h_s.grad.norm().item(),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (the heads' input); small keeps it fast")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--kd-loss", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.variant:  # child process
        print(json.dumps(run_variant(opts)))
        return

    results = {}
    for variant in ("naive", "chunked"):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant],
            capture_output=True, text=True, check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    ratio = chunked["peak_mib"] / naive["peak_mib"]
    loss_diff = abs(chunked["loss"] - naive["loss"])
    print(
        f"vocab {opts.vocab}, seq {opts.seq}, batch {opts.batch}, hidden {opts.hidden}, "
        f"chunk {opts.chunk_size}, {opts.kd_loss} + CE, device {opts.device}, torch {torch.__version__}"
    )
    print("| variant | peak MiB (loss + backward) | seconds | loss |")
    print("|---|---|---|---|")
    for row in (naive, chunked):
        print(f"| {row['variant']} | {row['peak_mib']:.0f} | {row['seconds']:.1f} | {row['loss']:.6f} |")
    print(f"ratio chunked/naive peak: {ratio:.3f} (target <= 0.5); |loss difference| {loss_diff:.2e} (target <= 1e-5)")
    if ratio > 0.5 or loss_diff > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
