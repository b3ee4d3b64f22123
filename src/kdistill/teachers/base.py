"""What the teacher tells the student: the signals, and the one interface every source implements.

A *teacher source* answers questions about one token view of a batch (a :class:`TeacherQuery`) or about a text
field; objectives ask for what they need and dispatch on the type of what they get back:

* :meth:`TeacherSource.tokens`: the teacher's next-token distribution at every position of the view, as one of
  :class:`DenseLogits` (B, T, V) logits, :class:`HiddenAndHead` (B, T, H) final hidden states plus the output
  layer (the chunked path projects them a slice of positions at a time) or :class:`TopKRows` (its k most likely
  ids with log-probabilities, one row per trained position);
* :meth:`TeacherSource.outputs`: the teacher's model output with hidden states / attention maps (alignment
  objectives);
* :meth:`TeacherSource.embeddings`: the teacher's sentence embeddings of a text field.

`provides` lists which of "tokens", "hidden_states", "attentions", "embeddings" a source can answer; the trainer
checks before training that every objective's `teacher_needs` is covered, so a mismatch (a top-k cache asked for
hidden states) is an error naming both, not a crash mid-run. Sources today: a live model (`live.py`), the top-k
cache (`topk_cache.py`), a served teacher (`served.py`), precomputed embeddings (`embeddings.py`). A new source is one file with a subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from kdistill.batch import Batch, TokenView
from kdistill.losses import TopKTeacher
from kdistill.models.heads import OutputHead, shifted_targets

__all__ = ["DenseLogits", "HiddenAndHead", "TeacherQuery", "TeacherSource", "TeacherSignalError", "TopKRows"]


class TeacherSignalError(RuntimeError):
    """A source was asked for a signal it does not have, or its signal does not fit the batch."""


@dataclass
class DenseLogits:
    """(B, T, V) teacher logits; position i is the distribution over `TeacherQuery.targets[:, i]`."""

    logits: torch.Tensor


@dataclass
class HiddenAndHead:
    """(B, T, H) teacher final hidden states and its output layer: logits = hidden @ head.weight.T (+ bias)."""

    hidden: torch.Tensor
    head: OutputHead


@dataclass
class TopKRows:
    """The teacher's top-k at each trained position: (N, k) rows in the row-major order of `TeacherQuery.mask`;
    `target_logprobs` (N,): the teacher's log-prob of each position's actual target, when the source knows it
    (a served teacher does; on-policy `sampled_token` needs it)."""

    teacher: TopKTeacher
    target_logprobs: torch.Tensor | None = None


@dataclass
class TeacherQuery:
    """One token view of a batch, as a teacher source sees it.

    `memo` lets a source compute once per view what several objectives ask for (a live model's forward pass)."""

    view: str
    tokens: TokenView
    batch: Batch
    encoder_decoder: bool
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> torch.Tensor:
        """(B, T) the token each position predicts (causal LMs: the labels shifted by one)."""
        return shifted_targets(self.tokens.labels, self.encoder_decoder)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: trained positions."""
        return self.targets.ne(-100)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


class TeacherSource:
    """Base class of the places a teacher signal comes from (see the module docstring)."""

    name: ClassVar[str] = "teacher"
    provides: ClassVar[frozenset[str]] = frozenset()
    model: torch.nn.Module | None = None  # a live model, when the source runs one (the trainer places it)

    def place(self, device: torch.device) -> None:
        """Called once by the trainer with the student's device (a live model moves there)."""

    def setup(self, *, encoder_decoder: bool, chunked: bool, outputs: frozenset[str] = frozenset()) -> None:
        """Called once by the trainer: the model kind, whether token losses are chunked and which extra outputs
        ("hidden_states", "attentions") objectives read."""

    def tokens(self, query: TeacherQuery) -> DenseLogits | HiddenAndHead | TopKRows:
        raise TeacherSignalError(f"the {self.name} gives no next-token distributions")

    def outputs(self, query: TeacherQuery):
        raise TeacherSignalError(f"the {self.name} gives no hidden states or attention maps (they need a live "
                                 "teacher model)")

    def embeddings(self, batch: Batch, field_name: str) -> torch.Tensor:
        raise TeacherSignalError(f"the {self.name} gives no sentence embeddings")

    def check_covers(self, needs: dict[str, frozenset[str]]) -> None:
        """Refuse objectives (name -> what they ask the teacher) that this source cannot serve."""
        for objective, wanted in needs.items():
            missing = sorted(wanted - self.provides)
            if missing:
                raise ValueError(f"objective {objective} needs the teacher's {', '.join(missing)}, which the "
                                 f"{self.name} cannot give (it gives: {', '.join(sorted(self.provides)) or 'nothing'})")
