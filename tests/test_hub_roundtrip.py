"""Save/load round trips of both formats: bit-exact weights, identical outputs, metadata, plain-transformers behaviour."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_config, tiny_model

import hf_sparse
from hf_sparse.persistence import load_sparse, save_sparse
from hf_sparse.persistence.compress import COMPRESSED_MODEL_TYPE


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def assert_bit_exact(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key


def _pruned(arch: str, dtype: torch.dtype, pattern):
    """A seeded tiny model built directly in ``dtype`` (as from_pretrained builds it: fp32 rotary buffers), pruned."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype, attn_implementation="eager").eval()
    hf_sparse.prune(model, None, "magnitude", pattern, progress=False)
    return model


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
@pytest.mark.parametrize("pattern", [0.5, "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_is_bit_exact(tmp_path, arch, dtype, pattern, fmt):
    model = _pruned(arch, dtype, pattern)
    save_sparse(model, tmp_path, format=fmt)
    loaded = load_sparse(str(tmp_path), attn_implementation="eager")  # kwargs reach from_pretrained
    assert_bit_exact(model, loaded)
    assert loaded.config.sparsity_config == model.config.sparsity_config
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    files = set(os.listdir(tmp_path))
    if fmt == "compressed":
        assert "model.hf_sparse.safetensors" in files and "model.safetensors" not in files
    else:
        assert "model.safetensors" in files


def test_compressed_is_smaller_and_2_4_costs_values_plus_an_eighth(tmp_path):
    model = _pruned("llama", torch.bfloat16, "2:4")
    save_sparse(model, tmp_path / "dense", format="dense")
    save_sparse(model, tmp_path / "compressed", format="compressed")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "compressed" / "model.hf_sparse.safetensors"), "pt") as f:
        values = f.get_tensor("model.layers.0.mlp.up_proj.weight::values")
        groups = f.get_tensor("model.layers.0.mlp.up_proj.weight::groups")
        dense_embed = f.get_tensor("model.embed_tokens.weight")
    # up_proj is [128, 64]: 2:4 keeps [128, 32] values and one byte per group of 4 -> [128, 16]
    assert values.shape == (128, 32) and values.dtype == torch.bfloat16
    assert groups.shape == (128, 16) and groups.dtype == torch.uint8
    assert (values.numel() * 2 + groups.numel()) / (128 * 64 * 2) == pytest.approx(0.5 + 0.125)
    assert dense_embed.shape == (128, 64)  # non-pruned tensors are stored as they are
    size = lambda d: os.path.getsize(next(p for p in d.iterdir() if p.suffix == ".safetensors"))
    assert size(tmp_path / "compressed") < size(tmp_path / "dense")


def test_dense_checkpoint_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _pruned("llama", torch.float32, 0.5)
    save_sparse(model, tmp_path, format="dense")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert_bit_exact(model, plain)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sparsity_config"]["method"] == "magnitude"
    assert config["sparsity_config"]["per_module"]["model.layers.0.mlp.down_proj"]["sparsity"] == pytest.approx(0.5)


def test_plain_transformers_refuses_compressed_checkpoint_naming_the_plugin(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    model = _pruned("llama", torch.float32, "2:4")
    save_sparse(model, tmp_path, format="compressed")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == COMPRESSED_MODEL_TYPE
    assert config["quantization_config"]["quant_method"] == "hf_sparse"
    with pytest.raises(ValueError, match="hf_sparse"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="hf_sparse"):
        AutoConfig.from_pretrained(str(tmp_path))
    # a concrete class finds no model.safetensors to load: it fails instead of using random weights
    with pytest.raises(OSError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(str(tmp_path))


def test_model_pruned_elsewhere_gets_measured_metadata(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # zero a 2:4 pattern by hand in one layer and 30% in another
        w = model.model.layers[0].mlp.up_proj.weight
        w.view(-1, 4)[:, :2] = 0
        v = model.model.layers[1].self_attn.q_proj.weight
        v.view(-1)[: int(v.numel() * 0.3)] = 0
    save_sparse(model, tmp_path, format="compressed")
    record = json.loads((tmp_path / "config.json").read_text())["sparsity_config"]
    assert record["method"] == "unknown"
    assert record["per_module"]["model.layers.0.mlp.up_proj"] == {"pattern": "2:4", "sparsity": 0.5}
    assert record["per_module"]["model.layers.1.self_attn.q_proj"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert set(record["per_module"]) == {"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"}
    assert_bit_exact(model, load_sparse(str(tmp_path)))


def test_sparsity_check_catches_filled_in_zeros(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _pruned("llama", torch.float32, 0.5)
    save_sparse(model, tmp_path, format="dense")
    # someone fine-tunes the dense checkpoint without masks and saves over it: zeros are gone
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        plain.model.layers[1].mlp.gate_proj.weight.add_(1e-3)
    plain.save_pretrained(str(tmp_path))
    with pytest.raises(hf_sparse.persistence.SparsityMismatchError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        load_sparse(str(tmp_path))
    assert load_sparse(str(tmp_path), check_sparsity=False) is not None


def test_save_refuses_model_whose_2_4_pattern_was_broken(tmp_path):
    model = _pruned("llama", torch.float32, "2:4")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.fill_(0.1)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        save_sparse(model, tmp_path, format="compressed")


def test_cats_thresholds_survive_both_formats(tmp_path, calib_ids):
    cats = pytest.importorskip("hf_sparse.cats")
    if not hasattr(cats, "apply_cats") or not hasattr(cats, "apply_cats_from_config"):
        pytest.skip("hf_sparse.cats has no apply_cats/apply_cats_from_config yet")
    model = _pruned("llama", torch.float32, "2:4")
    cats.apply_cats(model, 0.5, calib_ids[:4], kernel="reference")
    thresholds = cats.cats_thresholds(model)
    ids = calib_ids[:2, :10]
    with torch.no_grad():
        expected = model(ids).logits
    for fmt in ("dense", "compressed"):
        save_sparse(model, tmp_path / fmt, format=fmt)
        loaded = load_sparse(str(tmp_path / fmt), attn_implementation="eager")
        assert cats.is_cats_applied(loaded), fmt
        assert cats.cats_thresholds(loaded) == thresholds
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, expected, atol=1e-6), fmt


def test_model_card(tmp_path):
    model = _pruned("llama", torch.float32, "2:4")
    results = {"perplexity": {"wikitext2": {"dense": 5.47, "sparse": 6.81}}, "zero_shot": {"arc_easy": 0.71}}
    save_sparse(model, tmp_path, format="compressed", results=results, base_model="meta-llama/Llama-2-7b-hf")
    card = (tmp_path / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert {"sparse", "hf-sparse", "magnitude"} <= set(meta["tags"])
    assert "| down_proj | 2:4 | 50.00% | 2 |" in body
    assert "6.81" in body and "arc_easy" in body and "0.71" in body
    assert "hf_sparse.from_pretrained" in body


@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_negative_zeros_from_masking_survive_compression(tmp_path, pattern):
    """``weight * mask`` leaves -0.0 where negative weights were pruned; the round trip keeps the sign bit."""
    model = _pruned("llama", torch.bfloat16, pattern)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.copy_(torch.where(w == 0, torch.tensor(-0.0, dtype=w.dtype), w))
    assert torch.signbit(model.model.layers[0].mlp.down_proj.weight).any()
    save_sparse(model, tmp_path, format="compressed")
    assert_bit_exact(model, load_sparse(str(tmp_path)))
