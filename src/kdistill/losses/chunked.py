"""Memory-efficient losses computed from hidden states and lm_head weights, in chunks of positions.

The dense path, e.g. ``DIVERGENCES[name](h_s @ W_s.T, h_t @ W_t.T, mask, ...)``, materialises (N, V) logit
tensors and autograd keeps several more (N, V) intermediates alive until backward. For V ~ 150k that is
gigabytes per thousand tokens. The three entry points below return the same value and the same student gradients
as their dense counterparts but never hold more than a (chunk_size, V) block of logits at a time:

* :func:`chunked_distillation_loss`: KD divergence against a *dense* teacher given by its hidden states and
  lm_head (``DIVERGENCES[divergence]`` on both projected logits);
* :func:`chunked_topk_distillation_loss`: KD divergence against a *sparse* top-k teacher
  (:class:`kdistill.losses.topk.TopKTeacher`, ``topk_divergence`` on the student's projected logits);
* :func:`chunked_cross_entropy`: next-token cross-entropy against integer targets (``F.cross_entropy``).

All three share one engine (:class:`kdistill.losses.chunked_engine.ChunkedLoss`):

* the counted positions (``mask``) are selected first and flattened to (N, H);
* the N rows are processed ``chunk_size`` at a time (``"auto"``, the default: as many as fit a fixed working-set
  budget, :func:`auto_chunk_size`): the student lm_head projects the chunk to logits and a
  per-chunk callable ``chunk_loss(start, stop, logits_s_chunk)`` returns the chunk's *summed* loss. That callable
  applies the *same* dense function as the reference (the divergence of :mod:`kdistill.losses.divergences`,
  ``topk_divergence`` or ``F.cross_entropy``, each with ``reduction="sum"`` and no mask), so temperature, the T^2
  factor and the per-row formulas are shared, not re-derived. Teacher data / targets are captured in the
  closure, detached and already restricted to the counted rows. The gradient with respect to the chunk's logits
  is taken right away with ``torch.autograd.grad``;
* that (chunk, V) logit gradient is folded immediately into grad_hidden[chunk] = g @ W_s and
  grad_W_s += g.T @ h_chunk (grad_b_s += g.sum(0)), then dropped;
* a custom ``torch.autograd.Function`` stores only grad_hidden (N, H), grad_weight (V, H) and grad_bias (V,);
  its backward scales them by ``grad_output`` in place and hands them to autograd (no second (V, H) buffer), so
  it runs once: a second backward through the same loss (``retain_graph=True``) is an error. Gradients are
  therefore computed during the forward pass (there is no recomputation in backward); a forward under
  ``torch.no_grad()`` or with no input requiring grad skips them.

Conventions and limits
    * Teacher inputs (hidden states, weight, bias, top-k data) are detached: they never receive a gradient.
    * Computation and accumulation are in float32 whatever the input dtype (float64 student hidden states stay
      float64); the loss is returned in that dtype and the gradients are cast back to each input's dtype. A
      low-precision student weight is upcast once, i.e. one (V, H) float32 copy is made. Teacher data (logits,
      top-k log-probabilities) are cast to the same compute dtype.
    * ``reduction`` is "mean" (default; divided by the number of counted positions, or by ``num_items`` when
      given) or "sum". "none" is not supported (raises ``NotImplementedError``): use the dense path for
      per-position values.
    * ``vocab_size``: only the first ``vocab_size`` rows of the lm_heads (and biases) are used, for padded
      vocabularies; student weight rows past ``vocab_size`` get a zero gradient. Token ids (top-k ids, targets)
      must be < ``vocab_size``.
    * ``metrics``: optional dict. When given, the function stores (overwriting) a 0-dim float tensor COUNT
      (not a fraction; normalise by your global count of counted rows): ``metrics["top1_agreement"]`` for the two
      distillation losses (number of counted rows where the student's argmax over the first ``vocab_size``
      logits equals the teacher's argmax; for a top-k teacher, the id with the largest stored log-probability),
      ``metrics["accuracy"]`` for the cross-entropy (number of counted rows where the argmax equals the target).
      They are computed without grad inside the chunk loop, from the same logits (no extra projection pass).
    * Logit soft-capping / scaling (e.g. Gemma's ``final_logit_softcapping``) is not supported: callers must not
      use these functions for models whose logits are not exactly ``hidden @ W.T + b``
      (``chunked_distillation_loss`` raises ``NotImplementedError`` when ``logit_softcap`` is passed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.chunked_engine import ChunkedLoss, compute_dtype, denominator, need_grads, select_rows
from kdistill.losses.divergences import DIVERGENCE_PARAMS, DIVERGENCES, check_temperature
from kdistill.losses.topk import TopKTeacher, topk_divergence

__all__ = ["chunked_distillation_loss", "chunked_topk_distillation_loss", "chunked_cross_entropy",
           "auto_chunk_size", "resolve_chunk_size", "CHUNK_BUDGET_BYTES", "WORKING_SET"]

CHUNK_BUDGET_BYTES = 1 << 30
"""What one chunk's working set may take when ``chunk_size="auto"``: 1 GiB, whatever N."""

