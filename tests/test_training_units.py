"""Unit tests of the training building blocks: masks, schedules, criteria, mask selection, RigL update."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_sparse.patterns import NM, Unstructured
from hf_sparse.training import MaskSet, SparsitySchedule, cubic_sparsity, get_criterion, linear_sparsity, select_prune_masks
from hf_sparse.training.criteria import count_for
from hf_sparse.training.integration import refuse_deepspeed
from hf_sparse.training.masks import layer_group


def test_maskset_applies_to_weights_and_grads_and_round_trips():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 13.0).view(3, 4))
        lin.weight[0, 1] = 0
        lin.weight[2, 3] = 0
    masks = MaskSet.from_zeros({"model.layers.0.mlp.up_proj": lin.weight})
    assert masks.sparsity() == pytest.approx(2 / 12)
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert masks.violations() == 2
    lin.weight.grad = torch.ones_like(lin.weight)
    masks.apply()
    masks.apply_to_grads()
    assert masks.violations() == 0 and lin.weight[0, 1] == 0 and lin.weight.grad[2, 3] == 0
    assert lin.weight.grad.sum() == 10
    state = masks.state_dict()
    other = MaskSet()
    other.add("model.layers.0.mlp.up_proj", lin.weight)
    assert other.sparsity() == 0
    other.load_state_dict(state)
    assert torch.equal(other.masks["model.layers.0.mlp.up_proj"], masks.masks["model.layers.0.mlp.up_proj"])
    assert masks.group_sparsity() == {"up_proj": pytest.approx(2 / 12)}


def test_layer_group_names():
    assert layer_group("model.layers.3.self_attn.q_proj") == "q_proj"
    assert layer_group("base_model.model.model.layers.0.mlp.down_proj.base_layer") == "down_proj"
    assert layer_group("transformer.h.1.attn.c_attn") == "c_attn"


def test_cubic_schedule_matches_zhu_gupta_and_events():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0)/(n dt))^3, t0=10, n*dt=40, s_i=0.1, s_f=0.9
    assert cubic_sparsity(10, 0.1, 0.9, 10, 50) == pytest.approx(0.1)
    assert cubic_sparsity(30, 0.1, 0.9, 10, 50) == pytest.approx(0.9 - 0.8 * 0.125)
    assert cubic_sparsity(50, 0.1, 0.9, 10, 50) == pytest.approx(0.9)
    assert cubic_sparsity(70, 0.1, 0.9, 10, 50) == pytest.approx(0.9)
    assert cubic_sparsity(5, 0.1, 0.9, 10, 50) == 0.0
    assert linear_sparsity(30, 0.1, 0.9, 10, 50) == pytest.approx(0.5)
    sched = SparsitySchedule(0.0, 0.8, start_step=2, end_step=9, frequency=3)
    steps = [s for s, _ in sched.events()]
    assert steps == [2, 5, 8, 9]  # end_step always included
    values = [v for _, v in sched.events()]
    assert values == sorted(values) and values[-1] == pytest.approx(0.8)
    # cubic rises faster at first than linear
    assert sched.sparsity_at(5) > SparsitySchedule(0.0, 0.8, 2, 9, 3, "linear").sparsity_at(5)
    with pytest.raises(ValueError):
        SparsitySchedule(0.5, 0.2, 0, 10)


def test_criteria_rank_as_defined():
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    g1 = torch.tensor([[1.0, 1.0, -4.0, 0.0]])
    g2 = torch.tensor([[1.0, 3.0, -2.0, 2.0]])
    mag = get_criterion("magnitude")
    assert torch.equal(mag.scores("l", w), w.abs())
    mov, tay, fis = get_criterion("movement"), get_criterion("taylor"), get_criterion("fisher")
    for crit in (mov, tay, fis):
        assert not crit.ready()
        crit.accumulate({"l": w}, {"l": g1})
        crit.accumulate({"l": w}, {"l": g2})
        assert crit.ready() and crit.steps == 2
    # movement: -sum w*g
    assert torch.allclose(mov.scores("l", w), -(w * g1 + w * g2))
    assert torch.allclose(mov.scores("l", w), torch.tensor([[-2.0, 8.0, 3.0, -6.0]]))
    # taylor: mean |w*g|
    assert torch.allclose(tay.scores("l", w), torch.tensor([[1.0, 4.0, 1.5, 3.0]]))
    # fisher: 1/2 E[g^2] w^2
    assert torch.allclose(fis.scores("l", w), 0.5 * (g1**2 + g2**2) / 2 * w**2)
    # the weight pushed towards zero (3.0 with positive gradient) is the first movement pruning victim
    prune = select_prune_masks({"l": mov.scores("l", w)}, 0.25, Unstructured(0.25))
    assert prune["l"].tolist() == [[False, False, False, True]]
    # magnitude prunes the 0.5, taylor prunes the 1.0
    assert select_prune_masks({"l": mag.scores("l", w)}, 0.25, Unstructured(0.25))["l"][0, 2]
    assert select_prune_masks({"l": tay.scores("l", w)}, 0.25, Unstructured(0.25))["l"][0, 0]
    # non-finite gradients are skipped, not accumulated
    assert not mov.accumulate({"l": w}, {"l": torch.full_like(w, math.nan)}) and mov.steps == 2
    mov.reset()
    assert mov.steps == 0 and not mov.buffers


def test_selection_is_monotone_exact_and_supports_global_row_and_nm():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(4, 16) * 10
    first = select_prune_masks({"a": a, "b": b}, 0.25, Unstructured(0.5))
    assert int(first["a"].sum()) == 32 and int(first["b"].sum()) == 16
    keep = {n: ~m for n, m in first.items()}
    # later scores would rank the already pruned entries highest: they stay pruned anyway
    flipped = {"a": -a.abs(), "b": -b.abs()}
    second = select_prune_masks(flipped, 0.5, Unstructured(0.5), previous_keep=keep)
    for n in second:
        assert bool((second[n] | keep[n]).all()) and bool(second[n][~keep[n]].all())
        assert int(second[n].sum()) == count_for(0.5, second[n].numel())
    glob = select_prune_masks({"a": a.abs(), "b": b.abs()}, 0.5, Unstructured(0.5), ranking="global")
    assert int(glob["a"].sum() + glob["b"].sum()) == 96
    assert int(glob["a"].sum()) > int(glob["b"].sum())  # the large-magnitude layer keeps more
    row = select_prune_masks({"a": a}, 0.25, Unstructured(0.25), ranking="row")
    assert (row["a"].sum(1) == 4).all()
    nm_half = select_prune_masks({"a": a}, 0.3, NM(2, 4))  # floor(0.3 * 4) = 1 of every 4
    assert (nm_half["a"].view(8, 4, 4).sum(-1) == 1).all()
    nm = select_prune_masks({"a": a}, 0.5, NM(2, 4), previous_keep={"a": ~nm_half["a"]})
    assert (nm["a"].view(8, 4, 4).sum(-1) == 2).all() and bool(nm["a"][nm_half["a"]].all())


def test_rigl_update_drops_smallest_and_regrows_largest_dense_gradient():
    from hf_sparse.training import RigLCallback

    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.1, 5.0, 0.0], [3.0, 0.0, 0.2, 0.0]]))
    cb = RigLCallback(sparsity=0.5, update_frequency=1, alpha=1.0, end_step=100)
    cb.modules = {"layer": lin}
    cb.transposed = {"layer": False}
    cb.masks = MaskSet.from_zeros({"layer": lin.weight})
    lin.weight.grad = torch.tensor([[9.0, 0.0, 0.0, 1.0], [0.0, 7.0, 0.0, 0.0]])
    opt = torch.optim.Adam([lin.weight])
    opt.state[lin.weight] = {"exp_avg": torch.ones(2, 4), "exp_avg_sq": torch.ones(2, 4), "step": torch.tensor(1.0)}
    cb.resolved_end_step = 100
    cb.update_masks(step=50, optimizer=opt)  # fraction = 1/2 (1 + cos(pi/2)) = 0.5 -> n = 2 of 4 active
    keep = cb.masks.masks["layer"]
    # dropped: 0.1 and 0.2 (smallest active); grown: (0,0) grad 9 and (1,1) grad 7 (largest |g| inactive)
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert int(keep.sum()) == 4  # sparsity unchanged
    assert lin.weight[0, 0] == 0 and lin.weight[1, 1] == 0  # regrown weights start at zero
    assert opt.state[lin.weight]["exp_avg"][0, 0] == 0 and opt.state[lin.weight]["exp_avg"][0, 2] == 1
    cb.masks.apply_to_grads()
    assert lin.weight.grad[0, 0] == 9  # the regrown weight trains from this step on


def test_deepspeed_is_refused(monkeypatch):
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        refuse_deepspeed(SimpleNamespace(deepspeed="ds_config.json"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="silently train dense"):
        refuse_deepspeed(SimpleNamespace(deepspeed=None))
