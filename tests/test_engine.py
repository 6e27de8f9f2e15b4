"""The layerwise engine on tiny models of several architectures."""

import json
import logging

import pytest
import torch
from torch import nn

import hf_sparse
import hf_sparse.collect
from hf_sparse import solvers
from hf_sparse.modules import find_decoder_blocks, find_linears, weight_matrix
from conftest import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "opt"]


def layer_sparsity(model):
    name, blocks = find_decoder_blocks(model)
    return {n: float((weight_matrix(m) == 0).float().mean()) for n, m in find_linears(blocks, name).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_reaches_its_sparsity_and_runs(arch, calib_ids):
    model = tiny_model(arch)
    report = hf_sparse.prune(model, calib_ids, method="sparsegpt", sparsity=0.5, progress=False)
    sparsity = layer_sparsity(model)
    assert set(report.pruned_names) == set(sparsity)
    assert all(abs(s - 0.5) < 0.01 for s in sparsity.values()), sparsity
    assert all(0 <= r.rel_error < 1 for r in report.layers)
    with torch.no_grad():
        logits = model(input_ids=calib_ids[:2]).logits
    assert torch.isfinite(logits).all()
    assert "lm_head" in report.skipped or arch == "gpt2" and "lm_head" in report.skipped


@pytest.mark.parametrize("method", ["sparsegpt", "obc", "wanda", "magnitude"])
def test_nm_on_llama(method, calib_ids):
    model = tiny_model("llama")
    hf_sparse.prune(model, calib_ids, method=method, sparsity="2:4", progress=False)
    for name, module in find_linears(find_decoder_blocks(model)[1]).items():
        groups = (weight_matrix(module) != 0).view(weight_matrix(module).shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_and_device_preserved(dtype, calib_ids):
    model = tiny_model("llama", dtype=dtype)
    hf_sparse.prune(model, calib_ids, method="sparsegpt", sparsity=0.5, device="cpu", progress=False)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())
    assert all(abs(s - 0.5) < 0.01 for s in layer_sparsity(model).values())


@pytest.fixture
def recording_solver():
    """A solver that records each layer's Hessian and leaves the weights unchanged."""
    seen = {}

    def identity(weight, hessian, pattern, *, name="layer"):
        seen[name] = hessian.clone()
        return weight.clone()

    solvers.register_solver("record", identity)
    yield seen
    solvers.SOLVERS.pop("record")


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "mistral"])
def test_block_inputs_reproduce_the_model_forward(arch, calib_ids, recording_solver):
    """With an identity solver, each block sees exactly the hidden states of the model's own forward
    (so masks, positions, rotary tables and per-layer sliding windows were captured correctly)."""
    model = tiny_model(arch)
    linears = find_linears(*reversed(find_decoder_blocks(model)))
    seen_in_forward = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen_in_forward[n].append(a[0])) for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=calib_ids)
    for h in handles:
        h.remove()
    hf_sparse.prune(model, calib_ids, method="record", sparsity=0.5, batch_size=4, progress=False)
    assert set(recording_solver) == set(linears)
    for name, inputs in seen_in_forward.items():
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
        expected = (2 * x.t() @ x / x.shape[0]).float()
        torch.testing.assert_close(recording_solver[name], expected, rtol=1e-4, atol=1e-5)