WORKING_SET = {"distillation": 10, "topk": 8, "cross_entropy": 2, "projection": 3}
"""(rows, V) compute-dtype tensors alive at once inside one chunk, per entry point, rounded up from measurements
(float32, V = 151,936, forward + backward): dense teacher 5.3 (forward/reverse KL), 4.1 (tvd), 9.6 (jsd); top-k
teacher 3.3 (forward KL); cross-entropy 1.1. ``projection`` is a teacher's no-grad projection + log-softmax + top-k
(``kdistill cache``)."""


def auto_chunk_size(vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                    kind: str = "distillation", budget_bytes: int | None = None) -> int:
    """Rows per chunk such that one chunk's working set stays within ``budget_bytes`` (default
    ``CHUNK_BUDGET_BYTES``, read at call time).

    A row costs ``WORKING_SET[kind]`` vocabulary-wide values plus two hidden-wide ones (its hidden state and its
    hidden gradient; ``hidden_size`` is the sum of the student's and the teacher's widths when both project) in the
    compute dtype (float32, or float64 for float64 inputs). Above 64 rows the count is rounded down to a multiple
    of 8. At V = 151,936, H = 896 + 1,536, float32: 176 rows for a dense teacher, 1,584 at V = 16,384.
    """
    if kind not in WORKING_SET:
        raise ValueError(f"unknown chunk kind {kind!r}; valid: {', '.join(WORKING_SET)}")
    itemsize = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    per_row = itemsize * (WORKING_SET[kind] * int(vocab_size) + 2 * int(hidden_size))
    rows = int(CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes) // per_row
    if rows > 64:
        rows -= rows % 8
    return max(1, rows)


def resolve_chunk_size(chunk_size, vocab_size: int, hidden_size: int, dtype: torch.dtype, kind: str) -> int:
    """An explicit ``chunk_size`` (int >= 1) as given; ``"auto"`` -> :func:`auto_chunk_size`."""
    if chunk_size == "auto":
        return auto_chunk_size(vocab_size, hidden_size, dtype, kind)
    return int(chunk_size)


def _check_inputs(student_hidden, student_w, teacher_hidden, teacher_w, mask, student_b, teacher_b, vocab_size):
    if student_w.dim() != 2 or teacher_w.dim() != 2:
        raise ValueError("lm_head weights must be 2-D (V, H)")
    v_s, h_s = student_w.shape
    v_t, h_t = teacher_w.shape
    if student_hidden.shape[-1] != h_s:
        raise ValueError(f"student hidden size {student_hidden.shape[-1]} does not match the student lm_head "
                         f"weight {tuple(student_w.shape)}")
    if teacher_hidden.shape[-1] != h_t:
        raise ValueError(f"teacher hidden size {teacher_hidden.shape[-1]} does not match the teacher lm_head "
                         f"weight {tuple(teacher_w.shape)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student and teacher hidden states must share their leading (position) shape, got "
                         f"{tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}")
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape "
                         f"{tuple(student_hidden.shape[:-1])}")
    for name, b, v in (("student", student_b, v_s), ("teacher", teacher_b, v_t)):
        if b is not None and b.shape != (v,):
            raise ValueError(f"{name} lm_head bias must have shape ({v},), got {tuple(b.shape)}")
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(f"student and teacher vocabularies differ ({v_s} vs {v_t}); pass vocab_size (the "
                             f"number of leading rows both lm_heads share, e.g. for padded vocabularies)")
        vocab_size = v_s
    if not 0 < vocab_size <= min(v_s, v_t):
        raise ValueError(f"vocab_size must be in [1, min(V_s, V_t) = {min(v_s, v_t)}], got {vocab_size}")
    return int(vocab_size)


