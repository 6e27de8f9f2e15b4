"""``DistillationTrainer``: a drop-in ``transformers.Trainer`` that distils a teacher into a student.

Typical use: the student is a pruned copy of a model, the teacher the dense original; a short
distillation recovers most of the quality lost to pruning (keep the masks with
``hf_sparse.training.ConstantSparsityCallback``).

Loss, per target token and then averaged over all target tokens of the accumulated batch::

    loss = alpha * KD(teacher || student; T) + (1 - alpha) * CE(student, labels) + hidden_weight * SquareHead

How the average is taken matters (transformers 5 Trainer, ``trainer.py`` ``training_step`` and
``compute_loss``): we override ``compute_loss``, so none of the Trainer's own loss scaling applies
to us and we do it all explicitly here:

* ``get_batch_samples`` counts the target tokens of all the micro-batches of one optimizer step
  (with the causal shift and padding excluded, exactly as our loss masks them) and, with
  ``average_tokens_across_devices`` (the default), sums that count over processes. The Trainer
  only counts when ``model_accepts_loss_kwargs`` and with its own rule; we count ourselves so the
  numerator and the denominator always use the same mask.
* ``compute_loss`` returns ``sum over local target tokens / num_items_in_batch``. Summed over the
  micro-batches this is the mean over the accumulated batch, so ``loss_is_scaled_for_ga = True``
  tells ``training_step`` not to divide by the number of accumulation steps again.
* DDP (and DeepSpeed) *average* gradients over processes, while the global mean needs their
  *sum*; with a global token count we therefore multiply the loss by the number of processes, as
  the stock ``compute_loss`` does for models that accept loss kwargs.

The result: batch 4 x GA 1, batch 2 x GA 2 and 2 processes x batch 2 give the same update, even
when examples have different numbers of target tokens.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .losses import KD_LOSSES, check_vocab_sizes, count_target_tokens, distillation_loss_sums, squarehead_loss_sum

logger = logging.getLogger(__name__)

__all__ = ["DistillationArguments", "DistillationTrainer"]


@dataclass
class DistillationArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation settings (all validated on construction)."""

    alpha: float = field(
        default=0.5, metadata={"help": "Weight of the KD loss; 1 - alpha weighs the cross-entropy on the labels."}
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of the KD loss (the loss is multiplied by T^2)."}
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "KD divergence: 'forward_kl' KL(teacher||student), 'reverse_kl' or 'jsd'.", "choices": KD_LOSSES},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "Mixture weight of the generalized JSD (kd_loss='jsd'): 0 = forward KL, 1 = reverse KL."},
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the SquareHead intermediate-layer loss (0 = off)."}
    )
    chunk_size: int = field(
        default=1024,
        metadata={"help": "Target tokens per chunk of the KD/CE loss; bounds the fp32 logits memory (0 = no chunking)."},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {', '.join(KD_LOSSES)}, got {self.kd_loss!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.chunk_size is None or int(self.chunk_size) != self.chunk_size or self.chunk_size < 0:
            raise ValueError(f"chunk_size must be an integer >= 0 (0 = no chunking), got {self.chunk_size!r}")
        super().__post_init__()


class _HeadInputCapture:
    """Forward pre-hook on a model's output head: keeps the head's input, hands the head an empty slice.

    The model then returns ``[batch, 0, vocab]`` logits (no full logits are ever computed) and we
    apply the head ourselves, a chunk of tokens at a time. Calling the head *module* (not its
    weight) keeps PEFT adapters on the head and ZeRO-3 parameter gathering working.
    """

    def __init__(self, head: nn.Module):
        self.head = head
        self.hidden: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        self.hidden = hidden
        return (hidden[..., :0, :], *args[1:])

    def __enter__(self) -> "_HeadInputCapture":
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _vocab_size(model: nn.Module) -> int | None:
    """Logit dimension of a causal LM: its output head's rows, else ``config.vocab_size``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0:  # ZeRO-3 shards are empty
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


class DistillationTrainer(Trainer):
    """A ``Trainer`` that trains ``model`` (the student) to match ``teacher_model``.

    The teacher is put in eval mode, frozen (``requires_grad=False``), placed by accelerate
    (``prepare_model(evaluation_mode=True)``, or a parameter-sharded DeepSpeed inference engine
    under ZeRO-3) and run under ``no_grad``. It is an attribute of the trainer, not of the
    model, so it never enters the optimizer or the checkpoints. It may use another dtype (e.g.
    bf16): the losses are computed in fp32. ``args`` must be :class:`DistillationArguments`;
    batches must carry ``labels`` (``-100`` = not a target).

    The KD, CE and hidden-state losses are logged as ``kd_loss``, ``ce_loss`` and ``hidden_loss``
    (averaged over the logging interval, like ``loss``).
    """

    # We always return a loss normalised over the accumulated batch (see the module docstring).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: DistillationArguments | None = None,
        *trainer_args: Any,
        teacher_model: nn.Module | None = None,
        **kwargs: Any,
    ):
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher_model")
        if model is None:
            raise ValueError("DistillationTrainer needs a student model (model=...)")
        if args is None:
            args = DistillationArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationArguments):
            raise TypeError(f"args must be DistillationArguments, got {type(args).__name__}")
        check_vocab_sizes(_vocab_size(model), _vocab_size(teacher_model))
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "DistillationTrainer does not support torch.nn.DataParallel (several GPUs in one process); "
                "launch one process per device with torchrun or accelerate launch"
            )
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        self.teacher_model = self._prepare_teacher(teacher_model)
        self._heads: dict[int, nn.Module | None] = {}
        self._log_sums: dict[str, torch.Tensor] = {}
        self._last_logged_step = 0

    # ---- teacher placement ---------------------------------------------------------------
    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the frozen teacher like the student: accelerate device/precision, or a ZeRO-3 engine."""
        if self.is_deepspeed_enabled:
            return self._prepare_deepspeed_teacher(teacher)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _prepare_deepspeed_teacher(self, teacher: nn.Module) -> nn.Module:
        """An inference-only DeepSpeed engine: ZeRO-3 shards the teacher's parameters, other stages
        just replicate it (stage 0), and no optimizer state is created."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = config.setdefault("zero_optimization", {})
        if zero.get("stage") != 3:
            zero["stage"] = 0
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine

    # ---- forward passes ------------------------------------------------------------------
    def _output_head(self, unwrapped: nn.Module, sample_inputs: dict[str, Any]) -> nn.Module | None:
        """The module whose input we capture, or ``None`` to use the model's logits.

        Checked once per model on one example: if the logits are post-processed after the head
        (soft-capping, scaling), ``head(hidden)`` would be wrong, so we fall back to the logits
        (correct, more memory).
        """
        key = id(unwrapped)
        if key in self._heads:
            return self._heads[key]
        get_head = getattr(unwrapped, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is not None and not self._head_reproduces_logits(unwrapped, head, sample_inputs):
            logger.warning(
                "%s post-processes its logits after the output head; computing the distillation loss from the "
                "full logits instead (correct, but uses more memory)",
                type(unwrapped).__name__,
            )
            head = None
        self._heads[key] = head
        return head

    def _head_reproduces_logits(self, unwrapped: nn.Module, head: nn.Module, inputs: dict[str, Any]) -> bool:
        batch = inputs["input_ids"].shape[0] if "input_ids" in inputs else None
        one = {
            k: (v[:1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v) for k, v in inputs.items()
        }
        one.pop("output_hidden_states", None)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                logits = unwrapped(**one).logits
                with _HeadInputCapture(head) as capture:
                    unwrapped(**one)
                if capture.hidden is None:
                    return False
                rebuilt = head(capture.hidden)
        finally:
            unwrapped.train(was_training)
        if rebuilt.shape != logits.shape:
            return False
        return bool(torch.allclose(rebuilt.float(), logits.float(), rtol=1e-3, atol=1e-3))

    @staticmethod
    def _forward(model: nn.Module, head: nn.Module | None, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Run ``model``; return (the head's input, or the logits when ``head`` is None) and the outputs."""
        if head is None:
            outputs = model(**inputs)
            return outputs.logits, outputs
        with _HeadInputCapture(head) as capture:
            outputs = model(**inputs)
        if capture.hidden is None:
            raise RuntimeError(f"the output head of {type(model).__name__} was not called during the forward pass")
        return capture.hidden, outputs

    @staticmethod
    def _model_inputs(unwrapped: nn.Module, inputs: dict[str, Any], hidden_states: bool) -> dict[str, Any]:
        """The batch without ``labels`` (we compute the loss), without a KV cache, with hidden states if needed."""
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        params = inspect.signature(unwrapped.forward).parameters
        accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "use_cache" in params or accepts_any:
            model_inputs.setdefault("use_cache", False)
        if hidden_states:
            model_inputs["output_hidden_states"] = True
        return model_inputs

    # ---- loss ----------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and their number of target tokens (all processes)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = [
            count_target_tokens(batch["labels"], batch.get("attention_mask"))
            for batch in batch_samples
            if isinstance(batch, dict) and batch.get("labels") is not None
        ]
        if not counts:
            return batch_samples, None
        num_items = torch.stack(counts).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``alpha * KD + (1 - alpha) * CE + hidden_weight * SquareHead``, normalised as described above."""
        args: DistillationArguments = self.args
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "DistillationTrainer needs `labels` in every batch (-100 for positions that are not targets), "
                "e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)"
            )
        attention_mask = inputs.get("attention_mask")
        training = model.training
        want_hidden = args.hidden_weight > 0

        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        s_inputs = self._model_inputs(student, inputs, want_hidden)
        t_inputs = self._model_inputs(teacher, inputs, want_hidden)
        # In evaluation with return_outputs the caller may want the student's logits: compute them.
        s_head = None if (return_outputs and not training) else self._output_head(student, s_inputs)
        t_head = self._output_head(teacher, t_inputs)

        s_hidden, s_out = self._forward(model, s_head, s_inputs)
        with torch.no_grad():
            t_hidden, t_out = self._forward(self.teacher_model, t_head, t_inputs)

        with self.accelerator.autocast():
            sums = distillation_loss_sums(
                s_hidden,
                t_hidden,
                labels,
                student_head=s_head,
                teacher_head=t_head,
                attention_mask=attention_mask,
                kd_loss=args.kd_loss,
                temperature=args.temperature,
                jsd_beta=args.jsd_beta,
                chunk_size=args.chunk_size or None,
            )
            hidden_sum = None
            if want_hidden:
                # hidden_states[0] is the embedding output; compare the decoder layers' outputs.
                hidden_sum = squarehead_loss_sum(
                    s_out.hidden_states[1:], t_out.hidden_states[1:], labels, attention_mask
                )

        if training and num_items_in_batch is not None:
            # Sum over local tokens / tokens of the whole accumulated (multi-process) batch.
            denominator = num_items_in_batch.float() if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)
            # DDP/DeepSpeed average gradients over processes; the global mean needs their sum.
            if args.average_tokens_across_devices and args.world_size > 1:
                denominator = denominator / self.accelerator.num_processes
        else:
            # Evaluation, or a caller without a token count: mean over this batch's tokens, and
            # (training only) divided by the accumulation steps, since training_step will not.
            denominator = float(max(sums.num_tokens, 1))
            if training:
                denominator *= getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)

        kd = sums.kd / denominator
        ce = sums.ce / denominator
        loss = args.alpha * kd + (1.0 - args.alpha) * ce
        parts = {"kd_loss": kd, "ce_loss": ce}
        if hidden_sum is not None:
            hidden = hidden_sum / denominator
            loss = loss + args.hidden_weight * hidden
            parts["hidden_loss"] = hidden
        if training and s_head is not None:
            # The loss depends on the captured hidden states, not on the (empty) logits DDP returned.
            # DDP finalises gradient reduction from a hook on its forward outputs (_DDPSink, used
            # with find_unused_parameters / static_graph): without this link that hook never fires
            # and the processes deadlock. The term is an exact zero.
            loss = loss + s_out.logits.sum() * 0.0
        if training:
            for name, value in parts.items():
                value = value.detach()
                self._log_sums[name] = self._log_sums[name] + value if name in self._log_sums else value

        return (loss, s_out) if return_outputs else loss

    # ---- logging -------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the KD/CE/hidden losses to each training log, averaged like ``loss``."""
        if "loss" in logs and self._log_sums:
            names = sorted(self._log_sums)
            values = torch.stack([self._log_sums[name] for name in names])
            if self.args.world_size > 1:  # the same values `loss` is averaged over: all processes
                values = self.accelerator.gather(values.unsqueeze(0)).mean(0)
            steps = max(self.state.global_step - self._last_logged_step, 1)
            for name, value in zip(names, values.tolist()):
                logs[name] = value / steps
            self._log_sums = {}
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)
