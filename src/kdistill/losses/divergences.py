"""Token-level divergences between a teacher's and a student's next-token distributions.

Every function here is pure: tensors in, a float32 tensor out, no model code and no I/O.

Common signature::

    f(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None)

Inputs
    student_logits, teacher_logits : (..., V) tensors of any float dtype; the leading dims are positions
        (e.g. (B, T) or (N,)). Computation is upcast to float32 (float64 inputs stay float64).
    mask : optional bool tensor of the leading shape; True marks a position that counts. Positions with
        False never enter the value or the gradient (they are dropped before any arithmetic).
    temperature : T > 0. Both distributions are softened, P = softmax(logits / T), and the per-position
        divergence is multiplied by T^2 so that gradient magnitudes stay comparable across T
        (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").
    reduction : "mean" (default): sum over counted positions / their number, or / `num_items` when given
        (pass the global number of trained tokens so gradient accumulation and data parallelism do not change
        the objective); "sum": sum over counted positions; "none": per-position values of the leading shape,
        0 at masked positions.

Directions (P_t: teacher, P_s: student)
    forward_kl       KL(P_t || P_s) = sum_v P_t (log P_t - log P_s)        mode-covering ("mean-seeking")
    reverse_kl       KL(P_s || P_t)                                           mode-seeking (MiniLLM, Gu et al. 2024)
    jsd(beta)        beta KL(P_t || M) + (1-beta) KL(P_s || M), M = beta P_t + (1-beta) P_s
                     (beta = 0.5: Jensen-Shannon, symmetric, <= ln 2; generalised JSD of GKD, Agarwal et al. 2024)
    skew_forward_kl  KL(P_t || alpha P_t + (1-alpha) P_s)                    (DistiLLM, Ko et al. 2024)
    skew_reverse_kl  KL(P_s || alpha P_s + (1-alpha) P_t)                    (DistiLLM, Ko et al. 2024)
    tvd              0.5 sum_v |P_t - P_s|                                    total variation distance, in [0, 1]

Mixtures are formed in log space with `logaddexp`, never by taking the log of summed probabilities, so
values and gradients stay finite for logits of +-1e4 and for teacher logits of -inf (a token the teacher
never produces; only reverse_kl is then legitimately infinite where the student puts mass on it).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "DIVERGENCES",
    "get_divergence",
    "reduce_positions",
    "per_row_divergence",
    "REDUCTIONS",
    "check_temperature",
    "counted_rows",
]

REDUCTIONS = ("mean", "sum", "none")  # the `reduction=` values every logit divergence accepts


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless the loss temperature is > 0 (shared by the dense, chunked and top-k losses)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _select(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None):
    """Flatten to (N, V) rows, keeping only the counted positions."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (align vocabularies first: kdistill.models.align_vocab)")
    return counted_rows(student_logits, teacher_logits, mask)


def counted_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None):
    """(..., V_s), (..., V_t) with one leading shape -> the counted rows (N, V_s), (N, V_t) and the flat mask
    (None: every position counted). The vocabularies may differ (cross-tokenizer losses)."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student and teacher logits must have the same leading shape (aligned positions), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is None:
        return s, t, None
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    flat = mask.reshape(-1).to(torch.bool)
    return s[flat], t[flat], flat


def reduce_positions(per_position: torch.Tensor, leading_shape: torch.Size, flat_mask: torch.Tensor | None,
                     reduction: str, num_items: int | torch.Tensor | None) -> torch.Tensor:
    """Reduce per-position values (N_counted,) according to `reduction` (see the module docstring)."""
    if reduction == "none":
        if flat_mask is None:
            return per_position.reshape(leading_shape)
        out = per_position.new_zeros(flat_mask.shape)
        out = out.masked_scatter(flat_mask, per_position)
        return out.reshape(leading_shape)
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is None:
        num_items = per_position.shape[0]
    if torch.is_tensor(num_items):
        return total / num_items.to(total.dtype).clamp(min=1)
    return total / max(float(num_items), 1.0)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities, (N, V) -> (N,). Terms with P = 0 contribute exactly 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * A + (1 - weight_a) * B) for 0 < weight_a < 1, computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _divergence(per_row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Wrap a per-row function of (log P_s, log P_t) with temperature, masking and reduction."""

    def apply(student_logits, teacher_logits, mask, temperature, reduction, num_items):
        check_temperature(temperature)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        leading = student_logits.shape[:-1]
        s, t, flat = _select(student_logits, teacher_logits, mask)
        dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # >= float32
        log_ps = F.log_softmax(s.to(dtype) / temperature, dim=-1)
        log_pt = F.log_softmax(t.to(dtype) / temperature, dim=-1)
        values = per_row(log_ps, log_pt) * (temperature ** 2)
        return reduce_positions(values, leading, flat, reduction, num_items)

    return apply


