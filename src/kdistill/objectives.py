"""Objectives: each turns one micro-batch's student (and teacher) outputs into (loss, metrics).

The trainer computes the forward passes once, aligns positions once (the causal shift happens in
`kdistill.trainer.DistillTrainer._align`, nowhere else) and hands every objective the same `DistillBatch`.
An objective returns a loss already normalised by `batch.num_items`, the global number of trained tokens in
the optimizer step (all gradient-accumulation micro-batches, all processes), so that accumulation and data
parallelism leave the objective unchanged. Its metrics are normalised the same way (a count over this
micro-batch's tokens / num_items), so they too add up to token-weighted means over the whole step.
Adding a method = one class here + an example config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdistill.losses import DIVERGENCE_PARAMS, get_divergence


@dataclass
class DistillBatch:
    """One micro-batch as objectives see it. Position i of every (B, T, ...) tensor predicts `targets[:, i]`."""

    inputs: dict[str, Any]                 # the collated batch (input_ids, attention_mask, labels, ...)
    student_logits: torch.Tensor           # (B, T, V_student)
    targets: torch.Tensor                  # (B, T), -100 = not trained
    num_items: torch.Tensor | int          # global count of trained tokens in this optimizer step
    teacher_logits: torch.Tensor | None = None  # (B, T, V_teacher)
    kd_vocab: int | None = None            # leading vocabulary entries shared by teacher and student
    student_outputs: Any = None
    teacher_outputs: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: positions that are trained."""
        return self.targets.ne(-100)


class Objective:
    """Base class. Subclasses set `type`, `needs_teacher`, and implement `__call__`."""

    type: ClassVar[str]
    needs_teacher: ClassVar[bool] = False

    def __init__(self, name: str, cfg) -> None:
        self.name = name
        self.cfg = cfg

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class CrossEntropy(Objective):
    """Token cross-entropy on the labels (the SFT loss): sum over trained tokens of -log P_s(y) / num_items."""

    type = "ce"

    def __call__(self, batch):
        mask = batch.mask
        logits = batch.student_logits[mask].float()            # (N, V)
        loss = F.cross_entropy(logits, batch.targets[mask], reduction="sum")
        loss = loss / _as_float(batch.num_items, loss)
        return loss, {}


class LogitKD(Objective):
    """Token-level logit distillation with one of `kdistill.losses.DIVERGENCES` (default forward KL).

    Both logit tensors are cut to the shared vocabulary (`batch.kd_vocab`): a padded embedding matrix (Qwen2.5-7B
    has 152,064 rows, Qwen2.5-0.5B 151,936, the tokenizer 151,665) never enters the loss.
    """

    type = "kd"
    needs_teacher = True

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.divergence = get_divergence(cfg.divergence)
        self.params = {p: getattr(cfg, p) for p in DIVERGENCE_PARAMS[cfg.divergence]}

    def __call__(self, batch):
        if batch.teacher_logits is None:
            raise RuntimeError(f"objective {self.name!r} needs teacher logits, but the batch has none")
        vocab = batch.kd_vocab or min(batch.student_logits.shape[-1], batch.teacher_logits.shape[-1])
        mask = batch.mask
        student = batch.student_logits[..., :vocab]
        teacher = batch.teacher_logits[..., :vocab]
        loss = self.divergence(student, teacher, mask=mask, temperature=self.cfg.temperature,
                               num_items=batch.num_items, **self.params)
        with torch.no_grad():
            agree = (student[mask].argmax(-1) == teacher[mask].argmax(-1)).sum().float()
            metrics = {"top1_agreement": agree / _as_float(batch.num_items, agree)}
        return loss, metrics


def _as_float(num_items, like: torch.Tensor):
    if torch.is_tensor(num_items):
        return num_items.to(like.dtype).clamp(min=1)
    return max(float(num_items), 1.0)


OBJECTIVES: dict[str, type[Objective]] = {cls.type: cls for cls in (CrossEntropy, LogitKD)}


def build_objectives(configs: dict) -> dict[str, tuple[Objective, float]]:
    """name -> (objective, weight) from the `objectives` section of a RunConfig."""
    out = {}
    for name, cfg in configs.items():
        kind = cfg.type or name
        if kind not in OBJECTIVES:
            raise ValueError(f"objectives.{name}: unknown type {kind!r} (valid: {', '.join(OBJECTIVES)})")
        out[name] = (OBJECTIVES[kind](name, cfg), float(cfg.weight))
    return out
