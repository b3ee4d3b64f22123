"""The top-k cache as a teacher source: training reads the teacher's stored top-k instead of running it.

    kdistill cache config.yaml     # writes cache.dir/train (and cache.dir/eval when data.eval is set)
    kdistill train config.yaml     # same config: kd reads the cache, no teacher model is loaded

What is stored (`kdistill.teachers.topk_store` has the on-disk format, `kdistill.teachers.cache_writer` writes
it): for every example of the encoded dataset, in order, and for every trained token of it (the positions `kd`
compares, after the causal shift of `kdistill.models.heads`), the teacher's k most likely token ids and their
log-probabilities under softmax(teacher logits / cache.temperature) over the shared vocabulary
(`kdistill.models.kd_vocab_size`). The manifest records the teacher, a fingerprint of the tokenizer, the capture
temperature, k, the encoding and a hash of each example's token ids and labels.

Training refuses a cache that does not match (`CacheMismatchError`, with the reason): another tokenizer, another
teacher than `teacher.name_or_path`, a different number of examples, or an example whose tokens differ (named by
its file:line).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.batch import TOPK_KEYS
from kdistill.errors import UserError
from kdistill.losses import TopKTeacher
from kdistill.models.heads import shifted_targets
from kdistill.teachers.base import TeacherQuery, TeacherSignalError, TeacherSource, TopKRows
from kdistill.teachers.topk_store import TopKStore

__all__ = ["CacheMismatchError", "CachedTeacherDataset", "CachedTopK", "TopKCollator", "cache_meta",
           "check_examples", "example_hash", "open_cache", "tokenizer_fingerprint", "trained_tokens"]

SPLITS = ("train", "eval")


class CacheMismatchError(UserError, ValueError):
    """The cache was written for other data, another tokenizer or another teacher."""


class CachedTopK(TeacherSource):
    """The teacher's stored top-k per trained token (`kdistill cache`), captured at `capture_temperature`. The
    batch carries the rows (`TopKCollator`); it covers the main token view only."""

    name = "top-k teacher cache"
    provides = frozenset({"tokens"})

    def __init__(self, capture_temperature: float):
        self.capture_temperature = float(capture_temperature)

    def tokens(self, query: TeacherQuery) -> TopKRows:
        indices, logprobs = (query.batch.teacher.get(key) for key in TOPK_KEYS)
        if indices is None or query.view:
            raise TeacherSignalError(f"token view {query.view or 'main'!r} carries no cached teacher signal "
                                     f"({TOPK_KEYS[0]}); a top-k cache covers the main view only")
        rows = int(query.mask.sum())
        if indices.shape[0] != rows:
            raise TeacherSignalError(f"the cached teacher has {indices.shape[0]} rows for a batch with {rows} "
                                     "trained tokens: the cache does not match the data")
        return TopKRows(TopKTeacher(indices=indices, logprobs=logprobs,
                                    capture_temperature=self.capture_temperature))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary (with added tokens), special tokens, chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def example_hash(row: dict) -> str:
    """Hash of an encoded example's token ids and labels (128 bits, hex)."""
    digest = hashlib.sha256()
    for key in ("input_ids", "labels"):
        digest.update(key.encode())
        digest.update(np.asarray(row[key], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def trained_tokens(row: dict, encoder_decoder: bool) -> int:
    """The positions `kd` compares in one example (causal LMs: labels after the shift)."""
    return int((shifted_targets(np.asarray(row["labels"]), encoder_decoder) != -100).sum())


def cache_meta(cfg, tokenizer, split: str, source: str, encoder_decoder: bool) -> dict[str, Any]:
    """What a cache was written from; a resumed or reused cache must match it."""
    data = cfg.data
    return {
        "teacher": {"name_or_path": cfg.teacher.name_or_path, "revision": cfg.teacher.revision,
                    "dtype": cfg.teacher.dtype,
                    "server_model": cfg.teacher.server.model if cfg.teacher.server is not None else None},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "capture_temperature": float(cfg.cache.temperature),
        "split": split,
        "source": source,
        "encoder_decoder": encoder_decoder,
        "encoding": {"format": data.format, "template": data.template, "max_length": data.max_length,
                     "max_target_length": data.max_target_length},
    }


def check_examples(store: TopKStore, rows, hashes, sources, encoder_decoder, upto: int, where: str) -> None:
    for i in range(upto):
        if store.example_hash(i) != hashes[i]:
            place = sources[i] if sources else f"example {i}"
            raise CacheMismatchError(
                f"{where}: {place}: the example's tokens differ from the cached one (the data, its order, the "
                "tokenizer or the encoding settings changed since caching); rebuild the cache (kdistill cache) "
                "into an empty folder")
        n = trained_tokens(rows[i], encoder_decoder)
        if store.num_tokens(i) != n:
            place = sources[i] if sources else f"example {i}"
            raise CacheMismatchError(f"{where}: {place}: {store.num_tokens(i)} cached positions, the example has "
                                     f"{n} trained tokens")


def open_cache(cfg, split: str, dataset, tokenizer, encoder_decoder: bool) -> TopKStore:
    """The cache of one split, checked against the run's data, tokenizer and teacher; `CacheMismatchError` (with
    the reason) when it does not fit."""
    root = Path(cfg.cache.dir) / split
    if not (root / "manifest.json").is_file():
        raise CacheMismatchError(f"{root}: no top-k cache here; write it first with `kdistill cache <config>`")
    store = TopKStore(root)
    meta = store.meta
    if not store.complete:
        raise CacheMismatchError(f"{root}: the cache is incomplete ({len(store)} of the examples written); run "
                                 "`kdistill cache <config>` again to finish it")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise CacheMismatchError(f"{root}: the cache was written with another tokenizer (fingerprint differs from "
                                 f"{cfg.student.tokenizer or cfg.student.name_or_path}'s)")
    cached_teacher = (meta.get("teacher") or {}).get("name_or_path")
    if cfg.teacher.name_or_path and cached_teacher != cfg.teacher.name_or_path:
        raise CacheMismatchError(f"{root}: the cache holds teacher {cached_teacher!r}, the config names "
                                 f"{cfg.teacher.name_or_path!r}")
    if bool(meta.get("encoder_decoder")) != encoder_decoder:
        raise CacheMismatchError(f"{root}: the cache was written for an "
                                 f"{'encoder-decoder' if meta.get('encoder_decoder') else 'causal'} teacher")
    if not math.isclose(float(meta.get("capture_temperature", float("nan"))), float(cfg.cache.temperature)):
        raise CacheMismatchError(f"{root}: the cache was captured at temperature {meta.get('capture_temperature')}, "
                                 f"cache.temperature is {cfg.cache.temperature}")
    if store.codec.vocab_size != len(tokenizer):
        raise CacheMismatchError(f"{root}: the cache covers {store.codec.vocab_size} vocabulary entries, the "
                                 f"tokenizer has {len(tokenizer)}")
    rows = dataset.rows
    if len(store) != len(rows):
        raise CacheMismatchError(f"{root}: the cache holds {len(store)} examples, the data has {len(rows)} "
                                 f"({meta.get('source')} was cached; data.{split} is "
                                 f"{cfg.data.train if split == 'train' else cfg.data.eval})")
    check_examples(store, rows, [example_hash(r) for r in rows], getattr(dataset, "sources", None),
                    encoder_decoder, upto=len(rows), where=str(root))
    return store


class CachedTeacherDataset(torch.utils.data.Dataset):
    """An encoded dataset whose rows also carry the cached teacher: teacher_topk_indices / teacher_topk_logprobs,
    (n, k) arrays over the row's n trained tokens."""

    def __init__(self, dataset, store: TopKStore):
        self.dataset = dataset
        self.store = store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ids, logprobs = self.store.get(i)
        return {**self.dataset[i], TOPK_KEYS[0]: ids, TOPK_KEYS[1]: logprobs}


class TopKCollator:
    """Wraps an LM collator: the rows' top-k arrays are concatenated in batch order into (N, k) tensors, N the
    batch's trained tokens, so row r is the r-th True entry of the batch's target mask in row-major order."""

    KEYS = TOPK_KEYS

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        topk = {key: [f[key] for f in features] for key in self.KEYS}
        batch = self.collator([{k: v for k, v in f.items() if k not in self.KEYS} for f in features])
        indices, logprobs = self.KEYS
        batch[indices] = torch.from_numpy(np.concatenate(topk[indices])).long()
        batch[logprobs] = torch.from_numpy(np.concatenate(topk[logprobs])).float()
        return batch
