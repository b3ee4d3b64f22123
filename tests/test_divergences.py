"""Independent tests for the divergence functions in ``kdistill.losses``.

Every numerical expectation is checked against explicit float64 reference
implementations written below with plain torch ops and Python loops over the
positions; the functions under test are never used to compute expected values
(except for self-consistency properties such as symmetry or reduction
relationships, which are stated in terms of the functions themselves).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import (
    DIVERGENCES,
    forward_kl,
    get_divergence,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]

FUNCS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

# (name, extra kwargs) combinations: defaults plus several beta / alpha values.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.5}),
    ("skew_forward_kl", {"alpha": 0.9}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.9}),
    ("tvd", {}),
]


def _case_id(case):
    name, kw = case
    if not kw:
        return name
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


CASE_IDS = [_case_id(c) for c in CASES]

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# float64 reference implementation
# ----------------------------------------------------------------------------


def _ref_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax of a 1-D float64 vector written out by hand (handles -inf)."""
    m = x.max()
    z = x - m
    return z - torch.log(torch.exp(z).sum())


def _ref_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), with the 0 * log 0 = 0 convention."""
    terms = []
    for lp, lq in zip(logp.tolist(), logq.tolist()):
        if lp == -math.inf:
            continue  # p_v = 0 contributes nothing
        p = math.exp(lp)
        if p == 0.0:
            continue
        terms.append(p * (lp - lq))
    return torch.tensor(math.fsum(terms), dtype=torch.float64)


def _ref_one(name: str, s: torch.Tensor, t: torch.Tensor, T: float, beta: float = 0.5,
             alpha: float = 0.1) -> torch.Tensor:
    """Divergence for a single position: s and t are 1-D logit vectors."""
    s = s.detach().to(torch.float64)
    t = t.detach().to(torch.float64)
    ls = _ref_log_softmax(s / T)
    lt = _ref_log_softmax(t / T)
    ps = torch.exp(ls)
    pt = torch.exp(lt)
    if name == "forward_kl":
        v = _ref_kl(lt, ls)
    elif name == "reverse_kl":
        v = _ref_kl(ls, lt)
    elif name == "jsd":
        m = beta * pt + (1.0 - beta) * ps
        lm = torch.log(m)
        v = torch.zeros((), dtype=torch.float64)
        if beta > 0:
            v = v + beta * _ref_kl(lt, lm)
        if beta < 1:
            v = v + (1.0 - beta) * _ref_kl(ls, lm)
    elif name == "skew_forward_kl":
        m = alpha * pt + (1.0 - alpha) * ps
        v = _ref_kl(lt, torch.log(m))
    elif name == "skew_reverse_kl":
        m = alpha * ps + (1.0 - alpha) * pt
        v = _ref_kl(ls, torch.log(m))
    elif name == "tvd":
        v = 0.5 * (pt - ps).abs().sum()
    else:  # pragma: no cover
        raise AssertionError(name)
    return v * (T * T)


def ref_per_position(name, s, t, T=1.0, **kw) -> torch.Tensor:
    """Per-position float64 values with the shape of the leading dims (loop over rows)."""
    lead = s.shape[:-1]
    V = s.shape[-1]
    s2 = s.detach().reshape(-1, V)
    t2 = t.detach().reshape(-1, V)
    out = torch.zeros(s2.shape[0], dtype=torch.float64)
    for i in range(s2.shape[0]):
        out[i] = _ref_one(name, s2[i], t2[i], T, **kw)
    return out.reshape(lead)


def ref_reduce(vals, mask=None, reduction="mean", num_items=None) -> torch.Tensor:
    if mask is None:
        mask = torch.ones(vals.shape, dtype=torch.bool)
    masked = torch.where(mask, vals, torch.zeros_like(vals))
    if reduction == "none":
        return masked
    total = masked.sum()
    if reduction == "sum":
        return total
    if num_items is not None:
        return total / num_items
    n = int(mask.sum())
    return total / n if n > 0 else torch.zeros((), dtype=torch.float64)


def reference(name, s, t, mask=None, temperature=1.0, reduction="mean", num_items=None, **kw):
    vals = ref_per_position(name, s, t, T=temperature, **kw)
    return ref_reduce(vals, mask, reduction, num_items)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, seed, scale=2.0, dtype=torch.float32):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _mask(shape, seed, p=0.6):
    m = torch.rand(shape, generator=_gen(seed)) < p
    m.view(-1)[0] = True  # make sure at least one position counts
    m.view(-1)[-1] = False  # and at least one is masked out
    return m


def _close(got, expected, atol=1e-5, rtol=1e-5):
    got64 = got.detach().to(torch.float64)
    exp64 = expected.detach().to(torch.float64)
    assert got64.shape == exp64.shape, (got64.shape, exp64.shape)
    assert torch.allclose(got64, exp64, atol=atol, rtol=rtol), (
        f"max abs diff {(got64 - exp64).abs().max().item():.3e}\ngot={got64}\nexpected={exp64}"
    )


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------


def test_registry_has_exactly_the_six_names():
    assert isinstance(DIVERGENCES, dict)
    assert set(DIVERGENCES.keys()) == set(NAMES)
    assert len(DIVERGENCES) == 6


@pytest.mark.parametrize("name", NAMES)
def test_registry_entries_are_the_exported_functions(name):
    assert DIVERGENCES[name] is FUNCS[name]
    assert get_divergence(name) is DIVERGENCES[name]


def test_get_divergence_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        get_divergence("not_a_divergence")
    msg = str(excinfo.value)
    for name in NAMES:
        assert name in msg, f"{name!r} missing from error message: {msg}"


# ----------------------------------------------------------------------------
# basic properties
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_divergence_of_identical_logits_is_zero(case, temperature):
    name, kw = case
    x = _logits((3, 5, 37), seed=1, scale=3.0)
    f = FUNCS[name]
    per = f(x, x.clone(), temperature=temperature, reduction="none", **kw)
    assert per.shape == (3, 5)
    assert per.abs().max().item() <= 1e-6
    assert abs(f(x, x.clone(), temperature=temperature, **kw).item()) <= 1e-6
    assert abs(f(x, x.clone(), temperature=temperature, reduction="sum", **kw).item()) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nonnegative(case):
    name, kw = case
    s = _logits((4, 6, 19), seed=2, scale=3.0)
    t = _logits((4, 6, 19), seed=3, scale=3.0)
    per = FUNCS[name](s, t, reduction="none", **kw)
    assert per.min().item() >= -1e-6


# ----------------------------------------------------------------------------
# forward / reverse KL against explicit formula and F.kl_div
# ----------------------------------------------------------------------------


def test_forward_kl_matches_formula_and_kl_div():
    s = _logits((3, 5, 37), seed=10)
    t = _logits((3, 5, 37), seed=11)
    mask = _mask((3, 5), seed=12)
    got = forward_kl(s, t, mask=mask)
    assert got.dtype == torch.float32
    assert got.shape == ()
    # explicit float64 formula, one position at a time
    _close(got, reference("forward_kl", s, t, mask=mask), atol=1e-5, rtol=1e-5)
    # torch's kl_div: kl_div(input=log q, target=log p) = KL(p || q)
    n = int(mask.sum())
    log_ps = F.log_softmax(s[mask], dim=-1)
    log_pt = F.log_softmax(t[mask], dim=-1)
    expected = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / n
    _close(got, expected, atol=1e-5, rtol=1e-5)


def test_reverse_kl_matches_formula_and_kl_div():
    s = _logits((3, 5, 37), seed=13)
    t = _logits((3, 5, 37), seed=14)
    mask = _mask((3, 5), seed=15)
    got = reverse_kl(s, t, mask=mask)
    assert got.dtype == torch.float32
    assert got.shape == ()
    _close(got, reference("reverse_kl", s, t, mask=mask), atol=1e-5, rtol=1e-5)
    n = int(mask.sum())
    log_ps = F.log_softmax(s[mask], dim=-1)
    log_pt = F.log_softmax(t[mask], dim=-1)
    expected = F.kl_div(log_pt, log_ps, log_target=True, reduction="sum") / n
    _close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_and_reverse_kl_are_argument_swaps():
    s = _logits((3, 5, 37), seed=16)
    t = _logits((3, 5, 37), seed=17)
    _close(reverse_kl(s, t, reduction="none"), forward_kl(t, s, reduction="none"), atol=1e-6)


# ----------------------------------------------------------------------------
# all divergences against the float64 reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(case, reduction):
    name, kw = case
    s = _logits((3, 5, 37), seed=20)
    t = _logits((3, 5, 37), seed=21)
    mask = _mask((3, 5), seed=22)
    got = FUNCS[name](s, t, mask=mask, reduction=reduction, **kw)
    assert got.dtype == torch.float32
    expected = reference(name, s, t, mask=mask, reduction=reduction, **kw)
    _close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 11), (6, 11), (2, 2, 3, 11)], ids=["1-V", "N-V", "4d"])
@pytest.mark.parametrize("name", NAMES)
def test_any_number_of_leading_dims(name, shape):
    s = _logits(shape, seed=23)
    t = _logits(shape, seed=24)
    per = FUNCS[name](s, t, reduction="none")
    assert per.shape == shape[:-1]
    _close(per, ref_per_position(name, s, t), atol=1e-5, rtol=1e-5)
    mask = _mask(shape[:-1], seed=25) if len(shape) > 2 else None
    _close(FUNCS[name](s, t, mask=mask), reference(name, s, t, mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_mask_none_equals_all_true_mask(name):
    s = _logits((2, 4, 13), seed=26)
    t = _logits((2, 4, 13), seed=27)
    full = torch.ones(2, 4, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        _close(FUNCS[name](s, t, reduction=reduction),
               FUNCS[name](s, t, mask=full, reduction=reduction), atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------
# JSD / TVD properties
# ----------------------------------------------------------------------------


def _one_hot_logits(V, idx, hi=50.0, lo=-50.0):
    x = torch.full((len(idx), V), lo)
    for r, i in enumerate(idx):
        x[r, i] = hi
    return x


def test_jsd_half_is_symmetric():
    a = _logits((3, 5, 37), seed=30, scale=3.0)
    b = _logits((3, 5, 37), seed=31, scale=3.0)
    mask = _mask((3, 5), seed=32)
    _close(jsd(a, b, reduction="none"), jsd(b, a, reduction="none"), atol=1e-6, rtol=1e-5)
    _close(jsd(a, b, mask=mask), jsd(b, a, mask=mask), atol=1e-6, rtol=1e-5)
    _close(jsd(a, b, beta=0.5), jsd(b, a, beta=0.5), atol=1e-6, rtol=1e-5)


def test_jsd_bounded_by_ln2_for_extreme_distributions():
    V = 37
    # disjoint one-hot-like distributions: JS divergence approaches ln 2
    s = _one_hot_logits(V, [0, 1, 2, 3, 36])
    t = _one_hot_logits(V, [5, 6, 7, 8, 0])
    per = jsd(s, t, reduction="none")
    assert torch.isfinite(per).all()
    assert per.max().item() <= LN2 + 1e-6
    assert per.min().item() >= LN2 - 1e-3  # essentially disjoint supports
    assert jsd(s, t).item() <= LN2 + 1e-6
    # very different random distributions of large magnitude
    s2 = _logits((4, 8, V), seed=33, scale=50.0)
    t2 = _logits((4, 8, V), seed=34, scale=50.0)
    per2 = jsd(s2, t2, reduction="none")
    assert torch.isfinite(per2).all()
    assert per2.max().item() <= LN2 + 1e-6
    assert per2.min().item() >= -1e-6
    # +-1e4 logits
    s3 = torch.where(torch.rand(4, V, generator=_gen(35)) < 0.5, -1e4, 1e4)
    t3 = torch.where(torch.rand(4, V, generator=_gen(36)) < 0.5, -1e4, 1e4)
    per3 = jsd(s3, t3, reduction="none")
    assert torch.isfinite(per3).all()
    assert per3.max().item() <= LN2 + 1e-6


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.75])
def test_jsd_beta_swap_identity(beta):
    # beta*KL(Pt||M) + (1-beta)*KL(Ps||M), M = beta*Pt + (1-beta)*Ps.
    # Swapping s <-> t and beta -> 1-beta gives (1-beta)*KL(Ps||M') + beta*KL(Pt||M')
    # with M' = (1-beta)*Ps + beta*Pt = M, i.e. the same value.
    a = _logits((3, 5, 37), seed=37, scale=3.0)
    b = _logits((3, 5, 37), seed=38, scale=3.0)
    lhs = jsd(a, b, beta=beta, reduction="none")
    rhs = jsd(b, a, beta=1.0 - beta, reduction="none")
    _close(lhs, rhs, atol=1e-6, rtol=1e-5)
    _close(lhs, ref_per_position("jsd", a, b, beta=beta), atol=1e-5, rtol=1e-5)
    # beta != 0.5 is genuinely asymmetric in general (so the identity is not trivial)
    plain_swap = jsd(b, a, beta=beta, reduction="none")
    assert (lhs - plain_swap).abs().max().item() > 1e-3


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_endpoints_give_zero(beta):
    s = _logits((3, 5, 37), seed=39, scale=3.0)
    t = _logits((3, 5, 37), seed=40, scale=3.0)
    per = jsd(s, t, beta=beta, reduction="none")
    assert torch.isfinite(per).all()
    assert per.abs().max().item() <= 1e-6
    assert abs(jsd(s, t, beta=beta).item()) <= 1e-6


def test_tvd_in_unit_interval_and_symmetric():
    a = _logits((4, 6, 23), seed=41, scale=4.0)
    b = _logits((4, 6, 23), seed=42, scale=4.0)
    per = tvd(a, b, reduction="none")
    assert per.min().item() >= 0.0
    assert per.max().item() <= 1.0 + 1e-6
    _close(per, tvd(b, a, reduction="none"), atol=1e-7, rtol=1e-6)
    # disjoint one-hot-like distributions: TVD ~ 1, never above
    s = _one_hot_logits(23, [0, 1, 2])
    t = _one_hot_logits(23, [3, 4, 5])
    per2 = tvd(s, t, reduction="none")
    assert per2.max().item() <= 1.0 + 1e-6
    assert per2.min().item() >= 1.0 - 1e-4


# ----------------------------------------------------------------------------
# temperature
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_temperature_scaling(case, T):
    name, kw = case
    f = FUNCS[name]
    s = _logits((3, 5, 37), seed=50)
    t = _logits((3, 5, 37), seed=51)
    mask = _mask((3, 5), seed=52)
    got = f(s, t, mask=mask, temperature=T, **kw)
    expected = T * T * f(s / T, t / T, mask=mask, temperature=1.0, **kw)
    _close(got, expected, atol=1e-5, rtol=1e-4)
    got_none = f(s, t, mask=mask, temperature=T, reduction="none", **kw)
    exp_none = T * T * f(s / T, t / T, mask=mask, temperature=1.0, reduction="none", **kw)
    _close(got_none, exp_none, atol=1e-5, rtol=1e-4)
    # and against the float64 reference directly
    _close(got, reference(name, s, t, mask=mask, temperature=T, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [0.0, -1.0, -0.5])
@pytest.mark.parametrize("name", NAMES)
def test_nonpositive_temperature_raises(name, T):
    s = _logits((2, 3, 7), seed=53)
    t = _logits((2, 3, 7), seed=54)
    with pytest.raises(ValueError):
        FUNCS[name](s, t, temperature=T)


# ----------------------------------------------------------------------------
# masking and reductions
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_masked_positions_do_not_affect_value_or_gradient(case, reduction):
    name, kw = case
    f = FUNCS[name]
    s = _logits((3, 5, 17), seed=60)
    t = _logits((3, 5, 17), seed=61)
    mask = _mask((3, 5), seed=62)
    # garbage (large but finite) logits at masked positions
    s_alt = s.clone()
    t_alt = t.clone()
    s_alt[~mask] = _logits((int((~mask).sum()), 17), seed=63, scale=30.0)
    t_alt[~mask] = _logits((int((~mask).sum()), 17), seed=64, scale=30.0)

    v1, gs1, gt1 = _value_and_grads(f, s, t, mask=mask, reduction=reduction, **kw)
    v2, gs2, gt2 = _value_and_grads(f, s_alt, t_alt, mask=mask, reduction=reduction, **kw)
    _close(v1, v2, atol=1e-6, rtol=1e-6)
    _close(gs1[mask], gs2[mask], atol=1e-7, rtol=1e-5)
    _close(gt1[mask], gt2[mask], atol=1e-7, rtol=1e-5)
    # the value does not depend on masked logits, so neither does its gradient there
    assert torch.all(gs2[~mask] == 0)
    assert torch.all(gt2[~mask] == 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reduction_relationships(case):
    name, kw = case
    f = FUNCS[name]
    s = _logits((3, 5, 37), seed=70)
    t = _logits((3, 5, 37), seed=71)
    mask = _mask((3, 5), seed=72)
    n = int(mask.sum())
    per = f(s, t, mask=mask, reduction="none", **kw)
    assert per.shape == (3, 5)
    assert per.dtype == torch.float32
    # masked positions exactly zero
    assert torch.all(per[~mask] == 0)
    # unmasked positions equal the unmasked computation
    per_nomask = f(s, t, reduction="none", **kw)
    _close(per[mask], per_nomask[mask], atol=1e-7, rtol=1e-6)
    total = f(s, t, mask=mask, reduction="sum", **kw)
    mean = f(s, t, mask=mask, reduction="mean", **kw)
    default = f(s, t, mask=mask, **kw)
    assert total.shape == () and mean.shape == ()
    _close(total, per.sum(), atol=1e-5, rtol=1e-5)
    _close(mean, total / n, atol=1e-6, rtol=1e-5)
    _close(default, mean, atol=0, rtol=0)


@pytest.mark.parametrize("num_items", [1, 7, 64])
@pytest.mark.parametrize("name", NAMES)
def test_num_items_normalisation(name, num_items):
    f = FUNCS[name]
    s = _logits((3, 5, 37), seed=73)
    t = _logits((3, 5, 37), seed=74)
    mask = _mask((3, 5), seed=75)
    total = f(s, t, mask=mask, reduction="sum")
    got = f(s, t, mask=mask, num_items=num_items)
    _close(got, total / num_items, atol=1e-6, rtol=1e-5)
    got_mean = f(s, t, mask=mask, reduction="mean", num_items=num_items)
    _close(got_mean, total / num_items, atol=1e-6, rtol=1e-5)
    _close(got, reference(name, s, t, mask=mask, num_items=num_items), atol=1e-5, rtol=1e-5)
    # without a mask too
    _close(f(s, t, num_items=num_items), f(s, t, reduction="sum") / num_items, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_all_false_mask_gives_zero(name):
    f = FUNCS[name]
    s = _logits((2, 3, 11), seed=76)
    t = _logits((2, 3, 11), seed=77)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mean = f(s, t, mask=mask)
    assert torch.isfinite(mean)
    assert mean.item() == 0.0
    assert f(s, t, mask=mask, reduction="sum").item() == 0.0
    per = f(s, t, mask=mask, reduction="none")
    assert per.shape == (2, 3)
    assert torch.all(per == 0)


@pytest.mark.parametrize("name", NAMES)
def test_all_false_mask_backward_is_finite_zero(name):
    # a micro-batch with no counted position must still be back-propagatable
    # (zero, not NaN, gradients)
    f = FUNCS[name]
    s = _logits((2, 3, 11), seed=78)
    t = _logits((2, 3, 11), seed=79)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    v, gs, gt = _value_and_grads(f, s, t, mask=mask)
    assert v.item() == 0.0
    assert torch.isfinite(gs).all() and torch.all(gs == 0)
    assert torch.isfinite(gt).all() and torch.all(gt == 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mean_equals_mean_of_single_positions(case):
    name, kw = case
    f = FUNCS[name]
    s = _logits((2, 3, 29), seed=80)
    t = _logits((2, 3, 29), seed=81)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    singles = []
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                singles.append(f(s[b, i][None], t[b, i][None], **kw))
    expected = torch.stack(singles).mean()
    _close(f(s, t, mask=mask, **kw), expected, atol=1e-6, rtol=1e-5)
    # same via the float64 reference, one position at a time
    ref_singles = [
        _ref_one(name, s[b, i], t[b, i], 1.0, **kw)
        for b in range(2) for i in range(3) if mask[b, i]
    ]
    _close(f(s, t, mask=mask, **kw), torch.stack(ref_singles).mean(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# extreme logits
# ----------------------------------------------------------------------------


def _grad(x):
    # an implementation may detach the teacher; a missing gradient counts as zero
    return torch.zeros_like(x) if x.grad is None else x.grad


def _value_and_grads(f, s, t, **kw):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = f(s, t, **kw)
    out.backward()
    return out.detach(), _grad(s), _grad(t)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_extreme_logits_finite(case, T):
    name, kw = case
    f = FUNCS[name]
    shape = (3, 4, 31)
    mask = _mask((3, 4), seed=90)
    # +-1e4 with random signs
    s = torch.where(torch.rand(shape, generator=_gen(91)) < 0.5, -1e4, 1e4)
    t = torch.where(torch.rand(shape, generator=_gen(92)) < 0.5, -1e4, 1e4)
    for reduction in ("mean", "sum"):
        v, gs, gt = _value_and_grads(f, s, t, mask=mask, temperature=T, reduction=reduction, **kw)
        assert torch.isfinite(v), v
        assert torch.isfinite(gs).all()
        assert torch.isfinite(gt).all()
    per = f(s, t, mask=mask, temperature=T, reduction="none", **kw)
    assert torch.isfinite(per).all()
    _close(per, reference(name, s, t, mask=mask, temperature=T, reduction="none", **kw),
           atol=1e-3, rtol=1e-4)
    # continuous values of magnitude ~1e4
    s2 = _logits(shape, seed=93, scale=1e4)
    t2 = _logits(shape, seed=94, scale=1e4)
    v, gs, gt = _value_and_grads(f, s2, t2, mask=mask, temperature=T, **kw)
    assert torch.isfinite(v), v
    assert torch.isfinite(gs).all()
    assert torch.isfinite(gt).all()


def _teacher_with_neg_inf(shape, seed):
    t = _logits(shape, seed=seed, scale=2.0)
    holes = torch.rand(shape, generator=_gen(seed + 1)) < 0.3
    holes[..., 0] = False  # every row keeps at least one finite entry
    t = t.masked_fill(holes, float("-inf"))
    # one position where the teacher is exactly one-hot
    t[0, 0, 1:] = float("-inf")
    return t


# reverse_kl = KL(P_s || P_t) is legitimately +inf when the student puts mass on a
# vocabulary entry that the teacher can never produce (P_t = 0 there), so it is
# excluded from the teacher -inf tests.
NEG_INF_CASES = [c for c in CASES if c[0] != "reverse_kl"]
NEG_INF_IDS = [_case_id(c) for c in NEG_INF_CASES]


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("case", NEG_INF_CASES, ids=NEG_INF_IDS)
def test_teacher_neg_inf_finite_and_correct(case, T):
    name, kw = case
    f = FUNCS[name]
    shape = (3, 4, 31)
    s = _logits(shape, seed=95)
    t = _teacher_with_neg_inf(shape, seed=96)
    mask = _mask((3, 4), seed=98)
    mask[0, 0] = True
    for reduction in ("mean", "sum"):
        v, gs, _ = _value_and_grads(f, s, t, mask=mask, temperature=T, reduction=reduction, **kw)
        assert torch.isfinite(v), v
        assert torch.isfinite(gs).all(), gs
    per = f(s, t, mask=mask, temperature=T, reduction="none", **kw)
    assert torch.isfinite(per).all()
    _close(per, reference(name, s, t, mask=mask, temperature=T, reduction="none", **kw),
           atol=1e-5, rtol=1e-5)
    # extreme student logits combined with teacher -inf
    s2 = torch.where(torch.rand(shape, generator=_gen(99)) < 0.5, -1e4, 1e4)
    v, gs, _ = _value_and_grads(f, s2, t, mask=mask, temperature=T, **kw)
    assert torch.isfinite(v), v
    assert torch.isfinite(gs).all()


@pytest.mark.parametrize("case", NEG_INF_CASES, ids=NEG_INF_IDS)
def test_teacher_neg_inf_teacher_gradient_finite(case):
    # The spec asks for finite gradients with teacher -inf entries; this also
    # checks the gradient w.r.t. the teacher logits (used e.g. by jsd).
    name, kw = case
    f = FUNCS[name]
    shape = (3, 4, 31)
    s = _logits(shape, seed=100)
    t = _teacher_with_neg_inf(shape, seed=101)
    v, gs, gt = _value_and_grads(f, s, t, **kw)
    assert torch.isfinite(v)
    assert torch.isfinite(gs).all()
    assert torch.isfinite(gt).all(), gt


# ----------------------------------------------------------------------------
# low precision inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_precision_inputs_give_float32(case, dtype):
    name, kw = case
    f = FUNCS[name]
    s = _logits((3, 5, 37), seed=110).to(dtype)
    t = _logits((3, 5, 37), seed=111).to(dtype)
    mask = _mask((3, 5), seed=112)
    got = f(s, t, mask=mask, temperature=2.0, **kw)
    assert got.dtype == torch.float32
    expected = f(s.float(), t.float(), mask=mask, temperature=2.0, **kw)
    _close(got, expected, atol=1e-5, rtol=1e-2)
    per = f(s, t, mask=mask, reduction="none", **kw)
    assert per.dtype == torch.float32
    _close(per, f(s.float(), t.float(), mask=mask, reduction="none", **kw), atol=1e-4, rtol=1e-2)
    assert f(s, t, mask=mask, reduction="sum", **kw).dtype == torch.float32
    # gradients flow back to the low-precision student
    s_req = s.clone().requires_grad_(True)
    f(s_req, t, mask=mask, **kw).backward()
    assert s_req.grad is not None and s_req.grad.dtype == dtype
    assert torch.isfinite(s_req.grad.float()).all()


# ----------------------------------------------------------------------------
# gradient checks
# ----------------------------------------------------------------------------


def _diff_ref(name, s, t, mask, T=1.0, beta=0.5, alpha=0.1):
    """Differentiable float64 reference (finite logits only), masked mean reduction."""
    s = s.to(torch.float64) / T
    t = t.to(torch.float64) / T

    def log_softmax(x):
        z = x - x.max(dim=-1, keepdim=True).values.detach()
        return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))

    def kl(lp, lq):
        return (torch.exp(lp) * (lp - lq)).sum(dim=-1)

    ls, lt = log_softmax(s), log_softmax(t)
    ps, pt = torch.exp(ls), torch.exp(lt)
    if name == "forward_kl":
        v = kl(lt, ls)
    elif name == "reverse_kl":
        v = kl(ls, lt)
    elif name == "jsd":
        lm = torch.log(beta * pt + (1 - beta) * ps)
        v = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    elif name == "skew_forward_kl":
        v = kl(lt, torch.log(alpha * pt + (1 - alpha) * ps))
    elif name == "skew_reverse_kl":
        v = kl(ls, torch.log(alpha * ps + (1 - alpha) * pt))
    else:
        v = 0.5 * (pt - ps).abs().sum(dim=-1)
    v = v * T * T
    return (v * mask.to(v.dtype)).sum() / mask.sum()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_gradient_matches_float64_reference(case):
    name, kw = case
    f = FUNCS[name]
    s = _logits((2, 4, 7), seed=124)
    t = _logits((2, 4, 7), seed=125)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    _, gs, gt = _value_and_grads(f, s, t, mask=mask, temperature=1.5, **kw)
    s64 = s.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    _diff_ref(name, s64, t64, mask, T=1.5, **kw).backward()
    _close(gs, s64.grad, atol=1e-6, rtol=1e-4)
    if name == "jsd":
        _close(gt, t64.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_float64_inputs_are_computed_in_float64(name):
    # "upcast to float32" must not *down*cast float64 inputs: the float64
    # gradcheck below is only possible if float64 stays float64.
    s = _logits((2, 4, 7), seed=126, dtype=torch.float64)
    t = _logits((2, 4, 7), seed=127, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = FUNCS[name](s, t, mask=mask)
    assert got.dtype == torch.float64
    _close(got, reference(name, s, t, mask=mask), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_student(case):
    name, kw = case
    f = FUNCS[name]
    s = _logits((2, 4, 7), seed=120, dtype=torch.float64).requires_grad_(True)
    t = _logits((2, 4, 7), seed=121, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: f(x, t, mask=mask, temperature=1.5, **kw), (s,),
        eps=1e-6, atol=1e-5, fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda x: f(x, t, mask=mask, reduction="none", **kw), (s,),
        eps=1e-6, atol=1e-5, fast_mode=True,
    )


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gradcheck_jsd_student_and_teacher(beta):
    s = _logits((2, 4, 7), seed=122, dtype=torch.float64).requires_grad_(True)
    t = _logits((2, 4, 7), seed=123, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    assert torch.autograd.gradcheck(
        lambda a, b: jsd(a, b, mask=mask, beta=beta, temperature=2.0), (s, t),
        eps=1e-6, atol=1e-5, fast_mode=True,
    )


# ----------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-0.1, 1.1, 2.0])
def test_jsd_beta_out_of_range_raises(beta):
    s = _logits((2, 3, 7), seed=130)
    t = _logits((2, 3, 7), seed=131)
    with pytest.raises(ValueError):
        jsd(s, t, beta=beta)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, 2.0])
@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_alpha_out_of_range_raises(name, alpha):
    s = _logits((2, 3, 7), seed=132)
    t = _logits((2, 3, 7), seed=133)
    with pytest.raises(ValueError):
        FUNCS[name](s, t, alpha=alpha)
