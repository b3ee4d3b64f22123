"""A top-k teacher cache: run the teacher once, then train from its stored signals with no teacher in memory.

    kdistill cache config.yaml     # writes cache.dir/train (and cache.dir/eval when data.eval is set)
    kdistill train config.yaml     # same config: kd reads the cache, no teacher model is loaded

What is stored (`kdistill.topk_store` has the on-disk format): for every example of the encoded dataset, in
order, and for every trained token of it (the positions the `kd` objective compares, after the causal shift,
`kdistill.trainer.align_positions`), the teacher's k most likely token ids and their log-probabilities under
softmax(teacher logits / cache.temperature) over the shared vocabulary (`kdistill.models.kd_vocab_size`).
The manifest records the teacher, a fingerprint of the tokenizer, the capture temperature, k, the encoding
and a hash of each example's token ids and labels.

Training refuses a cache that does not match (`CacheMismatchError`, with the reason): another tokenizer,
another teacher than `teacher.name_or_path`, a different number of examples, or an example whose tokens
differ (named by its file:line). Caching resumes where a killed run stopped, without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.errors import UserError
from kdistill.losses.chunked import resolve_chunk_size
from kdistill.paths import check_output_dir, free_bytes
from kdistill.topk_store import TopKCodec, TopKStore, TopKStoreWriter, reconstruction_kl

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")


class CacheMismatchError(UserError, ValueError):
    """The cache was written for other data, another tokenizer or another teacher."""


# ------------------------------------------------------------------------------------------------ fingerprints
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
    from kdistill.models.heads import shifted_targets

    return int((shifted_targets(np.asarray(row["labels"]), encoder_decoder) != -100).sum())


def cache_meta(cfg, tokenizer, split: str, source: str, encoder_decoder: bool) -> dict[str, Any]:
    """What a cache was written from; a resumed or reused cache must match it."""
    data = cfg.data
    return {
        "teacher": {"name_or_path": cfg.teacher.name_or_path, "revision": cfg.teacher.revision,
                    "dtype": cfg.teacher.dtype},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "capture_temperature": float(cfg.cache.temperature),
        "split": split,
        "source": source,
        "encoder_decoder": encoder_decoder,
        "encoding": {"format": data.format, "template": data.template, "max_length": data.max_length,
                     "max_target_length": data.max_target_length},
    }


# ------------------------------------------------------------------------------------------------ writing
def build_cache(cfg, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the teacher over data.train (and data.eval) and write cache.dir/<split>; returns stats per split.

    Resumes a partial cache (same settings) where it stopped; a complete one is checked and left as it is."""
    from kdistill.models import compare_tokenizers, is_encoder_decoder, kd_vocab_size, load_model, load_tokenizer
    from kdistill.pipeline import load_split

    from kdistill.config import ConfigError

    if not cfg.cache.dir:
        raise ConfigError("cache.dir is not set: where should the cache be written?")
    if not cfg.teacher.name_or_path:
        raise ConfigError("teacher.name_or_path is required to write a cache")
    check_output_dir(cfg.cache.dir, "cache.dir")
    tokenizer = load_tokenizer(cfg.student, "student.name_or_path")
    compare_tokenizers(load_tokenizer(cfg.teacher, "teacher.name_or_path"), tokenizer)
    encoder_decoder = is_encoder_decoder(cfg.teacher.name_or_path, "teacher.name_or_path",
                                         trust_remote_code=cfg.teacher.trust_remote_code)
    splits = [("train", cfg.data.train, cfg.data.split, cfg.data.limit)]
    if cfg.data.eval:
        splits.append(("eval", cfg.data.eval, cfg.data.eval_split, cfg.data.eval_limit))
    datasets = {name: load_split(cfg, tokenizer, source, split, limit, encoder_decoder)[0]
                for name, source, split, limit in splits}  # every row validated before the teacher loads
    _warn_if_short_of_space(cfg, datasets)
    teacher = load_model(cfg.teacher, role="teacher")
    teacher.eval().requires_grad_(False)
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    vocab = kd_vocab_size(tokenizer, teacher, None)
    out = {}
    for name, source, _, _ in splits:
        out[name] = _cache_split(cfg, teacher, tokenizer, datasets[name], name, source, encoder_decoder, vocab,
                                 progress)
    return out