def test_later_blocks_see_pruned_inputs(calib_ids):
    """Sequential propagation: in one prune() call, block 1's statistics come from the *pruned* block 0."""
    recorded = {}

    def prune_block0_record_block1(weight, hessian, pattern, *, name="layer"):
        if ".layers.0." in name:
            return solvers.magnitude(weight, hessian, pattern)
        recorded[name] = hessian.clone()
        return weight.clone()

    solvers.register_solver("seq", prune_block0_record_block1)
    try:
        model = tiny_model("llama")
        dense = tiny_model("llama")
        hf_sparse.prune(model, calib_ids, method="seq", sparsity=0.7, progress=False)
    finally:
        solvers.SOLVERS.pop("seq")

    def q_proj_hessian(m):
        seen = []
        h = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
        with torch.no_grad():
            m(input_ids=calib_ids)
        h.remove()
        x = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()
        return (2 * x.t() @ x / x.shape[0]).float()

    got = recorded["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(got, q_proj_hessian(model), rtol=1e-4, atol=1e-5)
    dense_h = q_proj_hessian(dense)
    assert (got - dense_h).norm() > 0.05 * dense_h.norm()


def test_statistics_shared_by_layers_reading_the_same_input(calib_ids, monkeypatch):
    created = []
    original = hf_sparse.collect.HessianStats

    class Counting(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self)

    monkeypatch.setattr(hf_sparse.collect, "HessianStats", Counting)
    model = tiny_model("llama")
    mask = torch.ones_like(calib_ids)
    mask[:, 24:] = 0  # right padding: excluded from the statistics
    batches = [{"input_ids": calib_ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, 16, 4)]
    hf_sparse.prune(model, batches, method="wanda", sparsity=0.5, progress=False)
    assert len(created) == 2 * 4  # per block: q/k/v, o, gate/up, down
    assert all(s.nsamples == 16 * 24 for s in created)


def test_targets_ignore_and_overrides(calib_ids, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        report = hf_sparse.prune(
            model, calib_ids, method="wanda", sparsity=0.5,
            ignore=["model.layers.0.self_attn.q_proj", "*.1.mlp.down_proj", "re:.*k_proj", "no_such_layer"],
            overrides={"re:.*\\.up_proj": "2:4", "o_proj": 0.75}, progress=False,
        )
    sparsity = layer_sparsity(model)
    assert sparsity["model.layers.0.self_attn.q_proj"] == 0
    assert sparsity["model.layers.1.self_attn.q_proj"] == pytest.approx(0.5)
    assert sparsity["model.layers.1.mlp.down_proj"] == 0
    assert sparsity["model.layers.0.self_attn.k_proj"] == 0 and sparsity["model.layers.1.self_attn.k_proj"] == 0
    assert sparsity["model.layers.0.self_attn.o_proj"] == pytest.approx(0.75)
    assert "ignored by '*.1.mlp.down_proj'" in report.skipped["model.layers.1.mlp.down_proj"]
    assert any("'no_such_layer' matched no module" in r.message for r in caplog.records)
    up = {r.name: r.pattern for r in report.layers}["model.layers.0.mlp.up_proj"]
    assert up == "2:4"


def test_metadata_saved_in_config(calib_ids, tmp_path):
    model = tiny_model("llama")
    report = hf_sparse.prune(model, calib_ids, method="sparsegpt", sparsity="2:4", progress=False)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())["sparsity_config"]
    assert meta["method"] == "sparsegpt" and meta["pattern"] == "2:4"
    assert set(meta["per_module"]) == set(report.pruned_names)
    assert meta["calibration"] == {"nsamples": 16, "seqlen": 32}
    assert "| layer |" in report.to_table()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity must be a fraction"),
        (dict(sparsity="4:4"), "N must be smaller than M"),
        (dict(sparsity="2:3"), "not divisible by M=3"),
        (dict(method="nope"), "unknown pruning method"),
        (dict(calibration=torch.zeros(0, 8, dtype=torch.long)), "non-empty"),
        (dict(calibration=None), "calibration data is required"),
        (dict(calibration=torch.zeros(1, 200, dtype=torch.long)), "at most 128 positions"),
        (dict(calibration=torch.full((1, 8), 500)), "vocabulary has 128"),
        (dict(blocksize="x", method="wanda"), "does not take option"),
        (dict(ignore=["re:.*"]), "no layer to prune"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match, calib_ids):
    model = tiny_model("llama")
    args = dict(calibration=calib_ids, method="sparsegpt", sparsity=0.5)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        hf_sparse.prune(model, args.pop("calibration"), progress=False, **args)


def test_model_without_decoder_blocks():
    with pytest.raises(ValueError, match="no decoder blocks"):
        hf_sparse.prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.zeros(1, 4, dtype=torch.long), progress=False)


def test_magnitude_needs_no_calibration():
    model = tiny_model("llama")
    report = hf_sparse.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    assert report.overall_sparsity == pytest.approx(0.5)


