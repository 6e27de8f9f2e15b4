"""Tensor-level codecs of the compressed format: bitmask (unstructured) and N:M, with checksums.

Pure functions of tensors, no files and no models, so that every rule of the format sits on one
screen and can be tested with random matrices.

*Kept* positions are the non-zero ones (NaNs included). Zeros are dropped, and a zero stored as
``-0.0`` (e.g. after ``weight * mask``) is remembered in an optional ``negzero`` part (one packed
bit per element, written only when such zeros exist), so decoding gives back the very same bytes in
every dtype (bit-exact round trip).

- ``bitmask``: ``values`` = the kept entries in row-major order (1-D); ``bitmask`` = one bit per
  weight, packed 8 to a ``uint8``, least significant bit first, padding bits zero.
- ``nm``: the weight seen as ``[out, in]`` is cut into groups of ``M`` consecutive inputs; every group
  keeps exactly ``N`` positions (zeros are taken to fill a group that has fewer non-zeros), so
  ``values`` is a regular ``[out, in*N/M]`` matrix and ``groups`` holds one ``uint8`` per group whose
  bits are the kept positions (``M <= 8``). At 16-bit values, 2:4 costs 50% of the values plus 12.5%.
"""

from __future__ import annotations

import zlib

import torch

__all__ = [
    "MAX_M",
    "CodecError",
    "crc32",
    "decode_bitmask",
    "decode_nm",
    "encode_bitmask",
    "encode_nm",
    "kept_mask",
    "negative_zeros",
    "pack_bits",
    "unpack_bits",
]

MAX_M = 8
"""Largest group size of the ``nm`` codec: its per-group metadata is one byte."""

_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CodecError(ValueError):
    """Stored data that does not decode consistently (counts, shapes or bits that disagree)."""


def crc32(tensor: torch.Tensor) -> int:
    """CRC32 of the tensor's raw bytes (any dtype, made contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


def _int_view(tensor: torch.Tensor) -> torch.Tensor:
    int_dtype = _INT_VIEW.get(tensor.element_size())
    if int_dtype is None or tensor.is_complex():
        raise CodecError(f"cannot compress dtype {tensor.dtype}")
    return tensor.contiguous().view(int_dtype)


def _sign_bit(tensor: torch.Tensor) -> int:
    """The sign bit as a value of the same-width signed integer (``-2**(bits-1)``)."""
    return -(1 << (tensor.element_size() * 8 - 1))


def kept_mask(tensor: torch.Tensor) -> torch.Tensor:
    """``True`` where the element is not zero (``+0.0`` and ``-0.0`` are zeros; NaNs are kept)."""
    bits = _int_view(tensor)
    if not tensor.dtype.is_floating_point:
        return bits != 0
    return (bits & ~_sign_bit(tensor)) != 0


def negative_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """``True`` where the element is ``-0.0`` (only the sign bit set); all ``False`` for integers."""
    if not tensor.dtype.is_floating_point:
        return torch.zeros(tensor.shape, dtype=torch.bool)
    return _int_view(tensor) == _sign_bit(tensor)


def _with_negzero(parts: dict[str, torch.Tensor], dropped_negzero: torch.Tensor) -> dict[str, torch.Tensor]:
    if dropped_negzero.any():
        parts["negzero"] = pack_bits(dropped_negzero)
    return parts


def _apply_negzero(dense: torch.Tensor, negzero: torch.Tensor | None, kept: torch.Tensor) -> torch.Tensor:
    """Restore the ``-0.0`` zeros recorded in ``negzero`` (packed bits over ``dense``)."""
    if negzero is None:
        return dense
    numel = dense.numel()
    if negzero.dtype != torch.uint8 or negzero.dim() != 1 or negzero.numel() != (numel + 7) // 8:
        raise CodecError(f"negzero has {negzero.numel()} {negzero.dtype} bytes; expected {(numel + 7) // 8} uint8")
    full = unpack_bits(negzero, negzero.numel() * 8)
    if full[numel:].any() or not dense.dtype.is_floating_point:
        raise CodecError("negzero bits set on padding or on an integer tensor (corrupted)")
    mask = full[:numel].reshape(dense.shape)
    if (mask & kept.reshape(dense.shape)).any():
        raise CodecError("negzero marks positions that also hold kept values (corrupted)")
    dense[mask] = -0.0
    return dense


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean mask and pack it 8 bits per byte, least significant bit first."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat boolean tensor."""
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:numel].bool()


