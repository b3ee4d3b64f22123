"""Semantic textual similarity (STS) evaluation of sentence embeddings.

:func:`evaluate_sts` embeds both sides of scored sentence pairs with any ``encode(list[str]) -> (N, D)``
function, scores each pair by the cosine similarity of its two embeddings, and reports the Spearman and
Pearson correlations (x100) with the gold scores, plus encoding throughput.

The Spearman value is the one ``sentence_transformers``' ``EmbeddingSimilarityEvaluator`` reports as its
cosine Spearman (ST reports it on a 0-1 scale; ours / 100 equals it): the same cosine (each embedding
divided by ``max(||x||, 1e-12)``, then the dot product, as ``torch.nn.functional.normalize`` does), the
same ``scipy.stats.spearmanr`` / ``pearsonr`` of (gold, predicted), float32 embeddings as
``model.encode`` returns them, no quantisation (ST's ``precision=None`` default). Given the same
embeddings, :func:`sts_correlations` reproduces ST's numbers.

Where the two differ, and why it does not matter beyond float noise:

* ST encodes the ``sentences1`` list and the ``sentences2`` list separately, duplicates included, so a
  sentence occurring on both sides is embedded twice, in batches of different shape, and its two
  embeddings differ by float rounding (~1e-7). We embed each distinct sentence once. The one visible
  effect: for a pair that also occurs swapped (STS-B dev has "A man is speaking." / "A man is
  dancing." both ways round) our two cosines are exactly equal, a tie that Spearman ranks as 91.5 and
  91.5, while ST's rounding noise breaks the tie (91 and 92). On the first 300 STS-B dev pairs with
  all-MiniLM-L6-v2 this moves Spearman by 1.0e-7 (on the 0-1 scale); ours is the deterministic value.
* ST computes cosines in float32 torch, we in float64 numpy: values move by float32 rounding only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdistill.bundled import STSB_DEV, bundled_path
from kdistill.data.records import load_examples
from kdistill.embedder import Embedder
from kdistill.models import pretrained_config

__all__ = ["STSResult", "add_parser", "cosine_scores", "evaluate_sts", "load_sts_pairs", "run_cli", "sts_correlations"]

_EPS = 1e-12  # torch.nn.functional.normalize's default eps: a zero vector has cosine 0 with anything
_WARMUP_SENTENCES = 8


@dataclass
class STSResult:
    """Correlations x100 of cosine similarity with the gold scores, and encoding speed."""

    spearman: float  # x100
    pearson: float  # x100
    n_pairs: int
    sentences_per_second: float  # distinct sentences encoded / wall seconds spent encoding them
    seconds: float  # wall seconds spent in the timed encode calls (warm-up excluded)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_2d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), found shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, found dtype {array.dtype}")
    return array


def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity ``cos(emb1[i], emb2[i])`` of two (N, D) arrays, as float64 (N,).

    Each row is divided by ``max(norm, 1e-12)`` first, so a zero vector scores 0 instead of NaN.
    """
    a = _as_2d(emb1, "emb1").astype(np.float64)
    b = _as_2d(emb2, "emb2").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape, found {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), _EPS)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), _EPS)
    return np.einsum("ij,ij->i", a, b)


