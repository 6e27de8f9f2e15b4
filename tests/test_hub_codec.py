"""The tensor codecs of the compressed format, semi-structured export errors, and the CLI hooks."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import tiny_model

import hf_sparse
from hf_sparse.persistence import codec, export_semi_structured

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_round_trip_is_bit_exact_including_negative_zero(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(13, 11, generator=g) * 50).to(dtype)  # 143 elements: the last byte is padded
    w[torch.rand(13, 11, generator=g) < 0.6] = 0
    if dtype.is_floating_point:
        w[0, 0] = -0.0
        w[1, 1] = float("nan")
    parts = codec.encode_bitmask(w)
    assert ("negzero" in parts) == dtype.is_floating_point
    assert parts["bitmask"].numel() == (143 + 7) // 8
    assert parts["values"].numel() == int((w != 0).sum())  # zeros, -0.0 included, are not stored
    assert _bits_equal(
        codec.decode_bitmask(parts["values"], parts["bitmask"], list(w.shape), dtype, parts.get("negzero")), w
    )


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_round_trip_with_underfull_groups(n, m, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4 * m, generator=g).to(dtype)
    mask = torch.zeros_like(w, dtype=torch.bool).view(6, 4, m)
    idx = torch.rand(6, 4, m, generator=g).argsort(dim=-1)[..., n:]
    w.view(6, 4, m)[mask.scatter_(-1, idx, True)] = 0
    w[0, :m] = 0  # a group with no non-zero at all: zeros are stored as kept values
    w[2] = w[2].where(w[2] != 0, torch.tensor(-0.0, dtype=dtype))  # -0.0 zeros (as after weight * mask)
    w[3, :m] = -0.0  # more -0.0 than a group keeps: the rest goes to the negzero part
    parts = codec.encode_nm(w, n, m)
    assert "negzero" in parts
    assert parts["values"].shape == (6, 4 * n) and parts["groups"].shape == (6, 4)
    assert all(int(b).bit_count() == n for b in parts["groups"].flatten())
    assert _bits_equal(codec.decode_nm(parts["values"], parts["groups"], n, m, [6, 4 * m], dtype, parts["negzero"]), w)


def test_nm_encode_refuses_a_matrix_that_is_not_nm():
    w = torch.ones(4, 8)
    with pytest.raises(codec.CodecError, match="more than 2 non-zeros"):
        codec.encode_nm(w, 2, 4)


def test_decoders_reject_inconsistent_parts():
    w = torch.randn(4, 8)
    w.view(4, 2, 4)[..., :2] = 0
    nm = codec.encode_nm(w, 2, 4)
    bad_groups = nm["groups"].clone()
    bad_groups[0, 0] = 0b0111  # three kept positions in a 2:4 group
    with pytest.raises(codec.CodecError, match="exactly N=2"):
        codec.decode_nm(nm["values"], bad_groups, 2, 4, [4, 8], torch.float32)
    bad_groups[0, 0] = 0b10001  # a bit beyond M
    with pytest.raises(codec.CodecError, match="beyond position M"):
        codec.decode_nm(nm["values"], bad_groups, 2, 4, [4, 8], torch.float32)
    bm = codec.encode_bitmask(w)
    with pytest.raises(codec.CodecError, match="marks 16 kept weights but 15 values"):
        codec.decode_bitmask(bm["values"][:-1], bm["bitmask"], [4, 8], torch.float32)
    padded = codec.encode_bitmask(torch.ones(3, 3))
    padded["bitmask"][-1] |= 0b10000000
    with pytest.raises(codec.CodecError, match="padding"):
        codec.decode_bitmask(padded["values"], padded["bitmask"], [3, 3], torch.float32)
    overlap = codec.pack_bits(torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(codec.CodecError, match="negzero marks positions"):
        codec.decode_bitmask(bm["values"], bm["bitmask"], [4, 8], torch.float32, overlap)


def test_crc32_changes_with_one_bit():
    t = torch.arange(64, dtype=torch.bfloat16)
    u = t.clone()
    u.view(torch.int16)[5] ^= 1
    assert codec.crc32(t) != codec.crc32(u)


def test_export_semi_structured_errors_clearly_off_gpu():
    model = tiny_model("llama")
    hf_sparse.prune(model, None, "magnitude", 0.5, progress=False)
    with pytest.raises(ValueError, match="no 2:4 layer"):
        export_semi_structured(model)
    hf_sparse.prune(model, None, "magnitude", "2:4", progress=False)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        export_semi_structured(model)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA GPU with compute capability >= 8.0"):
        export_semi_structured(model)
    gpt2 = tiny_model("gpt2", dtype=torch.float16)
    hf_sparse.prune(gpt2, None, "magnitude", "2:4", progress=False)
    with pytest.raises(ValueError, match="Conv1D"):
        export_semi_structured(gpt2)


def test_cli_push_parser_and_prune_hooks(tmp_path, monkeypatch):
    from hf_sparse import hub_cli
    from hf_sparse.persistence import save_sparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    hub_cli.add_push_parser(sub)
    prune = sub.add_parser("prune")
    hub_cli.add_prune_save_arguments(prune)
    args = parser.parse_args(["push", str(tmp_path), "user/repo", "--private"])
    assert (args.directory, args.repo_id, args.private, args.format) == (str(tmp_path), "user/repo", True, None)
    args = parser.parse_args(["prune", "--push-to-hub", "user/x", "--save-format", "compressed"])
    assert (args.push_to_hub, args.save_format) == ("user/x", "compressed")

    calls = []
    monkeypatch.setattr(
        "hf_sparse.persistence.push_to_hub", lambda *a, **k: calls.append((a, k)) or argparse.Namespace(commit_url="u")
    )
    model = tiny_model("llama")
    hf_sparse.prune(model, None, "magnitude", "2:4", progress=False)
    args.output = str(tmp_path / "out")
    assert hub_cli.save_after_prune(args, model, None) == args.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "hf_sparse_compressed"
    hub_cli.push_to_hub_after_prune(args, model, None)
    assert calls[0][0][1] == "user/x" and calls[0][1]["format"] == "compressed"
    assert hub_cli.push_to_hub_after_prune(argparse.Namespace(push_to_hub=None), model, None) is None

    # push of a directory defaults to the directory's own format
    save_sparse(model, tmp_path / "dense")
    args = parser.parse_args(["push", str(tmp_path / "dense"), "user/d"])
    assert args.func(args) == 0
    assert calls[-1][1]["format"] == "dense"
