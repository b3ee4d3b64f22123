"""InfoNCE on (anchor, positive[, negatives]) text fields of an embedding run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdistill.fields import option
from kdistill.losses import info_nce
from kdistill.objectives.base import Objective, ObjectiveConfig, as_float

__all__ = ["Contrastive", "ContrastiveConfig"]


@dataclass
class ContrastiveConfig(ObjectiveConfig):
    """contrastive: InfoNCE with in-batch and hard negatives."""

    temperature: float = option(0.05, "Cosine-similarity temperature (0.05 = scale 20 in sentence-transformers "
                                "terms).", gt=0)


class Contrastive(Objective):
    """InfoNCE on (anchor, positive[, negatives]) text fields: in-batch negatives plus hard negatives.

    Cosine similarities / `temperature` (0.05 is the usual choice, scale 20 in sentence-transformers terms).
    Under several processes, candidates are gathered from every process (exact gradients), so each anchor is
    contrasted against the global batch. Needs no teacher. Metric: fraction of anchors whose positive scores
    highest among their candidates.
    """

    type = "contrastive"
    Config = ContrastiveConfig
    task = "embedding"

    def forward(self, batch):
        anchor = batch.embeddings("anchor")
        positive = batch.embeddings("positive")
        negatives = None
        if batch.has_field("negative"):
            negatives = batch.embeddings("negative").reshape(anchor.shape[0], -1, anchor.shape[-1])
        loss = info_nce(anchor, positive, negatives, temperature=self.cfg.temperature,
                        num_items=batch.num_examples, gather=True)  # all processes; no-op in one
        with torch.no_grad():
            a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
            correct = (a @ p.T).argmax(-1).eq(torch.arange(a.shape[0], device=a.device))
            if negatives is not None:
                n = F.normalize(negatives.float(), dim=-1)
                correct &= (a * p).sum(-1) > torch.einsum("bd,bkd->bk", a, n).max(-1).values
        return loss, {"accuracy": correct.sum().float() / as_float(batch.num_examples, loss)}
