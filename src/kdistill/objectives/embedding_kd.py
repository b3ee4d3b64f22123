"""Matching the teacher's sentence embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.fields import option
from kdistill.losses import embedding_cosine, embedding_mse, similarity_kd
from kdistill.objectives.base import Objective, ObjectiveConfig, as_float
from kdistill.teachers.embeddings import EMBEDDED_FIELDS

__all__ = ["EmbeddingKD", "EmbeddingKDConfig"]


@dataclass
class EmbeddingKDConfig(ObjectiveConfig):
    """embedding_kd: student embeddings toward the teacher's."""

    loss: str = option("mse", "mse | cosine (through a learned projection when widths differ) | similarity (KL "
                       "between in-batch similarity distributions).", ("mse", "cosine", "similarity"))
    temperature: float = option(0.05, "similarity: cosine-similarity temperature.", gt=0)


class EmbeddingKD(Objective):
    """Match the teacher's sentence embeddings: `loss` = mse | cosine | similarity (in-batch similarity
    distributions, which needs no projection), on every text field of the batch.

    When student and teacher widths differ, mse/cosine go through a learned linear projection (student -> teacher
    width), trained with the student and left out of the exported student.
    """

    type = "embedding_kd"
    Config = EmbeddingKDConfig
    task = "embedding"
    teacher_needs = frozenset({"embeddings"})

    def setup(self, student, teacher):
        s_dim, t_dim = int(student.config.hidden_size), int(teacher.config.hidden_size)
        self.projection = None
        if s_dim != t_dim and self.cfg.loss in ("mse", "cosine"):
            self.projection = torch.nn.Linear(s_dim, t_dim, bias=False)

    def forward(self, batch):
        total = None
        for field_name in (f for f in EMBEDDED_FIELDS if batch.has_field(f)):
            student = batch.embeddings(field_name)
            teacher = batch.teacher_embeddings(field_name).to(student.dtype)
            if self.cfg.loss == "similarity":
                loss = similarity_kd(student, teacher, temperature=self.cfg.temperature, reduction="sum")
            else:
                if self.projection is not None:
                    student = self.projection(student)
                fn = embedding_mse if self.cfg.loss == "mse" else embedding_cosine
                loss = fn(student, teacher, reduction="sum")
            total = loss if total is None else total + loss
        # sum over rows of every field / global example count: one mean per field, added
        total = total / as_float(batch.num_examples, total)
        return total, {}
