"""Multi-process calibration: 2 CPU processes (gloo) give the single-process weights on every rank."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import hf_sparse
from conftest import tiny_model

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "prune_distributed.py")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, pattern, arch", [("sparsegpt", "2:4", "llama"), ("wanda", "0.5", "llama"), ("sparsegpt", "0.5", "mixtral")]
)
def test_two_processes_equal_one(tmp_path, method, pattern, arch):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           SCRIPT, str(tmp_path), method, pattern, arch]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["nsamples"] == rank1["nsamples"] == 16
    assert rank0["layers"] == rank1["layers"] >= 14
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key  # identical weights on every rank

    single = tiny_model(arch)
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    hf_sparse.prune(single, calib, method=method, sparsity=pattern, batch_size=2, progress=False)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_failing_solver_raises_on_every_rank(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), SCRIPT, str(tmp_path), "obc-too-large", "0.5"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert "OBCTooLargeError" in errors[0] and "TFLOP" in errors[0]  # rank 0 owns the first job
    assert "failed to prune" in errors[1]
