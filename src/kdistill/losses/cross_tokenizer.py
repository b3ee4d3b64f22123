"""Losses between a teacher and a student whose tokenizers differ (alignment: `kdistill.data.alignment`).

Every function is pure: tensors in, a float32 tensor out (float64 inputs stay float64), no model code, no I/O. The
conventions are those of `kdistill.losses.divergences`: a bool `mask` over the leading dims drops positions before
any arithmetic; `reduction` is "mean" (sum over counted items / their number, or / `num_items` when given: pass
the GLOBAL count so gradient accumulation and data parallelism do not change the objective), "sum" or "none"
(per item, 0 where masked).

Token-level losses (rows i of both logit tensors predict the same next piece of text, e.g. the positions of
chunks that are one token on each side; V_s != V_t is allowed)
    uld_loss   ULD (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
               Loss for LLMs"): sum_k |sort(P_s)_k - sort(P_t)_k|, both probability vectors sorted in decreasing
               order, the shorter one padded with zeros. Ignores which token is which; symmetric; in [0, 2].
    gold_loss  GOLD (TRL's GOLD trainer, Patiño et al., 2025, "Unlocking On-Policy Distillation for Any Model
               Family"): a kdistill divergence over the vocabulary both tokenizers share (exactly matched token
               pairs) plus ULD over the rest, w_m * D + w_u * ULD.
    Temperature T softens both sides (softmax(logits / T)) and every per-position value is multiplied by T^2, as
    for every kdistill divergence.

Chunk-level loss (ALM, Minixhofer et al., 2025, "Universal Cross-Tokenizer Distillation via Approximate
Likelihood Matching")
    chunk_logprobs  the log-probability of each chunk: the sum of its tokens' log-probs (a chunk is the same text
                    on both sides, so these are two models' likelihoods of the same event);
    alm_loss        a binarised f-divergence between the chunk likelihoods: each chunk is a Bernoulli event
                    (the text continues with this chunk, or not). Needs only the log-probs of the actual tokens,
                    so it works with a live teacher, a cache, a served teacher and on-policy samples.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from kdistill.losses.divergences import (REDUCTIONS, check_temperature, counted_rows, per_row_divergence,
                                         reduce_positions)

__all__ = ["ALM_DIVERGENCES", "alm_loss", "chunk_logprobs", "gold_loss", "uld_loss"]

ALM_DIVERGENCES = ("forward_kl", "reverse_kl")  # the binarised divergences alm_loss offers


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _sorted_l1(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """sum_k |sort(p_s)_k - sort(p_t)_k| per row, (N, a), (N, b) -> (N,); the shorter side is padded with zeros."""
    width = max(p_s.shape[-1], p_t.shape[-1])
    if width == 0:
        return p_s.new_zeros(p_s.shape[0])
    s = F.pad(p_s.sort(dim=-1, descending=True).values, (0, width - p_s.shape[-1]))
    t = F.pad(p_t.sort(dim=-1, descending=True).values, (0, width - p_t.shape[-1]))
    return (s - t).abs().sum(-1)


def uld_loss(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None):
    """Universal Logit Distillation, per position: sum_k |sort(P_s)_k - sort(P_t)_k| * T^2.

    P = softmax(logits / T) on each side, sorted in decreasing order; the shorter vector is padded with zeros, so
    vocabularies of different sizes compare (Boizard et al., 2024: the closed form of the Wasserstein-1 distance
    when every pair of tokens is equally far apart). Symmetric in student and teacher; 0 iff the sorted
    probabilities are equal (a permutation of the teacher's distribution scores 0: the loss ignores token identity).
    Shapes: student (..., V_s), teacher (..., V_t) with the same leading shape; mask, temperature, reduction and
    num_items as in the module docstring. Returns float32 (float64 stays float64).
    """
    check_temperature(temperature)
    _check_reduction(reduction)
    leading = student_logits.shape[:-1]
    s, t, flat = counted_rows(student_logits, teacher_logits, mask)
    dtype = _dtype(s, t)
    p_s = F.softmax(s.to(dtype) / temperature, dim=-1)
    p_t = F.softmax(t.to(dtype) / temperature, dim=-1)
    return reduce_positions(_sorted_l1(p_s, p_t) * temperature ** 2, leading, flat, reduction, num_items)


def _check_pairs(student_ids: torch.Tensor, teacher_ids: torch.Tensor, v_s: int, v_t: int) -> None:
    if student_ids.dim() != 1 or student_ids.shape != teacher_ids.shape:
        raise ValueError(f"student_ids and teacher_ids must be 1-D of the same length, got "
                         f"{tuple(student_ids.shape)} and {tuple(teacher_ids.shape)}")
    for name, ids, vocab in (("student_ids", student_ids, v_s), ("teacher_ids", teacher_ids, v_t)):
        if ids.dtype != torch.long:
            raise ValueError(f"{name} must be a LongTensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{name} must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"{name} repeats an id: each token may be matched once (see matched_vocabulary)")


def gold_loss(student_logits, teacher_logits, student_ids, teacher_ids, divergence="forward_kl", mask=None,
              temperature=1.0, matched_weight=None, unmatched_weight=None, reduction="mean", num_items=None,
              beta=0.5, alpha=0.1):
    """GOLD-style hybrid loss, per position: w_m * D(matched part) + w_u * ULD(unmatched part), times T^2.

    ``student_ids[j]`` and ``teacher_ids[j]`` (1-D LongTensors, no repeats: `kdistill.data.matched_vocabulary`)
    are the same token in the two vocabularies; M = their number.
      matched part    D is the kdistill divergence ``divergence`` (`kdistill.losses.DIVERGENCES`; ``beta`` for
                      jsd, ``alpha`` for the skew KLs; its direction as named, e.g. forward_kl = KL(P_t|M || P_s|M))
                      between the two distributions RESTRICTED to the matched tokens and renormalised:
                      P|M = softmax(logits[ids] / T), the distribution of the next token given that it is one both
                      vocabularies share.
      unmatched part  ULD (:func:`uld_loss`'s sorted L1) between the probabilities that the FULL softmaxes put on
                      the unmatched ids of each side (not renormalised, so it also carries how much mass each side
                      leaves outside the matched vocabulary).
      weights         as GOLD: by default w_m = M / V_t (the teacher vocabulary's matched share; V_t is the
                      width of ``teacher_logits``, so cut padded embedding rows to ``len(tokenizer)`` first) and
                      w_u = 1 - w_m; either can be given (w_u then defaults to 1 - w_m).
    Differences from TRL's GOLD trainer (read, not copied): TRL compares the matched probabilities unrenormalised
    with a generalised JSD on clamped probabilities; here any kdistill divergence is applied to proper
    (renormalised) distributions, which makes the reduction exact: with identical tokenizers (identity pairs over
    every id, so w_m = 1 and nothing is unmatched) the value equals ``DIVERGENCES[divergence]`` bit for bit.
    Shapes: student (..., V_s), teacher (..., V_t), same leading shape; mask, temperature, reduction and num_items
    as in the module docstring. Returns float32 (float64 stays float64).
    """
    check_temperature(temperature)
    _check_reduction(reduction)
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    _check_pairs(student_ids, teacher_ids, v_s, v_t)
    n_matched = student_ids.numel()
    w_m = n_matched / max(v_t, 1) if matched_weight is None else float(matched_weight)
    w_u = 1.0 - w_m if unmatched_weight is None else float(unmatched_weight)
    if w_m < 0 or w_u < 0:
        raise ValueError(f"matched_weight and unmatched_weight must be >= 0, got {w_m} and {w_u}")
    leading = student_logits.shape[:-1]
    s, t, flat = counted_rows(student_logits, teacher_logits, mask)
    dtype = _dtype(s, t)
    s_ids, t_ids = student_ids.to(s.device), teacher_ids.to(t.device)
    per_row = per_row_divergence(divergence, beta=beta, alpha=alpha)
    if n_matched:
        log_ps = F.log_softmax(s[:, s_ids].to(dtype) / temperature, dim=-1)
        log_pt = F.log_softmax(t[:, t_ids].to(dtype) / temperature, dim=-1)
        matched = per_row(log_ps, log_pt) * (temperature ** 2)
    else:
        matched = s.new_zeros(s.shape[0], dtype=dtype)
    values = matched if w_m == 1.0 else w_m * matched
    if n_matched < v_s or n_matched < v_t:
        keep_s = torch.ones(v_s, dtype=torch.bool, device=s.device)
        keep_t = torch.ones(v_t, dtype=torch.bool, device=t.device)
        keep_s[s_ids] = False
        keep_t[t_ids] = False
        p_s = F.softmax(s.to(dtype) / temperature, dim=-1)[:, keep_s]
        p_t = F.softmax(t.to(dtype) / temperature, dim=-1)[:, keep_t]
        values = values + w_u * _sorted_l1(p_s, p_t) * (temperature ** 2)
    return reduce_positions(values, leading, flat, reduction, num_items)


def chunk_logprobs(token_logprobs: torch.Tensor, chunks: Sequence) -> torch.Tensor:
    """Sum per-token log-probs into chunk log-probs: log p(chunk) = sum of its tokens' log p.

    ``token_logprobs``: (T,) or (B, T), entry t the log-prob of token t given the tokens before it (the causal
    shift already applied: `kdistill.models.heads`). ``chunks``: for (T,) a sequence of token index ranges (a
    ``range`` or a (start, stop) pair, stop exclusive; e.g. ``[c.student for c in align_chunks(...)]``), for (B, T)
    one such sequence per row. Returns (C,), the chunks of all rows in order, float32 (float64 stays float64);
    differentiable in ``token_logprobs``. Ranges must be non-empty and inside [0, T).
    """
    if token_logprobs.dim() not in (1, 2):
        raise ValueError(f"token_logprobs must be (T,) or (B, T), got {tuple(token_logprobs.shape)}")
    rows = [chunks] if token_logprobs.dim() == 1 else list(chunks)
    if token_logprobs.dim() == 2 and len(rows) != token_logprobs.shape[0]:
        raise ValueError(f"chunks has {len(rows)} rows, token_logprobs {token_logprobs.shape[0]}")
    width = token_logprobs.shape[-1]
    starts, lengths = [], []
    for b, row in enumerate(rows):
        for r in row:
            start, stop = (r.start, r.stop) if isinstance(r, range) else (int(r[0]), int(r[1]))
            if not 0 <= start < stop <= width:
                raise ValueError(f"chunk ({start}, {stop}) of row {b} is empty or outside [0, {width})")
            starts.append(b * width + start)
            lengths.append(stop - start)
    dtype = _dtype(token_logprobs)
    device = token_logprobs.device
    if not starts:
        return token_logprobs.new_zeros(0, dtype=dtype)
    start_t = torch.tensor(starts, device=device)
    length_t = torch.tensor(lengths, device=device)
    chunk_of = torch.repeat_interleave(torch.arange(len(starts), device=device), length_t)
    first = torch.repeat_interleave(torch.cumsum(length_t, 0) - length_t, length_t)
    index = torch.repeat_interleave(start_t, length_t) + torch.arange(chunk_of.numel(), device=device) - first
    values = token_logprobs.reshape(-1).to(dtype)[index]
    return values.new_zeros(len(starts)).index_add(0, chunk_of, values)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of x = -log 2 (Mächler, 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) from log p, log q < 0: p (log p - log q) + (1-p) (log(1-p) - log(1-q))."""
    p = log_p.exp()
    gap = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))  # p = 0 contributes exactly 0 (no 0 * inf)
    return p * gap + (-torch.expm1(log_p)) * (_log1mexp(log_p) - _log1mexp(log_q))


