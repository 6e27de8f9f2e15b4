"""Run under torchrun: prune a tiny model with 2 processes (gloo) and save rank-wise weights for comparison."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hf_sparse  # noqa: E402
from conftest import tiny_model  # noqa: E402


def main() -> None:
    out_dir, method, pattern = sys.argv[1], sys.argv[2], sys.argv[3]
    arch = sys.argv[4] if len(sys.argv) > 4 else "llama"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model(arch)
    if method == "obc-too-large":  # the owner rank's solver fails: every rank must raise, none may hang
        try:
            hf_sparse.prune(model, calib, method="obc", sparsity=pattern, batch_size=2, progress=False, max_flops=1.0)
        except Exception as err:  # noqa: BLE001
            with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as handle:
                handle.write(f"{type(err).__name__}: {err}")
        dist.destroy_process_group()
        return
    report = hf_sparse.prune(model, calib, method=method, sparsity=pattern, batch_size=2, progress=False)
    torch.save(
        {"state": model.state_dict(), "nsamples": report.calibration["nsamples"], "layers": len(report.layers)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
