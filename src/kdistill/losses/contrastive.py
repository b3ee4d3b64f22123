"""Losses on sentence embeddings: contrastive training and embedding-level distillation.

Every function here is pure: tensors in, a tensor out, no model code and no I/O. Computation is upcast to
float32 (float64 inputs stay float64). Teacher tensors are used as given: the caller detaches them.

    info_nce          InfoNCE / in-batch-negatives cross-entropy on cosine similarities (optionally over the
                      global batch of all data-parallel processes)
    embedding_mse     mean squared error between student and teacher embeddings
    embedding_cosine  1 - cos(student_i, teacher_i)
    similarity_kd     KL between the teacher's and the student's in-batch similarity distributions

Rows are the items that `reduction` counts (one anchor, one sentence):
    reduction : "mean" (default): sum over rows / number of rows, or / `num_items` when given (pass the global
        number of rows in the optimizer step, all gradient-accumulation micro-batches and all processes, so that
        accumulation and data parallelism do not change the objective; the caller then multiplies by the number
        of processes, because DDP averages gradients; kdistill's trainer does this); "sum": sum over rows;
        "none": per-row values, shape (B,).

Cosine similarities are computed on rows scaled to unit length, x / max(||x||, eps) with eps = 1e-8, so a
zero vector has cosine 0 with everything and values and gradients stay finite.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdistill.losses.divergences import reduce_positions

__all__ = [
    "info_nce",
    "embedding_mse",
    "embedding_cosine",
    "similarity_kd",
]

_REDUCTIONS = ("mean", "sum", "none")
_EPS = 1e-8


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The common dtype of the inputs, at least float32 (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; rows with norm < eps are divided by eps instead (zero stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _check_rows(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, same_dim: bool) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name_a} and {name_b} must be 2-D (B, D), got shapes {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of rows, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if same_dim and a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same embedding dimension, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}; when the dimensions differ, map the student into the teacher's space with a "
            f"learned linear projection first (or use similarity_kd, which compares only B x B similarities)")


# ------------------------------------------------------------------------------------------ distributed gather
def _distributed_world() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0 (rank order), differentiably.

    Backward: the gradient of the full gathered tensor is summed over ranks (all_reduce) and each rank keeps
    its own slice, i.e. the gradient that every rank's loss sends to this rank's rows. all_reduce is used
    rather than reduce_scatter / all_to_all because every backend (gloo included) implements it.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def _gather_rows(tensor: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """All ranks' rows, in rank order; this rank's block is `tensor` itself, so its own gradient flows to it
    directly and the other ranks' contributions arrive through the collective's backward."""
    gathered = _AllGatherRows.apply(tensor)
    rows = tensor.shape[0]
    return torch.cat([gathered[:rank * rows], tensor, gathered[(rank + 1) * rows:]], dim=0)


def _check_same_local_shapes(shape: tuple[int, ...], device: torch.device, world: int) -> None:
    """Every rank must contribute the same (B, K, D); raises the same error on every rank otherwise."""
    local = torch.tensor(shape, dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    shapes = [tuple(int(v) for v in p.tolist()) for p in parts]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            "info_nce(gather=True) needs the same local batch on every rank (batch size, hard negatives per "
            "anchor, embedding dimension); got (B, K, D) per rank: "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            + " (pad the last batch or drop it, e.g. dataloader_drop_last=True)")


# -------------------------------------------------------------------------------------------------- losses
def info_nce(anchor, positive, negatives=None, temperature=0.05, reduction="mean", num_items=None,
             gather=False) -> torch.Tensor:
    """InfoNCE with in-batch negatives (and optional hard negatives) on cosine similarities.

    For anchor i of the batch, with c = cosine similarity and tau = `temperature`, the candidates are

        every positive of the batch, p_1 .. p_B           (p_i is the target; p_j, j != i, are in-batch negatives)
        every hard negative of the batch, n_{j,k}         (all anchors' negatives, j = 1..B, k = 1..K: B*K)

    and the per-anchor loss is the cross-entropy of the softmax over the candidates' logits c(a_i, .) / tau:

        loss_i = -c(a_i, p_i) / tau + log( sum_j exp(c(a_i, p_j) / tau) + sum_{j,k} exp(c(a_i, n_{j,k}) / tau) )

    Candidates are never deduplicated or masked: a duplicate of the positive elsewhere in the batch counts as a
    negative. (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding";
    in-batch negatives as in Henderson et al., 2017, and hard negatives as in Karpukhin et al., 2020, DPR.)

    Equivalence: the value equals sentence-transformers' (6.x) `MultipleNegativesRankingLoss(model,
    scale=1/temperature)` in its default configuration (similarity_fct=cos_sim, directions=("query_to_doc",),
    partition_mode="joint", hardness_mode=None, gather_across_devices=False) given the columns
    (anchor, positive, negatives[:, 0], ..., negatives[:, K-1]) and reduction="mean": its candidate set is the
    same (the order of candidates differs, which does not change a softmax cross-entropy).

    Shapes
        anchor, positive : (B, D). negatives : None, (B, D) (one hard negative per anchor) or (B, K, D).
        Returns a 0-dim tensor, or (B,) for reduction="none"; float32 (float64 for float64 inputs).

    Reduction: "mean" is sum / B, or sum / `num_items` when given; "sum"; "none" (see the module docstring).

    gather (data parallelism): when True and torch.distributed is initialised with world size W > 1, the
        positives and hard negatives of all ranks are all-gathered, so each rank's B anchors are scored against
        the global batch's W*B positives and W*B*K hard negatives; rank r's anchor i has target r*B + i. The
        gather is differentiable and this rank's block is its own tensor, so the gradient of every rank's
        anchors' loss flows back to the embeddings that produced each candidate. All ranks must pass the same
        (B, K, D) (checked with one small collective; a ValueError on every rank otherwise).
        Normalisation convention (the same as every kdistill loss under data parallelism): each rank returns
        its share of the GLOBAL mean, i.e. "mean" without num_items divides this rank's sum by W*B (the global
        number of anchors), and "mean" with num_items divides by num_items (the global count over all ranks and
        accumulation steps). Hence
            * the sum over ranks of the returned values is the loss of the global batch, and
            * each rank's gradient w.r.t. its own embeddings is exactly the gradient of the global loss
              w.r.t. them;
        because DDP AVERAGES parameter gradients over ranks, the caller multiplies the loss by W before
        backward (kdistill's trainer scales by the number of processes) to obtain the global gradient.
        "sum" returns this rank's anchors' sum and "none" this rank's (B,) values.
        When torch.distributed is not initialised, or W = 1, gather=True does nothing.
    """
    _check_temperature("temperature", temperature)
    _check_reduction(reduction)
    _check_rows("anchor", anchor, "positive", positive, same_dim=True)
    batch, dim = anchor.shape
    if negatives is not None:
        if negatives.dim() == 2:
            negatives = negatives.unsqueeze(1)
        if negatives.dim() != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
            raise ValueError(f"negatives must be (B, D) or (B, K, D) with B={batch} and D={dim} (anchor shape "
                             f"{tuple(anchor.shape)}), got {tuple(negatives.shape)}")
    dtype = _compute_dtype(anchor, positive, negatives)
    a = _unit(anchor.to(dtype))
    p = _unit(positive.to(dtype))
    n = None if negatives is None else _unit(negatives.to(dtype))

    world, rank = _distributed_world() if gather else (1, 0)
    if world > 1:
        k = 0 if n is None else n.shape[1]
        _check_same_local_shapes((batch, k, dim), anchor.device, world)
        p = _gather_rows(p, world, rank)
        if n is not None:
            n = _gather_rows(n, world, rank)

    candidates = p if n is None else torch.cat([p, n.reshape(-1, dim)], dim=0)
    logits = a @ candidates.T / temperature                       # (B, W*B*(1+K))
    targets = torch.arange(batch, device=anchor.device) + rank * batch
    per_anchor = F.cross_entropy(logits, targets, reduction="none")
    if reduction == "mean" and num_items is None:
        num_items = batch * world
    return reduce_positions(per_anchor, per_anchor.shape, None, reduction, num_items)


def embedding_mse(student, teacher, reduction="mean", num_items=None) -> torch.Tensor:
    """Mean squared error between embeddings: per row, (1/D) * sum_d (s_{i,d} - t_{i,d})^2.

    reduction="mean" averages the rows, which is the mean over all B*D elements: the same value as
    `torch.nn.functional.mse_loss(student, teacher)` and sentence-transformers' `MSELoss` (Reimers & Gurevych,
    2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation"). "sum" is the
    sum over rows of the per-row means (mse_loss(reduction="sum") / D); with `num_items`, that sum / num_items.

    Shapes: student (B, D), teacher (B, D); the dimensions must match (when the student's differs, the caller
    projects it into the teacher's space with a learned linear layer). Returns 0-dim, or (B,) for "none".
    """
    _check_reduction(reduction)
    _check_rows("student", student, "teacher", teacher, same_dim=True)
    dtype = _compute_dtype(student, teacher)
    per_row = (student.to(dtype) - teacher.to(dtype)).pow(2).mean(dim=-1)
    return reduce_positions(per_row, per_row.shape, None, reduction, num_items)


def embedding_cosine(student, teacher, reduction="mean", num_items=None) -> torch.Tensor:
    """Cosine distance between embeddings: per row, 1 - cos(s_i, t_i), in [0, 2] (0 when parallel).

    reduction="mean" averages the rows: the value of sentence-transformers' `EmbedDistillLoss(model,
    distance_metric="cosine")` (Kim et al., 2023, "EmbedDistill: A Geometric Knowledge Distillation for
    Information Retrieval"). A zero row has cosine 0 with everything (distance 1).

    Shapes: student (B, D), teacher (B, D); the dimensions must match (when the student's differs, the caller
    projects it into the teacher's space with a learned linear layer). Returns 0-dim, or (B,) for "none".
    """
    _check_reduction(reduction)
    _check_rows("student", student, "teacher", teacher, same_dim=True)
    dtype = _compute_dtype(student, teacher)
    cos = (_unit(student.to(dtype)) * _unit(teacher.to(dtype))).sum(dim=-1).clamp(-1.0, 1.0)
    per_row = 1.0 - cos
    return reduce_positions(per_row, per_row.shape, None, reduction, num_items)


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """(B, B) -> (B, B-1): row i without its column i."""
    b = matrix.shape[0]
    keep = ~torch.eye(b, dtype=torch.bool, device=matrix.device)
    return matrix[keep].reshape(b, b - 1)


def similarity_kd(student, teacher, temperature=0.05, teacher_temperature=None, reduction="mean",
                  num_items=None) -> torch.Tensor:
    """Similarity-distribution (relational) distillation over the batch.

    With c the cosine similarity, T_s = `temperature` and T_t = `teacher_temperature` (default T_s), row i of
    the batch defines two distributions over the OTHER rows j != i:

        P_s(j | i) = softmax_{j != i}( c(s_i, s_j) / T_s ),    P_t(j | i) = softmax_{j != i}( c(t_i, t_j) / T_t )

    and the per-row loss is KL(P_t(. | i) || P_s(. | i)) = sum_{j != i} P_t (log P_t - log P_s) >= 0.

    The diagonal (self-similarity, always 1 for a non-zero row) is excluded on both sides: it carries no
    information about the teacher, and at a small temperature it would take almost all of the mass and flatten
    the signal from the other rows. There is no T^2 factor (unlike kdistill.losses.divergences): the
    temperatures are scales of cosine similarities, possibly different for the two sides.

    The loss depends on the embeddings only through the B x B cosine-similarity matrices, so it is 0 whenever
    the student's similarities equal the teacher's (for example a rotation of the teacher, or a rescaling of
    its rows), and the dimensions D_s and D_t may differ. The relational idea is Park et al., 2019, "Relational
    Knowledge Distillation"; the KL between in-batch similarity distributions is the form of CompRess
    (Abbasi Koohpayegani et al., 2020) and SEED (Fang et al., 2021).

    Shapes: student (B, D_s), teacher (B, D_t), B >= 2. Returns 0-dim, or (B,) for "none". Reduction as in
    the module docstring (mean over rows by default). Under data parallelism each rank compares its own
    batch's similarities (nothing is gathered).
    """
    _check_temperature("temperature", temperature)
    if teacher_temperature is None:
        teacher_temperature = temperature
    _check_temperature("teacher_temperature", teacher_temperature)
    _check_reduction(reduction)
    _check_rows("student", student, "teacher", teacher, same_dim=False)
    if student.shape[0] < 2:
        raise ValueError(f"similarity_kd needs at least 2 rows (the diagonal is excluded), got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = _compute_dtype(student, teacher)
    s = _unit(student.to(dtype))
    t = _unit(teacher.to(dtype))
    log_ps = F.log_softmax(_off_diagonal(s @ s.T) / temperature, dim=-1)
    log_pt = F.log_softmax(_off_diagonal(t @ t.T) / teacher_temperature, dim=-1)
    per_row = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return reduce_positions(per_row, per_row.shape, None, reduction, num_items)
