"""Run by test_distill_trainer.py under ``torchrun --nproc_per_node 2``: DDP distillation on CPU (gloo).

Each rank trains with per-device batch 2 and saves its final weights to ``OUT/rank{r}.pt``.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distill_trainer import make_args, make_dataset, tiny_llama  # noqa: E402

from hf_sparse.distill import DistillationTrainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    student, teacher = tiny_llama(1), tiny_llama(0)
    args = make_args(out, per_device_train_batch_size=2, ddp_backend="gloo")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_dataset())
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    assert "kd_loss" in trainer.state.log_history[0]
    torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
