"""Multi-process vs single-process pruning time on the project's small model.

    python eval/bench_distributed.py --nproc 2          # launches torchrun itself

Each run prunes the cached "bench" model with SparseGPT; the table gives wall time of prune() and
the ratio. On a CPU machine both runs share the same cores (1 process x N threads vs N processes x
1 thread), so the ratio measures the parallel efficiency of the split, not extra hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _worker(out: str, method: str, pattern: str, nsamples: int, seqlen: int) -> None:
    import torch.distributed as dist

    import hf_sparse
    from hf_sparse.calibration import calibration_data
    from hf_sparse.demo.model import demo_texts, load_small_model

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    model, tokenizer = load_small_model("bench", progress=False)
    calib = calibration_data(demo_texts("calibration", 400), tokenizer, nsamples=nsamples, seqlen=seqlen)
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    hf_sparse.prune(model, calib, method=method, sparsity=pattern, batch_size=4, progress=False)
    seconds = time.perf_counter() - start
    if not distributed or dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump({"seconds": seconds}, handle)
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="0.5")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.method, args.pattern, args.nsamples, args.seqlen)
        return
    from hf_sparse.demo.model import load_small_model
    from hf_sparse.report import markdown_table

    load_small_model("bench")  # train/cache once before timing
    common = [
        "--method",
        args.method,
        "--pattern",
        args.pattern,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        single = os.path.join(tmp, "single.json")
        subprocess.run([sys.executable, __file__, "--worker", single, *common], check=True)
        times[1] = json.load(open(single))["seconds"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        multi = os.path.join(tmp, "multi.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(args.nproc),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                __file__,
                "--worker",
                multi,
                *common,
            ],
            check=True,
            env=env,
        )
        times[args.nproc] = json.load(open(multi))["seconds"]
    print(
        f"\n{args.method} {args.pattern} on the 'bench' small model, {args.nsamples} x {args.seqlen} tokens, "
        f"{os.cpu_count()}-core CPU, torch {torch.__version__}\n"
    )
    print(
        markdown_table(
            ["processes", "prune() seconds", "speed-up"],
            [[n, f"{t:.2f}", f"{times[1] / t:.2f}x"] for n, t in sorted(times.items())],
        )
    )


if __name__ == "__main__":
    main()
