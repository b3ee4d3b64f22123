"""Hidden-state alignment losses and student -> teacher layer maps.

Losses are pure functions on (B, T, H) tensors of the *same* width H (the caller projects the student first),
masked by a bool (B, T) mask and reduced like `kdistill.losses.reduce_positions`:

    reduction="mean":  sum over masked positions of the per-position value / num_items
                       (num_items defaults to the number of masked positions)
    reduction="sum":   sum over masked positions
    reduction="none":  (B, T) per-position values, 0 at unmasked positions

References: TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural Language Understanding") matches
hidden states with MSE through a learned projection W_h; Patient KD (Sun et al., 2019, "Patient Knowledge
Distillation for BERT Model Compression") matches normalised intermediate states of a uniform ("skip") layer map;
MiniLM (Wang et al., 2020) and DistilBERT (Sanh et al., 2019, cosine embedding loss) are close relatives.

Layer indexing. `resolve_layer_map` returns 0-based indices into the transformer layers. Hugging Face
`hidden_states` tuples start with the embedding output, so layer i's output is `hidden_states[i + 1]`
(`layer_output_index`). Note that transformers replaces the *last* entry with the final-norm output
(`last_hidden_state`): the last layer's state is normalised, intermediate ones are the raw residual stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.divergences import reduce_positions


def _flatten(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher hidden states must have the same shape (project the student "
                         f"first), got {tuple(student.shape)} and {tuple(teacher.shape)}")
    leading = student.shape[:-1]
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    flat_mask = None
    if mask is not None:
        if mask.shape != leading:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(leading)}")
        flat_mask = mask.reshape(-1).bool()
        s, t = s[flat_mask], t[flat_mask]
    return s.float(), t.float(), leading, flat_mask   # (N, H) each, float32


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
               reduction: str = "mean", num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between hidden states, per position averaged over the width:

        l(b, t) = (1 / H) * sum_h (s[b, t, h] - t[b, t, h])^2

    Symmetric (no direction). Shapes: student, teacher (B, T, H) (same H: project the student beforehand), mask
    (B, T) bool (positions that count). Reduced over masked positions as in the module docstring; computed in
    float32. Reference: TinyBERT hidden-state loss MSE(H_s W_h, H_t) (Jiao et al., 2020).
    """
    s, t, leading, flat_mask = _flatten(student, teacher, mask)
    per_position = (s - t).pow(2).mean(-1)                  # (N,)
    return reduce_positions(per_position, leading, flat_mask, reduction, num_items)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                  reduction: str = "mean", num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cosine distance between hidden states, per position:

        l(b, t) = 1 - cos(s[b, t], t[b, t]) = 1 - <s, t> / (|s| |t|)        (in [0, 2]; 0 when parallel)

    Symmetric, insensitive to scale. Shapes, mask and reduction as `hidden_mse`; float32 inside. Reference:
    cosine embedding loss on hidden states in DistilBERT (Sanh et al., 2019); normalised-state matching in
    Patient KD (Sun et al., 2019).
    """
    s, t, leading, flat_mask = _flatten(student, teacher, mask)
    per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)   # (N,)
    return reduce_positions(per_position, leading, flat_mask, reduction, num_items)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}


def layer_output_index(layer: int) -> int:
    """Index in a Hugging Face `hidden_states` tuple of 0-based layer `layer`'s output (index 0: embeddings)."""
    return layer + 1


def resolve_layer_map(spec, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student -> teacher layer pairs, 0-based indices into the transformer layers.

    spec:
      * "uniform": student layer i <-> teacher layer round((i + 1) * n_teacher / n_student) - 1, so the last
        student layer meets the last teacher layer; 3 of 6 gives [(0, 1), (1, 3), (2, 5)] (in 1-based counting
        student 3 <-> teacher 6, as in PKD-skip / MiniLM-style maps), 2 of 4 gives [(0, 1), (1, 3)];
      * a list of [student, teacher] pairs; negative indices count from the end and are normalised.
    Round-half cases use Python's round (to even); for integer ratios there are none.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer map: need at least one layer (student {n_student}, teacher {n_teacher})")
    if isinstance(spec, str):
        if spec != "uniform":
            raise ValueError(f"layer map: unknown spec {spec!r} (use 'uniform' or a list of [student, teacher] "
                             "pairs)")
        return [(i, max(0, min(n_teacher - 1, round((i + 1) * n_teacher / n_student) - 1)))
                for i in range(n_student)]
    if spec is None or not len(spec):
        raise ValueError("layer map: empty; give 'uniform' or at least one [student, teacher] pair")
    pairs = []
    for pair in spec:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"layer map: {pair!r} is not a [student, teacher] pair")
        s, t = pair
        if isinstance(s, bool) or isinstance(t, bool) or not isinstance(s, int) or not isinstance(t, int):
            raise ValueError(f"layer map: pair {list(pair)} must hold two integers")
        if not -n_student <= s < n_student:
            raise ValueError(f"layer map: pair {list(pair)}: student layer {s} out of range for a student with "
                             f"{n_student} layers")
        if not -n_teacher <= t < n_teacher:
            raise ValueError(f"layer map: pair {list(pair)}: teacher layer {t} out of range for a teacher with "
                             f"{n_teacher} layers")
        pairs.append((s % n_student, t % n_teacher))
    return pairs


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                 reduction: str = "mean", num_items=None) -> torch.Tensor:
    """KL(A_teacher || A_student) between attention maps, per query position, averaged over heads.

    student (B, H_s, T, T), teacher (B, H_t, T, T): rows are probability distributions over keys (softmax outputs).
    When H_s != H_t both are averaged over their heads first (one map per model). Per query q:
    sum_k A_t[q, k] (log A_t[q, k] - log A_s[q, k]); keys the teacher gives no mass (padding, the causal future)
    contribute exactly 0. `mask` (B, T) bool selects the counted queries; reduction as in `reduce_positions`.
    Reference: MiniLM (Wang et al., 2020), self-attention distribution transfer; TinyBERT (Jiao et al., 2020).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] or \
            student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"attention maps must be (B, H, T, T) with equal B and T, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s, t = student.to(dtype), teacher.to(dtype)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    positive = t > 0
    log_ratio = torch.where(positive, t.clamp_min(1e-38).log() - s.clamp_min(1e-38).log(), torch.zeros_like(t))
    per_query = (t * log_ratio).sum(-1).mean(1)                             # (B, T)
    leading = per_query.shape
    flat = None if mask is None else mask.reshape(-1).bool()
    values = per_query.reshape(-1) if flat is None else per_query.reshape(-1)[flat]
    return reduce_positions(values, leading, flat, reduction, num_items)