def _check_student(student_hidden, student_w, student_b, mask, vocab_size):
    """Shape checks for the student-only entry points; returns vocab_size (default: W.shape[0])."""
    if student_w.dim() != 2:
        raise ValueError("lm_head weight must be 2-D (V, H)")
    v_s, h_s = student_w.shape
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != h_s:
        raise ValueError(f"student hidden size {student_hidden.shape[-1] if student_hidden.dim() else None} does "
                         f"not match the student lm_head weight {tuple(student_w.shape)}")
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape "
                         f"{tuple(student_hidden.shape[:-1])}")
    if student_b is not None and student_b.shape != (v_s,):
        raise ValueError(f"student lm_head bias must have shape ({v_s},), got {tuple(student_b.shape)}")
    if vocab_size is None:
        vocab_size = v_s
    if not 0 < vocab_size <= v_s:
        raise ValueError(f"vocab_size must be in [1, V_s = {v_s}], got {vocab_size}")
    return int(vocab_size)


def _check_common(reduction, chunk_size, name):
    if reduction == "none":
        raise NotImplementedError(f"reduction='none' is not supported by {name}; use 'mean' or 'sum', or the "
                                  f"dense function for per-position values")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or 'auto', got {chunk_size!r}")


def _run(h_s, w_s, b_s, vocab_size, chunk_loss, chunk_size, reduction, num_items, kind, teacher_width=0):
    denom = denominator(reduction, num_items, h_s.shape[0])
    need = need_grads(h_s, w_s, b_s)
    rows = resolve_chunk_size(chunk_size, vocab_size, h_s.shape[1] + teacher_width, h_s.dtype, kind)
    return ChunkedLoss.apply(h_s, w_s, b_s, vocab_size, chunk_loss, rows, denom, need)


def chunked_distillation_loss(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                              mask=None, divergence="forward_kl", temperature=1.0, chunk_size="auto",
                              reduction="mean", num_items=None, student_lm_head_bias=None,
                              teacher_lm_head_bias=None, vocab_size=None, logit_softcap=None, metrics=None,
                              **divergence_kwargs):
    """KD divergence between the lm_head distributions of student and teacher, without (N, V) tensors.

    Equal (value and student gradients) to::

        DIVERGENCES[divergence](student_hidden @ W_s[:V].T (+ b_s[:V]), teacher_hidden @ W_t[:V].T (+ b_t[:V]),
                                mask, temperature, reduction, num_items, **divergence_kwargs)

    student_hidden (..., H_s), teacher_hidden (..., H_t) with the same leading shape; weights (V_s, H_s) and
    (V_t, H_t) as ``model.get_output_embeddings().weight``; mask: bool of the leading shape (True counts);
    ``divergence``: a key of ``DIVERGENCES`` (extra keyword arguments as in ``DIVERGENCE_PARAMS``, e.g.
    ``beta`` for jsd, ``alpha`` for the skew KLs). ``vocab_size``: default the common size when V_s == V_t; when
    they differ it must be given (``ValueError`` otherwise) and be <= min(V_s, V_t). ``metrics``: optional dict,
    receives ``"top1_agreement"`` (a count, see the module docstring). ``chunk_size``: rows per chunk, or
    ``"auto"`` (:func:`auto_chunk_size`: the chunk's working set within ``CHUNK_BUDGET_BYTES``). Peak extra memory
    is O(chunk_size * V) plus (N, H) + (V, H) gradients, handed to autograd without a copy. Teacher inputs are
    detached. See the module docstring for dtype, reduction ("none" unsupported) and soft-capping rules.
    """
    if logit_softcap is not None:
        raise NotImplementedError("logit soft-capping is not supported by chunked_distillation_loss; use the "
                                  "dense divergence on the model's (capped) logits")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCES)}")
    unknown = set(divergence_kwargs) - set(DIVERGENCE_PARAMS[divergence])
    if unknown:
        raise TypeError(f"{divergence} takes no argument(s) {sorted(unknown)}; "
                        f"accepted: {DIVERGENCE_PARAMS[divergence]}")
    _check_common(reduction, chunk_size, "chunked_distillation_loss")
    check_temperature(temperature)
    # Validate the divergence's own parameters even when no position is counted.
    DIVERGENCES[divergence](torch.zeros(1, 1), torch.zeros(1, 1), None, temperature, "sum", None,
                            **divergence_kwargs)
    vocab_size = _check_inputs(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                               mask, student_lm_head_bias, teacher_lm_head_bias, vocab_size)

    flat = None if mask is None else mask.reshape(-1).to(device=student_hidden.device, dtype=torch.bool)
    h_s = select_rows(student_hidden, flat)
    h_t = select_rows(teacher_hidden.detach(), None if flat is None else flat.to(teacher_hidden.device))
    dtype = compute_dtype(h_s)
    wt = teacher_lm_head_weight.detach()[:vocab_size].to(dtype)
    bt = None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach()[:vocab_size].to(dtype)
    fn = DIVERGENCES[divergence]
    temperature = float(temperature)
    agree = torch.zeros((), dtype=dtype, device=h_s.device)

    def chunk_loss(start, stop, logits_s):
        logits_t = h_t[start:stop].to(dtype) @ wt.T
        if bt is not None:
            logits_t = logits_t + bt
        if metrics is not None:
            with torch.no_grad():
                agree.add_((logits_s.detach().argmax(-1) == logits_t.argmax(-1)).sum().to(dtype))
        return fn(logits_s, logits_t, None, temperature, "sum", None, **divergence_kwargs)

    loss = _run(h_s, student_lm_head_weight, student_lm_head_bias, vocab_size, chunk_loss, chunk_size, reduction,
                num_items, "distillation", teacher_width=h_t.shape[1])
    if metrics is not None:
        metrics["top1_agreement"] = agree
    return loss


