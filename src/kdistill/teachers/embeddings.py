"""Precomputed teacher embeddings: the teacher embedder runs once over every distinct text before training, and
each row carries its vectors (`teacher_<field>`), so an epoch costs no teacher forward pass and teacher and student
need not share a tokenizer."""

from __future__ import annotations

import torch

from kdistill.batch import Batch
from kdistill.teachers.base import TeacherSignalError, TeacherSource

__all__ = ["EMBEDDED_FIELDS", "PrecomputedEmbeddings", "attach_teacher_embeddings"]

EMBEDDED_FIELDS = ("anchor", "positive", "negative", "sentence1", "sentence2", "text")


class PrecomputedEmbeddings(TeacherSource):
    """Teacher sentence embeddings carried by the batch (see `attach_teacher_embeddings`)."""

    name = "precomputed teacher embeddings"
    provides = frozenset({"embeddings"})

    def embeddings(self, batch: Batch, field_name: str) -> torch.Tensor:
        vectors = batch.teacher_embeddings(field_name)
        if vectors is None:
            raise TeacherSignalError(f"no precomputed teacher embeddings for field {field_name!r} in this batch "
                                     f"(expected key teacher_{field_name})")
        return vectors


def attach_teacher_embeddings(examples, rows: list[dict], teacher, batch_size: int) -> None:
    """Run the frozen teacher embedder once over every distinct text and store `teacher_<field>` vectors in each
    encoded row (examples and rows in the same order)."""
    texts = sorted({t for ex in examples for f in EMBEDDED_FIELDS
                    for t in ([ex.fields[f]] if isinstance(ex.fields.get(f), str) else ex.fields.get(f) or [])})
    vectors = teacher.encode(texts, batch_size=batch_size, show_progress=True)
    index = {t: i for i, t in enumerate(texts)}
    for ex, row in zip(examples, rows):
        for f in EMBEDDED_FIELDS:
            value = ex.fields.get(f)
            if isinstance(value, str):
                row[f"teacher_{f}"] = vectors[index[value]].tolist()
            elif isinstance(value, list):
                row[f"teacher_{f}"] = [vectors[index[t]].tolist() for t in value]
