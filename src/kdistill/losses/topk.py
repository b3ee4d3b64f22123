"""Divergences against a sparse (top-k) teacher: only the teacher's k most likely tokens are stored.

Storing a teacher's full (..., V) distribution offline is expensive; storing its k most likely token ids and their
log-probabilities is not. This module applies the six divergences of `kdistill.losses.divergences` to such a
teacher, with the same conventions (mask over the leading dims, temperature T with both distributions softened and
the per-position value multiplied by T^2, reduction "mean"/"sum"/"none", `num_items`), reusing the same per-row
functions on log-probabilities, so that with k = V the values and gradients equal the dense path.

    teacher = topk_from_logits(teacher_logits, k=32, temperature=2.0)       # capture once (offline)
    loss = topk_divergence(student_logits, teacher, "forward_kl", mask=mask, temperature=2.0)

How the mass outside the k ids is handled (`missing`)
    "bucket" (default): both distributions get k + 1 outcomes: the k ids and one extra "everything else" bucket.
        Teacher: its stored probabilities of the k ids plus the bucket 1 - sum_k p_t, computed in log space as
        log1p(-exp(logsumexp(log p_k))) and clamped at 0 (a remainder below k * eps of the dtype, i.e. float
        rounding of a teacher that put all its mass on the k ids, is treated as exactly 0).
        Student: its probabilities of the k ids under the FULL softmax(student_logits / T) over V, plus the bucket
        logsumexp(student logits / T over the ids not in the top k) - logsumexp(all / T), i.e. a masked logsumexp
        over V; it never forms 1 - sum in probability space, so it stays exact when the remainder underflows.
        The student is thus also pushed to keep its mass off tokens outside the teacher's top k, as in the dense
        loss, without knowing how the teacher spreads the remainder.
    "renormalize": both distributions are restricted to the k ids and renormalised to sum 1: teacher
        log_softmax over its k stored log-probabilities, student log_softmax over its k gathered logits / T.
        The student's mass outside the k ids is then ignored.

Temperatures (re-tempering rule)
    A `TopKTeacher` records `capture_temperature` T_c, the temperature its log-probabilities were computed at.
    If the loss temperature T equals T_c, the stored values are used as they are.
    If T != T_c, the stored log-probabilities are re-tempered: log p_T = log_softmax_k(log p_c * T_c / T).
    Since log p_c = l / T_c - logZ_c for the teacher's logits l, log p_c * T_c / T = l / T - const, so this is
    EXACTLY the top-k part of softmax(l / T) renormalised over the k ids (no approximation). The mass outside the
    k ids at the new temperature is, however, unknown (it depends on the logits that were not stored), so
    re-tempering is only allowed with missing="renormalize"; missing="bucket" with T != T_c raises ValueError.
    Capture the teacher at the temperature you train at to use the bucket.

Token ids in `indices` are expected to be distinct within a position (as `torch.topk` produces them).
Computation is float32 (float64 inputs stay float64); the result has that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kdistill.losses.divergences import (
    DIVERGENCE_PARAMS,
    REDUCTIONS,
    check_temperature,
    per_row_divergence,
    reduce_positions,
)

__all__ = ["TopKTeacher", "topk_from_logits", "topk_divergence", "MISSING_MODES"]

MISSING_MODES = ("bucket", "renormalize")


@dataclass
class TopKTeacher:
    """A sparse teacher: per position, its k most likely token ids and their log-probabilities.

    indices : (..., k) long, vocabulary ids (distinct within a position).
    logprobs : (..., k) float, log P_teacher(id) under softmax(teacher_logits / capture_temperature) over the
        full vocabulary (so they sum to <= 1 in probability space; the remainder is the mass outside the k ids).
    capture_temperature : the temperature those log-probabilities were computed at.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    capture_temperature: float = 1.0


def topk_from_logits(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """Keep the k most likely tokens of softmax(teacher_logits / temperature), (..., V) -> TopKTeacher (..., k).

    The result is detached (a teacher carries no gradient) and at least float32.
    """
    check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    with torch.no_grad():
        logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        values, indices = logp.topk(k, dim=-1)
    return TopKTeacher(indices=indices, logprobs=values, capture_temperature=float(temperature))


def _per_row(divergence: str, kwargs: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-row function of (log P_s, log P_t), (N, K) -> (N,), identical to the dense divergence's."""
    if divergence not in DIVERGENCE_PARAMS:
        raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCE_PARAMS)}")
    allowed = DIVERGENCE_PARAMS[divergence]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"divergence {divergence!r} takes no parameter(s) {unknown}; it takes {list(allowed)}")
    return per_row_divergence(divergence, **{k: float(v) for k, v in kwargs.items()})


