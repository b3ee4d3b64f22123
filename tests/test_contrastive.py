"""Tests for the embedding losses in ``kdistill.losses.contrastive``.

Expected values come from sentence-transformers' own losses (fed the same embeddings through their
``compute_loss_from_embeddings``), from explicit float64 loops written below, and from closed forms; the
2-process test runs the real gloo collectives.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import embedding_cosine, embedding_mse, info_nce, similarity_kd


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _st_losses():
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    return st


# ------------------------------------------------------------------------------------------ references
def ref_info_nce(anchor, positive, negatives, temperature):
    """Per-anchor InfoNCE, float64, one anchor and one candidate at a time."""
    a, p = anchor.double(), positive.double()
    n = None if negatives is None else negatives.double()
    if n is not None and n.dim() == 2:
        n = n.unsqueeze(1)

    def cos(x, y):
        return float(x @ y) / max(float(x.norm()) * float(y.norm()), 1e-300)

    out = []
    for i in range(a.shape[0]):
        logits = [cos(a[i], p[j]) / temperature for j in range(p.shape[0])]
        if n is not None:
            logits += [cos(a[i], n[j, k]) / temperature for j in range(n.shape[0]) for k in range(n.shape[1])]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        out.append(log_z - logits[i])
    return torch.tensor(out, dtype=torch.float64)


def ref_similarity_kd(student, teacher, ts, tt):
    """Per-row KL(P_t || P_s) over j != i, float64 loops."""
    s, t = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    b = s.shape[0]
    out = []
    for i in range(b):
        others = [j for j in range(b) if j != i]
        ls = torch.log_softmax(torch.stack([s[i] @ s[j] for j in others]) / ts, 0)
        lt = torch.log_softmax(torch.stack([t[i] @ t[j] for j in others]) / tt, 0)
        out.append(float((lt.exp() * (lt - ls)).sum()))
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ info_nce
@pytest.mark.parametrize("temperature", [0.02, 0.05, 0.1, 1.0])
@pytest.mark.parametrize("num_neg", [0, 1, 3])
def test_info_nce_equals_sentence_transformers_mnrl(temperature, num_neg):
    losses = _st_losses()
    g = _gen(int(temperature * 1000) + num_neg)
    b, d = 7, 16
    a, p = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    # Make the problem non-trivial: positives correlated with anchors.
    p = a + 0.8 * p
    n = torch.randn(b, num_neg, d, generator=g) + 0.5 * a.unsqueeze(1) if num_neg else None
    st = losses.MultipleNegativesRankingLoss(model=None, scale=1.0 / temperature)  # default configuration
    assert st.directions == ("query_to_doc",) and st.partition_mode == "joint" and st.hardness_mode is None
    columns = [a, p] + ([n[:, k] for k in range(num_neg)] if num_neg else [])
    expected = st.compute_loss_from_embeddings(columns, None)
    got = info_nce(a, p, n, temperature=temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if num_neg == 1:  # a (B, D) negatives tensor means one hard negative per anchor
        torch.testing.assert_close(info_nce(a, p, n[:, 0], temperature=temperature), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_neg", [None, 1, 3])
@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_info_nce_matches_float64_loop(num_neg, temperature):
    g = _gen(11)
    b, d = 5, 8
    a = torch.randn(b, d, generator=g, dtype=torch.float64)
    p = a + torch.randn(b, d, generator=g, dtype=torch.float64)
    n = None if num_neg is None else torch.randn(b, num_neg, d, generator=g, dtype=torch.float64)
    ref = ref_info_nce(a, p, n, temperature)
    got = info_nce(a, p, n, temperature=temperature, reduction="none")
    assert got.dtype == torch.float64 and got.shape == (b,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # float32 / bfloat16 inputs are computed in float32
    got32 = info_nce(a.float(), p.float(), None if n is None else n.float(), temperature=temperature,
                     reduction="none")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-4)
    assert info_nce(a.bfloat16(), p.bfloat16(), temperature=temperature).dtype == torch.float32


def test_info_nce_perfect_alignment_with_orthogonal_others():
    b, k, d = 4, 2, 16
    eye = torch.eye(d)
    a = eye[:b] * 3.0                       # scale does not matter (cosine)
    p = eye[:b].clone()
    n = eye[b:b + b * k].reshape(b, k, d)   # orthogonal to every anchor and positive
    assert info_nce(a, p, n, temperature=0.01) < 1e-6
    # exact value: log(1 + (B - 1 + B*K) * exp(-1/T))
    t = 0.5
    expected = math.log(1 + (b - 1 + b * k) * math.exp(-1 / t))
    torch.testing.assert_close(info_nce(a, p, n, temperature=t, reduction="none"), torch.full((b,), expected))
    # swapping the positives makes it large
    assert info_nce(a, p.roll(1, 0), n, temperature=0.01) > 50


def test_info_nce_reductions_and_num_items():
    g = _gen(3)
    a, p = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    n = torch.randn(6, 2, 5, generator=g)
    none = info_nce(a, p, n, reduction="none")
    total = info_nce(a, p, n, reduction="sum")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(info_nce(a, p, n), none.mean())
    torch.testing.assert_close(info_nce(a, p, n, num_items=24), none.sum() / 24)
    torch.testing.assert_close(info_nce(a, p, n, num_items=torch.tensor(24)), none.sum() / 24)
    # gather=True without torch.distributed initialised is a no-op
    torch.testing.assert_close(info_nce(a, p, n, gather=True), info_nce(a, p, n))
    with pytest.raises(ValueError, match="reduction"):
        info_nce(a, p, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(a, p, temperature=0.0)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(a, p, torch.randn(5, 2, 5))
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        info_nce(a, torch.randn(6, 4))


def test_info_nce_gradcheck_float64():
    g = _gen(5)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, z: info_nce(x, y, z, temperature=0.2), (a, p, n))
    assert torch.autograd.gradcheck(lambda x, y: info_nce(x, y, temperature=0.1, reduction="none"), (a, p))


def test_degenerate_rows_stay_finite():
    x = torch.zeros(4, 6, requires_grad=True)          # zero vectors
    y = torch.ones(4, 6, requires_grad=True)           # identical rows
    for fn in (lambda: info_nce(x, y, y.unsqueeze(1)), lambda: info_nce(y, y),
               lambda: embedding_cosine(x, y), lambda: embedding_mse(x, y),
               lambda: similarity_kd(x, y), lambda: similarity_kd(y, x)):
        x.grad = y.grad = None
        value = fn()
        value.backward()
        assert torch.isfinite(value)
        for t in (x, y):
            assert t.grad is None or torch.isfinite(t.grad).all()
    # identical rows everywhere: every candidate ties, loss = log(number of candidates)
    torch.testing.assert_close(info_nce(y, y), torch.tensor(math.log(4.0)))


# ------------------------------------------------------------------------------- 2-process gathering
WORLD = 2


def _gather_worker(rank: int, workdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    try:
        data = torch.load(os.path.join(workdir, "inputs.pt"))
        t = data["temperature"]
        b = data["anchor"].shape[0] // WORLD
        rows = slice(rank * b, (rank + 1) * b)
        out = {}

        # (a) leaf embeddings: value and gradient w.r.t. this rank's embeddings
        a, p, n = (data[k][rows].clone().requires_grad_(True) for k in ("anchor", "positive", "negatives"))
        loss = info_nce(a, p, n, temperature=t, gather=True)
        loss.backward()
        out.update(loss=loss.detach(), grad_a=a.grad, grad_p=p.grad, grad_n=n.grad)
        with torch.no_grad():
            out["loss_num_items"] = info_nce(a, p, n, temperature=t, gather=True, num_items=b * WORLD)
            out["sum"] = info_nce(a, p, n, temperature=t, gather=True, reduction="sum")
            out["none"] = info_nce(a, p, n, temperature=t, gather=True, reduction="none")
            out["no_gather"] = info_nce(a, p, n, temperature=t, gather=False)

        # (b) a shared parameter, as a DDP-replicated model would have: per-rank parameter gradients
        w = data["weight"].clone().requires_grad_(True)
        xa, xp, xn = (data[k][rows] for k in ("x_anchor", "x_positive", "x_negatives"))
        info_nce(xa @ w, xp @ w, xn @ w, temperature=t, gather=True).backward()
        out["grad_w"] = w.grad

        # (c) different local batch sizes: a clear error on every rank
        m = b - rank
        try:
            info_nce(data["anchor"][:m], data["positive"][:m], temperature=t, gather=True)
            out["error"] = None
        except ValueError as exc:
            out["error"] = str(exc)
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_info_nce_gather_two_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    g = _gen(7)
    b_global, k, d, d_in = 8, 2, 6, 5
    dt = torch.float64
    data = {
        "temperature": 0.1,
        "anchor": torch.randn(b_global, d, generator=g, dtype=dt),
        "positive": torch.randn(b_global, d, generator=g, dtype=dt),
        "negatives": torch.randn(b_global, k, d, generator=g, dtype=dt),
        "weight": torch.randn(d_in, d, generator=g, dtype=dt),
        "x_anchor": torch.randn(b_global, d_in, generator=g, dtype=dt),
        "x_positive": torch.randn(b_global, d_in, generator=g, dtype=dt),
        "x_negatives": torch.randn(b_global, k, d_in, generator=g, dtype=dt),
    }
    data["positive"] = data["positive"] + data["anchor"]
    torch.save(data, tmp_path / "inputs.pt")
    mp.spawn(_gather_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process, the global batch
    t = data["temperature"]
    a, p, n = (data[key].clone().requires_grad_(True) for key in ("anchor", "positive", "negatives"))
    full = info_nce(a, p, n, temperature=t)
    full.backward()
    w = data["weight"].clone().requires_grad_(True)
    info_nce(data["x_anchor"] @ w, data["x_positive"] @ w, data["x_negatives"] @ w, temperature=t).backward()

    tol = dict(rtol=1e-6, atol=1e-6)
    # Convention: each rank returns its share of the global mean; the shares add up to the global loss.
    torch.testing.assert_close(res[0]["loss"] + res[1]["loss"], full.detach(), **tol)
    torch.testing.assert_close(res[0]["loss_num_items"], res[0]["loss"], **tol)
    torch.testing.assert_close(res[0]["sum"] + res[1]["sum"], full.detach() * b_global, **tol)
    torch.testing.assert_close(torch.cat([res[0]["none"], res[1]["none"]]),
                               info_nce(data["anchor"], data["positive"], data["negatives"], temperature=t,
                                        reduction="none"), **tol)
    # without gathering each rank only sees its own candidates: a different (easier) objective
    assert not torch.allclose(res[0]["no_gather"] + res[1]["no_gather"], 2 * full.detach())
    # Each rank's gradient w.r.t. its own embeddings is exactly the global gradient's slice (no scaling).
    for key, leaf in (("grad_a", a), ("grad_p", p), ("grad_n", n)):
        torch.testing.assert_close(torch.cat([res[0][key], res[1][key]]), leaf.grad, **tol)
    # DDP averages parameter gradients, so world_size * average = the one-process gradient.
    ddp_average = (res[0]["grad_w"] + res[1]["grad_w"]) / WORLD
    torch.testing.assert_close(WORLD * ddp_average, w.grad, **tol)
    for r in range(WORLD):
        assert res[r]["error"] is not None and "same local batch" in res[r]["error"]
        assert "rank 0: (4, 0, 6)" in res[r]["error"] and "rank 1: (3, 0, 6)" in res[r]["error"]


# --------------------------------------------------------------------------------- embedding_mse / cosine
def test_embedding_mse_matches_mse_loss_and_sentence_transformers():
    losses = _st_losses()
    g = _gen(9)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    torch.testing.assert_close(embedding_mse(s, t), F.mse_loss(s, t))
    st = losses.MSELoss(model=None).compute_loss_from_embeddings([s], [t])
    torch.testing.assert_close(embedding_mse(s, t), st)
    per_row = embedding_mse(s, t, reduction="none")
    torch.testing.assert_close(per_row, ((s - t) ** 2).mean(dim=1))
    torch.testing.assert_close(embedding_mse(s, t, reduction="sum"), F.mse_loss(s, t, reduction="sum") / 12)
    torch.testing.assert_close(embedding_mse(s, t, num_items=10), per_row.sum() / 10)
    assert embedding_mse(s.double(), t.double()).dtype == torch.float64
    assert embedding_mse(s.half(), t.half()).dtype == torch.float32


def test_embedding_cosine_range_identity_and_sentence_transformers():
    losses = _st_losses()
    g = _gen(10)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    values = embedding_cosine(s, t, reduction="none")
    assert ((values >= 0) & (values <= 2)).all()
    torch.testing.assert_close(values, 1 - F.cosine_similarity(s, t, dim=-1))
    st = losses.EmbedDistillLoss(None, distance_metric="cosine").compute_loss_from_embeddings([s], [t])
    torch.testing.assert_close(embedding_cosine(s, t), st)
    assert embedding_cosine(s, s) == pytest.approx(0.0, abs=1e-6)
    assert embedding_cosine(s, 3.0 * s) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(embedding_cosine(s, -s, reduction="none"), torch.full((6,), 2.0))
    torch.testing.assert_close(embedding_cosine(s, t, reduction="sum"), values.sum())
    torch.testing.assert_close(embedding_cosine(s, t, num_items=12), values.sum() / 12)


@pytest.mark.parametrize("fn", [embedding_mse, embedding_cosine])
def test_mismatched_dims_raise(fn):
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 16\).*projection"):
        fn(torch.randn(4, 8), torch.randn(4, 16))
    with pytest.raises(ValueError, match="rows"):
        fn(torch.randn(4, 8), torch.randn(5, 8))


# ------------------------------------------------------------------------------------------ similarity_kd
def test_similarity_kd_matches_loop_and_excludes_diagonal():
    g = _gen(12)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(6, 9, generator=g, dtype=torch.float64)
    for ts, tt in ((0.05, None), (0.1, 0.05), (1.0, 2.0)):
        got = similarity_kd(s, t, temperature=ts, teacher_temperature=tt, reduction="none")
        torch.testing.assert_close(got, ref_similarity_kd(s, t, ts, ts if tt is None else tt))
    per_row = similarity_kd(s, t, reduction="none")
    torch.testing.assert_close(similarity_kd(s, t), per_row.mean())
    torch.testing.assert_close(similarity_kd(s, t, reduction="sum"), per_row.sum())
    torch.testing.assert_close(similarity_kd(s, t, num_items=12), per_row.sum() / 12)
    # Two rows: each row has a single other row, so the distributions are both a point mass -> 0, whatever
    # the embeddings (this would not hold if the self-similarity were one of the candidates).
    assert similarity_kd(s[:2], t[:2]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        similarity_kd(s[:1], t[:1])


def test_similarity_kd_zero_for_same_similarities_positive_otherwise():
    g = _gen(13)
    t = torch.randn(8, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert similarity_kd(t, t) == pytest.approx(0.0, abs=1e-6)
    assert similarity_kd(t @ q, t) == pytest.approx(0.0, abs=1e-5)           # rotation
    scales = torch.rand(8, 1, generator=g) + 0.5
    assert similarity_kd(t * scales, t) == pytest.approx(0.0, abs=1e-6)      # per-row rescaling
    padded = torch.cat([t @ q, torch.zeros(8, 4)], dim=1)                    # D_s != D_t, same geometry
    assert similarity_kd(padded, t) == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(8, 16, generator=g)
    assert similarity_kd(other, t) > 1e-2
    assert similarity_kd(t, t, temperature=0.05, teacher_temperature=0.1) > 1e-3
    assert similarity_kd(torch.randn(8, 4, generator=g), t).dtype == torch.float32


def test_similarity_kd_decreases_under_sgd():
    g = _gen(14)
    teacher = torch.randn(8, 32, generator=g)
    student = torch.randn(8, 12, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([student], lr=0.05)
    history = []
    for _ in range(30):
        opt.zero_grad()
        loss = similarity_kd(student, teacher.detach(), temperature=0.1)
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:])), history
