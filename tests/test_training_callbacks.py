"""Trainer runs with the sparsity callbacks: exact zeros every step, schedules, RigL, logs, resume."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_sparse
from hf_sparse.training import (
    ConstantSparsityCallback,
    GradualPruningCallback,
    OneShotPruningCallback,
    RigLCallback,
)
from hf_sparse.training.criteria import count_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from training_common import Probe, make_args, tiny_llama, token_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train(tmp_path, callback, model=None, **arg_overrides):
    model = model if model is not None else tiny_llama()
    probe = Probe(callback)
    trainer = Trainer(
        model=model, args=make_args(str(tmp_path), **arg_overrides), train_dataset=token_dataset(), callbacks=[callback, probe]
    )
    trainer.train()
    return trainer, probe


def test_constant_sparsity_keeps_exact_zeros_with_grad_accumulation_and_bf16(tmp_path):
    model = tiny_llama()
    hf_sparse.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cb = ConstantSparsityCallback()
    trainer, probe = train(tmp_path, cb, model, gradient_accumulation_steps=2, bf16=True, max_steps=5)
    assert probe.violations == [0] * 5
    assert all(s == pytest.approx(0.5) for s in probe.sparsity.values())
    q_after = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert (q_after[q_before != 0] != q_before[q_before != 0]).float().mean() > 0.9  # it did train
    assert torch.equal(q_after == 0, q_before == 0)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and logs[-1]["sparsity/overall"] == pytest.approx(0.5) and "sparsity/q_proj" in logs[-1]


def test_without_the_callback_the_same_training_fills_the_zeros(tmp_path):
    """Control for the test above: the learning rate is large enough to move pruned weights."""
    model = tiny_llama()
    hf_sparse.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    pruned = model.model.layers[0].self_attn.q_proj.weight.detach() == 0
    Trainer(model=model, args=make_args(str(tmp_path), max_steps=2), train_dataset=token_dataset()).train()
    assert (model.model.layers[0].self_attn.q_proj.weight.detach()[pruned] != 0).float().mean() > 0.9


def test_one_shot_sparsegpt_2_4_from_the_train_dataloader(tmp_path):
    cb = OneShotPruningCallback(method="sparsegpt", sparsity="2:4", num_calibration_batches=2)
    trainer, probe = train(tmp_path, cb, max_steps=3)
    assert cb.pruned and cb.report is not None and cb.report.method == "sparsegpt"
    assert probe.violations == [0, 0, 0]
    for name, module in cb.modules.items():
        zeros = (module.weight.detach() == 0).view(module.weight.shape[0], -1, 4).sum(-1)
        assert (zeros >= 2).all(), name
    assert trainer.model.config.sparsity_config["pattern"] == "2:4"


def test_one_shot_with_given_calibration_tokens(tmp_path):
    calib = torch.stack([row["input_ids"] for row in token_dataset(8, seed=5)])
    cb = OneShotPruningCallback(method="wanda", sparsity=0.6, calibration=calib, ignore=["re:.*\\.1\\.mlp\\..*"])
    _, probe = train(tmp_path, cb, max_steps=2)
    assert probe.violations == [0, 0]
    assert not any(".1.mlp." in name for name in cb.modules) and len(cb.modules) == 11
    assert cb.masks.sparsity() == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
def test_gradual_reaches_each_scheduled_sparsity_at_its_step(tmp_path, criterion):
    cb = GradualPruningCallback(final=0.75, start_step=2, end_step=8, frequency=2, criterion=criterion)
    trainer, probe = train(tmp_path, cb, max_steps=10)
    assert probe.violations == [0] * 10
    assert probe.sparsity[1] == 0.0
    events = dict(cb.sched.events())
    assert sorted(events) == [2, 4, 6, 8]
    for step in range(1, 11):
        last_event = max([s for s in events if s <= step], default=None)
        target = events[last_event] if last_event is not None else 0.0
        for name, pruned in probe.layer_pruned[step].items():
            assert pruned == count_for(target, cb.masks.masks[name].numel()), (step, name)
    rising = [probe.sparsity[s] for s in (2, 4, 6, 8)]
    assert rising == sorted(rising) and rising[0] < rising[-1] == pytest.approx(0.75, abs=1e-3)
    for step in range(2, 10):  # monotone masks: a pruned weight never comes back
        for name, keep in probe.masks[step + 1].items():
            assert not bool((keep & ~probe.masks[step][name]).any())
    assert cb.last_event_step == 8 and cb.current_sparsity == pytest.approx(0.75, abs=1e-3)


def test_gradual_2_4_global_and_taylor(tmp_path):
    cb = GradualPruningCallback(final="2:4", start_step=1, end_step=4, frequency=1, criterion="taylor")
    _, probe = train(tmp_path, cb, max_steps=5)
    assert probe.violations == [0] * 5
    for name, module in cb.modules.items():
        assert ((module.weight.detach() == 0).view(module.weight.shape[0], -1, 4).sum(-1) >= 2).all(), name
    assert probe.sparsity[1] < probe.sparsity[5] == pytest.approx(0.5)
    cb = GradualPruningCallback(final=0.6, start_step=1, end_step=3, frequency=1, criterion="fisher", ranking="global")
    _, probe = train(tmp_path / "global", cb, max_steps=3)
    per_layer = {n: p / cb.masks.masks[n].numel() for n, p in probe.layer_pruned[3].items()}
    assert probe.sparsity[3] == pytest.approx(0.6, abs=1e-4)
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # global ranking: layers differ


def test_rigl_keeps_sparsity_while_the_mask_changes(tmp_path):
    cb = RigLCallback(sparsity=0.7, update_frequency=2, alpha=0.3, end_step=8)
    trainer, probe = train(tmp_path, cb, max_steps=8)
    assert probe.violations == [0] * 8
    counts = {step: sum(layer.values()) for step, layer in probe.layer_pruned.items()}
    assert len(set(counts.values())) == 1
    assert cb.masks.sparsity() == pytest.approx(0.7, abs=1e-3)
    changed = sum(int((probe.masks[1][n] != probe.masks[8][n]).sum()) for n in probe.masks[1])
    assert changed > 0 and cb.updates == 4
    assert trainer.state.log_history[0]["rigl/updates"] == 0


class _FakeReporter(TrainerCallback):
    """Stands in for TensorBoard/W&B: records what on_log gives it."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_sparsity_reaches_reporting_integrations(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "fake", _FakeReporter)
    reporter = _FakeReporter()
    model = tiny_llama()
    hf_sparse.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    cb = ConstantSparsityCallback()
    trainer = Trainer(
        model=model, args=make_args(str(tmp_path), max_steps=2), train_dataset=token_dataset(), callbacks=[reporter, cb]
    )
    trainer.train()
    assert reporter.seen and all("sparsity/overall" in logs for logs in reporter.seen if "loss" in logs)


