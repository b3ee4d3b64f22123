"""Evaluation of distilled models (semantic textual similarity for embedding models)."""

from .sts import STSResult, cosine_scores, evaluate_sts, load_sts_pairs, sts_correlations

__all__ = ["STSResult", "cosine_scores", "evaluate_sts", "load_sts_pairs", "sts_correlations"]
