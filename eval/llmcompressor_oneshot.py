"""Prune a causal LM with the peer library llm-compressor (``oneshot`` + ``SparseGPTModifier``).

Standalone on purpose: it must NOT import ``hf_sparse``. It runs in its own virtual environment,
because llm-compressor 0.14 pins ``transformers<=5.17``::

    python3 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0
    /work/llmc-venv/bin/pip install "llmcompressor==0.14.*" torch==2.13.0

    /work/llmc-venv/bin/python eval/llmcompressor_oneshot.py \\
        --model ~/.cache/hf_sparse/small-bench-XXXX --calib /tmp/calib_64x128.pt \\
        --sparsity 0.5 --output /tmp/llmc-sgpt-50

``--calib`` is a ``torch.save``-d LongTensor ``[nsamples, seqlen]`` of token ids (for example
``hf_sparse.calibration_data(...)``), so both libraries see exactly the same calibration tokens.

Layer selection matches hf_sparse: every ``Linear`` inside the decoder layers, never ``lm_head``.
The modifier's ``targets`` are the decoder-layer classes (``model._no_split_modules``, the same
classes llm-compressor's sequential pipeline splits the model at); ``SparseGPTModifier`` then prunes
every Linear inside each of them. (With the default ``targets=["Linear"]`` each Linear is its own
"layer" and its name gets a trailing dot, e.g. ``"lm_head."``, so an exact ``ignore=["lm_head"]``
does not match and lm_head would be pruned too.)

Solver settings are the SparseGPT paper's: block size 128, dampening 0.01 (llm-compressor's
defaults, passed explicitly). Calibration: batch size 1 (llm-compressor's default), no shuffling.

Prints one JSON line on stdout (llm-compressor's own log goes to stderr): ``{"seconds": <wall time of the oneshot call>, "llmcompressor": ...,
"transformers": ..., ...}``. The pruned model is written dense (``save_compressed=False``) so that
plain ``transformers`` (e.g. hf_sparse's venv) can load it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (loaded fp32 on CPU)")
    p.add_argument("--calib", required=True, help="torch-saved LongTensor [nsamples, seqlen] of token ids")
    p.add_argument("--sparsity", required=True, help="a fraction such as 0.5, or N:M such as 2:4")
    p.add_argument("--output", required=True, help="directory for the pruned model (save_pretrained)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size (llm-compressor default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's). On a shared/busy machine use 1 (also set OMP_NUM_THREADS=1): "
        "with 2 threads and other jobs running, both libraries ran 10-30x slower")
    return p.parse_args(argv)


def sparsity_args(spec: str) -> tuple[float, str]:
    """``"0.5"`` -> (0.5, "0:0"); ``"2:4"`` -> (0.5, "2:4")."""
    spec = spec.strip()
    if ":" in spec:
        n, m = (int(x) for x in spec.split(":"))
        if not 0 < n < m:
            raise SystemExit(f"bad N:M pattern {spec!r}")
        # llm-compressor's N:M mask zeroes `prune_n` of every `prune_m` (n = pruned count);
        # "2:4" prunes 2 of 4 either way, and `sparsity` is unused by the N:M branch.
        return (m - n) / m, f"{m - n}:{m}"
    value = float(spec.rstrip("%")) / (100 if spec.endswith("%") else 1)
    if not 0 < value < 1:
        raise SystemExit(f"sparsity must be in (0, 1), got {spec!r}")
    return value, "0:0"


def decoder_layer_classes(model) -> list[str]:
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise SystemExit("model has no _no_split_modules; cannot tell its decoder-layer class")
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise SystemExit("none of the model's _no_split_modules classes is present in it")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)

    # llm-compressor logs to stdout; keep stdout for the single JSON line by pointing fd 1 at stderr.
    sys.stdout.flush()
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    if args.threads:
        torch.set_num_threads(args.threads)

    tokens = torch.load(args.calib)
    if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2):
        raise SystemExit(f"{args.calib}: expected a [nsamples, seqlen] tensor, got {type(tokens)}")
    tokens = tokens.long()
    nsamples, seqlen = tokens.shape

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layer_classes = decoder_layer_classes(model)

    dataset = Dataset.from_dict(
        {
            "input_ids": tokens.tolist(),
            "attention_mask": torch.ones_like(tokens).tolist(),
        }
    )

    sparsity, mask_structure = sparsity_args(args.sparsity)
    recipe = SparseGPTModifier(
        sparsity=sparsity,
        mask_structure=mask_structure,
        block_size=args.block_size,
        dampening_frac=args.dampening,
        targets=layer_classes,  # prune every Linear inside each decoder layer
        ignore=["re:.*lm_head"],  # belt and braces: lm_head is outside the layers anyway
    )

    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        sequential_targets=layer_classes,
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads of this process; less sensitive to a busy machine

    # Which linears ended up sparse (decoder linears vs. everything else), for the record.
    decoder_zeros = decoder_total = 0
    other_sparse = []
    layer_set = set(layer_classes)
    inside = set()
    for name, module in model.named_modules():
        if type(module).__name__ in layer_set:
            inside.update(id(m) for m in module.modules())
    n_pruned = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach()
        zeros = int((w == 0).sum())
        if id(module) in inside:
            decoder_zeros += zeros
            decoder_total += w.numel()
            n_pruned += zeros > 0
        elif zeros > 0.1 * w.numel():
            other_sparse.append(name)

    model.save_pretrained(args.output, save_compressed=False)
    tokenizer.save_pretrained(args.output)

    print(
        json.dumps(
            {
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                "llmcompressor": version("llmcompressor"),
                "transformers": version("transformers"),
                "torch": torch.__version__,
                "sparsity": args.sparsity,
                "mask_structure": mask_structure,
                "calibration": [nsamples, seqlen],
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "decoder_linear_zero_fraction": round(decoder_zeros / max(decoder_total, 1), 6),
                "decoder_linears_pruned": int(n_pruned),
                "other_linears_sparse": other_sparse,
            }
        ),
        file=result_out,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
