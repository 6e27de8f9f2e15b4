"""The project's own small Llama-architecture models, trained on the generated corpus and cached.

``load_small_model("demo")`` (about a minute to train on 2 CPU cores the first time) backs the
``hf-sparse demo`` command; ``load_small_model("bench")`` is the larger model behind the quality
and speed benchmarks in ``eval/``. Both are cached under ``$HF_SPARSE_CACHE`` (default
``~/.cache/hf_sparse``), keyed by the recipe, so later runs load in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .corpus import generate_documents
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["SmallModelRecipe", "RECIPES", "load_small_model", "demo_texts", "cache_dir"]

RECIPE_VERSION = 1


@dataclass(frozen=True)
class SmallModelRecipe:
    """Everything that determines a cached small model: architecture, data and training."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 512
    max_position_embeddings: int = 512
    train_docs: int = 6000
    seqlen: int = 128
    batch_size: int = 32
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0


RECIPES = {
    "demo": SmallModelRecipe(
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352, steps=250
    ),
    "bench": SmallModelRecipe(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=704, steps=600
    ),
}

TRAIN_SEED, HELDOUT_SEED, CALIB_SEED = 0, 1, 2


def demo_texts(split: str = "heldout", n_docs: int = 200) -> list[str]:
    """Generated documents: ``"train"``, ``"heldout"`` (evaluation) or ``"calibration"`` split (disjoint seeds)."""
    seeds = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "calibration": CALIB_SEED}
    if split not in seeds:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(seeds)}")
    return generate_documents(n_docs, seed=seeds[split])


def cache_dir() -> str:
    return os.environ.get("HF_SPARSE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_sparse"))


def _recipe_key(recipe: SmallModelRecipe) -> str:
    payload = json.dumps({"v": RECIPE_VERSION, **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _train(recipe: SmallModelRecipe, tokenizer, progress: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    texts = demo_texts("train", recipe.train_docs)
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    stream = torch.tensor(stream, dtype=torch.long)
    n_windows = stream.numel() // recipe.seqlen
    windows = stream[: n_windows * recipe.seqlen].view(n_windows, recipe.seqlen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, recipe.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc="training the small model", disable=not progress)
    for _ in bar:
        batch = windows[torch.randint(0, n_windows, (recipe.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def load_small_model(name: str = "demo", *, progress: bool = True, cache: bool = True):
    """``(model, tokenizer)`` for the named recipe, trained once and cached on disk."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if name not in RECIPES:
        raise ValueError(f"unknown small model {name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    path = os.path.join(cache_dir(), f"small-{name}-{_recipe_key(recipe)}")
    if cache and os.path.exists(os.path.join(path, "config.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        return model, tokenizer
    logger.info("training the %r small model (cached afterwards in %s)", name, path)
    tokenizer = build_tokenizer(demo_texts("train", 2000), vocab_size=recipe.vocab_size)
    model = _train(recipe, tokenizer, progress)
    if cache:
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use theirs
            pass
    return model, tokenizer