def sts_correlations(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> tuple[float, float]:
    """``(spearman, pearson)`` x100 of ``cosine_scores(emb1, emb2)`` against ``gold`` (scipy.stats).

    A constant prediction (or constant gold scores) gives NaN, as scipy does.
    """
    from scipy.stats import pearsonr, spearmanr

    predicted = cosine_scores(emb1, emb2)
    gold = np.asarray(gold, dtype=np.float64)
    if gold.shape != predicted.shape:
        raise ValueError(f"gold has shape {gold.shape} but there are {predicted.shape[0]} embedding pairs")
    if gold.shape[0] < 2:
        raise ValueError(f"need at least 2 pairs to compute a correlation, got {gold.shape[0]}")
    return 100.0 * float(spearmanr(gold, predicted)[0]), 100.0 * float(pearsonr(gold, predicted)[0])


def _check_pairs(pairs: Sequence) -> tuple[list[str], list[str], np.ndarray]:
    s1, s2, gold = [], [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 3:
            raise ValueError(f"pairs[{i}] must be a (sentence1, sentence2, score) tuple, found {pair!r}")
        a, b, score = pair
        if not isinstance(a, str) or not isinstance(b, str):
            raise TypeError(f"pairs[{i}]: both sentences must be strings")
        if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(score)):
            raise ValueError(f"pairs[{i}]: score must be a finite number, found {score!r}")
        s1.append(a)
        s2.append(b)
        gold.append(float(score))
    if len(gold) < 2:
        raise ValueError(f"need at least 2 pairs to compute a correlation, got {len(gold)}")
    return s1, s2, np.asarray(gold, dtype=np.float64)


def _encode_batch(encode: Callable, batch: list[str]) -> np.ndarray:
    out = _as_2d(encode(batch), "encode(...) output")
    if out.shape[0] != len(batch):
        raise ValueError(f"encode returned {out.shape[0]} embeddings for {len(batch)} sentences")
    return out


def evaluate_sts(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str, float]],
                 batch_size: int = 64, warmup: bool = True) -> STSResult:
    """Spearman / Pearson (x100) of pair cosine similarities against gold scores.

    Every distinct sentence of ``pairs`` is encoded exactly once, in order of first appearance
    (all ``sentence1`` then the new ``sentence2``), by calls of ``encode`` on at most ``batch_size``
    sentences. With ``warmup=True`` one untimed call on the first few (up to 8) distinct sentences comes
    first and its output is thrown away (lazy initialisation, kernel selection), so those sentences go
    through ``encode`` twice. ``seconds`` is the wall time of the timed calls and
    ``sentences_per_second`` = distinct sentences / ``seconds``. A constant prediction (or constant gold
    scores) gives NaN correlations, as scipy does.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    s1, s2, gold = _check_pairs(pairs)
    index: dict[str, int] = {}
    for sentence in s1 + s2:
        index.setdefault(sentence, len(index))
    unique = list(index)

    if warmup:
        _encode_batch(encode, unique[:min(batch_size, _WARMUP_SENTENCES)])

    chunks: list[np.ndarray] = []
    seconds = 0.0
    for start in range(0, len(unique), batch_size):
        batch = unique[start:start + batch_size]
        t0 = time.perf_counter()
        out = _encode_batch(encode, batch)
        seconds += time.perf_counter() - t0
        chunks.append(out)
    dims = {c.shape[1] for c in chunks}
    if len(dims) > 1:
        raise ValueError(f"encode returned embeddings of different dimensions across batches: {sorted(dims)}")
    embeddings = np.concatenate(chunks, axis=0)

    spearman, pearson = sts_correlations(embeddings[[index[s] for s in s1]], embeddings[[index[s] for s in s2]],
                                         gold)
    return STSResult(spearman=spearman, pearson=pearson, n_pairs=len(gold),
                     sentences_per_second=len(unique) / seconds if seconds > 0 else float("inf"),
                     seconds=seconds)


def load_sts_pairs(source: str, limit: int | None = None, split: str = "validation",
                   skip_invalid: bool = False, option: str | None = None) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` tuples from a ``pair_score`` source (STS-B, or SICK by its aliases).

    ``source`` is anything :func:`kdistill.data.load_examples` reads (``split`` applies to hub ids); every
    row must be a ``pair_score`` row. ``limit`` keeps the first N pairs. ``option``: the flag that named
    ``source``, for the error when a hub id cannot be loaded.
    """
    loaded = load_examples(source, format="pair_score", split=split, skip_invalid=skip_invalid, limit=limit,
                           option=option)
    return [(e.fields["sentence1"], e.fields["sentence2"], e.fields["score"]) for e in loaded.examples]


def add_parser(eval_subparsers) -> argparse.ArgumentParser:
    """`kdistill eval sts`."""
    sts = eval_subparsers.add_parser("sts", help="Spearman/Pearson (x100) of cosine similarity vs gold scores, throughput")
    sts.add_argument("--model", required=True, help="Embedding model folder (sentence-transformers or kdistill)")
    sts.add_argument("--data", default=None,
                     help="{sentence1, sentence2, score} pairs: a .jsonl/.json file or a hub id (e.g. "
                          "sentence-transformers/stsb); default: the 375 STS-B dev pairs kdistill ships")
    sts.add_argument("--split", default="validation", help="Split, when --data is a hub id")
    sts.add_argument("--out", default="sts.json", help="Result JSON (default: sts.json; kdistill report reads it)")
    sts.add_argument("--batch-size", type=int, default=64)
    sts.add_argument("--limit", type=int, default=None, help="First N pairs only")
    sts.add_argument("--pooling", choices=("mean", "cls", "eos"), default=None,
                     help="Override the folder's pooling (plain transformers folders: mean, eos for decoders)")
    return sts


def run_cli(args) -> int:
    """`kdistill eval sts`: evaluate, print, write the result JSON (`--out`)."""

    data = args.data or bundled_path(STSB_DEV)
    pretrained_config(args.model, "--model")  # a missing folder or an unreachable hub id: one line
    embedder = Embedder.from_pretrained(args.model, pooling=args.pooling)
    pairs = load_sts_pairs(data, limit=args.limit, split=args.split, option="--data")
    result = evaluate_sts(lambda texts: embedder.encode(texts, batch_size=args.batch_size), pairs,
                          batch_size=args.batch_size)
    print(f"{args.model} on {args.data or 'the bundled STS-B dev pairs'} ({result.n_pairs} pairs, "
          f"{embedder.pooling} pooling)")
    print(f"spearman: {result.spearman:.2f}")
    print(f"pearson: {result.pearson:.2f}")
    print(f"sentences_per_second: {result.sentences_per_second:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "data": args.data or "bundled:" + STSB_DEV,
                               "pooling": embedder.pooling, **result.to_dict()}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
