"""Save, load and push sparse models: the user-facing entry points of the persistence package.

- :func:`save_sparse` writes ``save_pretrained`` output (``format="dense"``: plain safetensors with the
  zeros in place, loadable by any ``transformers`` user) or the compact ``format="compressed"``
  (see :mod:`.compress`), always with ``sparsity_config`` in ``config.json`` and a model card.
- :func:`load_sparse` (also exported as ``hf_sparse.from_pretrained``) loads either format from a
  directory or a Hub repo, checks that the recorded sparsity holds, and re-applies CATS.
- :func:`push_to_hub` saves (if given a model) and uploads with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

from torch import nn

from ..modules import TRANSPOSED_WEIGHT_TYPES, weight_matrix
from ..patterns import NM, parse_pattern
from .card import build_model_card, looks_like_repo_id
from .codec import MAX_M
from .compress import compress_checkpoint, decompress_checkpoint, is_compressed_checkpoint
from .sparsity import check_sparsity as _check_sparsity
from .sparsity import ensure_sparsity_config, module_sizes

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "from_pretrained", "load_sparse", "push_to_hub", "save_sparse"]

FORMATS = ("dense", "compressed")
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {FORMATS}")


def _remove_weight_files(directory: str) -> None:
    """Drop weight files of an earlier save (either format) so the new save is not mixed with them."""
    for name in os.listdir(directory):
        if name.startswith(("model.", "model-", "pytorch_model")) and name.endswith(_WEIGHT_SUFFIXES):
            os.remove(os.path.join(directory, name))


def _saved_tensor_names(directory: str) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in os.listdir(directory):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), framework="pt") as reader:
                names.update(reader.keys())
    return names


def _compression_plan(model: nn.Module, record: dict[str, Any], saved: set[str]) -> dict[str, dict[str, Any]]:
    """Tensor name -> codec spec for every pruned module of ``record`` found in the saved files."""
    modules = dict(model.named_modules())
    plan: dict[str, dict[str, Any]] = {}
    for name, entry in (record.get("per_module") or {}).items():
        module = modules.get(name)
        key = f"{name}.weight"
        if key not in saved:
            suffix = [k for k in saved if k.endswith("." + key)]
            key = suffix[0] if len(suffix) == 1 else None
        if module is None or key is None:
            logger.warning("%s: not found in the model or its saved tensors; stored dense", name)
            continue
        pattern = parse_pattern(entry.get("pattern", entry.get("sparsity", 0.0)))
        in_features = weight_matrix(module).shape[1]
        if isinstance(pattern, NM) and pattern.m <= MAX_M and in_features % pattern.m == 0:
            plan[key] = {
                "encoding": "nm",
                "n": pattern.n,
                "m": pattern.m,
                "transposed": isinstance(module, TRANSPOSED_WEIGHT_TYPES),
            }
        else:
            plan[key] = {"encoding": "bitmask"}
    return plan


def _base_model(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if looks_like_repo_id(name) and not os.path.exists(str(name)) else None


def save_sparse(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    format: str = "dense",
    tokenizer: Any = None,
    model_card: bool = True,
    results: dict[str, Any] | None = None,
    base_model: str | None = None,
    check: bool = True,
) -> str:
    """Save a sparse model with its ``sparsity_config`` and a model card; returns the directory.

    Args:
        model: a ``transformers`` model, pruned by :func:`hf_sparse.prune` or elsewhere (then its zeros
            are measured per linear layer and recorded with method ``"unknown"``).
        save_directory: where to write (created if needed; earlier weight files there are replaced).
        format: ``"dense"`` (default: plain safetensors with the zeros in place, loadable without
            the plugin) or ``"compressed"`` (kept values + bitmask / N:M metadata; needs the plugin).
        tokenizer: saved alongside when given.
        model_card: write a README.md describing the sparsity (and ``results``).
        results: ``{"perplexity": {...}, "zero_shot": {...}}`` for the model card.
        base_model: Hub id of the dense model (default: the model's ``name_or_path`` if it is one).
        check: verify first that the weights still have the recorded sparsity.
    """
    _check_format(format)
    directory = os.fspath(save_directory)
    record = ensure_sparsity_config(model)
    if check:
        _check_sparsity(model, record)
    os.makedirs(directory, exist_ok=True)
    _remove_weight_files(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if format == "compressed":
        compress_checkpoint(directory, _compression_plan(model, record, _saved_tensor_names(directory)))
    if model_card:
        card = build_model_card(
            record,
            base_model=base_model or _base_model(model),
            results=results,
            sizes=module_sizes(model, list(record.get("per_module") or {})),
            storage_format=format,
        )
        with open(os.path.join(directory, "README.md"), "w") as f:
            f.write(card)
    logger.info("saved %s checkpoint to %s", format, directory)
    return directory


def _local_path(repo_or_dir: str, hub_kwargs: dict[str, Any]) -> str:
    """The directory itself, or a snapshot of the Hub repo (honouring ``HF_ENDPOINT``)."""
    if os.path.isdir(repo_or_dir):
        return repo_or_dir
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=repo_or_dir,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot"],
        **hub_kwargs,
    )


def _restore_cats(model: nn.Module) -> None:
    if not getattr(getattr(model, "config", None), "cats_config", None):
        return
    try:
        from ..cats import apply_cats_from_config
    except ImportError as err:  # CATS not available in this build
        logger.warning("the checkpoint has cats_config but hf_sparse.cats is unavailable (%s); CATS not applied", err)
        return
    apply_cats_from_config(model)
    logger.info("re-applied CATS activation sparsity from cats_config")


def load_sparse(
    repo_or_dir: str | os.PathLike,
    *,
    check_sparsity: bool = True,
    restore_cats: bool = True,
    model_class: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a sparse checkpoint (dense or compressed) from a directory or a Hub repo id.

    Args:
        repo_or_dir: a local directory or a Hub repo id (downloaded with ``snapshot_download``,
            which honours ``HF_ENDPOINT``).
        check_sparsity: raise if any module recorded in ``sparsity_config`` lacks its sparsity.
        restore_cats: re-apply CATS from ``config.cats_config`` when present.
        model_class: the ``transformers`` auto class (default ``AutoModelForCausalLM``).
        kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download`` go to
            the download; everything else (``dtype``, ``device_map``, ...) to ``from_pretrained``.

    Raises:
        CompressedCheckpointError: a corrupted, truncated or inconsistent compressed file.
        SparsityMismatchError: weights that do not have the recorded sparsity.
    """
    from transformers import AutoModelForCausalLM

    source = os.fspath(repo_or_dir)
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    path = _local_path(source, hub_kwargs)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    loader = model_class or AutoModelForCausalLM
    if is_compressed_checkpoint(config):
        workdir = tempfile.mkdtemp(prefix="hf_sparse_decompressed_")
        try:
            decompress_checkpoint(path, workdir)
            model = loader.from_pretrained(workdir, **kwargs)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    else:
        model = loader.from_pretrained(path, **kwargs)
    model.name_or_path = source  # the repo id or directory, not the temporary or snapshot path
    model.config._name_or_path = source
    if getattr(model.config, "sparsity_config", None) is None:
        logger.warning("%s has no sparsity_config in config.json: not saved by hf_sparse; nothing to check", source)
    elif check_sparsity:
        _check_sparsity(model)
    if restore_cats:
        _restore_cats(model)
    return model


from_pretrained = load_sparse


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer and other non-weight files of ``src`` that ``dst`` does not have yet."""
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(path, os.path.join(dst, name))


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    format: str = "dense",
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload sparse model with hf_sparse",
    tokenizer: Any = None,
    results: dict[str, Any] | None = None,
    revision: str | None = None,
) -> Any:
    """Upload a sparse model (saved on the fly) or a saved directory to the Hub; returns the ``CommitInfo``.

    A directory saved in the other format is loaded and re-saved in ``format`` first; a directory
    without a README.md gets the generated model card. The repo is created if needed.
    """
    from huggingface_hub import HfApi

    _check_format(format)
    with tempfile.TemporaryDirectory(prefix="hf_sparse_push_") as tmp:
        if isinstance(model_or_dir, nn.Module):
            folder = save_sparse(model_or_dir, tmp, format=format, tokenizer=tokenizer, results=results)
        else:
            folder = os.fspath(model_or_dir)
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
            current = "compressed" if is_compressed_checkpoint(config) else "dense"
            if current != format:
                logger.info("%s is %s; re-saving it as %s before the upload", folder, current, format)
                model = load_sparse(folder)
                save_sparse(model, tmp, format=format, results=results, model_card=True)
                _copy_side_files(folder, tmp)
                folder = tmp
            elif not os.path.exists(os.path.join(folder, "README.md")) and config.get("sparsity_config"):
                card = build_model_card(config["sparsity_config"], results=results, storage_format=format)
                with open(os.path.join(folder, "README.md"), "w") as f:
                    f.write(card)
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, repo_type="model"
        )
    logger.info("pushed %s checkpoint to %s", format, repo_id)
    return info
