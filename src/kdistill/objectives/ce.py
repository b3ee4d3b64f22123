"""Token cross-entropy on the labels (the SFT loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kdistill.losses import chunked_cross_entropy
from kdistill.objectives.base import Objective, TokenObjectiveConfig, as_float

__all__ = ["CrossEntropy", "CrossEntropyConfig"]


@dataclass
class CrossEntropyConfig(TokenObjectiveConfig):
    """ce: -log P_student(label) per trained token."""


class CrossEntropy(Objective):
    """Token cross-entropy on the labels: sum over trained tokens of -log P_s(y) / num_items.

    With `view: rationale` it is the rationale loss of distilling step-by-step (Hsieh et al., 2023):
    objectives {ce: {weight: alpha}, rationale: {type: ce, view: rationale, weight: 1 - alpha}} give
    alpha * L_label + (1 - alpha) * L_rationale, each a mean over its own view's tokens.
    """

    type = "ce"
    Config = CrossEntropyConfig
    reads_logits = True

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        mask = view.mask
        if view.chunked:  # never an (N, V) tensor: see kdistill.losses.chunked
            head = view.student_head
            loss = chunked_cross_entropy(view.student_hidden, head.weight, view.targets, mask=mask,
                                         chunk_size=view.chunk_size, reduction="sum", student_lm_head_bias=head.bias)
            return loss / as_float(view.num_items, loss), {}
        logits = view.student_logits[mask].float()             # (N, V)
        loss = F.cross_entropy(logits, view.targets[mask], reduction="sum")
        return loss / as_float(view.num_items, loss), {}
