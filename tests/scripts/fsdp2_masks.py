"""Run by test_training_distributed.py under ``torchrun --nproc_per_node 2``: FSDP2 ``fully_shard`` on CPU.

The callbacks are driven by hand (the Trainer disables FSDP on CPU) around a plain training loop,
in the Trainer's order of events. ``intermediate_size=99`` makes gate/up_proj split 50/49 rows.
Each rank saves the full masks, the full weights and its local shard shapes to ``OUT/fsdp_rank{r}.pt``.
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_common import tiny_llama, token_dataset  # noqa: E402

from hf_sparse.training import GradualPruningCallback, MaskSet, RigLCallback  # noqa: E402
from hf_sparse.training.masks import full_tensor, local_tensor  # noqa: E402


def train(out: str, callback, steps: int) -> dict:
    rank = dist.get_rank()
    model = tiny_llama(seed=0, intermediate_size=99)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = SimpleNamespace(output_dir=out, should_save=rank == 0, deepspeed=None, resume_from_checkpoint=None)
    state, control = TrainerState(max_steps=steps), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    data = token_dataset(16)
    for step in range(steps):
        batch = torch.stack([data[(4 * step + 2 * rank + i) % 16]["input_ids"] for i in range(2)])
        model(input_ids=batch, labels=batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.zero_grad()
        state.global_step += 1
        assert callback.masks.violations() == 0
    masks = callback.masks
    assert any(local_tensor(p).shape[0] * 2 != p.shape[0] for p in masks.params.values()), "no uneven shard"
    saved = masks.state_dict()
    reloaded = MaskSet()
    for name, param in masks.params.items():
        reloaded.add(name, param)
    reloaded.load_state_dict(saved)
    assert all(torch.equal(reloaded.masks[n], masks.masks[n]) for n in masks.masks)
    logs = callback.sparsity_logs()
    return {
        "masks": saved,
        "weights": {n: full_tensor(p).clone() for n, p in masks.params.items()},
        "local_shapes": {n: tuple(local_tensor(p).shape) for n, p in masks.params.items()},
        "overall": logs["sparsity/overall"],
        "updates": getattr(callback, "updates", None),
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "gradual": train(out, GradualPruningCallback(final=0.5, start_step=1, end_step=3, frequency=1), 4),
        "rigl": train(out, RigLCallback(sparsity=0.5, update_frequency=1, alpha=0.3, end_step=4), 4),
    }
    torch.save(result, os.path.join(out, f"fsdp_rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
