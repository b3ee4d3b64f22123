"""Tokenisation and collation of embedding rows (``triplet``, ``pair_score``, ``sentence`` examples).

:func:`encode_embedding_examples` turns validated :class:`~kdistill.data.records.Example` rows into
features of token id lists, one list per text; :class:`EmbeddingCollator` pads a list of such features
into a batch of tensors, one ``<field>_input_ids`` / ``<field>_attention_mask`` pair per text field.

Feature layout by kind:

* triplet -> ``{"anchor": ids, "positive": ids, "negative": [ids, ...]}`` (``negative`` only when the
  row has negatives; always a list of id lists, one per hard negative)
* pair_score -> ``{"sentence1": ids, "sentence2": ids, "score": float}``
* sentence -> ``{"text": ids}``

A feature may also carry precomputed teacher embeddings ``teacher_<field>`` (a list of D floats, or
K lists of D floats for ``teacher_negative``); the collator stacks them into float tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .records import EMBEDDING_FORMATS, Example

__all__ = ["TEXT_FIELDS", "EmbeddingCollator", "encode_embedding_examples", "tokenize_texts"]

TEXT_FIELDS = ("anchor", "positive", "negative")
# Single-text fields the collator pads (one sequence per feature); "negative" holds K sequences.
_SINGLE_FIELDS = ("anchor", "positive", "sentence1", "sentence2", "text")
_TEACHER = "teacher_"


def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int = 256, append_eos: bool = False
                   ) -> list[list[int]]:
    """Tokenise ``texts`` with the tokenizer's special tokens, truncated to ``max_length`` tokens.

    ``add_special_tokens=True``: a BERT tokenizer gives ``[CLS] ... [SEP]``, a T5 one ``... </s>``.
    With ``append_eos=True`` ``tokenizer.eos_token_id`` is appended to every sequence that does not
    already end with it (last-token pooling for decoder encoders); a sequence that is ``max_length``
    long is first cut to ``max_length - 1`` tokens so the EOS always survives truncation.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, found {type(text).__name__}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    eos = None
    if append_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"append_eos=True but the tokenizer ({type(tokenizer).__name__}) has no eos token; "
                             f"set tokenizer.eos_token or use append_eos=False")
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    out: list[list[int]] = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids[: max_length - 1] + [eos]
        out.append(ids)
    return out


def encode_embedding_examples(examples: Iterable[Example], tokenizer, max_length: int = 256,
                              append_eos: bool = False) -> list[dict]:
    """Tokenise embedding examples into collator features (see the module docstring for the layout).

    All texts are tokenised in one call. Raises ``ValueError`` naming ``example.source`` for an
    example of an LM kind (alpaca, prompt_completion, messages).
    """
    examples = list(examples)
    for ex in examples:
        if ex.kind not in EMBEDDING_FORMATS:
            raise ValueError(f"{ex.source}: example of kind {ex.kind!r} is not an embedding example "
                             f"(expected one of {', '.join(EMBEDDING_FORMATS)}); LM rows are encoded with "
                             f"kdistill.data.encode_examples")
    texts: list[str] = []
    plans: list[list[tuple[str, int]]] = []  # per example: (field, number of texts)
    for ex in examples:
        f = ex.fields
        if ex.kind == "triplet":
            plan = [("anchor", 1), ("positive", 1)]
            texts += [f["anchor"], f["positive"]]
            negatives = f.get("negative")
            if negatives is not None:
                negatives = [negatives] if isinstance(negatives, str) else list(negatives)
                if not negatives:
                    raise ValueError(f"{ex.source}: 'negative' is an empty list")
                plan.append(("negative", len(negatives)))
                texts += negatives
        elif ex.kind == "pair_score":
            plan = [("sentence1", 1), ("sentence2", 1)]
            texts += [f["sentence1"], f["sentence2"]]
        else:
            plan = [("text", 1)]
            texts.append(f["text"])
        plans.append(plan)

    ids = tokenize_texts(texts, tokenizer, max_length=max_length, append_eos=append_eos)
    features: list[dict] = []
    pos = 0
    for ex, plan in zip(examples, plans):
        feature: dict = {}
        for name, count in plan:
            if name == "negative":
                feature[name] = ids[pos:pos + count]
            else:
                feature[name] = ids[pos]
            pos += count
        if ex.kind == "pair_score":
            feature["score"] = float(ex.fields["score"])
        features.append(feature)
    return features


