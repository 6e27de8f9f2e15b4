"""Command-line hooks for saving and pushing sparse models, wired into ``hf_sparse.cli``.

- :func:`add_push_parser`: the ``hf-sparse push DIR REPO_ID`` subcommand;
- :func:`add_prune_save_arguments`: ``--save-format``, ``--push-to-hub REPO_ID``, ``--private`` and
  ``--hub-token`` for ``hf-sparse prune``;
- :func:`save_after_prune` / :func:`push_to_hub_after_prune`: what ``prune`` runs with those options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["add_prune_save_arguments", "add_push_parser", "push_to_hub_after_prune", "save_after_prune"]

FORMAT_CHOICES = ("dense", "compressed")


def _dir_format(directory: str) -> str:
    from .persistence.compress import is_compressed_checkpoint

    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory} is not a saved model directory (no config.json)")
    with open(config_path) as f:
        return "compressed" if is_compressed_checkpoint(json.load(f)) else "dense"


def _push(args: argparse.Namespace) -> int:
    from .persistence import push_to_hub

    fmt = args.format or _dir_format(args.directory)
    info = push_to_hub(
        args.directory,
        args.repo_id,
        format=fmt,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.directory} ({fmt}) to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``push DIR REPO_ID`` to the ``hf-sparse`` subcommands; returns its parser."""
    p = subparsers.add_parser("push", help="upload a saved sparse model directory to the Hugging Face Hub")
    p.add_argument("directory", help="a directory written by hf-sparse prune --output or hf_sparse.save_sparse")
    p.add_argument("repo_id", help="Hub repository, e.g. user/llama-2-7b-sparse (created if needed)")
    p.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default=None,
        help="upload format (default: the directory's own; the other one is converted before the upload)",
    )
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--commit-message", default="Upload sparse model with hf_sparse")
    p.set_defaults(func=_push)
    return p


def add_prune_save_arguments(prune_parser: argparse.ArgumentParser) -> None:
    """Add ``--save-format``, ``--push-to-hub``, ``--private`` and ``--hub-token`` to the ``prune`` parser."""
    prune_parser.add_argument(
        "--save-format",
        choices=FORMAT_CHOICES,
        default="dense",
        help="checkpoint format for --output and --push-to-hub: dense (loads anywhere) or compressed (needs hf_sparse)",
    )
    prune_parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the pruned model to this Hub repo"
    )
    prune_parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    prune_parser.add_argument("--hub-token", default=None, help="with --push-to-hub: Hub token (default: HF_TOKEN)")


def save_after_prune(args: argparse.Namespace, model: Any, tokenizer: Any) -> str | None:
    """Save to ``args.output`` (if given) in ``args.save_format`` with the model card; returns the directory."""
    if not getattr(args, "output", None):
        return None
    from .persistence import save_sparse

    fmt = getattr(args, "save_format", "dense") or "dense"
    save_sparse(model, args.output, format=fmt, tokenizer=tokenizer)
    print(f"\nsaved to {args.output} ({fmt}; sparsity metadata in config.json: sparsity_config; model card README.md)")
    return args.output


def push_to_hub_after_prune(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """Push the pruned model to ``args.push_to_hub`` when that option is set; returns the commit info or ``None``."""
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        return None
    from .persistence import push_to_hub

    fmt = getattr(args, "save_format", "dense") or "dense"
    info = push_to_hub(
        model,
        repo_id,
        format=fmt,
        private=bool(getattr(args, "private", False)),
        token=getattr(args, "hub_token", None),
        tokenizer=tokenizer,
    )
    print(f"\npushed to {repo_id} ({fmt}): {getattr(info, 'commit_url', info)}")
    return info
