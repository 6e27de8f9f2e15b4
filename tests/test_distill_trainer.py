"""DistillationTrainer on tiny Llama models built from configs (CPU, seconds)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparse.distill import DistillationArguments, DistillationTrainer
from hf_sparse.distill.losses import naive_distillation_loss_sums

VOCAB = 61


def tiny_llama(seed: int, vocab: int = VOCAB, hidden: int = 32, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def make_dataset(n: int = 8, seqlen: int = 12, seed: int = 0) -> list[dict]:
    """Examples with very different numbers of target tokens (prompt masked with -100, right padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (seqlen,), generator=g)
        attn = torch.ones(seqlen, dtype=torch.long)
        labels = ids.clone()
        prompt = [1, 8, 3, 9][i % 4]
        labels[:prompt] = -100
        pad = [0, 4, 1, 6][(i // 2) % 4]
        if pad:
            ids[-pad:] = 0
            attn[-pad:] = 0
            labels[-pad:] = -100
        rows.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return rows


def make_args(tmp_path, **overrides) -> DistillationArguments:
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True, alpha=0.5, temperature=2.0, chunk_size=7,
    )
    kwargs.update(overrides)
    return DistillationArguments(**kwargs)


def train(tmp_path, student_seed=1, **overrides):
    student, teacher = tiny_llama(student_seed), tiny_llama(0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides), train_dataset=make_dataset()
    )
    trainer.train()
    return trainer, student, teacher


def test_loss_matches_reference_from_full_logits(tmp_path):
    """The captured-hidden + chunked path equals KD/CE computed from the models' full logits."""
    student, teacher = tiny_llama(1), tiny_llama(0)
    args = make_args(tmp_path, kd_loss="jsd", jsd_beta=0.3, alpha=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_dataset())
    batch = {k: torch.stack([row[k] for row in make_dataset()[:4]]) for k in ("input_ids", "attention_mask", "labels")}
    student.train()
    loss = trainer.compute_loss(student, batch, num_items_in_batch=None)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = naive_distillation_loss_sums(
        s_logits, t_logits, batch["labels"], attention_mask=batch["attention_mask"], kd_loss="jsd",
        temperature=2.0, jsd_beta=0.3,
    )
    want = (0.7 * ref.kd + 0.3 * ref.ce) / ref.num_tokens
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


class _ScaledLogitsLlama(LlamaForCausalLM):
    """Post-processes logits after the head (like soft-capping): head(hidden) is not the logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_falls_back_to_logits_when_head_output_is_post_processed(tmp_path):
    torch.manual_seed(1)
    student = _ScaledLogitsLlama(tiny_llama(1).config)
    teacher = tiny_llama(0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    batch = {k: torch.stack([row[k] for row in make_dataset()[:2]]) for k in ("input_ids", "attention_mask", "labels")}
    loss = trainer.compute_loss(student, batch)
    assert trainer._heads[id(student)] is None and trainer._heads[id(teacher)] is not None
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = naive_distillation_loss_sums(s_logits, t_logits, batch["labels"], attention_mask=batch["attention_mask"], temperature=2.0)
    torch.testing.assert_close(loss.detach(), (0.5 * ref.kd + 0.5 * ref.ce) / ref.num_tokens, rtol=1e-5, atol=1e-6)


def test_teacher_frozen_not_optimized_not_saved_and_logs(tmp_path):
    trainer, student, teacher = train(tmp_path, save_strategy="steps", save_steps=2, hidden_weight=0.5)
    teacher_before = tiny_llama(0).state_dict()
    for name, p in teacher.named_parameters():
        assert p.grad is None and not p.requires_grad
        torch.testing.assert_close(p.detach(), teacher_before[name], rtol=0, atol=0)
    assert not teacher.training
    teacher_ids = {id(p) for p in teacher.parameters()}
    opt_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert opt_ids and not (opt_ids & teacher_ids)
    assert not (set(map(id, trainer.optimizer.state)) & teacher_ids)
    # the student did learn
    assert any(not torch.equal(p, tiny_llama(1).state_dict()[n]) for n, p in student.state_dict().items())

    saved = load_file(os.path.join(tmp_path, "checkpoint-2", "model.safetensors"))
    student_state = student.state_dict()
    assert set(saved) <= set(student_state) and not any("teacher" in k for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(value, student_state[key])
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], teacher_before["model.layers.0.mlp.up_proj.weight"])

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        total = 0.5 * entry["kd_loss"] + 0.5 * entry["ce_loss"] + 0.5 * entry["hidden_loss"]
        assert entry["hidden_loss"] > 0 and entry["kd_loss"] > 0
        assert total == pytest.approx(entry["loss"], rel=1e-4)


@pytest.mark.parametrize("extra", [{}, {"kd_loss": "reverse_kl", "hidden_weight": 1.0}])
def test_gradient_accumulation_invariance(tmp_path, extra):
    counts = [int((row["labels"][1:] != -100).sum()) for row in make_dataset()]
    assert len(set(counts)) > 2  # uneven target tokens per example
    _, a, _ = train(tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1, **extra)
    _, b, _ = train(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **extra)
    _, c, _ = train(tmp_path / "c", per_device_train_batch_size=1, gradient_accumulation_steps=4, **extra)
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), tiny_llama(1).parameters()))
    assert moved > 1e-3
    for other in (b, c):
        for (name, p), q in zip(a.named_parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_teacher(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(0, dtype=torch.bfloat16)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, max_steps=1), train_dataset=make_dataset())
    trainer.train()
    entry = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(entry["loss"])) and entry["kd_loss"] > 0
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in teacher.parameters())


def test_vocab_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"student 61, teacher 64"):
        DistillationTrainer(model=tiny_llama(1), teacher_model=tiny_llama(0, vocab=64), args=make_args(tmp_path))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"kd_loss": "kl"}, "kd_loss"),
        ({"jsd_beta": -0.1}, "jsd_beta"),
        ({"hidden_weight": -1.0}, "hidden_weight"),
        ({"chunk_size": -1}, "chunk_size"),
    ],
)
def test_argument_validation(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **bad)


def test_requires_teacher_and_distillation_arguments(tmp_path):
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=tiny_llama(1), args=make_args(tmp_path))
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DistillationArguments"):
        DistillationTrainer(model=tiny_llama(1), teacher_model=tiny_llama(0), args=TrainingArguments(str(tmp_path)))


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    """torchrun, 2 CPU processes x batch 2 (gloo): both ranks end identical, and equal to 1 process x batch 4."""
    script = os.path.join(os.path.dirname(__file__), "distill_ddp_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: no orphans on a hang
        output, _ = proc.communicate()
        pytest.fail("2-process DDP run timed out (deadlock?):\n" + output[-3000:])
    assert proc.returncode == 0, output[-5000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    _, single, _ = train(tmp_path / "single", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    moved = False
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved |= not torch.equal(value, tiny_llama(1).state_dict()[name])
    assert moved