def _id_list(value, key: str, index: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise TypeError(f"feature {index}: '{key}' must be a list of token ids (ints)")
    return list(value)


def _floats(value, key: str, index: int, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        shape = "a list of D floats" if ndim == 1 else "K lists of D floats"
        raise TypeError(f"feature {index}: '{key}' must be {shape} ({exc})") from None
    if array.ndim != ndim:
        raise ValueError(f"feature {index}: '{key}' must have {ndim} dimension(s) "
                         f"({'D floats' if ndim == 1 else 'K x D floats'}), found shape {tuple(array.shape)}")
    return array


@dataclass
class EmbeddingCollator:
    """Pad embedding features (from :func:`encode_embedding_examples`) into a batch of tensors.

    * Each single-text field present (``anchor``, ``positive``, ``sentence1``, ``sentence2``, ``text``)
      gives ``<field>_input_ids`` (B, T) padded with ``pad_token_id`` on ``padding_side`` and
      ``<field>_attention_mask`` (B, T), 1 on real tokens. Each field is padded to its own longest
      sequence (rounded up to ``pad_to_multiple_of`` when set).
    * ``negative`` (K id lists per feature, the same K for every feature) gives ``negative_input_ids`` and
      ``negative_attention_mask`` of shape (B*K, T): row ``b*K + k`` is negative ``k`` of example ``b``;
      plus ``num_negatives`` = K as a 0-dim long tensor.
    * ``score`` gives a float32 tensor (B,).
    * ``teacher_<field>`` (precomputed teacher embeddings) are stacked into float32 tensors: (B, D) for
      a single-text field, (B*K, D) for ``teacher_negative`` (K x D per feature, same row order as the
      negatives).
    * Integer scalars per feature (e.g. an index) are stacked into a 1-D long tensor.

    Every feature must carry the same keys; anything else raises ``ValueError``.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token) first")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")

    def _pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max((len(r) for r in rows), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, mask = [], []
        for r in rows:
            n = length - len(r)
            if self.padding_side == "left":
                ids.append([self.pad_token_id] * n + r)
                mask.append([0] * n + [1] * len(r))
            else:
                ids.append(r + [self.pad_token_id] * n)
                mask.append([1] * len(r) + [0] * n)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def _num_negatives(self, counts: list[int], key: str) -> int:
        k = counts[0]
        if k < 1:
            raise ValueError(f"feature 0: '{key}' is empty; every feature needs at least one negative")
        for i, c in enumerate(counts):
            if c != k:
                raise ValueError(f"feature {i} has {c} {key} row(s) but feature 0 has {k}; every feature in a "
                                 f"batch needs the same number of negatives (drop or pad negatives per row, "
                                 f"or batch rows by their number of negatives)")
        return k

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        features = list(features)
        if not features:
            raise ValueError("cannot collate an empty list of features")
        keys = set(features[0])
        for i, feature in enumerate(features):
            if set(feature) != keys:
                missing = sorted(keys - set(feature))
                extra = sorted(set(feature) - keys)
                detail = "; ".join(part for part in (f"lacks {missing}" if missing else "",
                                                      f"has extra {extra}" if extra else "") if part)
                raise ValueError(f"feature {i} {detail} compared with feature 0; a field must be present in "
                                 f"every feature of a batch or in none")
        if not keys:
            raise ValueError("features are empty dicts")

        batch: dict[str, torch.Tensor] = {}
        k_negatives: int | None = None
        for field in _SINGLE_FIELDS:
            if field in keys:
                rows = [_id_list(f[field], field, i) for i, f in enumerate(features)]
                batch[f"{field}_input_ids"], batch[f"{field}_attention_mask"] = self._pad(rows)
        if "negative" in keys:
            per_feature = []
            for i, f in enumerate(features):
                value = f["negative"]
                if not isinstance(value, (list, tuple)):
                    raise TypeError(f"feature {i}: 'negative' must be a list of token id lists")
                per_feature.append([_id_list(v, "negative", i) for v in value])
            k_negatives = self._num_negatives([len(p) for p in per_feature], "negative")
            flat = [ids for rows in per_feature for ids in rows]
            batch["negative_input_ids"], batch["negative_attention_mask"] = self._pad(flat)
            batch["num_negatives"] = torch.tensor(k_negatives, dtype=torch.long)

        handled = set(_SINGLE_FIELDS) | {"negative"}
        for key in sorted(keys - handled):
            values = [f[key] for f in features]
            if key == "score":
                for i, v in enumerate(values):
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise TypeError(f"feature {i}: 'score' must be a number, found {type(v).__name__}")
                batch["score"] = torch.tensor([float(v) for v in values], dtype=torch.float32)
            elif key == f"{_TEACHER}negative":
                arrays = [_floats(v, key, i, ndim=2) for i, v in enumerate(values)]
                k = self._num_negatives([a.shape[0] for a in arrays], key)
                if k_negatives is not None and k != k_negatives:
                    raise ValueError(f"'{key}' has {k} rows per feature but 'negative' has {k_negatives}")
                batch[key] = self._stack(arrays, key, concat=True)
            elif key.startswith(_TEACHER):
                arrays = [_floats(v, key, i, ndim=1) for i, v in enumerate(values)]
                batch[key] = self._stack(arrays, key, concat=False)
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                raise ValueError(f"don't know how to collate feature key {key!r}: supported are "
                                 f"{', '.join(_SINGLE_FIELDS)}, negative, score, teacher_<field> embeddings "
                                 f"and integer scalars")
        return batch

    @staticmethod
    def _stack(arrays: list[np.ndarray], key: str, concat: bool) -> torch.Tensor:
        dim = arrays[0].shape[-1]
        for i, a in enumerate(arrays):
            if a.shape[-1] != dim:
                raise ValueError(f"feature {i}: '{key}' has dimension {a.shape[-1]} but feature 0 has {dim}")
        stacked = np.concatenate(arrays, axis=0) if concat else np.stack(arrays, axis=0)
        return torch.from_numpy(np.ascontiguousarray(stacked))