def encode_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"values", "bitmask"}`` for any tensor: kept values (1-D) and one packed bit per element."""
    mask = kept_mask(weight)
    parts = {"values": weight.contiguous().reshape(-1)[mask.reshape(-1)].clone(), "bitmask": pack_bits(mask)}
    return _with_negzero(parts, negative_zeros(weight))


def decode_bitmask(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    negzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the dense tensor; raises :class:`CodecError` if the parts disagree."""
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
        raise CodecError(
            f"bitmask has {bitmask.numel()} {bitmask.dtype} bytes; a {list(shape)} tensor needs {(numel + 7) // 8} uint8"
        )
    if values.dtype != dtype or values.dim() != 1:
        raise CodecError(f"values are {values.dtype} {list(values.shape)}; expected 1-D {dtype}")
    full = unpack_bits(bitmask, bitmask.numel() * 8)
    if full[numel:].any():
        raise CodecError("bitmask padding bits are set (corrupted bitmask)")
    mask = full[:numel]
    kept = int(mask.sum())
    if kept != values.numel():
        raise CodecError(f"bitmask marks {kept} kept weights but {values.numel()} values are stored")
    dense = torch.zeros(numel, dtype=dtype)
    dense[mask] = values
    return _apply_negzero(dense, negzero, mask).reshape(shape)


def encode_nm(matrix: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor]:
    """``{"values" [out, in*n/m], "groups" [out, in/m] uint8}`` for an ``[out, in]`` N:M matrix.

    Raises :class:`CodecError` when a group holds more than ``n`` non-zeros (the matrix is not N:M).
    """
    if not 0 < n < m <= MAX_M:
        raise CodecError(f"the nm codec needs 0 < N < M <= {MAX_M}, got {n}:{m}")
    rows, cols = matrix.shape
    if cols % m:
        raise CodecError(f"input dimension {cols} is not a multiple of M={m}")
    groups = matrix.contiguous().reshape(rows, cols // m, m)
    nonzero = kept_mask(groups)
    worst = int(nonzero.sum(dim=-1).max()) if nonzero.numel() else 0
    if worst > n:
        bad = int((nonzero.sum(dim=-1) > n).sum())
        raise CodecError(f"{bad} group(s) of {m} hold more than {n} non-zeros (up to {worst}): not {n}:{m} sparse")
    negzero = negative_zeros(groups)
    # fill each group: non-zeros first, then -0.0 zeros (stored as values when there is room), then earliest
    position = torch.arange(m, 0, -1, dtype=torch.int32)
    key = nonzero.to(torch.int32) * (2 * m + 2) + negzero.to(torch.int32) * (m + 1) + position
    kept = torch.topk(key, n, dim=-1).indices.sort(dim=-1).values
    values = torch.gather(groups, -1, kept).reshape(rows, cols // m * n)
    bits = torch.zeros_like(groups, dtype=torch.int32).scatter_(-1, kept, 1)
    meta = (bits * _BIT_WEIGHTS[:m]).sum(dim=-1).to(torch.uint8)
    return _with_negzero({"values": values, "groups": meta}, negzero & ~bits.bool())


def decode_nm(
    values: torch.Tensor,
    groups: torch.Tensor,
    n: int,
    m: int,
    shape: list[int],
    dtype: torch.dtype,
    negzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the ``[out, in]`` matrix; raises :class:`CodecError` on any inconsistency."""
    if len(shape) != 2:
        raise CodecError(f"nm tensors are 2-D, metadata says shape {list(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if not 0 < n < m <= MAX_M or cols % m:
        raise CodecError(f"invalid N:M {n}:{m} for shape {list(shape)}")
    if groups.dtype != torch.uint8 or list(groups.shape) != [rows, cols // m]:
        raise CodecError(f"group metadata is {groups.dtype} {list(groups.shape)}; expected uint8 {[rows, cols // m]}")
    if values.dtype != dtype or list(values.shape) != [rows, cols // m * n]:
        raise CodecError(f"values are {values.dtype} {list(values.shape)}; expected {dtype} {[rows, cols // m * n]}")
    bits = ((groups.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).bool()
    if bits[..., m:].any():
        raise CodecError(f"group metadata has bits set beyond position M={m} (corrupted metadata)")
    bits = bits[..., :m]
    counts = bits.sum(dim=-1)
    if (counts != n).any():
        bad = int((counts != n).sum())
        raise CodecError(f"{bad} group(s) do not mark exactly N={n} kept positions (corrupted metadata)")
    kept = torch.argsort((~bits).to(torch.int8), dim=-1, stable=True)[..., :n]
    dense = torch.zeros(rows, cols // m, m, dtype=dtype)
    dense.scatter_(-1, kept, values.reshape(rows, cols // m, n))
    return _apply_negzero(dense.reshape(rows, cols), negzero, bits.reshape(rows, cols))
