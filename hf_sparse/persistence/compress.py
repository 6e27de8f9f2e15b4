"""Checkpoint-level compressed format: turn a dense ``save_pretrained`` directory into a compact one and back.

Compression is a transformation of *files*, not of a model: the dense safetensors written by
``save_pretrained`` (tied weights, shard names and key names exactly as ``transformers`` wants them)
are re-encoded tensor by tensor, and decompression writes those same dense files back, byte for byte
in every tensor. Only the pruned linear weights named in ``sparsity_config`` are encoded (see
:mod:`.codec`); every other tensor is stored as it is.

On disk:

- weights in ``*.hf_sparse.safetensors`` (``model.safetensors`` -> ``model.hf_sparse.safetensors``; a
  sharded checkpoint gets ``model.hf_sparse.safetensors.index.json``), so no plain loader finds a
  ``model.safetensors`` to load by mistake;
- per file, the safetensors header metadata ``hf_sparse`` (JSON): for every original tensor its
  encoding, dtype, shape, N:M, the stored parts with a CRC32 each, and a CRC32 of the entry itself;
- ``config.json`` with ``model_type = "hf_sparse_compressed"`` (so ``AutoConfig`` and every
  ``AutoModel*`` refuse it, naming the plugin), the original ``model_type`` under
  ``hf_sparse_compressed``, and ``quantization_config = {"quant_method": "hf_sparse", ...}`` (so
  loading with a concrete class such as ``LlamaForCausalLM`` warns naming the plugin, then fails for
  want of ``model.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import codec

logger = logging.getLogger(__name__)

__all__ = [
    "COMPRESSED_MODEL_TYPE",
    "FORMAT_VERSION",
    "CompressedCheckpointError",
    "compress_checkpoint",
    "compressed_name",
    "decompress_checkpoint",
    "is_compressed_checkpoint",
]

FORMAT_VERSION = 1
COMPRESSED_MODEL_TYPE = "hf_sparse_compressed"
HOW_TO_LOAD = (
    "This checkpoint is stored in hf_sparse's compressed format: pip install hf-sparse, then "
    "model = hf_sparse.from_pretrained(path_or_repo_id)."
)
_SUFFIX = ".hf_sparse.safetensors"
_DENSE_INDEX = "model.safetensors.index.json"
_SPARSE_INDEX = "model.hf_sparse.safetensors.index.json"


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint that cannot be decoded exactly (corrupted, truncated or inconsistent)."""


def compressed_name(dense_name: str) -> str:
    """``model.safetensors`` -> ``model.hf_sparse.safetensors`` (shards alike)."""
    return dense_name[: -len(".safetensors")] + _SUFFIX


def is_compressed_checkpoint(config: dict[str, Any]) -> bool:
    """Is this ``config.json`` (as a dict) the one of a compressed checkpoint?"""
    return config.get("model_type") == COMPRESSED_MODEL_TYPE or COMPRESSED_MODEL_TYPE in config


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CompressedCheckpointError(f"{where}: unknown dtype {name!r} in the metadata")
    return dtype


def _entry_check(entry: dict[str, Any]) -> int:
    """CRC32 of an entry's canonical JSON (without its own ``check``): detects edited metadata."""
    body = {k: v for k, v in entry.items() if k != "check"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode()) & 0xFFFFFFFF


# --- writing -------------------------------------------------------------------------------------