def test_offloaded_activations_give_the_same_result(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    hf_sparse.prune(a, calib_ids, method="sparsegpt", sparsity=0.5, progress=False)
    hf_sparse.prune(b, calib_ids, method="sparsegpt", sparsity=0.5, offload_activations=True, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_peft_wrapped_model_prunes_base_layers_under_their_names(calib_ids):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = hf_sparse.prune(model, calib_ids, method="wanda", sparsity=0.5, ignore=["v_proj"], progress=False)
    names = report.pruned_names
    assert any(n.endswith("layers.0.self_attn.q_proj") for n in names)
    assert not any("lora" in n or "base_layer" in n or n.endswith("v_proj") for n in names)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert float((q.base_layer.weight == 0).float().mean()) == pytest.approx(0.5)
    assert (q.lora_B.default.weight == 0).all() and (q.lora_A.default.weight != 0).all()


def tiny_moe(kind: str):
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  num_experts_per_tok=2, max_position_embeddings=128)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
    else:
        cfg = tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                num_experts=4, **common)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_experts_are_pruned_one_slice_per_expert(kind, calib_ids):
    model = tiny_moe(kind)
    report = hf_sparse.prune(model, calib_ids, method="sparsegpt", sparsity=0.5, progress=False)
    experts = model.model.layers[0].mlp.experts
    results = {r.name: r for r in report.layers}
    for e in range(experts.gate_up_proj.shape[0]):
        name = f"model.layers.0.mlp.experts.gate_up_proj.{e}"
        if name in report.skipped:
            continue
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        assert float((gate == 0).float().mean()) == pytest.approx(0.5)  # each half its own exact sparsity
        assert float((up == 0).float().mean()) == pytest.approx(0.5)
        assert float((experts.down_proj[e] == 0).float().mean()) == pytest.approx(0.5)
        assert results[name].rel_error < 1
    assert sum(n.startswith("model.layers.1.mlp.experts.down_proj.") for n in results) >= 2
    routers = [n for n in report.skipped if n.endswith(("mlp.gate", "shared_expert_gate"))]
    assert all("router" in report.skipped[n] for n in routers) and not any("gate" == r.name[-4:] for r in report.layers)
    if kind == "qwen2_moe":  # its shared-expert router is an nn.Linear: kept dense
        assert "model.layers.0.mlp.shared_expert_gate" in routers
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids[:2]).logits).all()


def test_each_expert_gets_the_hessian_of_its_own_routed_tokens(calib_ids, recording_solver):
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        model(input_ids=calib_ids)
    handle.remove()
    hidden, top_k = seen[0]
    hf_sparse.prune(model, calib_ids, method="record", sparsity=0.5, batch_size=16, progress=False)
    for e in range(4):
        x = hidden[(top_k == e).any(dim=-1)].double()
        if len(x) == 0:
            continue
        expected = (2 * x.t() @ x / x.shape[0]).float()
        got = recording_solver[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        gate, up = torch.nn.functional.linear(x.float(), experts.gate_up_proj[e]).chunk(2, dim=-1)
        inter = (experts.act_fn(gate) * up).double()
        expected_down = (2 * inter.t() @ inter / inter.shape[0]).float()
        torch.testing.assert_close(recording_solver[f"model.layers.0.mlp.experts.down_proj.{e}"], expected_down,
                                   rtol=1e-4, atol=1e-5)


def test_calibration_dicts_and_lists_are_split_into_batches(calib_ids):
    from hf_sparse.capture import as_batches

    mask = torch.ones_like(calib_ids)
    assert len(as_batches({"input_ids": calib_ids, "attention_mask": mask}, 4)) == 4
    assert len(as_batches([calib_ids[:8], calib_ids[8:]], 3)) == 6
    with pytest.raises(ValueError, match="does not match"):
        as_batches({"input_ids": calib_ids, "attention_mask": mask[:, :5]}, 4)
    with pytest.raises(ValueError, match="integer token ids"):
        as_batches([calib_ids.float()], 4)


def test_block_forwards_run_without_autograd(calib_ids):
    model = tiny_model("llama").train()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    hf_sparse.prune(model, calib_ids, method="wanda", sparsity=0.5, progress=False)
    assert seen and not any(seen)
    assert model.training  # the train/eval mode the model came with is restored


def test_a_layer_called_twice_per_forward_counts_every_call():
    from hf_sparse.collect import StatsCollector

    layer = nn.Linear(4, 4)
    collector = StatsCollector({"twice": layer}, torch.device("cpu"))
    with collector:
        for _ in range(2):
            collector.start_batch(None)
            layer(torch.randn(3, 4))
            layer(torch.randn(5, 4))
            collector.end_batch()
    assert collector.stats["twice"].nsamples == 16


def test_zero_sparsity_is_a_clear_error(calib_ids):
    with pytest.raises(ValueError, match="sparsity 0 prunes nothing"):
        hf_sparse.prune(tiny_model("llama"), calib_ids, method="wanda", sparsity=0.0, progress=False)
