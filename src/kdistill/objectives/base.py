"""What every objective shares: its config's common fields, the Objective base class, count helpers.

An objective turns one micro-batch (`kdistill.objectives.view.StepBatch`) into `(loss, metrics)`. It returns a loss
already divided by a *global* count over the whole optimizer step (all gradient-accumulation micro-batches, all
processes): token-level objectives by their view's trained tokens, example-level objectives by the step's examples,
so accumulation and data parallelism leave the objective unchanged. Metrics are normalised the same way, so they
add up to weighted means over the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kdistill.fields import Checked, FieldError, option

__all__ = ["AlignmentConfig", "Objective", "ObjectiveConfig", "TokenObjectiveConfig", "as_float"]


@dataclass
class ObjectiveConfig(Checked):
    """Fields every objective has. `type` defaults to the objective's key in the `objectives` mapping."""

    type: str | None = option(None, "Objective type (default: the key), one of the objectives table's.")
    weight: float = option(1.0, "Weight of this term in the total loss.", ge=0)


@dataclass
class TokenObjectiveConfig(ObjectiveConfig):
    """An objective on one token view of an LM batch."""

    view: str = option("", "Which token view of the batch: '' (the main one) or 'rationale' (distilling "
                       "step-by-step: the rationale view built from data.stepbystep).")


def _layer_map_problem(spec, optional: bool) -> str | None:
    """What is wrong with a layer map's form (ranges are checked when the models are known), or None."""
    if spec is None and optional:
        return None
    if spec == "uniform":
        return None
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)) or not spec:
        return f"expected 'uniform' or a non-empty list of [student, teacher] pairs, got {spec!r}"
    for pair in spec:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            return f"{pair!r} is not a [student, teacher] pair of integers"
    return None


@dataclass
class AlignmentConfig(TokenObjectiveConfig):
    """Objectives that align mapped student and teacher layers (hidden, attention)."""

    layer_map: Any = option("uniform", "Student -> teacher layer pairs, 'uniform' (student layer i <-> teacher layer "
                            "round((i+1) * L_t / L_s) - 1, last meets last) or a list of [student, teacher] pairs of "
                            "0-based layer indices (negative counts from the end). T5: used for encoder and decoder.")
    encoder_layer_map: Any = option(None, "T5: layer map of the encoder stack (default: layer_map).")
    decoder_layer_map: Any = option(None, "Layer map of the decoder stack (T5 decoder, or a causal LM's layers; "
                                    "default: layer_map).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("layer_map", "encoder_layer_map", "decoder_layer_map"):
            problem = _layer_map_problem(getattr(self, name), optional=name != "layer_map")
            if problem:
                raise FieldError(name, problem)


def as_float(count, like: torch.Tensor):
    """A normaliser: a count (int or 0-dim tensor) as a float of `like`'s dtype, at least 1."""
    if torch.is_tensor(count):
        return count.to(like.dtype).clamp(min=1)
    return max(float(count), 1.0)


class Objective(torch.nn.Module):
    """Base class. Subclasses set `type`, `Config` and what they read, and implement
    `forward(batch) -> (loss, metrics)`.

    What an objective reads, declared so the trainer can prepare it and refuse what cannot work before training:
    `task` ("lm": token views; "embedding": text fields of an embedding run), `teacher_needs` (what it asks the
    teacher source: "tokens", "hidden_states", "attentions", "embeddings"), `model_outputs` (extra outputs the
    models must return: "hidden_states", "attentions") and `reads_logits` (next-token logits: the chunked path
    changes how it computes), `uses_text_fields` and `requires_eager_attention` (what the LM recipe must prepare),
    and `scores_samples` (it can train on text sampled during the step: on-policy distillation).

    An objective is a Module so that objectives with trainable parts (a projection between student and teacher
    widths) are trained, synchronised across processes and checkpointed with the student. `setup(student,
    teacher)` runs once before training, when both models are known (teacher: a model, or None).
    """

    type: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    task: ClassVar[str] = "lm"
    teacher_needs: ClassVar[frozenset[str]] = frozenset()
    model_outputs: ClassVar[frozenset[str]] = frozenset()
    reads_logits: ClassVar[bool] = False
    uses_text_fields: ClassVar[bool] = False         # an LM run must also encode the rows' triplet text fields
    requires_eager_attention: ClassVar[bool] = False  # both models must be loaded with eager attention
    scores_samples: ClassVar[bool] = False  # it can train on samples generated during the step (on_policy)
    cross_tokenizer: ClassVar[bool] = False  # it reads the teacher's own tokens (another tokenizer than the student's)

    def __init__(self, name: str, cfg) -> None:
        super().__init__()
        self.name = name
        self.cfg = cfg

    @classmethod
    def needs_teacher(cls) -> bool:
        return bool(cls.teacher_needs)

    def setup(self, student, teacher) -> None:
        """Create trainable parts that depend on the models (default: none)."""

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError
