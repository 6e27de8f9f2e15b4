"""Calibration data from texts, local files and dataset folders, as seeded random windows."""

import json

import pytest
import torch

from hf_sparse import calibration_data
from hf_sparse.calibration import load_texts
from hf_sparse.demo.corpus import generate_documents
from hf_sparse.demo.tokenizer import build_tokenizer

DOCS = generate_documents(60, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(generate_documents(200, seed=0), vocab_size=300)


def test_windows_from_texts_are_seeded(tokenizer):
    a = calibration_data(DOCS, tokenizer, nsamples=8, seqlen=32, seed=0)
    b = calibration_data(DOCS, tokenizer, nsamples=8, seqlen=32, seed=0)
    c = calibration_data(DOCS, tokenizer, nsamples=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenizer("\n\n".join(DOCS), add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, stream))
    assert " ".join(map(str, a[0].tolist())) in text  # each window is a contiguous slice of the stream


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet", ".csv"])
def test_local_files(tmp_path, suffix, tokenizer):
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(DOCS))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
    else:
        import datasets

        ds = datasets.Dataset.from_dict({"text": DOCS})
        ds.to_parquet(str(path)) if suffix == ".parquet" else ds.to_csv(str(path), index=False)
    texts = load_texts(str(path))
    assert "".join(texts).replace("\n", "") == "".join(DOCS).replace("\n", "") or len(texts) == len(DOCS)
    assert calibration_data(str(path), tokenizer, nsamples=4, seqlen=16).shape == (4, 16)


def test_dataset_folder_goes_through_load_dataset(tmp_path, tokenizer):
    """A local dataset folder takes the same path as a Hub dataset name (datasets.load_dataset)."""
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in DOCS))
    ids = calibration_data(str(tmp_path), tokenizer, nsamples=4, seqlen=16, split="train", text_column="content")
    assert ids.shape == (4, 16)


def test_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_data(["just a few words"], tokenizer, nsamples=4, seqlen=512)
    with pytest.raises(ValueError, match="empty"):
        calibration_data([], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        calibration_data(["", "  "], tokenizer)
    with pytest.raises(FileNotFoundError):
        calibration_data(str(tmp_path / "missing.jsonl"), tokenizer)
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="no 'text' field"):
        calibration_data(str(tmp_path / "d.jsonl"), tokenizer)
    with pytest.raises(ValueError, match="must be positive"):
        calibration_data(DOCS, tokenizer, nsamples=0)