def _warn_if_short_of_space(cfg, datasets) -> None:
    """Log a warning when the cache's estimated size (trained tokens x record bytes, ids at 18 bits: enough for a
    262,144-entry vocabulary) exceeds the free space under cache.dir."""
    tokens = sum(sum(1 for t in row["labels"] if t != -100) for ds in datasets.values() for row in ds.rows)
    needed = tokens * math.ceil(cfg.cache.k * (18 + cfg.cache.logprob_bits) / 8)
    free = free_bytes(cfg.cache.dir)
    if needed > free:
        logger.warning("cache.dir %s: the cache needs about %.1f GiB (%d trained tokens x k=%d) but only %.1f GiB are "
                       "free there; it will stop when the disk is full (and resume once space is made)",
                       cfg.cache.dir, needed / 2**30, tokens, cfg.cache.k, free / 2**30)


def _cache_split(cfg, teacher, tokenizer, dataset, split, source, encoder_decoder, vocab, progress):
    root = Path(cfg.cache.dir) / split
    rows = dataset.rows
    hashes = [example_hash(r) for r in rows]
    codec = TopKCodec(vocab_size=vocab, k=min(cfg.cache.k, vocab), logprob_bits=cfg.cache.logprob_bits)
    meta = cache_meta(cfg, tokenizer, split, source, encoder_decoder)
    try:
        writer = TopKStoreWriter(root, meta, codec, shard_bytes=cfg.cache.shard_mb * 2 ** 20)
    except ValueError as exc:  # a folder holding another cache (other settings): never mixed, never overwritten
        raise CacheMismatchError(str(exc)) from None
    with writer:
        return _write(cfg, teacher, tokenizer, dataset, writer, root, codec, hashes, encoder_decoder, vocab,
                      split, progress)


