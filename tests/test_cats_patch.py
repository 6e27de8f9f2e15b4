"""CATS patcher: calibration, exactness, persistence, gradients, architectures, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_sparse.cats import (
    apply_cats,
    apply_cats_from_config,
    cats_thresholds,
    is_cats_applied,
    measure_cats_sparsity,
    remove_cats,
)

H, I, V = 64, 160, 128


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def cats_math(mlp, x: torch.Tensor, t: float) -> torch.Tensor:
    """CATS gated MLP written out in fp32 from the weights."""
    x = x.float()
    v = F.silu(x @ mlp.gate_proj.weight.float().t())
    v = torch.where(v.abs() >= t, v, torch.zeros(()))
    return (v * (x @ mlp.up_proj.weight.float().t())) @ mlp.down_proj.weight.float().t()


def test_calibration_hits_target_on_heldout_demo_text():
    from hf_sparse.calibration import calibration_data
    from hf_sparse.demo.model import demo_texts, load_small_model

    model, tok = load_small_model("demo", progress=False)
    calib = calibration_data(demo_texts("calibration", 120), tok, nsamples=16, seqlen=128, seed=0)
    held = calibration_data(demo_texts("heldout", 120), tok, nsamples=16, seqlen=128, seed=1)
    for target in (0.5, 0.8):
        apply_cats(model, target, calib)
        report = measure_cats_sparsity(model, held)
        assert len(report.per_layer) == model.config.num_hidden_layers
        for name, frac in report.per_layer.items():
            assert abs(frac - target) <= 0.02, (name, frac, target)
        assert "| model.layers.0.mlp |" in report.table()
    remove_cats(model)


def test_padding_is_excluded_from_calibration():
    model = tiny_llama()
    ids = tokens(4, 16, 1)
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    apply_cats(model, 0.6, {"input_ids": ids, "attention_mask": mask}, kernel="reference")
    with_mask = cats_thresholds(model)
    apply_cats(model, 0.6, ids[:, :8], kernel="reference")  # only the unpadded tokens
    assert cats_thresholds(model) == pytest.approx(with_mask)


def test_patched_model_equals_reference_math():
    model = tiny_llama()
    apply_cats(model, 0.5, tokens(8, 32, 1), kernel="reference")
    thresholds = cats_thresholds(model)
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(model.model.layers):
        t = thresholds[f"model.layers.{i}.mlp"]
        assert t > 0
        with torch.no_grad():
            torch.testing.assert_close(layer.mlp(x), cats_math(layer.mlp, x, t), rtol=1e-4, atol=1e-5)
            dense = type(layer.mlp).forward(layer.mlp, x)
        assert not torch.allclose(layer.mlp(x), dense)  # the patch does something


@pytest.mark.parametrize("kernel", ["auto", "cpu"])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_decode_kernels_in_model_equal_reference(kernel, n_tokens, monkeypatch):
    from hf_sparse.cats import patch

    used = []
    real = patch.select_kernel
    monkeypatch.setattr(patch, "select_kernel", lambda *a: used.append(real(*a)) or used[-1])
    model = tiny_llama()
    apply_cats(model, 0.7, tokens(8, 32, 1), kernel=kernel)
    t = cats_thresholds(model)["model.layers.1.mlp"]
    mlp = model.model.layers[1].mlp
    x = torch.randn(n_tokens, 1, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), cats_math(mlp, x, t), rtol=1e-4, atol=1e-5)
    assert used and used[-1] is not None  # the decode kernel ran, not the masked dense path
    # the row-contiguous W_down^T copy was made at patch time
    st = mlp.__dict__["_hf_sparse_cats"]
    assert st.w_down_t is not None and st.w_down_t.is_contiguous() and st.w_down_t.shape == (I, H)
    torch.testing.assert_close(st.w_down_t, mlp.down_proj.weight.t())


def test_sparsity_zero_leaves_outputs_unchanged_and_remove_restores():
    model = tiny_llama()
    ids = tokens(2, 16, 2)
    with torch.no_grad():
        dense = model(ids).logits
    apply_cats(model, 0.0, kernel="auto")
    assert all(t == 0.0 for t in cats_thresholds(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    apply_cats(model, 0.9, tokens(8, 32, 1))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense)
    remove_cats(model)
    assert not is_cats_applied(model)
    assert not hasattr(model.config, "cats_config")
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_thresholds_survive_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    ids = tokens(2, 16, 2)
    with torch.no_grad():
        dense = model(ids).logits
    apply_cats(model, 0.6, tokens(8, 32, 1), kernel="reference")
    with torch.no_grad():
        sparse = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.cats_config["thresholds"] == pytest.approx(model.config.cats_config["thresholds"])
    with torch.no_grad():  # without the plugin the checkpoint is the dense model
        torch.testing.assert_close(loaded(ids).logits, dense)
    apply_cats_from_config(loaded)
    assert cats_thresholds(loaded) == pytest.approx(cats_thresholds(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse)


def test_gradients_are_zero_for_masked_neurons():
    model = tiny_llama().train()
    apply_cats(model, 0.7, tokens(8, 32, 1))
    mlp = model.model.layers[0].mlp
    t = cats_thresholds(model)["model.layers.0.mlp"]
    x = torch.randn(1, 3, H, generator=torch.Generator().manual_seed(5), requires_grad=True)
    mlp(x).pow(2).sum().backward()
    with torch.no_grad():
        v = F.silu(x @ mlp.gate_proj.weight.t()).reshape(-1, I)
    masked = (v.abs() < t).all(dim=0)
    kept = (v.abs() >= t).all(dim=0)
    assert masked.any() and kept.any()
    for proj in (mlp.gate_proj, mlp.up_proj):
        assert torch.count_nonzero(proj.weight.grad[masked]) == 0
        assert (proj.weight.grad[kept].abs().sum(dim=1) > 0).all()
    assert torch.count_nonzero(mlp.down_proj.weight.grad[:, masked]) == 0


def test_phi3_fused_gate_up_proj():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=V,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Phi3ForCausalLM(cfg).eval()
    apply_cats(model, 0.5, tokens(8, 32, 1))
    report = measure_cats_sparsity(model, tokens(8, 32, 9))
    assert all(abs(f - 0.5) < 0.05 for f in report.per_layer.values())
    mlp = model.model.layers[0].mlp
    t = cats_thresholds(model)["model.layers.0.mlp"]
    w = mlp.gate_up_proj.weight.float()
    for shape in [(2, 5, H), (1, 1, H), (3, 1, H)]:  # masked dense path and decode kernel
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
        v = F.silu(x @ w[:I].t())
        want = (torch.where(v.abs() >= t, v, torch.zeros(())) * (x @ w[I:].t())) @ mlp.down_proj.weight.t()
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_experts(arch):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    common = {
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4, **common)).eval()
    else:
        model = Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                intermediate_size=96,
                moe_intermediate_size=48,
                shared_expert_intermediate_size=80,
                num_experts=4,
                **common,
            )
        ).eval()
    ids = tokens(2, 16, 2)
    with torch.no_grad():
        dense = model(ids).logits
    apply_cats(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    apply_cats(model, 0.5, tokens(16, 32, 1))
    experts = [n for n in cats_thresholds(model) if n.endswith("experts")]
    assert len(experts) == 2 and all(len(cats_thresholds(model)[n]) == 4 for n in experts)
    report = measure_cats_sparsity(model, tokens(16, 32, 9))
    assert all(abs(f - 0.5) < 0.05 for f in report.per_layer.values()), report.per_layer
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense)
    remove_cats(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V))
    with pytest.raises(ValueError, match="no gated MLP"):
        apply_cats(gpt2, 0.5, tokens(2, 8, 0))
    model = tiny_llama()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
            apply_cats(model, bad, tokens(2, 8, 0))
    with pytest.raises(ValueError, match="calibration"):
        apply_cats(model, 0.5)
    with pytest.raises(ValueError, match="unknown CATS kernel"):
        apply_cats(model, 0.5, tokens(2, 8, 0), kernel="cuda")
    assert not is_cats_applied(model)
