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

A cross-tokenizer run (`crosstok`, method alm) caches the teacher's token view "xt" instead: the teacher's own
tokens of each row, in its vocabulary, checked against its tokenizer; each position's actual next token is forced
into the stored k (it replaces the k-th entry when it is not among them), so the log-prob of every teacher token,
all that alm reads, is in the cache. The chunks that align the two tokenisations are recomputed from the text when
the data is loaded, so one teacher cache serves students with any tokenizer.
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
           "check_examples", "example_hash", "force_targets", "open_cache", "tokenizer_fingerprint",
           "trained_tokens", "view_rows"]

SPLITS = ("train", "eval")


class CacheMismatchError(UserError, ValueError):
    """The cache was written for other data, another tokenizer or another teacher."""


class CachedTopK(TeacherSource):
    """The teacher's stored top-k per trained token (`kdistill cache`), captured at `capture_temperature`. The
    batch carries the rows (`TopKCollator`); they cover one token view: the main one, or the teacher's own tokens
    ("xt") of a cross-tokenizer run, whose rows hold each actual next token (`force_targets`) and so also give
    `target_logprobs`."""

    name = "top-k teacher cache"
    provides = frozenset({"tokens"})

    def __init__(self, capture_temperature: float, view: str = ""):
        self.capture_temperature = float(capture_temperature)
        self.view = view

    def tokens(self, query: TeacherQuery) -> TopKRows:
        indices, logprobs = (query.batch.teacher.get(key) for key in TOPK_KEYS)
        if indices is None or query.view != self.view:
            raise TeacherSignalError(f"token view {query.view or 'main'!r} carries no cached teacher signal "
                                     f"({TOPK_KEYS[0]}); this top-k cache covers the "
                                     f"{repr(self.view) if self.view else 'main'} view only")
        rows = int(query.mask.sum())
        if indices.shape[0] != rows:
            raise TeacherSignalError(f"the cached teacher has {indices.shape[0]} rows for a batch with {rows} "
                                     "trained tokens: the cache does not match the data")
        target_logprobs = None
        if self.view:
            targets = query.targets[query.mask].to(indices.device)
            hit = indices.eq(targets[:, None])
            if not bool(hit.any(-1).all()):
                raise TeacherSignalError("a cross-tokenizer cache row lacks its position's actual token: the cache "
                                         "does not match the data")
            target_logprobs = logprobs.masked_fill(~hit, float("-inf")).amax(-1)
        return TopKRows(TopKTeacher(indices=indices, logprobs=logprobs, capture_temperature=self.capture_temperature),
                        target_logprobs=target_logprobs)


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


def view_rows(rows, view: str) -> list[dict]:
    """The rows of one token view as plain LM rows ({"input_ids", "labels"}): what a cache of that view stores and
    is checked against."""
    if not view:
        return rows
    return [{"input_ids": r[f"{view}_input_ids"], "labels": r[f"{view}_labels"]} for r in rows]


def force_targets(ids: np.ndarray, logprobs: np.ndarray, targets: np.ndarray, target_logprobs: np.ndarray) -> None:
    """In place: each row's actual next token (`targets`, (n,)) becomes one of its k entries; where it is not among
    them it replaces the last (least likely) one, with its log-prob `target_logprobs` (n,)."""
    absent = ~(ids == targets[:, None]).any(-1)
    ids[absent, -1] = targets[absent]
    logprobs[absent, -1] = target_logprobs[absent]


def trained_tokens(row: dict, encoder_decoder: bool) -> int:
    """The positions `kd` compares in one example (causal LMs: labels after the shift)."""
    return int((shifted_targets(np.asarray(row["labels"]), encoder_decoder) != -100).sum())


def cache_meta(cfg, tokenizer, split: str, source: str, encoder_decoder: bool, view: str = "") -> dict[str, Any]:
    """What a cache was written from; a resumed or reused cache must match it. `tokenizer`: the one of the cached
    view (the teacher's for the view "xt")."""
    data = cfg.data
    meta = {
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
    if view:  # absent for the main view, so caches written before views existed still match
        meta["view"] = view
        meta["targets_forced"] = True
    return meta


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


def open_cache(cfg, split: str, dataset, tokenizer, encoder_decoder: bool, view: str = "") -> TopKStore:
    """The cache of one split, checked against the run's data, tokenizer and teacher; `CacheMismatchError` (with
    the reason) when it does not fit. `view` "xt": a cross-tokenizer cache, checked against the teacher's tokens
    of the rows and `tokenizer`, the teacher's."""
    root = Path(cfg.cache.dir) / split
    if not (root / "manifest.json").is_file():
        raise CacheMismatchError(f"{root}: no top-k cache here; write it first with `kdistill cache <config>`")
    store = TopKStore(root)
    meta = store.meta
    if not store.complete:
        raise CacheMismatchError(f"{root}: the cache is incomplete ({len(store)} of the examples written); run "
                                 "`kdistill cache <config>` again to finish it")
    if meta.get("view", "") != view:
        raise CacheMismatchError(f"{root}: the cache holds the {_view_name(meta.get('view', ''))}, this run reads "
                                 f"the {_view_name(view)} (a cross-tokenizer objective caches the teacher's own "
                                 "tokens): write a cache for this config into another folder")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        owner = (cfg.teacher.tokenizer or cfg.teacher.name_or_path) if view else \
            (cfg.student.tokenizer or cfg.student.name_or_path)
        raise CacheMismatchError(f"{root}: the cache was written with another tokenizer (fingerprint differs from "
                                 f"{owner}'s)")
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
    rows = view_rows(dataset.rows, view)
    if len(store) != len(rows):
        raise CacheMismatchError(f"{root}: the cache holds {len(store)} examples, the data has {len(rows)} "
                                 f"({meta.get('source')} was cached; data.{split} is "
                                 f"{cfg.data.train if split == 'train' else cfg.data.eval})")
    check_examples(store, rows, [example_hash(r) for r in rows], getattr(dataset, "sources", None),
                    encoder_decoder, upto=len(rows), where=str(root))
    return store


def _view_name(view: str) -> str:
    return f"token view {view!r}" if view else "main token view"


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
