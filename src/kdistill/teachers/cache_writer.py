"""Writing the top-k cache: run a live teacher once over encoded datasets and store its top-k per trained token.

`kdistill.recipes.lm.build_cache` loads the data and the teacher and calls :func:`write_split` per split; the
format is `kdistill.teachers.topk_store`'s, what is stored is described in `kdistill.teachers.topk_cache`. A killed
run resumes where it stopped, without duplicates; a complete cache is checked against the data and left as it is.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdistill.batch import Batch
from kdistill.data import DataCollatorForDistillation
from kdistill.losses.chunked import resolve_chunk_size
from kdistill.models.heads import chunking_problem, output_layer
from kdistill.paths import free_bytes
from kdistill.teachers.base import HiddenAndHead, TeacherQuery
from kdistill.teachers.live import LiveTeacher
from kdistill.teachers.served import ServedTopK, TeacherServer
from kdistill.teachers.topk_cache import (CacheMismatchError, cache_meta, check_examples, example_hash, force_targets,
                                          trained_tokens, view_rows)
from kdistill.teachers.topk_codec import TopKCodec, reconstruction_kl
from kdistill.teachers.topk_store import TopKStore
from kdistill.teachers.topk_writer import TopKStoreWriter

__all__ = ["warn_if_short_of_space", "write_split"]

logger = logging.getLogger(__name__)


def warn_if_short_of_space(cfg, row_lists) -> None:
    """Log a warning when the cache's estimated size (trained tokens x record bytes, ids at 18 bits: enough for a
    262,144-entry vocabulary) exceeds the free space under cache.dir."""
    tokens = sum(sum(1 for t in row["labels"] if t != -100) for rows in row_lists for row in rows)
    needed = tokens * math.ceil(cfg.cache.k * (18 + cfg.cache.logprob_bits) / 8)
    free = free_bytes(cfg.cache.dir)
    if needed > free:
        logger.warning("cache.dir %s: the cache needs about %.1f GiB (%d trained tokens x k=%d) but only %.1f GiB are "
                       "free there; it will stop when the disk is full (and resume once space is made)",
                       cfg.cache.dir, needed / 2**30, tokens, cfg.cache.k, free / 2**30)


def write_split(cfg, teacher, tokenizer, dataset, split, source, encoder_decoder, vocab, progress=True, view=""):
    """Write (or resume, or check if complete) cache.dir/<split> for one encoded dataset; returns its stats.
    `teacher`: a model, or a `TeacherServer` (its top k are stored as they come; no reconstruction KL). `view`
    "xt": cache the teacher's own tokens of a cross-tokenizer dataset (`tokenizer` is then the teacher's), with
    each actual next token forced into the k (`kdistill.teachers.topk_cache.force_targets`)."""
    root = Path(cfg.cache.dir) / split
    rows = view_rows(dataset.rows, view)
    hashes = [example_hash(r) for r in rows]
    codec = TopKCodec(vocab_size=vocab, k=min(cfg.cache.k, vocab), logprob_bits=cfg.cache.logprob_bits)
    meta = cache_meta(cfg, tokenizer, split, source, encoder_decoder, view)
    try:
        writer = TopKStoreWriter(root, meta, codec, shard_bytes=cfg.cache.shard_mb * 2 ** 20)
    except ValueError as exc:  # a folder holding another cache (other settings): never mixed, never overwritten
        raise CacheMismatchError(str(exc)) from None
    with writer:
        return _write(cfg, teacher, tokenizer, rows, getattr(dataset, "sources", None), writer, root, codec, hashes,
                      encoder_decoder, vocab, split, progress, forced=bool(view))


def _write(cfg, teacher, tokenizer, rows, sources, writer, root, codec, hashes, encoder_decoder, vocab, split,
           progress, forced):
    start = writer.next_index
    if start:
        check_examples(TopKStore(root), rows, hashes, sources, encoder_decoder, upto=start, where=str(root))
    if writer.complete:
        logger.info("%s: complete cache of %d examples, nothing to do", root, len(rows))
        return TopKStore(root).stats
    if start:
        logger.info("%s: resuming after %d of %d examples", root, start, len(rows))

    served = isinstance(teacher, TeacherServer)
    if served:  # a served teacher answers with the top k itself; the KL to the full distribution is unknown
        device, live = torch.device("cpu"), ServedTopK(teacher)
    else:
        device = output_layer(teacher).weight.device
        live = LiveTeacher(teacher)  # chunked when it can be: project the trained rows only, a slice at a time
        live.place(device)
        live.setup(encoder_decoder=encoder_decoder, chunked=chunking_problem(teacher, encoder_decoder) is None)
    collator = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)
    temperature = float(cfg.cache.temperature)
    kl_values: list[np.ndarray] = []
    kl_budget = cfg.cache.kl_sample_tokens
    bar = tqdm(total=len(rows), initial=start, desc=f"caching {split}", unit="ex", disable=not progress)
    batch_size = max(1, cfg.cache.batch_size)
    for first in range(start, len(rows), batch_size):
        chunk_rows = rows[first:first + batch_size]
        batch = Batch.parse({k: v.to(device) for k, v in collator(chunk_rows).items()})
        query = TeacherQuery("", batch.views[""], batch, encoder_decoder)
        signal = live.tokens(query)
        targets = query.targets[query.mask].cpu().numpy()  # (N,) each trained position's actual next token
        ids_parts, lp_parts = [], []
        if served:
            ids_np, lp_np = signal.teacher.indices.numpy().copy(), signal.teacher.logprobs.numpy().copy()
            if forced:
                force_targets(ids_np, lp_np, targets, signal.target_logprobs.numpy())
            ids_parts.append(ids_np)
            lp_parts.append(lp_np)
            selected = signal.teacher.logprobs[:0]
            step = 1
        else:
            head = signal.head if isinstance(signal, HiddenAndHead) else None
            selected = (signal.hidden if head is not None else signal.logits)[query.mask]  # (N, H) or (N, V')
            step = resolve_chunk_size(cfg.chunked_loss.chunk_size, vocab, selected.shape[-1], selected.dtype,
                                      "projection")
        for lo in range(0, selected.shape[0], step):
            rows_ = selected[lo:lo + step]
            if head is not None:
                logits = torch.nn.functional.linear(rows_, head.weight[:vocab],
                                                    None if head.bias is None else head.bias[:vocab])
            else:
                logits = rows_[:, :vocab]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)   # (n, V)
            lp, ids = logp.topk(codec.k, dim=-1)
            ids_np, lp_np = ids.cpu().numpy(), lp.cpu().numpy()
            if forced:
                at = torch.as_tensor(targets[lo:lo + step], device=logp.device)
                force_targets(ids_np, lp_np, at.cpu().numpy(), logp.gather(1, at[:, None])[:, 0].cpu().numpy())
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
