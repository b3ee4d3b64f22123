"""Tests for the sparse (top-k) teacher divergences in ``kdistill.losses.topk``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import DIVERGENCES, TopKTeacher, topk_divergence, topk_from_logits
from kdistill.losses.topk import _student_bucket, _teacher_bucket

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
KWARGS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
B, L, V = 2, 3, 7


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    t = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    return s, t, mask


def _value_and_grad(fn, s):
    s = s.clone().requires_grad_(True)
    out = fn(s)
    (g,) = torch.autograd.grad(out, s)
    return out.detach(), g


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["renormalize", "bucket"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_full_k_matches_dense(name, missing, T):
    s, t, mask = _data()
    kw = KWARGS.get(name, {})
    teacher = topk_from_logits(t, k=V, temperature=T)
    v1, g1 = _value_and_grad(lambda x: topk_divergence(x, teacher, name, mask=mask, temperature=T,
                                                       missing=missing, **kw), s)
    v2, g2 = _value_and_grad(lambda x: DIVERGENCES[name](x, t, mask=mask, temperature=T, **kw), s)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    n1 = topk_divergence(s, teacher, name, mask=mask, temperature=T, missing=missing, reduction="none", **kw)
    n2 = DIVERGENCES[name](s, t, mask=mask, temperature=T, reduction="none", **kw)
    torch.testing.assert_close(n1, n2, atol=1e-5, rtol=1e-5)


def _collapse(logp, idx):
    """Reference (k+1)-outcome log-distribution: the k ids, then the summed rest (float64, plain ops)."""
    p = logp.double().exp()
    pk = p.gather(-1, idx)
    rest = (p.sum(-1, keepdim=True) - pk.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([pk, rest], -1).log()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_bucket_matches_collapsed_dense(name, T):
    """k < V: the bucket loss is the dense divergence between the (k+1)-outcome collapsed distributions."""
    s, t, mask = _data(1)
    kw = KWARGS.get(name, {})
    k = 3
    teacher = topk_from_logits(t, k=k, temperature=T)
    got = topk_divergence(s, teacher, name, mask=mask, temperature=T, missing="bucket", reduction="none", **kw)
    ref_t = _collapse(F.log_softmax(t.double() / T, -1), teacher.indices)
    ref_s = _collapse(F.log_softmax(s.double() / T, -1), teacher.indices)
    # log-probs * T as logits at temperature T give back exactly those distributions
    ref = DIVERGENCES[name](ref_s * T, ref_t * T, mask=mask, temperature=T, reduction="none", **kw)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_bucket_and_renormalized_distributions_sum_to_one():
    s, t, _ = _data(2)
    k = 3
    teacher = topk_from_logits(t, k=k)
    lp = teacher.logprobs.reshape(-1, k)
    idx = teacher.indices.reshape(-1, k)
    log_pt = torch.cat([lp, _teacher_bucket(lp)], -1)
    torch.testing.assert_close(log_pt.exp().sum(-1), torch.ones(B * L), atol=1e-6, rtol=0)
    log_pk, log_rest = _student_bucket(s.reshape(-1, V).float(), idx)
    torch.testing.assert_close(torch.cat([log_pk, log_rest], -1).exp().sum(-1), torch.ones(B * L),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(F.log_softmax(lp, -1).exp().sum(-1), torch.ones(B * L), atol=1e-6, rtol=0)
    # teacher covering everything: bucket is exactly empty
    full = topk_from_logits(t, k=V).logprobs.reshape(-1, V)
    assert torch.isneginf(_teacher_bucket(full)).all()


def test_student_bucket_underflow_is_stable():
    """A rest mass far below float32 resolution is still computed exactly in log space."""
    s = torch.tensor([[100.0, 0.0, 0.0]])
    log_pk, log_rest = _student_bucket(s, torch.tensor([[0]]))
    expected = torch.log(torch.tensor(2.0)) - 100.0  # log(2 e^0) - log(e^100 + 2)
    torch.testing.assert_close(log_rest, expected.reshape(1, 1), atol=1e-4, rtol=0)
    assert torch.isfinite(log_pk).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["renormalize", "bucket"])
@pytest.mark.parametrize("k", [1, 3, V])
def test_extreme_logits_finite(name, missing, k):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, V, generator=g).sign() * 1e4
    t = torch.randn(4, V, generator=g).sign() * 1e4
    teacher = topk_from_logits(t, k=k, temperature=2.0)
    v, grad = _value_and_grad(lambda x: topk_divergence(x, teacher, name, temperature=2.0, missing=missing,
                                                        **KWARGS.get(name, {})), s)
    if name == "reverse_kl" and missing == "bucket" and k < V:
        # the teacher's bucket may be exactly empty, then reverse KL is legitimately infinite (as dense)
        assert not torch.isnan(v)
    else:
        assert torch.isfinite(v)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("missing", ["renormalize", "bucket"])
def test_k1(missing):
    s, t, mask = _data(4)
    teacher = topk_from_logits(t, k=1)
    assert teacher.indices.shape == (B, L, 1)
    v, grad = _value_and_grad(lambda x: topk_divergence(x, teacher, mask=mask, missing=missing), s)
    assert torch.isfinite(v) and torch.isfinite(grad).all()
    if missing == "renormalize":  # one outcome on both sides: nothing to distinguish
        assert v.abs() < 1e-6
    else:
        assert v > 0


@pytest.mark.parametrize("name", NAMES)
def test_retempering_exact_with_full_k(name):
    s, t, mask = _data(5)
    kw = KWARGS.get(name, {})
    teacher = topk_from_logits(t, k=V, temperature=1.0)
    v1, g1 = _value_and_grad(lambda x: topk_divergence(x, teacher, name, mask=mask, temperature=2.0,
                                                       missing="renormalize", **kw), s)
    v2, g2 = _value_and_grad(lambda x: DIVERGENCES[name](x, t, mask=mask, temperature=2.0, **kw), s)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_retempering_topk_is_renormalized_softmax_at_new_temperature():
    s, t, _ = _data(6)
    k = 3
    captured = topk_from_logits(t, k=k, temperature=0.5)
    direct = topk_from_logits(t, k=k, temperature=3.0)
    assert torch.equal(captured.indices, direct.indices)  # tempering keeps the order
    a = topk_divergence(s, captured, "forward_kl", temperature=3.0, missing="renormalize")
    b = topk_divergence(s, direct, "forward_kl", temperature=3.0, missing="renormalize")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bucket_with_other_temperature_raises():
    s, t, _ = _data(7)
    teacher = topk_from_logits(t, k=3, temperature=1.0)
    with pytest.raises(ValueError, match="capture"):
        topk_divergence(s, teacher, temperature=2.0, missing="bucket")


@pytest.mark.parametrize("missing", ["renormalize", "bucket"])
def test_masked_positions_never_matter(missing):
    s, t, mask = _data(8)
    teacher = topk_from_logits(t, k=3)
    s2 = s.clone()
    s2[~mask] = float("nan")
    lp = teacher.logprobs.clone()
    lp[~mask] = float("nan")
    idx = teacher.indices.clone()
    idx[~mask] = 0
    teacher2 = TopKTeacher(idx, lp, 1.0)
    v1, g1 = _value_and_grad(lambda x: topk_divergence(x, teacher, mask=mask, missing=missing), s)
    v2, g2 = _value_and_grad(lambda x: topk_divergence(x, teacher2, mask=mask, missing=missing), s2)
    torch.testing.assert_close(v1, v2)
    assert torch.equal(g2[~mask], torch.zeros_like(g2[~mask]))
    torch.testing.assert_close(g1[mask], g2[mask])
    none = topk_divergence(s2, teacher2, mask=mask, missing=missing, reduction="none")
    assert none.shape == (B, L) and torch.equal(none[~mask], torch.zeros_like(none[~mask]))


def test_reductions_and_num_items():
    s, t, mask = _data(9)
    teacher = topk_from_logits(t, k=4)
    none = topk_divergence(s, teacher, mask=mask, reduction="none")
    total = topk_divergence(s, teacher, mask=mask, reduction="sum")
    mean = topk_divergence(s, teacher, mask=mask)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, total / mask.sum())
    torch.testing.assert_close(topk_divergence(s, teacher, mask=mask, num_items=10), total / 10)
    torch.testing.assert_close(topk_divergence(s, teacher, mask=mask, num_items=torch.tensor(10)), total / 10)


def test_float64_stays_float64_and_bad_arguments():
    s, t, _ = _data(10, torch.float64)
    teacher = topk_from_logits(t, k=3)
    assert teacher.logprobs.dtype == torch.float64
    assert topk_divergence(s, teacher).dtype == torch.float64
    assert topk_divergence(s.half(), topk_from_logits(t.half(), k=3)).dtype == torch.float32
    with pytest.raises(ValueError):
        topk_divergence(s, teacher, missing="drop")
    with pytest.raises(ValueError):
        topk_divergence(s, teacher, "not_a_divergence")
    with pytest.raises(TypeError):
        topk_divergence(s, teacher, "forward_kl", beta=0.5)
    with pytest.raises(ValueError):
        topk_divergence(s, teacher, "jsd", beta=2.0)
    with pytest.raises(ValueError):
        topk_divergence(s[..., :2], teacher)
    with pytest.raises(ValueError):
        topk_from_logits(t, k=V + 1)


def test_student_bucket_all_ids_covered_has_finite_gradient():
    s = torch.randn(2, 4, requires_grad=True)
    idx = torch.arange(4).repeat(2, 1)
    log_pk, log_rest = _student_bucket(s, idx)
    assert (log_rest < -1e30).all()
    (g,) = torch.autograd.grad(log_pk.sum() + log_rest.sum() * 0, s)
    assert torch.isfinite(g).all()
