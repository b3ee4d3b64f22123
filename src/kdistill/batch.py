"""The batch schema: what a collated micro-batch holds, typed, read in one place.

Collators emit a flat mapping of tensors (the form `transformers.Trainer` moves to the device and that a user's own
collator can produce). :meth:`Batch.parse` is the one place that mapping is read; everything after it (the trainer,
teacher sources, objectives) works on the typed :class:`Batch`:

* token views, `Batch.views[name]` (:class:`TokenView`): the main view `""` from `input_ids` / `attention_mask` /
  `labels` (and `decoder_*`), other views (e.g. `"rationale"` of distilling step-by-step) from the same keys
  prefixed `<name>_`. A view is defined by its labels key;
* text fields, `Batch.texts[field]` (:class:`TextField`): `<field>_input_ids` / `<field>_attention_mask` without
  labels (embedding rows: anchor, positive, negative, sentence1, sentence2, text; triplet fields of an LM run);
* teacher signals a source put in the batch beforehand, `Batch.teacher`: the top-k cache's `teacher_topk_indices` /
  `teacher_topk_logprobs` (N, k) rows, precomputed teacher embeddings `teacher_<field>`;
* `Batch.sampled_by`: None for text from the dataset; "student" or "teacher" when on-policy distillation
  (`kdistill.onpolicy`) replaced the main view by answers sampled during the step (collated key `sampled_by`).

Counts (:class:`Counts`): the trained tokens per view (after the causal shift), examples and, for alignment
objectives, hidden-state positions per view and stack; the trainer sums them over an optimizer step's micro-batches
and processes once, and objectives divide by those global counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.models.heads import shifted_targets

__all__ = ["SAMPLED_BY", "Batch", "Counts", "TextField", "TokenView", "TOPK_KEYS", "hidden_position_mask", "teacher_key",
           "view_key"]

VIEW_KEYS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TOPK_KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")
TEACHER_PREFIX = "teacher_"
LABELS = "labels"
SAMPLED_BY = "sampled_by"


def view_key(view: str, key: str) -> str:
    """The collated key of one tensor of a token view: ('', 'labels') -> labels, ('rationale', 'labels') ->
    rationale_labels."""
    return f"{view}_{key}" if view else key


def teacher_key(field_name: str) -> str:
    """The collated key of a text field's precomputed teacher embeddings."""
    return f"{TEACHER_PREFIX}{field_name}"


@dataclass
class TokenView:
    """One tokenised LM view: (B, T) input_ids and attention_mask, (B, T') labels (-100: not trained), and for an
    encoder-decoder its decoder inputs when the collator made them."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The view's tensors by name (absent ones left out)."""
        return {k: getattr(self, k) for k in VIEW_KEYS if getattr(self, k) is not None}

    def trained_tokens(self, encoder_decoder: bool) -> torch.Tensor:
        """Positions that are trained: labels != -100 after the causal shift (the first label is never a target)."""
        return shifted_targets(self.labels, encoder_decoder).ne(-100).sum()


@dataclass
class TextField:
    """One tokenised text per row (negatives: K rows per example, row b*K + k)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None


@dataclass
class Counts:
    """Normalisers: trained tokens per view, examples, and hidden-state positions per view and stack. Local to a
    micro-batch, or (from the trainer) global over an optimizer step: values are then 0-dim tensors."""

    tokens: dict[str, Any]
    examples: Any
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)


def hidden_position_mask(view: TokenView, stack: str, encoder_decoder: bool) -> torch.Tensor:
    """(B, T) bool: positions whose hidden states are compared. Causal LMs and T5 encoders: real tokens (the
    attention mask; prompt tokens included, padding excluded). T5 decoders: positions with a label != -100."""
    if encoder_decoder and stack == "decoder":
        return view.labels.ne(-100)
    if view.attention_mask is None:
        return torch.ones_like(view.input_ids, dtype=torch.bool)
    return view.attention_mask.bool()


@dataclass
class Batch:
    """A micro-batch, typed. See the module docstring for where each part comes from."""

    views: dict[str, TokenView] = field(default_factory=dict)
    texts: dict[str, TextField] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    sampled_by: str | None = None  # "student" / "teacher": the main view holds answers sampled in this step
    extra: dict[str, Any] = field(default_factory=dict)  # other collated values (num_negatives, score, ...)

    @classmethod
    def parse(cls, inputs: Mapping[str, Any]) -> "Batch":
        """Read a collated mapping (see the module docstring); a Batch passes through unchanged."""
        if isinstance(inputs, Batch):
            return inputs
        keys = set(inputs)
        batch = cls()
        names = sorted(k[: -len(LABELS)].rstrip("_") for k in keys if k == LABELS or k.endswith("_" + LABELS))
        for name in names:
            present = {k: inputs[view_key(name, k)] for k in VIEW_KEYS if view_key(name, k) in keys}
            if "input_ids" not in present:
                raise ValueError(f"token view {name or 'main'!r}: {view_key(name, LABELS)} without "
                                 f"{view_key(name, 'input_ids')}")
            batch.views[name] = TokenView(**present)
            keys -= {view_key(name, k) for k in present}
        if SAMPLED_BY in keys:
            batch.sampled_by = inputs[SAMPLED_BY]
            keys.discard(SAMPLED_BY)
        for key in sorted(k for k in keys if k.startswith(TEACHER_PREFIX)):
            batch.teacher[key] = inputs[key]
            keys.discard(key)
        fields = sorted(k[: -len("_input_ids")] for k in keys if k.endswith("_input_ids"))
        for name in fields:
            present = {k: inputs[f"{name}_{k}"] for k in TEXT_KEYS if f"{name}_{k}" in keys}
            if "attention_mask" not in present:
                raise ValueError(f"text field {name!r}: {name}_input_ids without {name}_attention_mask")
            batch.texts[name] = TextField(**present)
            keys -= {f"{name}_{k}" for k in present}
        batch.extra = {k: inputs[k] for k in sorted(keys)}
        return batch

    @property
    def size(self) -> int:
        """Examples in the batch."""
        if "" in self.views:
            return int(self.views[""].input_ids.shape[0])
        for name in ("anchor", "text", "sentence1"):
            if name in self.texts:
                return int(self.texts[name].input_ids.shape[0])
        for view in (*self.views.values(), *self.texts.values()):
            return int(view.input_ids.shape[0])
        raise ValueError("the batch holds no token view or text field: cannot tell its size")

    def teacher_embeddings(self, field_name: str) -> torch.Tensor | None:
        return self.teacher.get(teacher_key(field_name))

    def counts(self, encoder_decoder: bool, stacks: tuple[str, ...] = ()) -> Counts:
        """This micro-batch's own counts; `stacks` non-empty: also the hidden-state positions of each view."""
        tokens = {name: int(view.trained_tokens(encoder_decoder)) for name, view in self.views.items()}
        positions = {name: {stack: int(hidden_position_mask(view, stack, encoder_decoder).sum()) for stack in stacks}
                     for name, view in self.views.items()} if stacks else {}
        return Counts(tokens=tokens, examples=self.size, positions=positions)