def chunked_topk_distillation_loss(student_hidden, student_lm_head_weight, teacher: TopKTeacher, mask=None,
                                   divergence="forward_kl", temperature=1.0, missing="bucket", chunk_size="auto",
                                   reduction="mean", num_items=None, student_lm_head_bias=None, vocab_size=None,
                                   metrics=None, **divergence_kwargs):
    """KD divergence against a sparse top-k teacher, from the student's hidden states, without (N, V) tensors.

    Equal (value and student gradients for hidden, weight and bias) to::

        topk_divergence(student_hidden @ W[:V].T (+ b[:V]), teacher, divergence, mask, temperature, missing,
                        reduction, num_items, **divergence_kwargs)

    ``topk_divergence`` itself is applied to each chunk (``reduction="sum"``, no mask), so the ``missing`` modes
    ("bucket" / "renormalize") and the re-tempering rule are exactly those of :mod:`kdistill.losses.topk`.

    Teacher layout — two forms are accepted:
        * full: ``teacher.indices`` / ``teacher.logprobs`` of shape (*leading, k) where ``leading`` is
          ``student_hidden.shape[:-1]``; ``mask`` (if any) selects the counted rows from both;
        * pre-selected: shape (N, k) where N is the number of counted rows (``mask.sum()``, or the number of
          positions when ``mask`` is None), holding the counted rows in the row-major order of ``mask``. This
          form is used when ``teacher.indices.shape[:-1] != leading`` (when the two coincide, e.g. an all-True
          mask over 1-D positions, both readings are the same).
    ``vocab_size`` defaults to ``W.shape[0]``; the teacher ids (of counted rows) must lie in [0, vocab_size) and
    k <= vocab_size. ``metrics``: optional dict, receives ``"top1_agreement"``: the number of counted rows where
    the student's argmax equals the teacher id with the largest stored log-probability. The teacher is detached
    and its log-probabilities are cast to the compute dtype (float32, or float64 for float64 hidden states).
    """
    _check_common(reduction, chunk_size, "chunked_topk_distillation_loss")
    capture = float(teacher.capture_temperature)
    # Validate divergence name / parameters, missing mode, temperatures (incl. bucket re-tempering) up front,
    # with topk_divergence's own messages, even when no row is counted.
    topk_divergence(torch.zeros(1, 1), TopKTeacher(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), capture),
                    divergence, None, temperature, missing, "sum", None, **divergence_kwargs)
    vocab_size = _check_student(student_hidden, student_lm_head_weight, student_lm_head_bias, mask, vocab_size)

    indices, logprobs = teacher.indices, teacher.logprobs
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} differ")
    if indices.dim() < 1:
        raise ValueError("teacher indices must have a trailing k dimension")
    k = indices.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"teacher k must be in [1, {vocab_size}] (vocab_size), got {k}")
    leading = student_hidden.shape[:-1]
    flat = None if mask is None else mask.reshape(-1).to(device=student_hidden.device, dtype=torch.bool)
    h_s = select_rows(student_hidden, flat)
    n = h_s.shape[0]
    device = h_s.device
    idx = indices.detach().reshape(-1, k).to(device=device, dtype=torch.long)
    lp = logprobs.detach().reshape(-1, k).to(device)
    if indices.shape[:-1] == leading:
        if flat is not None:
            idx, lp = idx[flat], lp[flat]
    elif indices.dim() != 2 or indices.shape[0] != n:
        raise ValueError(f"teacher leading shape {tuple(indices.shape[:-1])} must equal the student hidden states' "
                         f"{tuple(leading)} or be ({n},): the counted rows already selected by the mask")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ValueError(f"teacher indices must lie in [0, {vocab_size}) (vocab_size)")

    dtype = compute_dtype(h_s)
    lp = lp.to(dtype)
    temperature = float(temperature)
    agree = torch.zeros((), dtype=dtype, device=device)
    teacher_top1 = idx.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1) if metrics is not None else None

    def chunk_loss(start, stop, logits_s):
        if metrics is not None:
            with torch.no_grad():
                agree.add_((logits_s.detach().argmax(-1) == teacher_top1[start:stop]).sum().to(dtype))
        chunk_teacher = TopKTeacher(idx[start:stop], lp[start:stop], capture)
        return topk_divergence(logits_s, chunk_teacher, divergence, None, temperature, missing, "sum", None,
                               **divergence_kwargs)

    loss = _run(h_s, student_lm_head_weight, student_lm_head_bias, vocab_size, chunk_loss, chunk_size, reduction,
                num_items, "topk")
    if metrics is not None:
        metrics["top1_agreement"] = agree
    return loss


