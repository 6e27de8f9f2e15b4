"""Calibration data: texts, local files or Hub datasets -> seeded random token windows.

As in the SparseGPT paper, the texts are tokenized as one stream and ``nsamples`` windows of
``seqlen`` tokens start at seeded random offsets.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["calibration_data", "load_texts", "tokenize_stream", "random_windows", "DEMO_SOURCE"]

DEMO_SOURCE = "demo"
"""Pass ``source="demo"`` to use the embedded, generated demo corpus."""

_LOCAL_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".parquet", ".csv")


def _texts_from_records(records: Iterable[Any], text_column: str, origin: str) -> list[str]:
    texts = []
    for record in records:
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict):
            if text_column not in record:
                raise ValueError(
                    f"{origin}: records have no {text_column!r} field (fields: {sorted(record)}); "
                    f"pass text_column= with the name of the text field"
                )
            texts.append(str(record[text_column]))
        else:
            raise ValueError(f"{origin}: cannot read text from a record of type {type(record).__name__}")
    return texts


def _load_local(path: str, text_column: str) -> list[str]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".txt", ".text", ".md"):
        with open(path, encoding="utf-8") as handle:
            return [handle.read()]
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        return _texts_from_records(records, text_column, path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if isinstance(data, dict):
            data = data.get("data", data.get(text_column, [data]))
        return _texts_from_records(data if isinstance(data, list) else [data], text_column, path)
    if suffix in (".parquet", ".csv"):
        import datasets

        ds = datasets.load_dataset(suffix[1:], data_files=path, split="train")
        if text_column not in ds.column_names:
            raise ValueError(f"{path}: no column {text_column!r} (columns: {ds.column_names}); pass text_column=")
        return [str(t) for t in ds[text_column]]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_LOCAL_SUFFIXES)}")


def load_texts(
    source: "str | Sequence[str] | Any",
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> list[str]:
    """Texts from a list of strings, a local file, a ``datasets.Dataset`` or a Hub dataset name."""
    if isinstance(source, str):
        if source == DEMO_SOURCE:
            from .demo.corpus import generate_documents

            return generate_documents(400, seed=1234)
        if os.path.isfile(source):
            return _load_local(source, text_column)
        if source.lower().endswith(_LOCAL_SUFFIXES):
            raise FileNotFoundError(f"calibration file {source!r} does not exist")
        import datasets

        ds = datasets.load_dataset(source, dataset_config, split=split)  # a Hub name or a local dataset folder
        return load_texts(ds, text_column=text_column)
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        if text_column not in source.column_names:
            raise ValueError(
                f"dataset has no column {text_column!r} (columns: {source.column_names}); pass text_column="
            )
        return [str(t) for t in source[text_column]]
    if isinstance(source, Sequence):
        return _texts_from_records(source, text_column, "calibration texts")
    raise TypeError(
        f"cannot read calibration texts from {type(source).__name__}: pass a list of strings, a file path, "
        "a datasets.Dataset or a Hub dataset name"
    )


def tokenize_stream(texts: Sequence[str], tokenizer: Any, separator: str = "\n\n") -> torch.Tensor:
    """Tokenize ``texts`` joined by ``separator`` into one 1-D stream of token ids."""
    joined = separator.join(t for t in texts if t)
    if not joined.strip():
        raise ValueError("calibration data is empty: no text to tokenize; pass non-empty texts or another dataset")
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets in ``stream``."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    total = int(stream.numel())
    if total < seqlen:
        raise ValueError(
            f"calibration data has {total} tokens, fewer than one window of seqlen={seqlen}; "
            f"pass more text or a smaller seqlen"
        )
    if total < nsamples * seqlen:
        logger.warning(
            "calibration data has %d tokens, fewer than nsamples x seqlen = %d: windows will overlap",
            total,
            nsamples * seqlen,
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def calibration_data(
    source: "str | Sequence[str] | Any",
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> torch.Tensor:
    """Token windows ``[nsamples, seqlen]`` for calibration.

    ``source`` is a list of strings, a local ``.txt/.json/.jsonl/.parquet/.csv`` file, a
    ``datasets.Dataset``, a Hub dataset name (with ``dataset_config``, ``split``, ``text_column``),
    or ``"demo"`` for the embedded generated corpus.
    """
    texts = load_texts(source, dataset_config=dataset_config, split=split, text_column=text_column)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("calibration data is empty: the source holds no text")
    return random_windows(tokenize_stream(texts, tokenizer), nsamples, seqlen, seed)
