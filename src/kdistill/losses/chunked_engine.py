"""The autograd engine shared by the chunked losses of :mod:`kdistill.losses.chunked` (read its docstring first).

:class:`ChunkedLoss` computes a loss over (N, H) hidden rows ``chunk_size`` rows at a time: each chunk is projected
by the student lm_head, ``chunk_loss(start, stop, logits_s_chunk)`` returns the chunk's summed loss, and the
(chunk, V) logit gradient is folded right away into the hidden / weight / bias gradients, which backward only
rescales by ``grad_output`` and hands over (once). :func:`denominator`, :func:`need_grads`, :func:`compute_dtype`
and :func:`select_rows` are the small helpers the entry points use around it.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ChunkLoss", "ChunkedLoss", "compute_dtype", "denominator", "need_grads", "select_rows"]

ChunkLoss = Callable[[int, int, torch.Tensor], torch.Tensor]  # (start, stop, logits_s chunk) -> summed loss


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the chunks are computed and accumulated in: float32, or float64 for float64 inputs."""
    return torch.promote_types(h.dtype, torch.float32)


def denominator(reduction, num_items, n):
    """What the summed loss is divided by: 1 for "sum"; ``num_items`` (>= 1) or the n counted rows for "mean"."""
    if reduction == "sum":
        return 1.0
    if num_items is None:
        return float(max(n, 1))
    if torch.is_tensor(num_items):
        return float(num_items.detach().clamp(min=1).item())
    return max(float(num_items), 1.0)


def need_grads(h_s, w_s, b_s):
    """(hidden, weight, bias): which student gradients the forward must accumulate."""
    grad_on = torch.is_grad_enabled()
    return (
        grad_on and h_s.requires_grad,
        grad_on and w_s.requires_grad,
        grad_on and b_s is not None and b_s.requires_grad,
    )


class ChunkedLoss(torch.autograd.Function):
    """Loss forward that also computes the student gradients chunk by chunk; backward only rescales them.

    ``chunk_loss(start, stop, logits_s)`` returns the summed loss of rows [start, stop) given the student's
    (stop - start, vocab_size) logits in the compute dtype; it is called exactly once per chunk, in order.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, vocab_size, chunk_loss, chunk_size, denom, need_grads):
        # h_s (N, H): counted rows only. w_s: full (V, H) weight; b_s: (V,) or None.
        dtype = compute_dtype(h_s)
        n = h_s.shape[0]
        ws = w_s[:vocab_size].to(dtype)
        bs = None if b_s is None else b_s[:vocab_size].to(dtype)
        grad_h_on, grad_w_on, grad_b_on = need_grads
        any_grad = grad_h_on or grad_w_on or grad_b_on
        grad_h = torch.zeros(n, h_s.shape[1], dtype=dtype, device=h_s.device) if grad_h_on else None
        # Full-shape weight/bias gradients (rows past vocab_size stay zero), so backward returns them without a copy.
        grad_w = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if grad_w_on else None
        grad_b = torch.zeros(b_s.shape, dtype=dtype, device=b_s.device) if grad_b_on else None
        total = torch.zeros((), dtype=dtype, device=h_s.device)
        scale = 1.0 / denom
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            hs = h_s[start:stop].to(dtype)
            logits_s = hs @ ws.T
            if bs is not None:
                logits_s = logits_s + bs
            if not any_grad:
                total += chunk_loss(start, stop, logits_s).detach()
                continue
            with torch.enable_grad():
                logits_s.requires_grad_(True)
                loss = chunk_loss(start, stop, logits_s)
                (g,) = torch.autograd.grad(loss, logits_s)
            total += loss.detach()
            del logits_s, loss
            g = g.to(dtype)
            g.mul_(scale)  # fold the mean's 1/denominator in here: no extra (V, H) pass later
            if grad_h_on:
                torch.matmul(g, ws, out=grad_h[start:stop])
            if grad_w_on:
                grad_w[:vocab_size].addmm_(g.T, hs)
            if grad_b_on:
                grad_b[:vocab_size] += g.sum(0)
            del g
        total = total * scale
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        # Kept as attributes, not saved tensors: backward scales them in place and hands them over (one (V, H)
        # buffer in all, instead of a second scaled copy), so it can run once only.
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through a chunked loss (retain_graph=True); the chunked losses "
                               "hand their precomputed gradients over once: compute the loss again instead")
        grads, ctx.grads = ctx.grads, None
        out = []
        for grad, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad[:3]):
            if grad is None or not needed:
                out.append(None)
                continue
            grad.mul_(grad_output.to(grad.dtype))
            out.append(grad.to(dtype))
        return (*out, None, None, None, None, None)


def select_rows(x, flat_mask):
    """(..., H) -> (N, H): flatten the leading dims, keep the rows where flat_mask is True (all when None)."""
    x = x.reshape(-1, x.shape[-1])
    return x if flat_mask is None else x[flat_mask]
