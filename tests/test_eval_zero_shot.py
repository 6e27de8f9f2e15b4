"""The zero-shot and perplexity evaluation end to end, offline, on a tiny Llama.

Each of the paper's eight tasks runs with its official lm-eval configuration (prompt, choices,
metrics) on a few local documents in the official schema (eval/tasks/*.jsonl), through the same code
path as the real runs: ``eval/zero_shot.py``, lm-eval's CLI with the ``hf-sparse`` model type, and
``eval/perplexity.py``. The scores of a random tiny model mean nothing; the plumbing is what is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'hf-sparse[eval]')")

from hf_sparse.evaluation import PAPER_TASKS

try:
    import hf_sparse.cats  # noqa: F401

    HAVE_CATS, CATS_ERROR = True, ""
except ImportError as err:
    HAVE_CATS, CATS_ERROR = False, str(err)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DATA = os.path.join(ROOT, "eval", "tasks")
HAS_ACC_NORM = {"piqa", "sciq", "openbookqa", "hellaswag", "arc_easy", "arc_challenge"}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: datasets and the Hub client in offline mode, even if imported before this module."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with a tokenizer trained in code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse.demo.corpus import generate_documents
    from hf_sparse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(generate_documents(200), vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", os.path.join(ROOT, "eval", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_scores(scores: dict, tasks=PAPER_TASKS) -> None:
    assert set(scores) == set(tasks)
    for task in tasks:
        row = scores[task]
        assert 0.0 <= row["acc"] <= 1.0 and row["n"] == 4, (task, row)
        assert ("acc_norm" in row) == (task in HAS_ACC_NORM), (task, row)


def test_evaluate_model_uses_the_official_task_configs(tiny):
    from hf_sparse.evaluation import evaluate_model

    model, tok = tiny
    out = evaluate_model(model, tok, PAPER_TASKS, data_dir=TASK_DATA, batch_size=4, return_raw=True)
    _check_scores(out["scores"])
    configs = out["raw"]["configs"]
    assert configs["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"
    assert configs["boolq"]["doc_to_choice"] == ["no", "yes"]
    assert configs["arc_challenge"]["dataset_path"] == "json"
    assert all(configs[t]["num_fewshot"] == 0 for t in PAPER_TASKS)


def test_zero_shot_script_writes_the_paper_table_and_chart(tiny_dir, tmp_path):
    configs = ["dense", "relu", "sparsegpt2:4", "wanda50"]
    if HAVE_CATS:
        configs.insert(1, "cats50")
    out = tmp_path / "zs"
    record = _script("zero_shot").main(
        [
            "--model",
            tiny_dir,
            "--paper",
            "mistral-7b",
            "--configs",
            *configs,
            "--data-dir",
            TASK_DATA,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--batch-size",
            "4",
            "--calibration",
            "demo",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--output-dir",
            str(out),
        ]
    )
    assert list(record["results"]) == configs
    for scores in record["results"].values():
        _check_scores(scores)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == record["results"] and saved["paper_results"]["dense"]["avg"] == 0.6994
    table = (out / "table.md").read_text()
    assert "| Method | WG | PIQA | SciQ | OBQA | HS | BoolQ | ARC-e | ARC-c | Avg |" in table
    assert "(0.7419, " in table  # the paper's dense WinoGrande beside ours
    assert "| ReLUification |" in table and "| SparseGPT 2:4 |" in table and "acc_norm, 0-shot" in table
    if HAVE_CATS:
        assert "| CATS 50% |" in table and "(0.7245, " in table
    assert (out / "chart.png").stat().st_size > 10_000


@pytest.mark.skipif(not HAVE_CATS, reason=f"hf_sparse.cats not importable: {CATS_ERROR}")
def test_lm_eval_cli_with_the_hf_sparse_model(tiny_dir, tmp_path, monkeypatch):
    """``python -m hf_sparse.evaluation.cli --model hf-sparse --model_args ...,cats=0.5,prune=...``."""
    import lm_eval

    from hf_sparse.evaluation.cli import main

    official = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "piqa", "piqa.yaml")
    data = os.path.join(TASK_DATA, "piqa.jsonl")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "piqa_local.yaml").write_text(
        f"include: {official}\ntask: piqa_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data}\n    validation: {data}\n"
    )
    args = f"pretrained={tiny_dir},dtype=float32,prune=sparsegpt:2:4,cats=0.5,calibration=demo,nsamples=4,seqlen=32"
    monkeypatch.chdir(tmp_path)
    main(
        [
            "--model",
            "hf-sparse",
            "--model_args",
            args,
            "--tasks",
            "piqa_local",
            "--include_path",
            str(tasks_dir),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".json")]
    assert files, "lm-eval wrote no results"
    results = json.loads(Path(files[0]).read_text())
    assert 0.0 <= results["results"]["piqa_local"]["acc,none"] <= 1.0
    model_args = results["config"]["model_args"]
    assert (model_args["cats"], model_args["prune"]) == (0.5, "sparsegpt:2:4")


def test_hf_sparse_model_type_loads_and_prunes(tiny_dir, tmp_path):
    from lm_eval.api.registry import get_model

    from hf_sparse.evaluation.lm_eval_model import HFSparseLM

    assert get_model("hf-sparse") is HFSparseLM
    lm = HFSparseLM(pretrained=tiny_dir, device="cpu", dtype="float32", prune="magnitude:2:4", batch_size=2)
    w = lm.model.model.layers[1].mlp.up_proj.weight
    assert (w.view(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2
    assert lm.configuration.name == "magnitude2:4"

    # a compressed hf_sparse checkpoint of that model loads through the same model type
    from hf_sparse import save_sparse

    saved = save_sparse(lm.model, tmp_path / "compressed", format="compressed", tokenizer=lm.tokenizer)
    lm2 = HFSparseLM(pretrained=str(saved), device="cpu", dtype="float32", batch_size=2)
    assert torch.equal(lm2.model.model.layers[1].mlp.up_proj.weight, w)
    if HAVE_CATS:
        from hf_sparse.cats import is_cats_applied

        lm3 = HFSparseLM(
            pretrained=tiny_dir,
            device="cpu",
            dtype="float32",
            config="relu+cats50",
            calibration="demo",
            nsamples=4,
            seqlen=32,
        )
        assert is_cats_applied(lm3.model) and lm3.model.config.cats_config["sparsity"] == 0.5
    with pytest.raises(ValueError, match="either config"):
        HFSparseLM(pretrained=tiny_dir, device="cpu", config="cats50", cats=0.5)


def test_perplexity_script(tiny_dir, tmp_path):
    from hf_sparse.demo.model import demo_texts

    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(demo_texts("heldout", 20)))
    configs = ["dense", "relu", "magnitude50"] + (["cats50"] if HAVE_CATS else [])
    record = _script("perplexity").main(
        [
            "--model",
            tiny_dir,
            "--dataset",
            str(text),
            "--configs",
            *configs,
            "--seqlen",
            "64",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--calibration",
            "demo",
            "--nsamples",
            "4",
            "--calibration-seqlen",
            "32",
            "--output-dir",
            str(tmp_path / "ppl"),
        ]
    )
    assert list(record["perplexity"]) == configs and record["windows"] >= 2
    assert all(v > 1 for v in record["perplexity"].values())
    assert "| Dense |" in (tmp_path / "ppl" / "perplexity.md").read_text()