def _encode_tensor(
    name: str, tensor: torch.Tensor, spec: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored parts and metadata entry of one tensor; ``spec`` is ``None`` (dense) or a compression plan."""
    entry: dict[str, Any] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    if spec is None:
        parts = {"data": tensor}
        entry["encoding"] = "dense"
    elif spec["encoding"] == "nm":
        matrix = tensor.t() if spec.get("transposed") else tensor
        try:
            parts = codec.encode_nm(matrix, spec["n"], spec["m"])
        except codec.CodecError as err:
            raise CompressedCheckpointError(
                f"{name}: cannot store as {spec['n']}:{spec['m']}: {err}. The weights were changed after pruning "
                "(re-prune, or fix sparsity_config)"
            ) from err
        entry.update(encoding="nm", n=spec["n"], m=spec["m"], transposed=bool(spec.get("transposed")))
    else:
        parts = codec.encode_bitmask(tensor)
        entry["encoding"] = "bitmask"
    stored = {}
    keyed: dict[str, torch.Tensor] = {}
    for part, value in parts.items():
        key = name if part == "data" else f"{name}::{part}"
        keyed[key] = value.contiguous()
        stored[part] = {"key": key, "crc32": codec.crc32(value)}
    entry["stored"] = stored
    entry["check"] = _entry_check(entry)
    return keyed, entry


def _compress_file(src: str, dst: str, plan: dict[str, dict[str, Any]]) -> set[str]:
    """Re-encode one dense safetensors file; returns the tensor names it compressed."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    compressed: set[str] = set()
    with safe_open(src, framework="pt") as reader:
        original_metadata = reader.metadata() or {}
        for name in reader.keys():
            spec = plan.get(name)
            keyed, entry = _encode_tensor(name, reader.get_tensor(name), spec)
            tensors.update(keyed)
            entries[name] = entry
            if spec is not None:
                compressed.add(name)
    header = {"format_version": FORMAT_VERSION, "original_metadata": original_metadata, "tensors": entries}
    save_file(tensors, dst, metadata={"format": "pt", "hf_sparse": json.dumps(header)})
    return compressed


def compress_checkpoint(directory: str, plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Re-encode, in place, the dense safetensors checkpoint that ``save_pretrained`` wrote to ``directory``.

    ``plan`` maps tensor names (``"model.layers.0.mlp.up_proj.weight"``) to ``{"encoding": "bitmask"}``
    or ``{"encoding": "nm", "n", "m", "transposed"}``; other tensors are stored as they are.
    Returns the ``hf_sparse_compressed`` block written into ``config.json``.
    """
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    index_path = os.path.join(directory, _DENSE_INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        dense_files = sorted(set(index["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        index, dense_files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} holds no model.safetensors to compress (save with safe_serialization)")

    done: set[str] = set()
    for name in dense_files:
        done |= _compress_file(os.path.join(directory, name), os.path.join(directory, compressed_name(name)), plan)
        os.remove(os.path.join(directory, name))
    missing = sorted(set(plan) - done)
    if missing:
        logger.warning(
            "%d planned tensor(s) were not found in the checkpoint and stay dense: %s", len(missing), missing[:5]
        )
    if index is not None:
        index["weight_map"] = {k: compressed_name(v) for k, v in index["weight_map"].items()}
        with open(os.path.join(directory, _SPARSE_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.remove(index_path)

    block = {
        "format_version": FORMAT_VERSION,
        "model_type": config.get("model_type"),
        "weight_files": [compressed_name(n) for n in dense_files],
        "index": _SPARSE_INDEX if index is not None else None,
        "how_to_load": HOW_TO_LOAD,
    }
    if "quantization_config" in config:
        block["quantization_config"] = config["quantization_config"]
    config["hf_sparse_compressed"] = block
    config["model_type"] = COMPRESSED_MODEL_TYPE
    config["quantization_config"] = {"quant_method": "hf_sparse", "format": "compressed", "how_to_load": HOW_TO_LOAD}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    logger.info("compressed %d tensor(s) in %d file(s)", len(done), len(dense_files))
    return block


# --- reading -------------------------------------------------------------------------------------


def _decode_entry(file: str, name: str, entry: Any, reader) -> torch.Tensor:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict) or entry.get("check") != _entry_check(entry):
        raise CompressedCheckpointError(f"{where}: its metadata fails its checksum (edited or corrupted header)")
    dtype = _dtype_from_name(entry["dtype"], where)
    shape = [int(d) for d in entry["shape"]]
    parts: dict[str, torch.Tensor] = {}
    for part, info in entry["stored"].items():
        try:
            value = reader.get_tensor(info["key"])
        except Exception as err:  # safetensors raises its own error types for missing keys / short files
            raise CompressedCheckpointError(f"{where}: cannot read stored part {info['key']!r}: {err}") from err
        if codec.crc32(value) != info["crc32"]:
            raise CompressedCheckpointError(
                f"{where}: CRC32 mismatch in stored part {info['key']!r} (the file is corrupted; download it again)"
            )
        parts[part] = value
    try:
        if entry["encoding"] == "dense":
            data = parts["data"]
            if data.dtype != dtype or list(data.shape) != shape:
                raise codec.CodecError(f"stored as {data.dtype} {list(data.shape)}, metadata says {dtype} {shape}")
            return data
        if entry["encoding"] == "bitmask":
            return codec.decode_bitmask(parts["values"], parts["bitmask"], shape, dtype, parts.get("negzero"))
        if entry["encoding"] == "nm":
            transposed = bool(entry.get("transposed"))
            matrix_shape = [shape[1], shape[0]] if transposed else shape
            matrix = codec.decode_nm(
                parts["values"],
                parts["groups"],
                int(entry["n"]),
                int(entry["m"]),
                matrix_shape,
                dtype,
                parts.get("negzero"),
            )
            return matrix.t().contiguous() if transposed else matrix
    except (codec.CodecError, KeyError) as err:
        raise CompressedCheckpointError(f"{where}: {err}") from err
    raise CompressedCheckpointError(f"{where}: unknown encoding {entry.get('encoding')!r}")


def _decompress_file(src: str, dst: str) -> None:
    file = os.path.basename(src)
    try:
        with safe_open(src, framework="pt") as reader:
            metadata = reader.metadata() or {}
            if "hf_sparse" not in metadata:
                raise CompressedCheckpointError(f"{file}: no hf_sparse metadata in the safetensors header")
            try:
                header = json.loads(metadata["hf_sparse"])
                entries = header["tensors"]
            except (ValueError, KeyError, TypeError) as err:
                raise CompressedCheckpointError(f"{file}: unreadable hf_sparse metadata: {err}") from err
            if int(header.get("format_version", 0)) > FORMAT_VERSION:
                raise CompressedCheckpointError(
                    f"{file}: format version {header['format_version']} is newer than this hf_sparse reads ({FORMAT_VERSION}); upgrade hf-sparse"
                )
            expected_keys = {
                info["key"] for e in entries.values() if isinstance(e, dict) for info in e.get("stored", {}).values()
            }
            unexpected = sorted(set(reader.keys()) - expected_keys)
            if unexpected:
                raise CompressedCheckpointError(f"{file}: tensors not described by the metadata: {unexpected[:5]}")
            tensors = {name: _decode_entry(file, name, entry, reader) for name, entry in entries.items()}
            original_metadata = header.get("original_metadata") or {"format": "pt"}
    except CompressedCheckpointError:
        raise
    except Exception as err:  # SafetensorError, OSError, ... from a truncated or garbled file
        raise CompressedCheckpointError(
            f"{file}: not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    save_file(tensors, dst, metadata=original_metadata)


def decompress_checkpoint(src_dir: str, dst_dir: str) -> None:
    """Write the dense ``save_pretrained`` form of the compressed checkpoint in ``src_dir`` into ``dst_dir``.

    Every tensor is validated (metadata checksum, shapes, kept-value counts vs bitmask popcount, N:M
    group counts, CRC32 of every stored part); any failure raises :class:`CompressedCheckpointError`
    naming the file and the tensor.
    """
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    block = config.get("hf_sparse_compressed")
    if not isinstance(block, dict) or config.get("model_type") != COMPRESSED_MODEL_TYPE:
        raise CompressedCheckpointError(f"{src_dir}/config.json does not describe an hf_sparse compressed checkpoint")
    if int(block.get("format_version", 0)) > FORMAT_VERSION:
        raise CompressedCheckpointError(
            f"config.json: compressed format version {block['format_version']} is newer than this hf_sparse reads; upgrade hf-sparse"
        )
    os.makedirs(dst_dir, exist_ok=True)
    weight_files = list(block.get("weight_files") or [])
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if name in weight_files or name == block.get("index") or name == "config.json" or not os.path.isfile(path):
            continue
        shutil.copy2(path, os.path.join(dst_dir, name))
    for name in weight_files:
        src = os.path.join(src_dir, name)
        if not os.path.exists(src):
            raise CompressedCheckpointError(f"{name}: listed in config.json but missing from {src_dir}")
        _decompress_file(src, os.path.join(dst_dir, name.replace(_SUFFIX, ".safetensors")))
    if block.get("index"):
        with open(os.path.join(src_dir, block["index"])) as f:
            index = json.load(f)
        index["weight_map"] = {k: v.replace(_SUFFIX, ".safetensors") for k, v in index["weight_map"].items()}
        with open(os.path.join(dst_dir, _DENSE_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    config["model_type"] = block["model_type"]
    config.pop("hf_sparse_compressed")
    config.pop("quantization_config", None)
    if "quantization_config" in block:
        config["quantization_config"] = block["quantization_config"]
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
