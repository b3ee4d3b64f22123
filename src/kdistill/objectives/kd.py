"""Token-level logit distillation with one of the divergences of `kdistill.losses`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.fields import FieldError, option
from kdistill.losses import (DIVERGENCE_PARAMS, DIVERGENCES, chunked_distillation_loss,
                             chunked_topk_distillation_loss, get_divergence, topk_divergence)
from kdistill.losses.chunked import chunked_cross_entropy
from kdistill.losses.policy import (chunked_target_logprobs, discounted_advantages, sampled_token_loss,
                                    target_logprobs, with_estimate_value)
from kdistill.objectives.base import Objective, TokenObjectiveConfig, as_float
from kdistill.teachers.base import DenseLogits, HiddenAndHead, TopKRows

__all__ = ["LogitKD", "LogitKDConfig"]


@dataclass
class LogitKDConfig(TokenObjectiveConfig):
    """kd: a divergence between the teacher's and the student's next-token distributions."""

    divergence: str = option("forward_kl", "Divergence between teacher and student next-token distributions.",
                             tuple(DIVERGENCES))
    temperature: float = option(1.0, "Loss temperature: both distributions softened, loss scaled by T^2 (not the "
                                "sampling temperature, nor a cache's capture temperature).", gt=0)
    beta: float = option(0.5, "jsd: mixture weight of the teacher in M (0.5 = Jensen-Shannon).", ge=0, le=1)
    alpha: float = option(0.1, "skew_*: skew mixture weight.", ge=0, le=1)
    missing: str = option("bucket", "From a top-k cache: the teacher mass outside its stored k ids is one extra "
                          "'bucket' outcome on both sides (needs the loss temperature = cache.temperature), or the "
                          "k ids are 'renormalize'd on both sides (any loss temperature).", ("bucket", "renormalize"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            raise FieldError("beta", f"{self.beta} makes jsd identically zero here (M equals one of the two "
                             f"distributions); TRL's GKD means beta 0 = forward KL and beta 1 = reverse KL: write "
                             f"divergence: {'forward_kl' if self.beta == 0 else 'reverse_kl'}")


class LogitKD(Objective):
    """Token-level logit distillation with one of `kdistill.losses.DIVERGENCES` (default forward KL).

    Both sides are cut to the shared vocabulary (`batch.kd_vocab`): a padded embedding matrix (Qwen2.5-7B has
    152,064 rows, Qwen2.5-0.5B 151,936, the tokenizer 151,665) never enters the loss.

    Dispatch on what the teacher source gives (`kdistill.teachers.base`): dense logits, hidden states with the
    output layer (the chunked losses, no (tokens x V) tensor) or top-k rows (`kdistill.losses.topk_divergence`,
    with the `missing` rule for the mass outside the k ids). Metric: top-1 agreement of student and teacher.

    On answers the student sampled in the step (on-policy distillation, `batch.sampled_by == "student"`), mode
    "divergence" computes the same divergence at every sampled position (GKD), and mode "sampled_token" the
    policy-gradient loss of `kdistill.losses.policy` (needs only the teacher's log-prob of each sampled token).
    Both then also report `student_samples_divergence` (the loss) and `teacher_nll` (the teacher's mean
    -log P_t(x_t) over the sampled tokens).
    """

    type = "kd"
    Config = LogitKDConfig
    teacher_needs = frozenset({"tokens"})
    reads_logits = True
    scores_samples = True

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.divergence = get_divergence(cfg.divergence)
        self.params = {p: getattr(cfg, p) for p in DIVERGENCE_PARAMS[cfg.divergence]}

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        signal = view.teacher_tokens()
        if batch.sampled_by != "student":
            return self._divergence(batch, view, signal)
        if batch.policy is not None and batch.policy.mode == "sampled_token":
            return self._sampled_token(batch, view, signal)
        loss, metrics = self._divergence(batch, view, signal)
        nll = -self._teacher_logprobs(batch, view, signal).masked_fill(~view.mask, 0.0).sum()
        return loss, {**metrics, "student_samples_divergence": loss.detach(),
                      "teacher_nll": nll / as_float(view.num_items, nll)}

    def _divergence(self, batch, view, signal):
        if isinstance(signal, TopKRows):
            return self._from_topk(batch, view, signal)
        if isinstance(signal, HiddenAndHead):
            return self._chunked(batch, view, signal)
        if not isinstance(signal, DenseLogits):
            raise TypeError(f"objectives.{self.name}: unknown teacher signal {type(signal).__name__}")
        student, teacher = view.student_logits, signal.logits
        vocab = batch.kd_vocab or min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[..., :vocab], teacher[..., :vocab]
        mask = view.mask
        loss = self.divergence(student, teacher, mask=mask, temperature=self.cfg.temperature,
                               num_items=view.num_items, **self.params)
        with torch.no_grad():
            agree = (student[mask].argmax(-1) == teacher[mask].argmax(-1)).sum().float()
        return loss, {"top1_agreement": agree / as_float(view.num_items, agree)}

    def _chunked(self, batch, view, signal: HiddenAndHead):
        s_head, t_head = view.student_head, signal.head
        vocab = batch.kd_vocab or min(s_head.weight.shape[0], t_head.weight.shape[0])
        counts: dict[str, torch.Tensor] = {}
        loss = chunked_distillation_loss(
            view.student_hidden, s_head.weight, signal.hidden, t_head.weight, mask=view.mask,
            divergence=self.cfg.divergence, temperature=self.cfg.temperature, chunk_size=view.chunk_size,
            num_items=view.num_items, student_lm_head_bias=s_head.bias, teacher_lm_head_bias=t_head.bias,
            vocab_size=vocab, metrics=counts, **self.params)
        agree = counts["top1_agreement"]
        return loss, {"top1_agreement": agree / as_float(view.num_items, agree)}

    def _from_topk(self, batch, view, signal: TopKRows):
        teacher, mask = signal.teacher, view.mask
        kwargs = dict(divergence=self.cfg.divergence, temperature=self.cfg.temperature, missing=self.cfg.missing,
                      num_items=view.num_items, **self.params)
        if view.chunked:
            head = view.student_head
            vocab = batch.kd_vocab or head.weight.shape[0]
            counts: dict[str, torch.Tensor] = {}
            loss = chunked_topk_distillation_loss(view.student_hidden, head.weight, teacher, mask=mask,
                                                  chunk_size=view.chunk_size, student_lm_head_bias=head.bias,
                                                  vocab_size=vocab, metrics=counts, **kwargs)
            agree = counts["top1_agreement"]
        else:
            student = view.student_logits
            student = student[..., :batch.kd_vocab or student.shape[-1]][mask]           # (N, V)
            loss = topk_divergence(student, teacher, **kwargs)
            with torch.no_grad():
                best = teacher.indices.gather(-1, teacher.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
                agree = (student.argmax(-1) == best).sum().float()
        return loss, {"top1_agreement": agree / as_float(view.num_items, agree)}

    # --------------------------------------------------------------------------------- sampled-token mode
    def _teacher_logprobs(self, batch, view, signal) -> torch.Tensor:
        """(B, T) the teacher's log-prob of each position's target (0 where not trained); no gradient."""
        targets = view.targets
        if isinstance(signal, DenseLogits):
            vocab = batch.kd_vocab or signal.logits.shape[-1]
            return target_logprobs(signal.logits[..., :vocab].detach(), targets)
        if isinstance(signal, HiddenAndHead):
            head = signal.head
            vocab = batch.kd_vocab or head.weight.shape[0]
            return chunked_target_logprobs(signal.hidden, head.weight, targets, head.bias, vocab,
                                           view.chunk_size).masked_fill(targets < 0, 0.0)
        if isinstance(signal, TopKRows):
            mask = view.mask
            if signal.target_logprobs is not None:
                found = signal.target_logprobs.to(signal.teacher.logprobs.dtype)
            else:  # the target among the stored k ids
                hit = signal.teacher.indices.eq(targets[mask].unsqueeze(-1))
                if not bool(hit.any(-1).all()):
                    raise TypeError(f"objectives.{self.name}: a sampled token is not among the teacher's top "
                                    f"{hit.shape[-1]} ids, and this teacher source gives no log-prob for it")
                found = (signal.teacher.logprobs * hit).sum(-1)
            out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
            out[mask] = found.float().to(targets.device)
            return out
        raise TypeError(f"objectives.{self.name}: on-policy samples need the teacher's log-probs of the sampled "
                        f"tokens, which a {type(signal).__name__} signal does not give")

    def _sampled_token(self, batch, view, signal):
        mask, targets = view.mask, view.targets
        teacher = self._teacher_logprobs(batch, view, signal)
        discount = batch.policy.discount
        if view.chunked:
            head = view.student_head
            vocab = batch.kd_vocab or head.weight.shape[0]
            student = chunked_target_logprobs(view.student_hidden.detach(), head.weight.detach(), targets,
                                              None if head.bias is None else head.bias.detach(), vocab,
                                              view.chunk_size).masked_fill(~mask, 0.0)
            advantage = discounted_advantages(student, teacher, mask, discount)
            # sum_t A_t * (-log P_s(x_t)) = -sum_t A_t log P_s(x_t): the policy-gradient loss, chunked
            surrogate = chunked_cross_entropy(view.student_hidden, head.weight, targets, mask=mask,
                                              chunk_size=view.chunk_size, reduction="sum",
                                              student_lm_head_bias=head.bias, vocab_size=vocab, row_weights=advantage)
            loss = with_estimate_value(surrogate, student, teacher, mask, view.num_items)
        else:
            logits = view.student_logits
            student = target_logprobs(logits[..., :batch.kd_vocab or logits.shape[-1]], targets)
            loss = sampled_token_loss(student, teacher, mask, discount, view.num_items)
        nll = -teacher.masked_fill(~mask, 0.0).sum()
        return loss, {"student_samples_divergence": loss.detach(), "teacher_nll": nll / as_float(view.num_items, nll)}
