"""Alignment of the attention maps of mapped student/teacher layers."""

from __future__ import annotations

from dataclasses import dataclass

from kdistill.losses import attention_kl
from kdistill.objectives.base import AlignmentConfig, as_float
from kdistill.objectives.hidden import LayerAlignment

__all__ = ["AttentionAlignment", "AttentionAlignmentConfig"]


@dataclass
class AttentionAlignmentConfig(AlignmentConfig):
    """attention: KL between teacher and student attention maps of mapped layers (eager attention)."""


class AttentionAlignment(LayerAlignment):
    """Align the attention maps of mapped student/teacher layers (MiniLM, Wang et al., 2020; TinyBERT):
    for each stack, mapped pair (i, j) and counted query position q,

        d = sum_k A^t_j[q, k] (log A^t_j[q, k] - log A^s_i[q, k])      KL(A_teacher || A_student) over keys,

    averaged over heads; when head counts differ, each model's heads are averaged first and one KL is taken.
    Layer maps, masks (queries: real tokens; T5 decoder: trained positions) and the global normalisation are those
    of `hidden`. Self-attention only (T5: encoder and decoder self-attention; cross-attention is not aligned).
    Attention weights exist only with eager attention: the LM recipe loads both models with
    `attn_implementation: eager` when this objective is configured (`requires_eager_attention`).
    """

    type = "attention"
    Config = AttentionAlignmentConfig
    teacher_needs = frozenset({"attentions"})
    model_outputs = frozenset({"attentions"})
    requires_eager_attention = True

    def setup(self, student, teacher):
        for role, model in (("student", student), ("teacher", teacher)):
            impl = getattr(model.config, "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ValueError(f"objectives.{self.name}: the {role} uses {impl} attention, which returns no "
                                 f"attention weights; load it with attn_implementation: eager")
        self.resolve_maps(student, teacher)

    @staticmethod
    def _maps(outputs, stack: str, encoder_decoder: bool):
        maps = (outputs.encoder_attentions if stack == "encoder" else outputs.decoder_attentions) \
            if encoder_decoder else outputs.attentions
        if not maps:
            raise RuntimeError("the model returned no attention weights: it must run with eager attention and "
                               "output_attentions=True (DistillTrainer does so for the attention objective)")
        return maps

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        total, metrics = None, {}
        for stack, pairs, mask, count in self.stack_terms(view):
            s_maps = self._maps(view.student_outputs, stack, self.encoder_decoder)
            t_maps = self._maps(view.teacher_outputs, stack, self.encoder_decoder)
            mask = mask.to(s_maps[0].device)
            stack_loss = sum(attention_kl(s_maps[i], t_maps[j].to(s_maps[i].device), mask, reduction="sum")
                             for i, j in pairs)
            stack_loss = stack_loss / len(pairs) / as_float(count, stack_loss)
            metrics[stack] = stack_loss.detach()
            total = stack_loss if total is None else total + stack_loss
        return total, metrics if len(metrics) > 1 else {}
