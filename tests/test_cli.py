"""The hf-sparse command line on a tiny model saved to disk, and the embedded demo."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_sparse.cli import main
from hf_sparse.demo.corpus import generate_documents
from hf_sparse.demo.tokenizer import build_tokenizer
from conftest import tiny_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(generate_documents(200, seed=0), vocab_size=300)
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = path / "calib.txt"
    data.write_text("\n\n".join(generate_documents(80, seed=5)))
    return path, data


def test_prune_command_saves_sparse_model_with_metadata(saved_model, tmp_path, capsys):
    path, data = saved_model
    out = tmp_path / "pruned"
    code = main([
        "prune", str(path), "--method", "sparsegpt", "--sparsity", "2:4", "--dataset", str(data),
        "--nsamples", "8", "--seqlen", "32", "--output", str(out), "--eval-ppl", str(data),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| layer |" in printed and "perplexity:" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["pattern"] == "2:4"
    weights = load_file(str(out / "model.safetensors"))
    w = weights["model.layers.0.mlp.up_proj.weight"]
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert os.path.exists(out / "tokenizer.json")


def test_prune_command_reports_bad_input(saved_model, capsys):
    path, data = saved_model
    code = main(["prune", str(path), "--sparsity", "4:4", "--dataset", str(data), "--nsamples", "2", "--seqlen", "16"])
    assert code == 2
    assert "N must be smaller than M" in capsys.readouterr().err
    code = main(["prune", str(path), "--dataset", str(data), "--nsamples", "2", "--seqlen", "4096"])
    assert code == 2 and "at most 128 positions" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(capsys):
    """`hf-sparse demo`: trains (or loads) the embedded model and prints the comparison table."""
    code = main(["demo", "--methods", "sparsegpt", "magnitude", "--patterns", "0.5", "--nsamples", "16", "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"dense", "sparsegpt", "magnitude"} <= set(rows)
    ppl = {k: float(v.split("|")[5]) for k, v in rows.items() if k in ("dense", "sparsegpt", "magnitude")}
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["dense"] * 1.2  # pruned, and still close to dense
    assert torch.isfinite(torch.tensor(list(ppl.values()))).all()
