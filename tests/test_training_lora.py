"""PEFT/LoRA on a sparse base: training keeps the base sparse; ``merge_lora`` keeps it sparse after merging."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import Trainer

import hf_sparse
from hf_sparse.training import ConstantSparsityCallback, merge_lora

peft = pytest.importorskip("peft")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from training_common import Probe, make_args, tiny_llama, token_dataset  # noqa: E402


def sparse_lora_model():
    model = tiny_llama()
    hf_sparse.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def test_lora_training_keeps_the_base_sparse_and_merge_keeps_the_mask(tmp_path):
    torch.set_num_threads(1)
    model = sparse_lora_model()
    cb = ConstantSparsityCallback()
    probe = Probe(cb)
    Trainer(model=model, args=make_args(str(tmp_path), max_steps=4), train_dataset=token_dataset(), callbacks=[cb, probe]).train()
    assert probe.violations == [0] * 4
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert any(module.weight is q.base_layer.weight for module in cb.modules.values())  # base layers are targets
    assert not any("lora_" in name for name in cb.modules)
    assert q.lora_B["default"].weight.abs().sum() > 0  # the adapters trained
    base = q.base_layer.weight.detach().clone()
    expected = (base + q.get_delta_weight("default")) * (base != 0)

    merged = merge_lora(model, cb.masks)
    merged_q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(merged_q, torch.nn.Linear)
    assert torch.allclose(merged_q.weight, expected, atol=1e-6)
    for name in ("q_proj", "v_proj"):
        weight = getattr(merged.model.layers[1].self_attn, name).weight
        assert (weight == 0).float().mean() == pytest.approx(0.5)
    assert (merged.model.layers[0].mlp.down_proj.weight == 0).float().mean() == pytest.approx(0.5)


def test_naive_merge_destroys_sparsity(tmp_path):
    torch.set_num_threads(1)
    model = sparse_lora_model()
    Trainer(model=model, args=make_args(str(tmp_path), max_steps=2), train_dataset=token_dataset(),
            callbacks=[ConstantSparsityCallback()]).train()
    merged = model.merge_and_unload()
    assert (merged.model.layers[0].self_attn.q_proj.weight == 0).float().mean() < 0.01