def _teacher_bucket(log_pk: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(log_pk)) per row, clamped at 0 mass; (N, k) -> (N, 1)."""
    k = log_pk.shape[-1]
    lse = torch.logsumexp(log_pk, dim=-1, keepdim=True)
    tol = k * torch.finfo(log_pk.dtype).eps
    # remainder 1 - exp(lse) = -expm1(lse); below the rounding tolerance it is exactly 0
    rest = -torch.expm1(lse.clamp(max=0.0))
    log_rest = torch.log1p(-torch.exp(lse.clamp(max=0.0)))
    return torch.where(rest > tol, log_rest, torch.full_like(log_rest, float("-inf")))


def _student_bucket(scaled: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs of the k ids under the full softmax and of the rest; (N, V), (N, k) -> (N, k), (N, 1)."""
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_pk = scaled.gather(-1, idx) - log_z
    in_topk = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, idx, True)
    # a finite fill (not -inf) keeps logsumexp's gradient finite when every id is in the top k (k = V)
    rest_logits = scaled.masked_fill(in_topk, torch.finfo(scaled.dtype).min)
    log_rest = torch.logsumexp(rest_logits, dim=-1, keepdim=True) - log_z
    return log_pk, log_rest


def topk_divergence(student_logits: torch.Tensor, teacher: TopKTeacher, divergence: str = "forward_kl",
                    mask: torch.Tensor | None = None, temperature: float = 1.0, missing: str = "bucket",
                    reduction: str = "mean", num_items: int | torch.Tensor | None = None,
                    **divergence_kwargs) -> torch.Tensor:
    """A divergence between the student's (..., V) logits and a top-k teacher (..., k); see the module docstring.

    divergence : one of the six names of `kdistill.losses.DIVERGENCES`; its parameters (beta, alpha) go in
        `divergence_kwargs`. missing : "bucket" or "renormalize". mask, temperature, reduction and num_items as
        in the dense divergences.
    """
    check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
    per_row = _per_row(divergence, divergence_kwargs)
    capture = float(teacher.capture_temperature)
    check_temperature(capture)
    retemper = float(temperature) != capture
    if retemper and missing == "bucket":
        raise ValueError(
            f"missing='bucket' needs the loss temperature ({temperature}) to equal the teacher's capture "
            f"temperature ({capture}): the mass outside the top k at another temperature is unknown. Capture the "
            f"teacher at the training temperature, or use missing='renormalize' (exact re-tempering over the k ids)")

    indices, logprobs = teacher.indices, teacher.logprobs
    vocab = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} differ")
    if indices.shape[:-1] != leading:
        raise ValueError(f"teacher leading shape {tuple(indices.shape[:-1])} must equal the student logits' "
                         f"{tuple(leading)}")
    k = indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher k must be in [1, {vocab}] (the student's vocabulary size), got {k}")

    s = student_logits.reshape(-1, vocab)
    idx = indices.reshape(-1, k).to(device=s.device, dtype=torch.long)
    lp = logprobs.reshape(-1, k).to(s.device)
    flat = None
    if mask is not None:
        if mask.shape != leading:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(leading)}")
        flat = mask.reshape(-1).to(device=s.device, dtype=torch.bool)
        s, idx, lp = s[flat], idx[flat], lp[flat]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
        raise ValueError(f"teacher indices must lie in [0, {vocab})")

    dtype = torch.promote_types(torch.promote_types(s.dtype, lp.dtype), torch.float32)
    scaled = s.to(dtype) / temperature
    lp = lp.to(dtype)

    if missing == "renormalize":
        log_pt = F.log_softmax(lp * (capture / temperature) if retemper else lp, dim=-1)
        log_ps = F.log_softmax(scaled.gather(-1, idx), dim=-1)
    elif k == vocab:  # the k ids cover the vocabulary: the bucket is empty on both sides by construction
        log_pt = lp
        log_ps = F.log_softmax(scaled, dim=-1).gather(-1, idx)
    else:
        log_pt = torch.cat([lp, _teacher_bucket(lp)], dim=-1)
        log_pk, log_rest = _student_bucket(scaled, idx)
        log_ps = torch.cat([log_pk, log_rest], dim=-1)

    values = per_row(log_ps, log_pt) * (temperature ** 2)
    return reduce_positions(values, leading, flat, reduction, num_items)