def _write(cfg, teacher, tokenizer, dataset, writer, root, codec, hashes, encoder_decoder, vocab, split, progress):
    from tqdm.auto import tqdm

    from kdistill.data import DataCollatorForDistillation
    from kdistill.models.heads import align_positions, chunking_problem, lm_model_inputs, output_layer, \
        output_layer_bypassed

    rows = dataset.rows
    start = writer.next_index
    if start:
        _check_examples(TopKStore(root), rows, hashes, getattr(dataset, "sources", None), encoder_decoder,
                        upto=start, where=str(root))
    if writer.complete:
        logger.info("%s: complete cache of %d examples, nothing to do", root, len(rows))
        return TopKStore(root).stats
    if start:
        logger.info("%s: resuming after %d of %d examples", root, start, len(rows))

    device = output_layer(teacher).weight.device
    chunked = chunking_problem(teacher, encoder_decoder) is None  # project trained rows only, in chunks
    head = output_layer(teacher)
    collator = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)
    temperature = float(cfg.cache.temperature)
    kl_values: list[np.ndarray] = []
    kl_budget = cfg.cache.kl_sample_tokens
    bar = tqdm(total=len(rows), initial=start, desc=f"caching {split}", unit="ex", disable=not progress)
    batch_size = max(1, cfg.cache.batch_size)
    for first in range(start, len(rows), batch_size):
        chunk_rows = rows[first:first + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk_rows).items()}
        with torch.no_grad(), (output_layer_bypassed(teacher) if chunked else nullcontext()):
            out = teacher(**lm_model_inputs(teacher, batch, encoder_decoder))
        aligned, targets = align_positions(out.logits, batch["labels"], encoder_decoder)
        selected = aligned[targets.ne(-100)]                      # (N, H) hidden or (N, V') logits
        ids_parts, lp_parts = [], []
        step = resolve_chunk_size(cfg.chunked_loss.chunk_size, vocab, selected.shape[-1], selected.dtype, "projection")
        for lo in range(0, selected.shape[0], step):
            rows_ = selected[lo:lo + step]
            if chunked:
                logits = torch.nn.functional.linear(rows_, head.weight[:vocab],
                                                    None if head.bias is None else head.bias[:vocab])
            else:
                logits = rows_[:, :vocab]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)   # (n, V)
            lp, ids = logp.topk(codec.k, dim=-1)
            ids_np, lp_np = ids.cpu().numpy(), lp.cpu().numpy()
            if kl_budget > 0:  # the KL of what training will read back: encoded then decoded
                take = min(kl_budget, ids_np.shape[0])
                dec_ids, dec_lp = codec.decode(codec.encode(ids_np[:take], lp_np[:take]), take)
                kl_values.append(reconstruction_kl(logp[:take].double().cpu().numpy(), dec_ids, dec_lp))
                kl_budget -= take
            ids_parts.append(ids_np)
            lp_parts.append(lp_np)
        ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros((0, codec.k), np.int64)
        lp_all = np.concatenate(lp_parts) if lp_parts else np.zeros((0, codec.k), np.float32)
        offset = 0
        for j, row in enumerate(chunk_rows):
            n = trained_tokens(row, encoder_decoder)
            writer.append(first + j, hashes[first + j], ids_all[offset:offset + n], lp_all[offset:offset + n])
            offset += n
        if offset != ids_all.shape[0]:
            raise RuntimeError(f"internal error: {ids_all.shape[0]} trained positions in a batch, {offset} counted")
        bar.update(len(chunk_rows))
    bar.close()
    kl = np.concatenate(kl_values) if kl_values else np.zeros(0)
    store_tokens = sum(trained_tokens(r, encoder_decoder) for r in rows)
    stats = {
        "examples": len(rows), "tokens": store_tokens, "k": codec.k, "vocab_size": vocab,
        "logprob_bits": codec.logprob_bits, "id_bits": codec.id_bits,
        "record_bytes_per_token": codec.bytes_per_token(),
        "kl_sample_tokens": int(kl.size),
        "kl_mean": float(kl.mean()) if kl.size else None,
        "kl_max": float(kl.max()) if kl.size else None,
    }
    writer.close(stats=stats, num_examples=len(rows))
    store = TopKStore(root)
    stats["bytes_per_token"] = store.total_bytes() / max(store_tokens, 1)
    _update_stats(root, stats)
    logger.info("%s: %d examples, %d tokens, %.1f bytes/token on disk, mean KL(full || top-%d) %s", root,
                len(rows), store_tokens, stats["bytes_per_token"], codec.k,
                "n/a" if stats["kl_mean"] is None else f"{stats['kl_mean']:.4g}")
    return stats


def _update_stats(root: Path, stats: dict) -> None:
    """Add the on-disk size (known only once the cache is closed) to the manifest's stats, atomically."""
    manifest = root / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stats"] = {**data.get("stats", {}), **stats}
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(manifest)


# ------------------------------------------------------------------------------------------------ reading
def _check_examples(store: TopKStore, rows, hashes, sources, encoder_decoder, upto: int, where: str) -> None:
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
    _check_examples(store, rows, [example_hash(r) for r in rows], getattr(dataset, "sources", None),
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
        return {**self.dataset[i], "teacher_topk_indices": ids, "teacher_topk_logprobs": logprobs}


class TopKCollator:
    """Wraps an LM collator: the rows' top-k arrays are concatenated in batch order into (N, k) tensors, N the
    batch's trained tokens, so row r is the r-th True entry of the batch's target mask in row-major order."""

    KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        topk = {key: [f[key] for f in features] for key in self.KEYS}
        batch = self.collator([{k: v for k, v in f.items() if k not in self.KEYS} for f in features])
        batch["teacher_topk_indices"] = torch.from_numpy(np.concatenate(topk["teacher_topk_indices"])).long()
        batch["teacher_topk_logprobs"] = torch.from_numpy(np.concatenate(topk["teacher_topk_logprobs"])).float()
        return batch
