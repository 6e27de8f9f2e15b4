"""Push to and load from a real HTTP Hub on loopback (tests/hub_server.py), with the unmodified huggingface_hub.

huggingface_hub reads ``HF_ENDPOINT`` at import time, so the client side runs in a fresh subprocess
(this file run as a script) with the environment pointing at the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _client(workdir: str) -> dict:
    """Prune tiny models, push them in both formats, load them back from the server, compare bit-exactly."""
    import torch

    sys.path.insert(0, HERE)
    from conftest import tiny_model

    import hf_sparse
    from hf_sparse.persistence import load_sparse, push_to_hub, save_sparse

    out: dict = {}
    cases = [("llama", "2:4", "dense"), ("llama", 0.5, "compressed"), ("gpt2", "2:4", "compressed")]
    for arch, pattern, fmt in cases:
        model = tiny_model(arch, dtype=torch.bfloat16)
        hf_sparse.prune(model, None, "magnitude", pattern, progress=False)
        repo = f"user/tiny-{arch}-{fmt}"
        push_to_hub(model, repo, format=fmt, token="hf_fake_token", results={"perplexity": {"demo": 12.5}})
        loaded = load_sparse(repo, cache_dir=os.path.join(workdir, "cache"))
        a, b = model.state_dict(), loaded.state_dict()
        exact = a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
        )
        out[repo] = {"exact": exact, "sparsity_config": loaded.config.sparsity_config == model.config.sparsity_config}
    # a saved directory pushed in the other format is converted before the upload
    model = tiny_model("llama", dtype=torch.float32)
    hf_sparse.prune(model, None, "magnitude", 0.5, progress=False)
    save_sparse(model, os.path.join(workdir, "saved"))
    push_to_hub(os.path.join(workdir, "saved"), "user/from-dir", format="compressed", token="hf_fake_token")
    loaded = load_sparse("user/from-dir", cache_dir=os.path.join(workdir, "cache"))
    out["user/from-dir"] = {
        "exact": all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items()),
        "sparsity_config": True,
    }
    return out


@pytest.fixture
def hub_server():
    sys.path.insert(0, HERE)
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.stop()


@pytest.mark.slow
def test_push_and_load_through_a_loopback_hub(hub_server, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": "hf_fake_token",
        "HF_HOME": str(tmp_path / "hf_home"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HTTP_PROXY", None), env.pop("HTTPS_PROXY", None), env.pop("http_proxy", None), env.pop("https_proxy", None)
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n" + "\n".join(hub_server.requests)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {
        "user/tiny-llama-dense",
        "user/tiny-llama-compressed",
        "user/tiny-gpt2-compressed",
        "user/from-dir",
    }
    for repo, checks in result.items():
        assert checks == {"exact": True, "sparsity_config": True}, repo

    # the server really received the protocol: repo creation, LFS upload, commits, tree listing, resolve
    seen = "\n".join(hub_server.requests)
    for expected in (
        "POST /api/repos/create",
        "/info/lfs/objects/batch",
        "PUT /_lfs/",
        "/commit/main",
        "/tree/",
        "/resolve/",
    ):
        assert expected in seen, expected
    compressed = hub_server.repos["user/tiny-llama-compressed"].commits[-1][1]
    assert {"config.json", "README.md", "model.hf_sparse.safetensors"} <= set(compressed)
    assert "model.safetensors" not in compressed
    assert compressed["model.hf_sparse.safetensors"]["lfs"]
    assert "model.safetensors" in hub_server.repos["user/tiny-llama-dense"].commits[-1][1]
    assert "model.hf_sparse.safetensors" in hub_server.repos["user/from-dir"].commits[-1][1]
    card = hub_server.read(hub_server.repos["user/tiny-llama-dense"].commits[-1][1]["README.md"]["sha256"]).decode()
    assert "hf-sparse" in card and "12.5" in card


if __name__ == "__main__":
    print(json.dumps(_client(sys.argv[1])))
