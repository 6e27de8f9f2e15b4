"""Two CPU processes (gloo): Trainer DDP and FSDP2 ``fully_shard`` with the sparsity callbacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from hf_sparse.training.criteria import count_for

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def torchrun(script: str, out: str, timeout: int = 240) -> None:
    torchrun_bin = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun_bin if os.path.exists(torchrun_bin) else "torchrun", "--nproc_per_node", "2",
           "--standalone", os.path.join(SCRIPTS, script), out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} timed out:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]


@pytest.mark.slow
def test_ddp_trainer_identical_masks_and_exact_sparsity(tmp_path):
    torchrun("ddp_callbacks.py", str(tmp_path))
    for phase, target in (("oneshot", 0.5), ("gradual", 0.6)):
        r0 = torch.load(tmp_path / f"{phase}_rank0.pt")
        r1 = torch.load(tmp_path / f"{phase}_rank1.pt")
        assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 14
        for name, keep in r0["masks"].items():
            assert torch.equal(keep, r1["masks"][name]), (phase, name)
            assert int((~keep).sum()) == count_for(target, keep.numel()), (phase, name)
            weight = r0["weights"][f"{name}.weight"]
            assert bool((weight[~keep] == 0).all())
        for name, weight in r0["weights"].items():
            assert torch.equal(weight, r1["weights"][name]), (phase, name)
        assert r0["sparsity"][max(r0["sparsity"])] == pytest.approx(target, abs=1e-4)
    gradual = torch.load(tmp_path / "gradual_rank0.pt")["sparsity"]
    assert gradual[1] < gradual[2] < gradual[4]  # sparsity rose during DDP training


@pytest.mark.slow
def test_fsdp2_masks_on_uneven_local_shards(tmp_path):
    torchrun("fsdp2_masks.py", str(tmp_path))
    r0 = torch.load(tmp_path / "fsdp_rank0.pt")
    r1 = torch.load(tmp_path / "fsdp_rank1.pt")
    for kind in ("gradual", "rigl"):
        a, b = r0[kind], r1[kind]
        gate = "model.layers.0.mlp.gate_proj"
        assert a["local_shapes"][gate] == (50, 64) and b["local_shapes"][gate] == (49, 64)  # 99 rows split unevenly
        assert a["overall"] == b["overall"] == pytest.approx(0.5, abs=1e-3)
        for name, keep in a["masks"].items():
            assert torch.equal(keep, b["masks"][name]), (kind, name)
            assert int((~keep).sum()) == count_for(0.5, keep.numel()), (kind, name)
            assert bool((a["weights"][name][~keep] == 0).all()), (kind, name)
            assert torch.equal(a["weights"][name], b["weights"][name])
    assert r0["rigl"]["updates"] == 4
