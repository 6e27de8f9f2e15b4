"""Corrupted, truncated or inconsistent compressed checkpoints give clear errors, never a wrong model."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import tiny_model

import hf_sparse
from hf_sparse.persistence import CompressedCheckpointError, SparsityMismatchError, load_sparse, save_sparse

WEIGHTS = "model.hf_sparse.safetensors"
TARGET = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(params=["2:4", 0.5])
def saved(request, tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    hf_sparse.prune(model, None, "magnitude", request.param, progress=False)
    save_sparse(model, tmp_path, format="compressed")
    return tmp_path


def _read_header(path) -> tuple[dict, int]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), 8 + size


def _write_header(path, header: dict) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def test_flipped_bytes_in_values_are_caught_by_crc(saved):
    path = saved / WEIGHTS
    header, start = _read_header(path)
    begin, _end = header[f"{TARGET}::values"]["data_offsets"]
    data = bytearray(path.read_bytes())
    for i in range(start + begin + 10, start + begin + 14):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedCheckpointError, match=rf"{WEIGHTS}.*{TARGET}.*CRC32 mismatch"):
        load_sparse(str(saved))


def test_truncated_file_names_the_file(saved):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressedCheckpointError, match=rf"{WEIGHTS}.*(truncated|corrupted)"):
        load_sparse(str(saved))


def test_file_cut_inside_the_header(saved):
    path = saved / WEIGHTS
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CompressedCheckpointError, match=WEIGHTS):
        load_sparse(str(saved))


def test_missing_weight_file(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(CompressedCheckpointError, match=rf"{WEIGHTS}.*missing"):
        load_sparse(str(saved))


def test_edited_per_module_sparsity_is_caught(saved):
    config = json.loads((saved / "config.json").read_text())
    config["sparsity_config"]["per_module"]["model.layers.1.self_attn.v_proj"]["sparsity"] = 0.9
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparsityMismatchError, match=r"model\.layers\.1\.self_attn\.v_proj.*below the recorded 90"):
        load_sparse(str(saved))


def test_edited_shape_in_hf_sparse_metadata_is_caught(saved):
    path = saved / WEIGHTS
    header, _ = _read_header(path)
    meta = json.loads(header["__metadata__"]["hf_sparse"])
    meta["tensors"][TARGET]["shape"] = [64, 128]
    header["__metadata__"]["hf_sparse"] = json.dumps(meta)
    _write_header(path, header)
    with pytest.raises(CompressedCheckpointError, match=rf"{TARGET}.*metadata fails its checksum"):
        load_sparse(str(saved))


def test_reshaped_stored_values_are_caught(saved):
    """Same bytes (so the CRC32 passes) under a different stored shape: the layout check fails."""
    path = saved / WEIGHTS
    header, _ = _read_header(path)
    key = f"{TARGET}::values"
    numel = 1
    for d in header[key]["shape"]:
        numel *= d
    header[key]["shape"] = [2, numel // 2] if len(header[key]["shape"]) == 1 else [numel]
    _write_header(path, header)
    with pytest.raises(CompressedCheckpointError, match=rf"{TARGET}.*values are"):
        load_sparse(str(saved))


def test_unknown_tensor_in_file_is_rejected(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = saved / WEIGHTS
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors["intruder.weight"] = torch.zeros(3)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CompressedCheckpointError, match="intruder.weight"):
        load_sparse(str(saved))
