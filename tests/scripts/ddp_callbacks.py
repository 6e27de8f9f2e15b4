"""Run by test_training_distributed.py under ``torchrun --nproc_per_node 2``: Trainer DDP on CPU (gloo).

Phase 1: one-shot Wanda calibrated on each rank's own data shard (different per rank) -> rank 0's
result must be broadcast. Phase 2: gradual movement pruning (gradient scores after the all-reduce).
Each rank saves its masks and weights to ``OUT/{phase}_rank{r}.pt``.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_common import Probe, make_args, tiny_llama, token_dataset  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_sparse.training import GradualPruningCallback, OneShotPruningCallback  # noqa: E402


def run(out: str, phase: str, callback, **overrides) -> None:
    rank = int(os.environ["RANK"])
    model = tiny_llama(seed=rank if phase == "oneshot" else 0)  # DDP broadcasts rank 0's weights at wrap time
    probe = Probe(callback)
    args = make_args(os.path.join(out, phase), per_device_train_batch_size=2, ddp_backend="gloo", **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[callback, probe])
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    assert all(v == 0 for v in probe.violations), probe.violations
    torch.save(
        {
            "masks": callback.masks.state_dict(),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "sparsity": probe.sparsity,
        },
        os.path.join(out, f"{phase}_rank{rank}.pt"),
    )


def main(out: str) -> None:
    torch.set_num_threads(1)
    run(out, "oneshot", OneShotPruningCallback(method="wanda", sparsity=0.5, num_calibration_batches=2), max_steps=2)
    run(out, "gradual", GradualPruningCallback(final=0.6, start_step=1, end_step=4, frequency=1, criterion="movement"),
        max_steps=5)


if __name__ == "__main__":
    main(sys.argv[1])
