"""Perplexity of a model under several sparsity configurations (WikiText-2 style).

The evaluation text is tokenized as one stream (documents joined by blank lines) and cut into
non-overlapping windows of the context length; the tail shorter than a window is dropped, as in the
SparseGPT and Wanda evaluation code. Each configuration is applied, measured and undone in turn.
Writes ``perplexity.json`` and ``perplexity.md`` to ``--output-dir`` and prints the table.

    python eval/perplexity.py --model mistralai/Mistral-7B-v0.1 --configs dense cats50 cats70 relu sparsegpt2:4
    python eval/perplexity.py --model ./my-sparse-llama --dataset my_texts.txt --seqlen 1024
    python eval/perplexity.py --model meta-llama/Llama-2-7b-hf --dataset allenai/c4 --dataset-config en --split validation

Datasets: wikitext2 (WikiText-2 raw, test; the default), a local .txt/.jsonl/.json/.parquet/.csv file,
or a Hub dataset name with --dataset-config/--split/--text-column. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_sparse.evaluation import (
    calibration_tokens,
    load_model,
    parse_configuration,
    perplexity_table,
    perplexity_tokens,
    run_perplexity,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hub id or local directory")
    p.add_argument("--configs", nargs="+", default=["dense", "cats50", "cats70", "cats90", "relu"])
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, a local file or a Hub dataset name")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default: min(2048, the model's))")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--revision", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--calibration", default="c4", help="for CATS/pruning: c4, wikitext2, a file, a Hub dataset, demo")
    p.add_argument("--calibration-config", default=None)
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calibration-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: results/perplexity/<model name>")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    for name in args.configs:
        parse_configuration(name)
    output_dir = args.output_dir or os.path.join("results", "perplexity", args.model.rstrip("/").replace("/", "--"))
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model(
        args.model, dtype=args.dtype, device=args.device, revision=args.revision, tokenizer=args.tokenizer
    )
    max_positions = getattr(model.config, "max_position_embeddings", None) or 2048
    seqlen = args.seqlen or min(2048, max_positions)
    calib_seqlen = min(args.calibration_seqlen, max_positions)
    tokens = perplexity_tokens(
        tokenizer, args.dataset, dataset_config=args.dataset_config, split=args.split, text_column=args.text_column
    )

    def calibration():
        return calibration_tokens(
            tokenizer,
            args.calibration,
            args.nsamples,
            calib_seqlen,
            args.seed,
            dataset_config=args.calibration_config,
            split=args.calibration_split,
        )

    results = run_perplexity(
        model, tokens, args.configs, calibration=calibration, seqlen=seqlen, batch_size=args.batch_size
    )
    record = {
        "model": args.model,
        "dataset": {"source": args.dataset, "config": args.dataset_config, "split": args.split},
        "tokens": int(tokens.numel()),
        "windows": int(tokens.numel()) // seqlen,
        "seqlen": seqlen,
        "dtype": args.dtype,
        "calibration": {
            "source": args.calibration,
            "nsamples": args.nsamples,
            "seqlen": calib_seqlen,
            "seed": args.seed,
        },
        "perplexity": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    table = perplexity_table(results)
    with open(os.path.join(output_dir, "perplexity.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(output_dir, "perplexity.md"), "w") as f:
        f.write(f"# Perplexity: {args.model} on {args.dataset} ({record['windows']} x {seqlen} tokens)\n\n{table}\n")
    print(table)
    print(f"\nwrote {output_dir}/perplexity.json and perplexity.md ({record['seconds']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
