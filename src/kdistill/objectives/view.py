"""What an objective sees of a micro-batch: the typed batch, the step's global counts, and lazy forward passes.

`StepBatch.view(name)` gives an :class:`LMView` of one token view. The student's forward pass runs once, the first
time some objective asks for it (`student_forward`, supplied by the trainer); the teacher's signal comes from the
run's teacher source (`kdistill.teachers`), also once per view. Positions are those of the causal shift in
`kdistill.models.heads` (position i predicts `targets[:, i]`).

Chunked mode (`chunk_size` set): the student runs with its output layer bypassed; `student_hidden` (B, T, H) and
`student_head` replace the logits, and token objectives use the chunked losses, which never hold a (tokens x V)
tensor; `student_logits` still works but materialises the full logits.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kdistill.batch import Batch, Counts, TokenView
from kdistill.teachers.base import TeacherQuery, TeacherSignalError, TeacherSource

__all__ = ["LMView", "StepBatch"]


class LMView:
    """One token view: student outputs (lazy), the teacher's signal (lazy), targets, mask and counts.

    `student_forward(tokens)` returns {"outputs": ModelOutput, "aligned": (B, T, V) logits or, chunked, (B, T, H)
    hidden states, "head": OutputHead (chunked only)}. `num_items` is the view's global trained-token count,
    `num_positions` {stack: global count of the positions hidden-state objectives compare} (None: objectives
    fall back to the micro-batch's own count)."""

    def __init__(self, name: str, tokens: TokenView, batch: Batch, num_items, student_forward: Callable | None,
                 teacher: TeacherSource | None, encoder_decoder: bool, num_positions: dict | None = None,
                 chunk_size: int | str | None = None):
        self.name = name
        self.tokens = tokens
        self.num_items = num_items
        self.num_positions = num_positions
        self.chunk_size = chunk_size
        self.encoder_decoder = encoder_decoder
        self.query = TeacherQuery(name, tokens, batch, encoder_decoder)
        self._student_forward = student_forward
        self._teacher = teacher

    # ------------------------------------------------------------------------------------------------ student
    @cached_property
    def _student(self) -> dict[str, Any]:
        if self._student_forward is None:
            raise RuntimeError("this batch has no student forward pass")
        return self._student_forward(self.tokens)

    @property
    def chunked(self) -> bool:
        return self.chunk_size is not None

    @property
    def student_outputs(self):
        return self._student["outputs"]

    @property
    def student_hidden(self) -> torch.Tensor:
        """(B, T, H) final hidden states (chunked mode): what the output layer would project."""
        return self._student["aligned"]

    @property
    def student_head(self):
        """The student's output layer (chunked mode): `kdistill.models.heads.OutputHead(weight, bias)`."""
        return self._student["head"]

    @cached_property
    def student_logits(self) -> torch.Tensor:
        """(B, T, V) next-token logits (chunked mode: projected here, in full)."""
        if self.chunked:
            head = self.student_head
            return F.linear(self.student_hidden.to(head.weight.dtype), head.weight, head.bias)
        return self._student["aligned"]

    @property
    def targets(self) -> torch.Tensor:
        """(B, T) the token each position predicts; -100: not trained."""
        return self.query.targets

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: positions that are trained."""
        return self.query.mask

    # ------------------------------------------------------------------------------------------------ teacher
    def _source(self) -> TeacherSource:
        if self._teacher is None:
            raise TeacherSignalError("an objective asked for the teacher, but the run has no teacher source")
        return self._teacher

    def teacher_tokens(self):
        """The teacher's next-token signal: DenseLogits, HiddenAndHead or TopKRows (`kdistill.teachers.base`)."""
        return self._source().tokens(self.query)

    @property
    def teacher_outputs(self):
        """The teacher's model output (hidden states / attention maps; no grad)."""
        return self._source().outputs(self.query)


class StepBatch:
    """One micro-batch as objectives see it: `view(name)` for LM views, `embeddings(field)` /
    `teacher_embeddings(field)` for text fields; `num_items` (main view) and `num_examples` are global counts."""

    def __init__(self, batch: Batch, counts: Counts, *, student_forward: Callable | None = None,
                 embed: Callable | None = None, teacher: TeacherSource | None = None, encoder_decoder: bool = False,
                 kd_vocab: int | None = None, chunk_size: int | str | None = None, policy=None):
        self.batch = batch
        # on-policy settings (`kdistill.config.OnPolicyConfig`: mode, discount) when the run samples answers
        self.policy = policy
        self.counts = counts
        self.kd_vocab = kd_vocab  # leading vocabulary entries shared by teacher and student
        self.chunk_size = chunk_size
        self.encoder_decoder = encoder_decoder
        self._student_forward = student_forward
        self._embed = embed
        self._teacher = teacher
        self._views: dict[str, LMView] = {}
        self._embeddings: dict[str, torch.Tensor] = {}

    @property
    def sampled_by(self) -> str | None:
        """None: the main view is dataset text; "student" / "teacher": answers sampled in this step."""
        return self.batch.sampled_by

    @property
    def num_examples(self):
        return self.counts.examples

    def view(self, name: str = "") -> LMView:
        if name not in self._views:
            tokens = self.batch.views.get(name)
            if tokens is None:
                raise RuntimeError(f"this batch has no token view {name!r}")
            self._views[name] = LMView(name, tokens, self.batch, self.counts.tokens[name], self._student_forward,
                                       self._teacher, self.encoder_decoder, self.counts.positions.get(name),
                                       chunk_size=self.chunk_size)
        return self._views[name]

    @property
    def num_items(self):
        return self.view().num_items

    @property
    def student_outputs(self):
        return self.view().student_outputs

    def has_field(self, field_name: str) -> bool:
        return field_name in self.batch.texts

    def embeddings(self, field_name: str) -> torch.Tensor:
        """(N, H) student embeddings of a text field (negatives: (B*K, H), row b*K + k)."""
        if field_name not in self._embeddings:
            if self._embed is None or not self.has_field(field_name):
                raise RuntimeError(f"this batch has no text field {field_name!r} to embed")
            self._embeddings[field_name] = self._embed(self.batch.texts[field_name])
        return self._embeddings[field_name]

    def teacher_embeddings(self, field_name: str) -> torch.Tensor:
        if self._teacher is None:
            raise TeacherSignalError("an objective asked for teacher embeddings, but the run has no teacher source")
        return self._teacher.embeddings(self.batch, field_name)
