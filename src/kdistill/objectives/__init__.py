"""Objectives: each turns one micro-batch into (loss, metrics); the total loss is sum(weight_i * objective_i).

One file per objective, each with its config dataclass (help, defaults, range checks in `__post_init__`).
:data:`OBJECTIVES` is the one table from a config's `type:` to the class (and so to its config); the YAML
loader, `kdistill train --help` and the trainer all read it. Adding an objective = one file here, one line in the
table, and an example config.
"""

from __future__ import annotations

from kdistill.objectives.attention import AttentionAlignment
from kdistill.objectives.base import Objective, ObjectiveConfig
from kdistill.objectives.ce import CrossEntropy
from kdistill.objectives.contrastive import Contrastive
from kdistill.objectives.cross_tokenizer import CrossTokenizerKD
from kdistill.objectives.embedding_kd import EmbeddingKD
from kdistill.objectives.hidden import HiddenAlignment
from kdistill.objectives.kd import LogitKD
from kdistill.objectives.triplet import Triplet
from kdistill.objectives.view import LMView, StepBatch

__all__ = ["OBJECTIVES", "LMView", "Objective", "ObjectiveConfig", "StepBatch", "build_objectives",
           "objective_class"]

OBJECTIVES: dict[str, type[Objective]] = {
    cls.type: cls for cls in (CrossEntropy, LogitKD, HiddenAlignment, AttentionAlignment, Contrastive, EmbeddingKD,
                              Triplet, CrossTokenizerKD)}


def objective_class(kind: str, where: str = "objectives") -> type[Objective]:
    """The objective class of a `type:`; ValueError naming the valid ones."""
    if kind not in OBJECTIVES:
        raise ValueError(f"{where}: unknown type {kind!r} (valid: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[kind]


def build_objectives(configs: dict) -> dict[str, tuple[Objective, float]]:
    """name -> (objective, weight) from the `objectives` section of a RunConfig."""
    out = {}
    for name, cfg in configs.items():
        cls = objective_class(cfg.type or name, f"objectives.{name}")
        out[name] = (cls(name, cfg), float(cfg.weight))
    return out