def alm_loss(student_chunk_logprobs, teacher_chunk_logprobs, mask=None, binarization_temperature=100.0,
             divergence="forward_kl", reduction="mean", num_items=None, eps=1e-6):
    """ALM's chunk-level likelihood matching with a binarised KL, per chunk (Minixhofer et al., 2025).

    Each aligned chunk c is a Bernoulli event, "the text continues with c", with probability
    p = exp(log p(c) / tau) on each side (``binarization_temperature`` tau > 0 flattens small chunk
    probabilities so that unlikely chunks still give a gradient). Per chunk, with p_t the teacher's and p_s the
    student's:
        forward_kl  KL(Bern(p_t) || Bern(p_s)) = p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))
        reverse_kl  KL(Bern(p_s) || Bern(p_t))
    computed in log space (log(1 - p) with expm1/log1p). 0 iff the two chunk log-probs are equal, >= 0.
    Source: the paper's reference implementation (tokenkit, `compute_alm_loss`): its default `binary_ce`
    difference (binary cross-entropy of the student's chunk probability against the teacher's, tau = 100) equals
    forward_kl plus the teacher's binary entropy, a constant for the student, so values differ and gradients are
    the same; `reverse_binary_kl` is reverse_kl. As there, log-probs are first clamped at 0 and shifted by -eps
    (scaled log p - eps, so a chunk of probability 1 keeps a finite log(1 - p)). The value scales roughly as 1/tau
    for a fixed log-prob gap; tokenkit weighs each chunk equally (mean over chunks), as "mean" does here.
    With identical tokenizers every chunk is one token, and this is exact per-token log-likelihood matching.
    Shapes: (C,) or any shape, the same on both sides; mask (same shape, True counts); reduction and
    num_items (the global number of chunks) as in the module docstring. Returns float32 (float64 stays float64).
    """
    if not binarization_temperature > 0:
        raise ValueError(f"binarization_temperature must be > 0, got {binarization_temperature}")
    if divergence not in ALM_DIVERGENCES:
        raise ValueError(f"divergence must be one of {ALM_DIVERGENCES}, got {divergence!r}")
    _check_reduction(reduction)
    s, t = student_chunk_logprobs, teacher_chunk_logprobs
    if s.shape != t.shape:
        raise ValueError(f"student and teacher chunk log-probs must have the same shape, got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    leading = s.shape
    s, t, flat = s.reshape(-1), t.reshape(-1), None
    if mask is not None:
        if mask.shape != leading:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the chunk log-probs' shape {tuple(leading)}")
        flat = mask.reshape(-1).to(torch.bool)
        s, t = s[flat], t[flat]
    dtype = _dtype(s, t)
    log_s = s.to(dtype).clamp(max=0.0) / binarization_temperature - eps
    log_t = t.to(dtype).clamp(max=0.0) / binarization_temperature - eps
    values = _binary_kl(log_t, log_s) if divergence == "forward_kl" else _binary_kl(log_s, log_t)
    return reduce_positions(values, leading, flat, reduction, num_items)