def chunked_cross_entropy(student_hidden, student_lm_head_weight, targets, mask=None, chunk_size="auto",
                          reduction="mean", num_items=None, student_lm_head_bias=None, vocab_size=None,
                          ignore_index=-100, metrics=None, row_weights=None):
    """Cross-entropy of the student's lm_head distribution against integer targets, without (N, V) tensors.

    Equal (value and gradients for hidden, weight and bias) to::

        logits = student_hidden @ W[:V].T (+ b[:V])
        F.cross_entropy(logits[counted], targets[counted], reduction="sum") / denom

    where counted = ``mask & (targets != ignore_index)`` (``mask`` defaults to all True), and denom is the number
    of counted rows, or ``num_items`` when given ("sum": no division). ``targets``: integer tensor of the hidden
    states' leading shape; counted targets must lie in [0, vocab_size) (``ValueError`` otherwise).
    ``vocab_size`` defaults to ``W.shape[0]``. ``metrics``: optional dict, receives ``"accuracy"``: the number of
    counted rows whose argmax equals the target (a count, see the module docstring). ``row_weights``: optional
    constants of the hidden states' leading shape; each counted row's cross-entropy is multiplied by its weight
    (the sampled-token policy gradient of :mod:`kdistill.losses.policy` weighs rows by their advantage).
    """
    _check_common(reduction, chunk_size, "chunked_cross_entropy")
    vocab_size = _check_student(student_hidden, student_lm_head_weight, student_lm_head_bias, mask, vocab_size)
    leading = student_hidden.shape[:-1]
    if targets.shape != leading:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the hidden states' leading shape "
                         f"{tuple(leading)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    device = student_hidden.device
    tgt = targets.detach().reshape(-1).to(device=device, dtype=torch.long)
    counted = tgt != ignore_index
    if mask is not None:
        counted = counted & mask.reshape(-1).to(device=device, dtype=torch.bool)
    h_s = select_rows(student_hidden, counted)
    tgt = tgt[counted]
    weights = None
    if row_weights is not None:
        if row_weights.shape != leading:
            raise ValueError(f"row_weights shape {tuple(row_weights.shape)} must equal the hidden states' leading "
                             f"shape {tuple(leading)}")
        weights = row_weights.detach().reshape(-1).to(device)[counted]
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= vocab_size):
        raise ValueError(f"targets of counted positions must lie in [0, {vocab_size}) (vocab_size)")

    dtype = compute_dtype(h_s)
    correct = torch.zeros((), dtype=dtype, device=device)

    def chunk_loss(start, stop, logits_s):
        t = tgt[start:stop]
        if metrics is not None:
            with torch.no_grad():
                correct.add_((logits_s.detach().argmax(-1) == t).sum().to(dtype))
        if weights is None:
            return F.cross_entropy(logits_s, t, reduction="sum")
        return (F.cross_entropy(logits_s, t, reduction="none") * weights[start:stop].to(logits_s.dtype)).sum()

    loss = _run(h_s, student_lm_head_weight, student_lm_head_bias, vocab_size, chunk_loss, chunk_size, reduction,
                num_items, "cross_entropy")
    if metrics is not None:
        metrics["accuracy"] = correct
    return loss