@pytest.mark.parametrize("kind", ["gradual", "rigl"])
def test_resume_restores_masks_and_schedule_position(tmp_path, kind):
    def make():
        if kind == "gradual":
            return GradualPruningCallback(final=0.75, start_step=2, end_step=8, frequency=2, criterion="movement")
        return RigLCallback(sparsity=0.6, update_frequency=2, end_step=8)

    common = dict(max_steps=10, save_strategy="steps", save_steps=5)
    full_cb = make()
    train(tmp_path / "full", full_cb, **common)
    assert os.path.isfile(tmp_path / "full" / "checkpoint-5" / "hf_sparse_masks.pt")
    resumed_cb = make()
    model = tiny_llama()
    probe = Probe(resumed_cb)
    trainer = Trainer(
        model=model, args=make_args(str(tmp_path / "full"), **common), train_dataset=token_dataset(),
        callbacks=[resumed_cb, probe],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert probe.violations == [0] * 5
    assert resumed_cb.restored_from == str(tmp_path / "full" / "checkpoint-5")
    for name, keep in full_cb.masks.masks.items():
        assert torch.equal(keep, resumed_cb.masks.masks[name]), name
    if kind == "gradual":
        assert resumed_cb.last_event_step == 8 and resumed_cb.resolved == full_cb.resolved
        assert probe.sparsity[6] == pytest.approx(full_cb.sched.sparsity_at(6), abs=1e-3)
    else:
        assert resumed_cb.updates == full_cb.updates == 4


def test_resume_with_trainer_restored_callback_state(tmp_path):
    """With restore_callback_states_from_checkpoint the Trainer rebuilds the callback from its JSON state."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, restore_callback_states_from_checkpoint=True)
    cb = GradualPruningCallback(final=0.5, start_step=1, end_step=5, frequency=2)
    train(tmp_path, cb, **common)
    trainer = Trainer(
        model=tiny_llama(), args=make_args(str(tmp_path), **common), train_dataset=token_dataset(),
        callbacks=[GradualPruningCallback(final=0.5, start_step=1, end_step=5, frequency=2)],
    )
    trainer.train(resume_from_checkpoint=True)
    rebuilt = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradualPruningCallback))
    assert rebuilt.restored_from is not None and rebuilt.last_event_step == 5
    assert rebuilt.masks.violations() == 0
    for name, keep in cb.masks.masks.items():
        assert torch.equal(keep, rebuilt.masks.masks[name]), name
