"""Zero-shot lm-eval accuracy of a model under several sparsity configurations: the CATS paper's tables.

For each configuration (dense, CATS 50/70/90 %, ReLUification, SparseGPT/Wanda pruning, ...) the
model is made sparse in place, evaluated 0-shot on the paper's eight tasks with lm-evaluation-harness
0.4, and restored. Writes ``results.json``, ``table.md`` (the paper's layout; with ``--paper`` each
cell reads "ours (paper, ours - paper)") and ``chart.png`` to ``--output-dir``, and prints the tables.

    # the CATS paper's Mistral-7B table (one GPU)
    python eval/zero_shot.py --paper mistral-7b
    # its Llama-2-7B table
    python eval/zero_shot.py --paper llama2-7b
    # pruning baselines, or any checkpoint (hf_sparse-saved ones included: compressed, CATS, distilled)
    python eval/zero_shot.py --model meta-llama/Llama-2-7b-hf --configs dense sparsegpt50 sparsegpt2:4 wanda50
    python eval/zero_shot.py --model ./my-sparse-llama --configs dense

Configuration names: dense, relu, catsNN, METHODNN, METHODN:M (sparsegpt, wanda, magnitude, obc),
joined by '+' to combine (sparsegpt2:4+cats50). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_sparse.evaluation import (
    DEFAULT_CONFIGS,
    PAPER_MODELS,
    PAPER_TASKS,
    calibration_tokens,
    load_model,
    paper_results,
    parse_configuration,
    run_zero_shot,
    zero_shot_chart,
    zero_shot_table,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub id or local directory (default: the --paper model)")
    p.add_argument("--paper", choices=sorted(PAPER_MODELS), help="compare with the CATS paper's table of this model")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="configurations, in table order")
    p.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="lm-eval task names")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", default="16", help="lm-eval batch size (an int or 'auto')")
    p.add_argument("--limit", type=float, default=None, help="documents per task (smoke tests only)")
    p.add_argument("--data-dir", help="read task documents from DIR/<task>.jsonl instead of the Hub")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--revision", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--calibration", default="c4", help="c4, wikitext2, a local file, a Hub dataset or 'demo'")
    p.add_argument("--calibration-config", default=None, help="dataset config of a Hub calibration dataset")
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (capped by the model's)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--output-dir", default=None, help="default: results/zero_shot/<model name>")
    return p


def _batch_size(value: str) -> int | str:
    return value if value == "auto" else int(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.model is None and args.paper is None:
        raise SystemExit("give --model, or --paper to evaluate the paper's model")
    model_name = args.model or PAPER_MODELS[args.paper]
    for name in args.configs:
        parse_configuration(name)  # fail on a typo before loading 14 GB
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    output_dir = args.output_dir or os.path.join("results", "zero_shot", model_name.rstrip("/").replace("/", "--"))
    os.makedirs(output_dir, exist_ok=True)

    start = time.perf_counter()
    model, tokenizer = load_model(
        model_name, dtype=args.dtype, device=args.device, revision=args.revision, tokenizer=args.tokenizer
    )
    max_positions = getattr(model.config, "max_position_embeddings", None) or args.seqlen
    seqlen = min(args.seqlen, max_positions)

    def calibration():
        return calibration_tokens(
            tokenizer,
            args.calibration,
            args.nsamples,
            seqlen,
            args.seed,
            dataset_config=args.calibration_config,
            split=args.calibration_split,
        )

    record: dict[str, Any] = {
        "model": model_name,
        "paper": args.paper,
        "tasks": args.tasks,
        "num_fewshot": args.num_fewshot,
        "limit": limit,
        "data_dir": args.data_dir,
        "dtype": args.dtype,
        "calibration": {
            "source": args.calibration,
            "config": args.calibration_config,
            "nsamples": args.nsamples,
            "seqlen": seqlen,
            "seed": args.seed,
        },
        "versions": _versions(),
        "results": {},
    }
    json_path = os.path.join(output_dir, "results.json")

    def save_partial(name: str, scores: dict) -> None:
        record["results"][name] = scores
        record["seconds"] = round(time.perf_counter() - start, 1)
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)

    results = run_zero_shot(
        model,
        tokenizer,
        args.configs,
        args.tasks,
        calibration=calibration,
        data_dir=args.data_dir,
        num_fewshot=args.num_fewshot,
        batch_size=_batch_size(args.batch_size),
        limit=limit,
        on_result=save_partial,
    )
    if args.paper:
        record["paper_results"] = paper_results(args.paper)
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2)

    tables = [
        zero_shot_table(results, args.tasks, paper=args.paper, metric="acc"),
        zero_shot_table(results, args.tasks, metric="acc_norm"),
    ]
    header = f"# Zero-shot results: {model_name}\n\n"
    if args.paper:
        header += f"Compared with the CATS paper's {args.paper} table.\n\n"
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(header + "\n\n".join(tables) + "\n")
    chart = zero_shot_chart(
        results,
        os.path.join(output_dir, "chart.png"),
        args.tasks,
        paper=args.paper,
        title=f"{model_name}: zero-shot accuracy",
    )
    print("\n\n".join(tables))
    print(f"\nwrote {json_path}, {os.path.join(output_dir, 'table.md')}, {chart} ({time.perf_counter() - start:.0f} s)")
    return record


def _versions() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    return {
        "lm_eval": lm_eval.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