def per_row_divergence(name: str, beta: float = 0.5, alpha: float = 0.1) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                   torch.Tensor]:
    """The per-position function of (log P_s, log P_t), (N, V) -> (N,), of a divergence (before T^2 and reduction).

    The one definition of each divergence's formula: the dense functions below, the top-k teacher path
    (`kdistill.losses.topk`) and the chunked loss all apply it. `beta` is used by jsd, `alpha` by the skew KLs.
    """
    if name == "forward_kl":
        return lambda ls, lt: _kl_rows(lt, ls)
    if name == "reverse_kl":
        return lambda ls, lt: _kl_rows(ls, lt)
    if name == "jsd":
        _check_unit_interval("beta", beta)

        def jsd_rows(ls, lt):
            if beta in (0.0, 1.0):
                return (ls * 0.0).sum(-1)
            log_m = _log_mixture(lt, ls, beta)
            return beta * _kl_rows(lt, log_m) + (1.0 - beta) * _kl_rows(ls, log_m)

        return jsd_rows
    if name == "skew_forward_kl":
        _check_unit_interval("alpha", alpha)
        return lambda ls, lt: _skew_kl_rows(lt, ls, alpha)
    if name == "skew_reverse_kl":
        _check_unit_interval("alpha", alpha)
        return lambda ls, lt: _skew_kl_rows(ls, lt, alpha)
    if name == "tvd":
        return lambda ls, lt: 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCE_PARAMS)}")


def forward_kl(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None):
    """Forward KL, KL(P_teacher || P_student) = sum_v P_t (log P_t - log P_s), per position.

    The standard KD objective (Hinton et al., 2015): mode-covering, the student spreads mass over everything the
    teacher considers likely. Shapes (..., V); see the module docstring for mask, temperature and reduction.
    """
    return _divergence(per_row_divergence("forward_kl"))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None):
    """Reverse KL, KL(P_student || P_teacher) = sum_v P_s (log P_s - log P_t), per position.

    Mode-seeking: the student concentrates on the teacher's main modes (MiniLLM, Gu et al., 2024).
    Shapes (..., V); see the module docstring for mask, temperature and reduction.
    """
    return _divergence(per_row_divergence("reverse_kl"))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


def jsd(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None,
        beta=0.5):
    """Generalised Jensen-Shannon divergence, per position:

        beta * KL(P_t || M) + (1 - beta) * KL(P_s || M),   M = beta * P_t + (1 - beta) * P_s.

    beta = 0.5 is the Jensen-Shannon divergence (symmetric, bounded by ln 2). beta -> 0 behaves like a scaled
    forward KL and beta -> 1 like a scaled reverse KL (Agarwal et al., 2024, "On-Policy Distillation of Language
    Models", GKD). beta = 0 or 1 makes M equal one of the two distributions and the value is exactly 0.
    Shapes (..., V); see the module docstring for mask, temperature and reduction.
    """
    return _divergence(per_row_divergence("jsd", beta=beta))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


def _skew_kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(P || alpha * P + (1 - alpha) * Q) per row; alpha = 0 is KL(P || Q), alpha = 1 gives 0."""
    if alpha == 1.0:
        return (log_p * 0.0).sum(-1)
    if alpha == 0.0:
        return _kl_rows(log_p, log_q)
    return _kl_rows(log_p, _log_mixture(log_p, log_q, alpha))


def skew_forward_kl(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean",
                    num_items=None, alpha=0.1):
    """Skew forward KL, KL(P_t || alpha * P_t + (1 - alpha) * P_s), per position (DistiLLM, Ko et al., 2024).

    alpha = 0 is the forward KL; alpha = 1 gives 0. Mixing a little of the teacher into the student side keeps
    the divergence and its gradient bounded where the student gives a teacher token almost no mass.
    """
    return _divergence(per_row_divergence("skew_forward_kl", alpha=alpha))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean",
                    num_items=None, alpha=0.1):
    """Skew reverse KL, KL(P_s || alpha * P_s + (1 - alpha) * P_t), per position (DistiLLM, Ko et al., 2024).

    alpha = 0 is the reverse KL; alpha = 1 gives 0.
    """
    return _divergence(per_row_divergence("skew_reverse_kl", alpha=alpha))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


def tvd(student_logits, teacher_logits, mask=None, temperature=1.0, reduction="mean", num_items=None):
    """Total variation distance, 0.5 * sum_v |P_t - P_s|, per position; symmetric, in [0, 1] (times T^2)."""
    return _divergence(per_row_divergence("tvd"))(
        student_logits, teacher_logits, mask, temperature, reduction, num_items)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

# Extra keyword parameters each divergence takes (used by config validation).
DIVERGENCE_PARAMS: dict[str, tuple[str, ...]] = {
    "forward_kl": (),
    "reverse_kl": (),
    "jsd": ("beta",),
    "skew_forward_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
    "tvd": (),
}


def get_divergence(name: str) -> Callable[..., torch.Tensor]:
    """Look a divergence up by its exact name."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}") from None
