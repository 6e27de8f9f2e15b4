"""The ``hf-sparse`` command line: ``demo`` and ``prune``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .hub_cli import add_prune_save_arguments, add_push_parser, push_to_hub_after_prune, save_after_prune
from .report import markdown_table

__all__ = ["main"]

DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    rows = run_demo(
        model_name=args.model,
        methods=args.methods,
        patterns=args.patterns,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        progress=not args.quiet,
    )
    print(
        f"\nhf-sparse demo: the project's small Llama ({args.model}), {args.nsamples} x {args.seqlen} calibration tokens\n"
    )
    print(
        markdown_table(
            ["method", "pattern", "sparsity", "ppl before", "ppl after", "time (s)"],
            [
                [
                    r["method"],
                    r["pattern"],
                    f"{r['sparsity']:.1%}",
                    f"{r['ppl_before']:.3f}",
                    f"{r['ppl_after']:.3f}",
                    f"{r['seconds']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    return 0


def _load(model_id: str, dtype: str, trust_remote_code: bool):
    """A Hub name or local directory, or ``small:demo`` / ``small:bench`` for the project's own models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_id.startswith("small:"):
        import torch

        from .demo.model import load_small_model

        model, tokenizer = load_small_model(model_id.split(":", 1)[1])
        if dtype not in ("auto", "float32"):
            model = model.to(getattr(torch, dtype))
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _eval_texts(spec: str, args: argparse.Namespace, load_texts) -> list[str]:
    """A local file, ``demo``, a Hub dataset name, or (when it contains spaces) the text itself."""
    import os

    if os.path.exists(spec) or spec == "demo" or not any(c.isspace() for c in spec):
        return load_texts(spec, dataset_config=args.eval_config, split=args.eval_split, text_column=args.text_column)
    return [spec]


def _prune(args: argparse.Namespace) -> int:
    from .calibration import calibration_data, load_texts, tokenize_stream
    from .engine import prune
    from .metrics import perplexity

    model, tokenizer = _load(args.model, DTYPES[args.dtype], args.trust_remote_code)
    source = args.dataset
    if source is None and not args.model.startswith("small:"):
        logging.getLogger(__name__).warning(
            "no --dataset given: calibrating on the embedded demo corpus; pass --dataset for a real model"
        )
    calibration = None
    if args.method != "magnitude" or source:
        calibration = calibration_data(
            source or "demo",
            tokenizer,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            dataset_config=args.dataset_config,
            split=args.split,
            text_column=args.text_column,
        )
    eval_tokens = None
    before = None
    if args.eval_ppl:
        texts = _eval_texts(args.eval_ppl, args, load_texts)
        eval_tokens = tokenize_stream(texts, tokenizer)
        before = perplexity(model, eval_tokens, seqlen=min(args.seqlen, eval_tokens.numel()), progress=True)
    report = prune(
        model,
        calibration,
        method=args.method,
        sparsity=args.sparsity,
        targets=args.targets or None,
        ignore=args.ignore or None,
        device=args.device,
        batch_size=args.batch_size,
        offload_activations=args.offload_activations,
    )
    print(report.to_table())
    if eval_tokens is not None:
        after = perplexity(model, eval_tokens, seqlen=min(args.seqlen, eval_tokens.numel()), progress=True)
        print(f"\nperplexity: {before:.3f} dense -> {after:.3f} pruned")
        model.config.sparsity_config["perplexity"] = {"dense": before, "pruned": after}
    save_after_prune(args, model, tokenizer)
    push_to_hub_after_prune(args, model, tokenizer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description="Make Hugging Face causal LMs sparse.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune the embedded small model with every method (no download)")
    demo.add_argument("--model", default="demo", choices=["demo", "bench"], help="which embedded small model")
    demo.add_argument("--methods", nargs="+", default=["sparsegpt", "obc", "wanda", "magnitude"])
    demo.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    demo.add_argument("--nsamples", type=int, default=64)
    demo.add_argument("--seqlen", type=int, default=128)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    p = sub.add_parser("prune", help="prune a model one-shot and save it")
    p.add_argument("model", help="Hub name or local directory (or small:demo / small:bench)")
    p.add_argument("--method", default="sparsegpt", help="sparsegpt | obc | wanda | magnitude")
    p.add_argument("--sparsity", default="0.5", help="a fraction (0.5) or an N:M pattern (2:4)")
    p.add_argument("--dataset", help="calibration: Hub dataset name, local file, or 'demo' (default: demo corpus)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="where each block is processed, e.g. cuda:0 (default: in place)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    p.add_argument("--targets", nargs="*", default=[], help="names, globs or re:regexes to prune")
    p.add_argument("--ignore", nargs="*", default=[], help="names, globs or re:regexes to keep dense")
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--eval-ppl", default=None, help="text, local file or Hub dataset for perplexity before/after")
    p.add_argument("--eval-config", default=None)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default=None, help="directory for save_pretrained")
    add_prune_save_arguments(p)
    p.set_defaults(func=_prune)
    add_push_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.command == "prune" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"hf-sparse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
