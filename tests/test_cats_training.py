"""CATS in training: CATSCallback with a Trainer, LoRA, and the TEAL variant."""

from __future__ import annotations

import pytest
import torch
from test_cats_patch import H, V, tiny_llama, tokens  # the same tiny model and token helper

from hf_sparse.cats import CATSCallback, apply_cats, apply_teal, cats_thresholds, measure_cats_sparsity, remove_cats


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_callback_applies_cats_keeps_thresholds_frozen_and_logs_sparsity(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_llama().train()
    callback = CATSCallback(sparsity=0.6, calibration=tokens(8, 32, 1))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(tokens(12, 32, 3)), callbacks=[callback])
    thresholds = None

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            nonlocal thresholds
            thresholds = thresholds or dict(cats_thresholds(model))

    trainer.add_callback(Snapshot())
    trainer.train()
    assert thresholds and cats_thresholds(model) == thresholds  # frozen during training
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # weights did train
    logged = [h["cats_sparsity"] for h in trainer.state.log_history if "cats_sparsity" in h]
    assert len(logged) >= 3 and all(0.4 < s < 0.8 for s in logged), logged


def test_lora_wrapped_projections_train_through_cats():
    peft = pytest.importorskip("peft")

    model = tiny_llama()
    apply_cats(model, 0.7, tokens(8, 32, 1))
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    )
    lora.train()
    mlp = lora.base_model.model.model.layers[0].mlp
    assert type(mlp.gate_proj).__name__ == "Linear" and hasattr(mlp.gate_proj, "lora_A")
    t = cats_thresholds(lora)["model.layers.0.mlp"]
    ids = tokens(2, 16, 4)
    out = lora(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # the masked dense path went through the LoRA wrappers: their adapters get gradients
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n and "mlp" in n]  # B (A gets none while B is 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # and eval/decode still equals the math with LoRA's effective weights
    with torch.no_grad():
        x = torch.randn(1, 1, H)
        v = torch.nn.functional.silu(mlp.gate_proj(x))
        want = mlp.down_proj(torch.where(v.abs() >= t, v, torch.zeros(())) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), want)
    # apply on an already-wrapped model: names are stored without the PEFT prefix
    apply_cats(lora, 0.5, tokens(8, 32, 1))
    assert sorted(cats_thresholds(lora)) == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_teal_thresholds_every_block_linear_input():
    model = tiny_llama()
    ids = tokens(2, 16, 2)
    with torch.no_grad():
        dense = model(ids).logits
    apply_teal(model, 0.5, tokens(16, 32, 1))
    cfg = model.config.cats_config
    assert cfg["method"] == "teal" and len(cfg["thresholds"]) == 2 * 7  # q k v o gate up down per block
    report = measure_cats_sparsity(model, tokens(16, 32, 9))
    assert len(report.per_layer) == 14
    assert all(abs(f - 0.5) < 0.05 for f in report.per_layer.values()), report.per_layer
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense)
    remove_cats(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_teal_round_trip_and_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hf_sparse.cats import apply_cats_from_config

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V)).eval()
    apply_teal(gpt2, 0.4, tokens(8, 16, 1))
    ids = tokens(2, 8, 2)
    with torch.no_grad():
        sparse = gpt2(ids).logits
    gpt2.save_pretrained(tmp_path)
    loaded = apply_cats_from_config(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse)
