"""Memory-efficient KD loss computed from hidden states and lm_head weights, in chunks of positions.

The dense path, ``DIVERGENCES[name](h_s @ W_s.T, h_t @ W_t.T, mask, ...)``, materialises two (N, V) logit
tensors and autograd keeps several more (N, V) intermediates alive until backward. For V ~ 150k that is
gigabytes per thousand tokens. ``chunked_distillation_loss`` returns the same value and the same gradients but
never holds more than a (chunk_size, V) block of logits at a time:

* the counted positions (``mask``) are selected first and flattened to (N, H);
* the N rows are processed ``chunk_size`` at a time: both lm_heads project the chunk to logits, the chunk's
  divergence sum is computed by the *same* dense divergence function of :mod:`kdistill.losses.divergences`
  (called with ``mask=None, reduction="sum"``, so temperature, the T^2 factor and the per-row formulas are
  shared, not re-derived), and the gradient with respect to the chunk's logits is taken right away with
  ``torch.autograd.grad``;
* that (chunk, V) logit gradient is folded immediately into grad_hidden[chunk] = g @ W_s and
  grad_W_s += g.T @ h_chunk (grad_b_s += g.sum(0)), then dropped;
* a custom ``torch.autograd.Function`` stores only grad_hidden (N, H), grad_weight (V, H) and grad_bias (V,);
  its backward scales them by ``grad_output``. Gradients are therefore computed during the forward pass (there
  is no recomputation in backward); a forward under ``torch.no_grad()`` or with no input requiring grad skips
  them.

Conventions and limits
    * Teacher inputs (hidden states, weight, bias) are detached: they never receive a gradient.
    * Computation and accumulation are in float32 whatever the input dtype (float64 inputs stay float64); the
      loss is returned in that dtype and the gradients are cast back to each input's dtype. A low-precision
      student weight is upcast once, i.e. one (V, H) float32 copy is made.
    * ``reduction`` is "mean" (default; divided by the number of counted positions, or by ``num_items`` when
      given) or "sum". "none" is not supported (raises ``NotImplementedError``): use the dense path for
      per-position values.
    * ``vocab_size``: only the first ``vocab_size`` rows of both lm_heads (and biases) are compared, for padded
      vocabularies. Default: the common size when V_s == V_t; when they differ, ``vocab_size`` must be given
      (``ValueError`` otherwise; it must then be <= min(V_s, V_t)). Student weight rows past ``vocab_size`` get
      a zero gradient.
    * Logit soft-capping / scaling (e.g. Gemma's ``final_logit_softcapping``) is not supported: passing
      ``logit_softcap`` raises ``NotImplementedError``; callers must not use this function for models whose
      logits are not exactly ``hidden @ W.T + b``.
"""

from __future__ import annotations

import torch

from kdistill.losses.divergences import DIVERGENCE_PARAMS, DIVERGENCES, _check_temperature

__all__ = ["chunked_distillation_loss"]


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


