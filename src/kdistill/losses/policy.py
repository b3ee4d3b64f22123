"""The sampled-token (policy-gradient) form of reverse KL on the student's own samples. Pure functions.

On text x sampled from the student, the per-token log-ratio r_t = log P_s(x_t | x_<t) - log P_t(x_t | x_<t) is
an unbiased one-sample estimate of the reverse KL at position t, KL(P_s || P_t)(. | x_<t). Trained as a policy
gradient (MiniLLM, Gu et al. 2024, with its single-step term off; on-policy distillation, Thinking Machines 2025):

    advantage  A_t = -sum_{k >= t} discount^(k - t) r_k           (stop-gradient: a constant of the loss)
    surrogate      = -sum_t A_t log P_s(x_t | x_<t) / num_items     (what is differentiated)
    loss value     = sum_t r_t / num_items                          (the reverse-KL estimate: what is reported)

The returned loss has the surrogate's gradient and the estimate's value (surrogate - stop_grad(surrogate) +
estimate), so a logged value reads as a reverse KL per token, comparable with the full-vocabulary divergence.

Its gradient is, in expectation over x ~ P_s:
* discount 0: the gradient of sum_t KL(P_s || P_t)(. | x_<t) with the prefixes' distribution held fixed (what
  GKD's full-vocabulary reverse KL on student samples computes exactly);
* discount 1: the gradient of the sequence-level reverse KL, KL(P_s(x) || P_t(x)) (the score-function term
  E[grad log P_s] is zero).
Both need only the teacher's log-probability of each sampled token.

Shapes: (B, T) per-position log-probs of the tokens the positions predict, a (B, T) bool mask of trained
positions (the sampled answer, up to and including its first end token). Computation in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.chunked import resolve_chunk_size

__all__ = ["chunked_target_logprobs", "discounted_advantages", "sampled_token_loss", "target_logprobs",
           "with_estimate_value"]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (...) integer targets -> (...) float32 log softmax(logits / T)[target]. Targets < 0
    (-100) give 0."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    safe = targets.clamp(min=0).unsqueeze(-1)
    return logp.gather(-1, safe).squeeze(-1).masked_fill(targets < 0, 0.0)


@torch.no_grad()
def chunked_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: torch.Tensor | None = None, vocab_size: int | None = None,
                            chunk_size: int | str = "auto") -> torch.Tensor:
    """Like :func:`target_logprobs` from final hidden states (..., H) and an output layer (V, H) (+ bias), a chunk
    of positions at a time: never a (positions x V) tensor. No gradient."""
    vocab = vocab_size or weight.shape[0]
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    rows = resolve_chunk_size(chunk_size, vocab, h.shape[1], h.dtype, "projection")
    w = weight[:vocab].float()
    b = None if bias is None else bias[:vocab].float()
    for start in range(0, h.shape[0], rows):
        logits = F.linear(h[start:start + rows].float(), w, b)
        out[start:start + rows] = target_logprobs(logits, t[start:start + rows])
    return out.reshape(lead)


def discounted_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                          discount: float = 0.0) -> torch.Tensor:
    """(B, T) A_t = -sum_{k >= t, trained} discount^(k - t) (log P_s(x_k) - log P_t(x_k)), 0 where not trained;
    detached. The sum restarts after an untrained position (an answer is one contiguous run)."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    reward = (teacher_logprobs.detach().float() - student_logprobs.detach().float()).masked_fill(~mask, 0.0)
    if discount == 0.0:
        return reward
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = (reward[:, t] + discount * running) * mask[:, t]
        out[:, t] = running
    return out


def sampled_token_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                       discount: float = 0.0, num_items=None) -> torch.Tensor:
    """-sum_t A_t log P_s(x_t) / num_items (see the module docstring). `student_logprobs` (B, T) carries the
    gradient; `teacher_logprobs` (B, T) none; `num_items` defaults to the trained positions. Reduction: mean."""
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.shape != mask.shape:
        raise ValueError(f"student log-probs {tuple(student_logprobs.shape)}, teacher log-probs "
                         f"{tuple(teacher_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape")
    advantage = discounted_advantages(student_logprobs, teacher_logprobs, mask, discount)
    surrogate = -(advantage * student_logprobs.float()).masked_fill(~mask, 0.0).sum()
    return with_estimate_value(surrogate, student_logprobs, teacher_logprobs, mask, num_items)


def with_estimate_value(surrogate_sum: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                        mask: torch.Tensor, num_items=None) -> torch.Tensor:
    """(surrogate - stop_grad(surrogate) + sum_t r_t) / num_items: the surrogate's gradient, the reverse-KL
    estimate's value (see the module docstring)."""
    estimate = (student_logprobs.detach().float() - teacher_logprobs.detach().float()).masked_fill(~mask, 0.0).sum()
    total = surrogate_sum - surrogate_sum.detach() + estimate
    denom = mask.sum() if num_items is None else num_items
    if torch.is_tensor(denom):
        return total / denom.to(total.dtype).clamp(min=1)
    return total / max(float(denom), 1.0)
