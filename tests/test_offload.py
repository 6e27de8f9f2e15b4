"""Pruning a model placed by accelerate (CPU and disk offload) equals pruning it in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.offload import is_offloaded, read_weight_matrix
from hf_sparse.modules import find_linears
from conftest import tiny_model


@pytest.mark.parametrize("offloaded_to", ["disk", "cpu-offload"])
def test_offloaded_run_equals_in_memory_run(tmp_path, calib_ids, offloaded_to):
    reference = tiny_model("llama")
    reference.save_pretrained(tmp_path / "model")
    checkpoint = (tmp_path / "model" / "model.safetensors").read_bytes()
    hf_sparse.prune(reference, calib_ids, method="sparsegpt", sparsity="2:4", progress=False)

    if offloaded_to == "disk":
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                      "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"),
            dtype=torch.float32, attn_implementation="eager",
        )
    else:
        from accelerate import cpu_offload

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32, attn_implementation="eager")
        cpu_offload(model, execution_device=torch.device("cpu"))
    offloaded = [n for n, m in model.named_modules() if is_offloaded(m)]
    assert offloaded and model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"

    report = hf_sparse.prune(model, calib_ids, method="sparsegpt", sparsity="2:4", progress=False)
    assert len(report.layers) == 14
    got = find_linears(model.model.layers, "model.layers")
    want = find_linears(reference.model.layers, "model.layers")
    for name, module in got.items():
        torch.testing.assert_close(read_weight_matrix(module, torch.device("cpu")), want[name].weight.float(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib_ids[:2]).logits, reference(input_ids=calib_ids[:2]).logits,
                                   rtol=1e-4, atol=1e-5)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == checkpoint  # the user's file is untouched
