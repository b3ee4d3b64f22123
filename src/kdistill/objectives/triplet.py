"""Contrastive textual deviation for LM students (MiniCSM-style consensus/supporting/refuting triplets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdistill.fields import option
from kdistill.losses import info_nce
from kdistill.objectives.base import Objective, ObjectiveConfig, as_float

__all__ = ["Triplet", "TripletConfig"]


@dataclass
class TripletConfig(ObjectiveConfig):
    """triplet: consensus closer to its supporting than to its refuting evidence."""

    temperature: float = option(0.05, "Cosine-similarity temperature.", gt=0)


class Triplet(Objective):
    """The student's pooled representation of a consensus statement must be closer to its supporting evidence
    than to its refuting evidence.

    InfoNCE (`kdistill.losses.info_nce`, the embedding path's loss) with anchor = consensus, positive = supporting,
    the row's refuting evidence as hard negative and the batch's other evidences as in-batch negatives; cosine /
    `temperature`. Representations: mean over real tokens of the last hidden states (T5: the encoder's). Rows come
    from `{consensus, supporting, refuting}` fields next to the LM fields (see `kdistill.data.claims`); it runs on
    the same batch as ce / kd / hidden. Metric: fraction of triplets with cos(c, s) > cos(c, r).
    """

    type = "triplet"
    Config = TripletConfig
    uses_text_fields = True

    def forward(self, batch):
        anchor, positive = batch.embeddings("anchor"), batch.embeddings("positive")
        negative = batch.embeddings("negative").reshape(anchor.shape[0], -1, anchor.shape[-1])
        loss = info_nce(anchor, positive, negative, temperature=self.cfg.temperature,
                        num_items=batch.num_examples, gather=True)  # all processes; no-op in one
        with torch.no_grad():
            a, p, n = (F.normalize(x.float(), dim=-1) for x in (anchor, positive, negative[:, 0]))
            closer = ((a * p).sum(-1) > (a * n).sum(-1)).sum().float()
        return loss, {"accuracy": closer / as_float(batch.num_examples, closer)}
