"""What a recipe hands the pipeline, and what recipes share.

A recipe owns one kind of run: its datasets, collator, models, teacher source and objectives (`Recipe.build`), how
the student is saved (`Recipe.save`) and the evaluation that follows training (`Recipe.evaluate`). The pipeline
builds one `DistillTrainer` from any recipe's :class:`Parts`, with no per-task branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.objectives import Objective
from kdistill.teachers.base import TeacherSource

__all__ = ["DataReport", "ListDataset", "Parts", "Recipe", "data_key"]


class ListDataset(torch.utils.data.Dataset):
    """Encoded examples held in memory (a list of dicts of token id lists); `sources[i]` says where row i came
    from ("file:line"), when known."""

    def __init__(self, rows: list[dict], sources: list[str] | None = None):
        self.rows = rows
        self.sources = sources

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class DataReport:
    """What happened to the rows of one data file."""

    source: str
    examples: int
    skipped_invalid: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_no_target: int = 0


@dataclass
class Parts:
    """Everything a trainer is built from. `teacher_model`: the teacher model, when one is loaded (reported to the
    caller); `teacher`: the source objectives read; `rows`: the encoded training rows (the data fingerprint)."""

    tokenizer: Any
    student: Any
    objectives: dict[str, tuple[Objective, float]]
    train_dataset: Any
    collator: Any
    reports: list[DataReport]
    rows: list[dict]
    eval_dataset: Any = None
    teacher: TeacherSource | None = None
    teacher_model: Any = None
    kd_vocab: int | None = None
    chunking: dict | None = None
    on_policy: Any = None  # kdistill.onpolicy.OnPolicy when the run samples answers


def data_key(cfg: RunConfig, source: str) -> str:
    """The config key that named `source` (for errors)."""
    return "data.eval" if source == cfg.data.eval and source != cfg.data.train else "data.train"


class Recipe:
    """One kind of run. Subclasses implement `build`; `save` and `evaluate` have defaults."""

    name = "recipe"

    def build(self, cfg: RunConfig) -> Parts:
        raise NotImplementedError

    def save(self, cfg: RunConfig, parts: Parts, model, output_dir: str) -> None:
        raise NotImplementedError

    def evaluate(self, cfg: RunConfig, parts: Parts, model) -> dict | None:
        """Evaluation after training (process 0 only); None when the recipe has none."""
        return None
