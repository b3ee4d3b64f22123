"""Batch collation for distillation features produced by :mod:`kdistill.data.formatting`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DataCollatorForDistillation"]


def _as_list(value, key: str, index: int) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"feature {index}: '{key}' must be a list of ints, found {type(value).__name__}")
    return list(value)


@dataclass
class DataCollatorForDistillation:
    """Pad a list of features into a batch of ``torch.long`` tensors.

    * ``input_ids`` is padded with ``pad_token_id`` on ``padding_side`` and an ``attention_mask`` is built
      (1 for real tokens, 0 for padding; a given ``attention_mask`` is padded with 0 instead).
    * ``labels`` and every other list-valued key whose name ends with ``"labels"`` are padded with
      ``label_pad_id`` to their own longest length (seq2seq labels are shorter or longer than the input;
      causal labels have the input's length and so stay aligned with it). They are padded on
      ``label_padding_side``, which defaults to ``padding_side`` (keeps causal labels aligned under left
      padding; use ``label_padding_side="right"`` for an encoder-decoder batch padded on the left).
    * Lengths are rounded up to ``pad_to_multiple_of`` when it is set.
    * Integer scalars per feature (e.g. an index) are stacked into a 1-D tensor; any other list-valued
      key raises ``ValueError`` (the collator cannot tell how to pad it).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    label_pad_id: int = -100
    label_padding_side: str | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token) first")
        for name in ("padding_side", "label_padding_side"):
            side = getattr(self, name)
            if side is not None and side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")

    def _target_length(self, rows: Sequence[list]) -> int:
        length = max((len(r) for r in rows), default=0)
        m = self.pad_to_multiple_of
        if m:
            length = -(-length // m) * m
        return length

    def _pad(self, rows: Sequence[list], value: int, side: str) -> torch.Tensor:
        length = self._target_length(rows)
        padded = []
        for r in rows:
            fill = [value] * (length - len(r))
            padded.append(fill + r if side == "left" else r + fill)
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        keys = set(features[0])
        for i, feature in enumerate(features):
            if set(feature) != keys:
                raise ValueError(f"feature {i} has keys {sorted(feature)} but feature 0 has {sorted(keys)}; "
                                 f"every feature in a batch needs the same keys")
        if "input_ids" not in keys:
            raise ValueError("features have no 'input_ids'")

        input_ids = [_as_list(f["input_ids"], "input_ids", i) for i, f in enumerate(features)]
        batch = {"input_ids": self._pad(input_ids, self.pad_token_id, self.padding_side)}
        if "attention_mask" in keys:
            masks = [_as_list(f["attention_mask"], "attention_mask", i) for i, f in enumerate(features)]
            for i, (mask, ids) in enumerate(zip(masks, input_ids)):
                if len(mask) != len(ids):
                    raise ValueError(f"feature {i}: attention_mask has length {len(mask)} but input_ids has "
                                     f"{len(ids)}")
        else:
            masks = [[1] * len(ids) for ids in input_ids]
        batch["attention_mask"] = self._pad(masks, 0, self.padding_side)

        label_side = self.label_padding_side or self.padding_side
        for key in sorted(keys - {"input_ids", "attention_mask"}):
            values = [f[key] for f in features]
            if key.endswith("labels"):
                rows = [_as_list(v, key, i) for i, v in enumerate(values)]
                batch[key] = self._pad(rows, self.label_pad_id, label_side)
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                raise ValueError(f"don't know how to collate feature key {key!r}: only 'input_ids', "
                                 f"'attention_mask', keys ending in 'labels' (padded with {self.label_pad_id}) "
                                 f"and integer scalars are supported; drop it or rename it")
        return batch


@dataclass
class ViewCollator:
    """Pads each token view of a batch separately (keys `input_ids`, `labels`, `rationale_input_ids`, ...)."""

    base: Any

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        prefixes = sorted({k[: -len("input_ids")] for k in features[0] if k.endswith("input_ids")})
        out: dict[str, Any] = {}
        for prefix in prefixes:
            sub = [{k[len(prefix):]: v for k, v in f.items()
                    if k.startswith(prefix) and (prefix or not any(k.startswith(p) for p in prefixes if p))}
                   for f in features]
            out.update({f"{prefix}{k}": v for k, v in self.base(sub).items()})
        return out


@dataclass
class TextFieldCollator:
    """LM fields through `lm`, `{anchor, positive, negative}` token fields through the embedding collator."""

    lm: Any
    text: Any

    TEXT_KEYS = ("anchor", "positive", "negative")

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        out = self.lm([{k: v for k, v in f.items() if k not in self.TEXT_KEYS} for f in features])
        text = [{k: v for k, v in f.items() if k in self.TEXT_KEYS} for f in features]
        if text[0]:
            out.update(self.text(text))
        return out
