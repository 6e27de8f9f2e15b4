"""Evaluation building blocks without lm-eval: configurations, ReLUification, paper data, tables, chart, perplexity."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import tiny_model

from hf_sparse.evaluation import (
    PAPER_RESULTS,
    PAPER_TASKS,
    Configuration,
    applied,
    apply_relu,
    is_relu_applied,
    parse_configuration,
    perplexity_table,
    remove_relu,
    run_perplexity,
    zero_shot_chart,
    zero_shot_table,
)
from hf_sparse.evaluation.configs import parse_prune_spec
from hf_sparse.modules import find_gated_mlps

try:
    import hf_sparse.cats  # noqa: F401

    HAVE_CATS, CATS_ERROR = True, ""
except ImportError as err:  # another engineer's module, maybe not there yet
    HAVE_CATS, CATS_ERROR = False, str(err)

needs_cats = pytest.mark.skipif(not HAVE_CATS, reason=f"hf_sparse.cats not importable: {CATS_ERROR}")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dense", Configuration("dense")),
        ("relu", Configuration("relu", relu=True)),
        ("cats50", Configuration("cats50", cats=0.5)),
        ("cats90", Configuration("cats90", cats=0.9)),
        ("sparsegpt50", Configuration("sparsegpt50", prune_method="sparsegpt", prune_sparsity="0.5")),
        ("sparsegpt2:4", Configuration("sparsegpt2:4", prune_method="sparsegpt", prune_sparsity="2:4")),
        ("wanda50", Configuration("wanda50", prune_method="wanda", prune_sparsity="0.5")),
        (
            "sparsegpt2:4+cats50",
            Configuration("sparsegpt2:4+cats50", cats=0.5, prune_method="sparsegpt", prune_sparsity="2:4"),
        ),
    ],
)
def test_parse_configuration(name, expected):
    assert parse_configuration(name) == expected


@pytest.mark.parametrize("bad", ["cats", "cats100", "foo50", "sparsegpt", "cats50+cats70", "sparsegpt50+wanda50"])
def test_parse_configuration_rejects(bad):
    with pytest.raises(ValueError):
        parse_configuration(bad)


def test_prune_spec_and_labels():
    assert parse_prune_spec("sparsegpt:2:4") == ("sparsegpt", "2:4")
    assert parse_prune_spec("wanda:0.5") == ("wanda", "0.5")
    assert parse_prune_spec("wanda50") == ("wanda", "0.5")
    with pytest.raises(ValueError, match="unknown pruning method"):
        parse_prune_spec("nosuch:0.5")
    config = Configuration.from_parts(cats=50, prune="sparsegpt:2:4")
    assert (config.name, config.cats) == ("sparsegpt2:4+cats50", 0.5)
    assert config.describe() == "SparseGPT 2:4 + CATS 50%"
    assert parse_configuration("relu").describe() == "ReLUification"
    assert not parse_configuration("magnitude50").needs_calibration


def test_paper_averages_are_the_mean_of_the_tasks():
    for model, table in PAPER_RESULTS.items():
        assert set(table) == {"dense", "cats50", "cats70", "cats90", "relu"}
        for config, row in table.items():
            mean = sum(row[t] for t in PAPER_TASKS) / len(PAPER_TASKS)
            assert abs(mean - row["avg"]) < 6e-4, (model, config, mean, row["avg"])


def test_relu_swaps_and_restores():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    original = {name: getattr(m.module, m.act) for name, m in find_gated_mlps(model).items()}
    apply_relu(model)
    apply_relu(model)  # idempotent
    assert is_relu_applied(model)
    for mlp in find_gated_mlps(model).values():
        assert isinstance(getattr(mlp.module, mlp.act), torch.nn.ReLU)
    with torch.no_grad():
        relu_logits = model(ids).logits
        act_in = model.model.layers[0].mlp.act_fn(torch.tensor([-1.0, 2.0]))
    assert torch.equal(act_in, torch.tensor([0.0, 2.0]))
    assert not torch.allclose(relu_logits, before)
    remove_relu(model)
    assert not is_relu_applied(model)
    for name, mlp in find_gated_mlps(model).items():
        assert getattr(mlp.module, mlp.act) is original[name]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_relu_needs_gated_mlps():
    with pytest.raises(ValueError, match="no gated MLPs"):
        apply_relu(tiny_model("gpt2"))


def test_applied_pruning_restores_weights_and_config(calib_ids):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(model, "sparsegpt2:4", calib_ids):
        w = model.model.layers[0].mlp.down_proj.weight
        assert (w.view(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2
        assert getattr(model.config, "sparsity_config", None) is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert getattr(model.config, "sparsity_config", None) is None


def test_applied_needs_calibration_for_data_aware_methods():
    with pytest.raises(ValueError, match="calibration"), applied(tiny_model("llama"), "wanda50"):
        pass
    with applied(tiny_model("llama"), "magnitude50"):  # magnitude needs none
        pass


@needs_cats
def test_applied_cats_is_removed(calib_ids):
    from hf_sparse.cats import is_cats_applied

    model = tiny_model("llama")
    calls = []

    def calibration():
        calls.append(1)
        return calib_ids

    with applied(model, "relu+cats70", calibration):
        assert is_cats_applied(model) and is_relu_applied(model)
    assert not is_cats_applied(model) and not is_relu_applied(model)
    assert calls == [1]


def test_run_perplexity_and_table(calib_ids):
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (4 * 32 + 5,))
    results = run_perplexity(model, tokens, ["dense", "magnitude50", "relu"], seqlen=32, batch_size=2)
    assert list(results) == ["dense", "magnitude50", "relu"]
    assert all(math.isfinite(v) and v > 1 for v in results.values())
    table = perplexity_table(results)
    assert "| Magnitude 50% |" in table and "vs dense" in table
    # the model is dense again
    assert results["dense"] == pytest.approx(run_perplexity(model, tokens, ["dense"], seqlen=32)["dense"])


def _fake_results():
    scores = {t: {"acc": 0.5 + 0.01 * i} for i, t in enumerate(PAPER_TASKS)}
    for t in ("piqa", "hellaswag"):
        scores[t]["acc_norm"] = 0.6
    return {"dense": scores, "cats50": {t: {"acc": 0.4} for t in PAPER_TASKS}, "wanda50": {"piqa": {"acc": 0.3}}}


def test_zero_shot_table_paper_layout():
    table = zero_shot_table(_fake_results(), paper="mistral-7b")
    lines = table.splitlines()
    assert "ours (paper, ours - paper)" in lines[0]
    assert lines[2] == "| Method | WG | PIQA | SciQ | OBQA | HS | BoolQ | ARC-e | ARC-c | Avg |"
    dense = next(line for line in lines if line.startswith("| Dense |"))
    assert "0.5000 (0.7419, -0.2419)" in dense  # WinoGrande
    assert dense.rstrip(" |").endswith("0.5350 (0.6994, -0.1644)")  # the average against the paper's
    cats = next(line for line in lines if line.startswith("| CATS 50% |"))
    assert "0.4000 (0.7245, -0.3245)" in cats
    wanda = next(line for line in lines if line.startswith("| Wanda 50% |"))
    assert "(" not in wanda and wanda.count("| - ") == 8  # not in the paper; 7 tasks and avg missing
    norm = zero_shot_table(_fake_results(), metric="acc_norm")
    assert "paper" not in norm and "| Dense | - | 0.6000 |" in norm


def test_zero_shot_chart(tmp_path):
    path = zero_shot_chart(_fake_results(), tmp_path / "sub" / "chart.png", paper="llama2-7b")
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