class _ChunkedKD(torch.autograd.Function):
    """Loss forward that also computes the student gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, vocab_size, fn, temperature, chunk_size, denom, need_grads,
                kwargs):
        # h_s (N, H_s), h_t (N, H_t): counted rows only. w_*: full (V_*, H_*) weights; b_*: (V_*,) or None.
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        n = h_s.shape[0]
        ws = w_s[:vocab_size].to(dtype)
        wt = w_t[:vocab_size].to(dtype)
        bs = None if b_s is None else b_s[:vocab_size].to(dtype)
        bt = None if b_t is None else b_t[:vocab_size].to(dtype)
        grad_h_on, grad_w_on, grad_b_on = need_grads
        any_grad = grad_h_on or grad_w_on or grad_b_on
        grad_h = torch.zeros(n, h_s.shape[1], dtype=dtype, device=h_s.device) if grad_h_on else None
        grad_w = torch.zeros_like(ws) if grad_w_on else None
        grad_b = torch.zeros_like(bs) if grad_b_on else None
        total = torch.zeros((), dtype=dtype, device=h_s.device)
        scale = 1.0 / denom
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            hs = h_s[start:stop].to(dtype)
            logits_s = hs @ ws.T
            if bs is not None:
                logits_s = logits_s + bs
            logits_t = h_t[start:stop].to(dtype) @ wt.T
            if bt is not None:
                logits_t = logits_t + bt
            if not any_grad:
                total += fn(logits_s, logits_t, None, temperature, "sum", None, **kwargs)
                continue
            with torch.enable_grad():
                logits_s.requires_grad_(True)
                loss = fn(logits_s, logits_t, None, temperature, "sum", None, **kwargs)
                (g,) = torch.autograd.grad(loss, logits_s)
            total += loss.detach()
            del logits_s, logits_t, loss
            g.mul_(scale)  # fold the mean's 1/denominator in here: no extra (V, H) pass later
            if grad_h_on:
                torch.matmul(g, ws, out=grad_h[start:stop])
            if grad_w_on:
                grad_w.addmm_(g.T, hs)
            if grad_b_on:
                grad_b += g.sum(0)
            del g
        total = total * scale
        ctx.shapes = (h_s.dtype, w_s.shape, w_s.dtype, None if b_s is None else b_s.dtype, vocab_size)
        saved = (grad_h, grad_w, grad_b)
        ctx.has = tuple(x is not None for x in saved)
        ctx.save_for_backward(*[x for x in saved if x is not None])
        return total

    @staticmethod
    def backward(ctx, grad_output):
        h_dtype, w_shape, w_dtype, b_dtype, vocab_size = ctx.shapes
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(saved) if has else None for has in ctx.has)
        go = grad_output.to(grad_h.dtype if grad_h is not None else torch.float32)
        out_h = out_w = out_b = None
        if grad_h is not None and ctx.needs_input_grad[0]:
            out_h = (grad_h * go).to(h_dtype)
        if grad_w is not None and ctx.needs_input_grad[1]:
            if vocab_size == w_shape[0]:
                out_w = (grad_w * go).to(w_dtype)
            else:
                out_w = torch.zeros(w_shape, dtype=w_dtype, device=grad_w.device)
                out_w[:vocab_size] = grad_w * go
        if grad_b is not None and ctx.needs_input_grad[2]:
            out_b = torch.zeros(w_shape[0], dtype=b_dtype, device=grad_b.device)
            out_b[:vocab_size] = grad_b * go
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None, None, None


def chunked_distillation_loss(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                              mask=None, divergence="forward_kl", temperature=1.0, chunk_size=1024,
                              reduction="mean", num_items=None, student_lm_head_bias=None,
                              teacher_lm_head_bias=None, vocab_size=None, logit_softcap=None,
                              **divergence_kwargs):
    """KD divergence between the lm_head distributions of student and teacher, without (N, V) tensors.

    Equal (value and student gradients) to::

        DIVERGENCES[divergence](student_hidden @ W_s[:V].T (+ b_s[:V]), teacher_hidden @ W_t[:V].T (+ b_t[:V]),
                                mask, temperature, reduction, num_items, **divergence_kwargs)

    student_hidden (..., H_s), teacher_hidden (..., H_t) with the same leading shape; weights (V_s, H_s) and
    (V_t, H_t) as ``model.get_output_embeddings().weight``; mask: bool of the leading shape (True counts);
    ``divergence``: a key of ``DIVERGENCES`` (extra keyword arguments as in ``DIVERGENCE_PARAMS``, e.g.
    ``beta`` for jsd, ``alpha`` for the skew KLs). Peak extra memory is O(chunk_size * V) plus
    (N, H) + (V, H) stored gradients. Teacher inputs are detached. See the module docstring for dtype,
    reduction ("none" unsupported), vocab_size and soft-capping rules.
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
    if reduction == "none":
        raise NotImplementedError("reduction='none' is not supported by chunked_distillation_loss; use "
                                  "'mean' or 'sum', or the dense divergence for per-position values")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_temperature(temperature)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Validate the divergence's own parameters even when no position is counted.
    DIVERGENCES[divergence](torch.zeros(1, 1), torch.zeros(1, 1), None, temperature, "sum", None,
                            **divergence_kwargs)
    vocab_size = _check_inputs(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                               mask, student_lm_head_bias, teacher_lm_head_bias, vocab_size)

    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        flat = mask.reshape(-1).to(torch.bool)
        h_s = h_s[flat]
        h_t = h_t[flat]
    n = h_s.shape[0]

    if reduction == "sum":
        denom = 1.0
    elif num_items is None:
        denom = float(max(n, 1))
    elif torch.is_tensor(num_items):
        denom = float(num_items.detach().clamp(min=1).item())
    else:
        denom = max(float(num_items), 1.0)

    grad_on = torch.is_grad_enabled()
    need_grads = (
        grad_on and h_s.requires_grad,
        grad_on and student_lm_head_weight.requires_grad,
        grad_on and student_lm_head_bias is not None and student_lm_head_bias.requires_grad,
    )
    t_b = None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach()
    return _ChunkedKD.apply(h_s, student_lm_head_weight, student_lm_head_bias, h_t,
                            teacher_lm_head_weight.detach(), t_b, vocab_size, DIVERGENCES[divergence],
                            float(temperature), int(chunk_size), denom, need_grads, divergence_kwargs)
