"""chunked_distillation_loss must equal the dense divergence on materialised logits (value and gradients)."""

from __future__ import annotations

import pytest
import torch

from kdistill.losses import DIVERGENCES, chunked_distillation_loss

V, H_S, H_T = 101, 16, 24
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("tvd", {}),
]


def _inputs(seed=0, shape=(4, 13), v_s=V, v_t=V, bias=False, counted=37):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*shape, H_S, generator=g, dtype=torch.float64)
    ht = torch.randn(*shape, H_T, generator=g, dtype=torch.float64)
    ws = torch.randn(v_s, H_S, generator=g, dtype=torch.float64) * 0.5
    wt = torch.randn(v_t, H_T, generator=g, dtype=torch.float64) * 0.5
    flat = torch.zeros(hs[..., 0].numel(), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[:counted]] = True
    mask = flat.reshape(shape)
    bs = torch.randn(v_s, generator=g, dtype=torch.float64) if bias else None
    bt = torch.randn(v_t, generator=g, dtype=torch.float64) if bias else None
    return [x.float() if x is not None else None for x in (hs, ws, ht, wt, bs, bt)] + [mask]


def _dense(hs, ws, ht, wt, bs, bt, mask, name, kw, vocab_size=None, **opts):
    v = vocab_size or ws.shape[0]
    ls = hs @ ws[:v].T + (bs[:v] if bs is not None else 0)
    lt = ht @ wt[:v].T + (bt[:v] if bt is not None else 0)
    return DIVERGENCES[name](ls, lt, mask, opts.get("temperature", 1.0), opts.get("reduction", "mean"),
                             opts.get("num_items"), **kw)


def _compare(name, kw, *, bias=False, v_t=V, vocab_size=None, counted=37, **opts):
    hs, ws, ht, wt, bs, bt, mask = _inputs(bias=bias, v_t=v_t, counted=counted)
    leaves = [hs, ws] + ([bs] if bias else [])
    for x in leaves:
        x.requires_grad_(True)
    dense = _dense(hs, ws, ht, wt, bs, bt, mask, name, kw, vocab_size, **opts)
    dgrads = torch.autograd.grad(dense, leaves)
    chunk_size = opts.pop("chunk_size", 8)
    chunked = chunked_distillation_loss(hs, ws, ht, wt, mask, name, chunk_size=chunk_size,
                                        student_lm_head_bias=bs, teacher_lm_head_bias=bt, vocab_size=vocab_size,
                                        **opts, **kw)
    cgrads = torch.autograd.grad(chunked, leaves)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)
    for c, d in zip(cgrads, dgrads):
        assert c.shape == d.shape and c.dtype == d.dtype
        torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-4)
    return chunked


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{kw}" for n, kw in CASES])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_matches_dense(name, kw, temperature, chunk_size):
    value = _compare(name, kw, temperature=temperature, chunk_size=chunk_size)
    assert value.item() > 0


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{kw}" for n, kw in CASES])
def test_sum_num_items_bias(name, kw):
    _compare(name, kw, reduction="sum", chunk_size=5, bias=True)
    _compare(name, kw, num_items=100, chunk_size=37, bias=True, temperature=2.0)
    _compare(name, kw, num_items=torch.tensor(50), chunk_size=1)


@pytest.mark.parametrize("name,kw", [CASES[0], CASES[3], CASES[6]])
def test_padded_vocab(name, kw):
    _compare(name, kw, v_t=V + 27, vocab_size=V, bias=True)
    _compare(name, kw, v_t=V + 27, vocab_size=V - 11, chunk_size=64)


def test_padded_student_rows_get_zero_grad():
    hs, ws, ht, wt, _, _, mask = _inputs()
    ws.requires_grad_(True)
    loss = chunked_distillation_loss(hs, ws, ht, wt, mask, vocab_size=V - 10)
    (gw,) = torch.autograd.grad(loss, ws)
    assert gw[V - 10:].abs().sum() == 0 and gw[: V - 10].abs().sum() > 0


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{kw}" for n, kw in CASES])
def test_all_masked(name, kw):
    hs, ws, ht, wt, bs, _, mask = _inputs(bias=True)
    for x in (hs, ws, bs):
        x.requires_grad_(True)
    for reduction in ("mean", "sum"):
        loss = chunked_distillation_loss(hs, ws, ht, wt, torch.zeros_like(mask), name, reduction=reduction,
                                         student_lm_head_bias=bs, **kw)
        assert loss.item() == 0.0
        for g in torch.autograd.grad(loss, (hs, ws, bs)):
            assert g.abs().sum() == 0


def test_no_mask_and_grad_output_scaling():
    hs, ws, ht, wt, _, _, _ = _inputs()
    hs.requires_grad_(True)
    dense = _dense(hs, ws, ht, wt, None, None, None, "forward_kl", {}) * 3.0
    chunked = chunked_distillation_loss(hs, ws, ht, wt, chunk_size=7) * 3.0
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(torch.autograd.grad(chunked, hs)[0], torch.autograd.grad(dense, hs)[0],
                               atol=1e-5, rtol=1e-4)


def test_teacher_gets_no_gradient_and_no_grad_mode():
    hs, ws, ht, wt, _, _, mask = _inputs()
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    hs.requires_grad_(True)
    loss = chunked_distillation_loss(hs, ws, ht, wt, mask)
    loss.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None
    with torch.no_grad():
        value = chunked_distillation_loss(hs, ws, ht, wt, mask, chunk_size=4)
    torch.testing.assert_close(value, loss.detach())


def test_low_precision_inputs_accumulate_in_float32():
    hs, ws, ht, wt, _, _, mask = _inputs()
    hb, wb = hs.bfloat16().requires_grad_(True), ws.bfloat16().requires_grad_(True)
    loss = chunked_distillation_loss(hb, wb, ht.bfloat16(), wt.bfloat16(), mask, chunk_size=8)
    assert loss.dtype == torch.float32
    ref = _dense(hb.float(), wb.float(), ht.bfloat16().float(), wt.bfloat16().float(), None, None, mask,
                 "forward_kl", {})
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    gh, gw = torch.autograd.grad(loss, (hb, wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_errors():
    hs, ws, ht, wt, _, _, mask = _inputs(v_t=V + 3)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distillation_loss(hs, ws, ht, wt, mask)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distillation_loss(hs, ws, ht, wt, mask, vocab_size=V + 1)
    with pytest.raises(NotImplementedError):
        chunked_distillation_loss(hs, ws, ht, wt, mask, vocab_size=V, reduction="none")
    with pytest.raises(NotImplementedError):
        chunked_distillation_loss(hs, ws, ht, wt, mask, vocab_size=V, logit_softcap=30.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_distillation_loss(hs, ws, ht, wt, mask, "kl", vocab_size=V)
    with pytest.raises(TypeError):
        chunked_distillation_loss(hs, ws, ht, wt, mask, "forward_kl", vocab_size=V, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        chunked_distillation_loss(hs, ws, ht, wt, mask, "jsd", vocab_size=V, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        chunked_distillation_loss(hs, ws, ht, wt, mask, vocab_size=V, temperature=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        chunked_distillation_loss(hs, ws, ht, wt, mask[:2], vocab_size=V)


# --------------------------------------------------------------------------------------------------------------
# chunked_topk_distillation_loss, chunked_cross_entropy, metrics
# --------------------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402

from kdistill.losses import (  # noqa: E402
    DIVERGENCE_PARAMS,
    TopKTeacher,
    chunked_cross_entropy,
    chunked_topk_distillation_loss,
    topk_divergence,
    topk_from_logits,
)

TOPK_KW = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
NAMES = list(DIVERGENCES)


def _student(seed=1, shape=(3, 7), v=23, h=8, bias=True, dtype=torch.float64, counted=15, pad=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*shape, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v + pad, h, generator=g, dtype=torch.float64) * 0.7
    bs = torch.randn(v + pad, generator=g, dtype=torch.float64) if bias else None
    flat = torch.zeros(hs[..., 0].numel(), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[:counted]] = True
    tl = torch.randn(*shape, v, generator=g, dtype=torch.float64) * 2
    conv = (lambda x: x.to(dtype) if x is not None else None)
    return conv(hs), conv(ws), conv(bs), flat.reshape(shape), conv(tl)


def _grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def _assert_same(a, b, rtol, atol):
    (va, ga), (vb, gb) = a, b
    assert va.dtype == vb.dtype
    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol)
    for x, y in zip(ga, gb):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _topk_case(name, missing, temperature, capture, k, chunk_size, *, dtype=torch.float64, preselect=False,
               reduction="mean", num_items=None, pad=0, rtol=1e-9, atol=1e-12):
    hs, ws, bs, mask, tl = _student(dtype=dtype, pad=pad)
    v = tl.shape[-1]
    teacher = topk_from_logits(tl, k=k, temperature=capture)
    kw = TOPK_KW.get(name, {})
    opts = dict(temperature=temperature, missing=missing, reduction=reduction, num_items=num_items)

    def dense(h, w, b):
        logits = h @ w[:v].T + b[:v]
        return topk_divergence(logits, teacher, name, mask, **opts, **kw)

    if preselect:
        sel = TopKTeacher(teacher.indices[mask], teacher.logprobs[mask], teacher.capture_temperature)
    else:
        sel = teacher

    def chunked(h, w, b):
        return chunked_topk_distillation_loss(h, w, sel, mask, name, chunk_size=chunk_size, student_lm_head_bias=b,
                                              vocab_size=v if pad else None, **opts, **kw)

    ref = _grads(dense, [hs, ws, bs])
    out = _grads(chunked, [hs, ws, bs])
    _assert_same(out, ref, rtol, atol)
    if pad:
        assert out[1][1][v:].abs().sum() == 0 and out[1][2][v:].abs().sum() == 0
    return out[0]


def test_divergence_names_covered():
    assert set(NAMES) == set(DIVERGENCE_PARAMS) and len(NAMES) == 6
    for name, kw in TOPK_KW.items():
        assert set(kw) <= set(DIVERGENCE_PARAMS[name])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing,temperature,capture", [
    ("bucket", 1.0, 1.0), ("bucket", 2.0, 2.0),
    ("renormalize", 1.0, 1.0), ("renormalize", 2.0, 2.0), ("renormalize", 2.0, 1.0),
])
@pytest.mark.parametrize("k", [5, 23])
def test_topk_matches_dense(name, missing, temperature, capture, k):
    for chunk_size in (1, 5, 1000):
        value = _topk_case(name, missing, temperature, capture, k, chunk_size)
        assert torch.isfinite(value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["bucket", "renormalize"])
def test_topk_preselected_sum_num_items_padded(name, missing):
    _topk_case(name, missing, 2.0, 2.0, 4, 5, preselect=True)
    _topk_case(name, missing, 1.0, 1.0, 23, 4, preselect=True, reduction="sum")
    _topk_case(name, missing, 1.0, 1.0, 6, 3, num_items=40, pad=9)
    _topk_case(name, missing, 1.0, 1.0, 6, 7, num_items=torch.tensor(11), preselect=True)


@pytest.mark.parametrize("missing", ["bucket", "renormalize"])
def test_topk_float32(missing):
    for name in NAMES:
        _topk_case(name, missing, 2.0, 2.0, 6, 5, dtype=torch.float32, rtol=1e-5, atol=1e-5)


def test_topk_preselected_without_mask_and_no_grad():
    hs, ws, bs, _, tl = _student()
    teacher = topk_from_logits(tl, k=4)
    flat_teacher = TopKTeacher(teacher.indices.reshape(-1, 4), teacher.logprobs.reshape(-1, 4))
    ref = topk_divergence(hs @ ws.T + bs, teacher)
    a = chunked_topk_distillation_loss(hs, ws, flat_teacher, chunk_size=4, student_lm_head_bias=bs)
    with torch.no_grad():
        b = chunked_topk_distillation_loss(hs.requires_grad_(True), ws, teacher, chunk_size=6,
                                           student_lm_head_bias=bs)
    torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b, ref.detach(), rtol=1e-9, atol=1e-12)
    assert not b.requires_grad


def test_topk_all_masked():
    hs, ws, bs, mask, tl = _student()
    teacher = topk_from_logits(tl, k=4)
    ws.requires_grad_(True)
    loss = chunked_topk_distillation_loss(hs, ws, teacher, torch.zeros_like(mask), student_lm_head_bias=bs)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, ws)[0].abs().sum() == 0
    pre = TopKTeacher(teacher.indices[:0].reshape(0, 4), teacher.logprobs[:0].reshape(0, 4))
    assert chunked_topk_distillation_loss(hs, ws, pre, torch.zeros_like(mask)).item() == 0.0


def _ce_case(reduction="mean", num_items=None, use_mask=True, chunk_size=4, pad=0, dtype=torch.float64,
             rtol=1e-9, atol=1e-12, ignore_index=-100):
    hs, ws, bs, mask, _ = _student(dtype=dtype, pad=pad)
    v = ws.shape[0] - pad
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(0, v, hs.shape[:-1], generator=g)
    targets[0, :3] = ignore_index
    targets[2, 4] = ignore_index
    counted = targets != ignore_index
    if use_mask:
        counted = counted & mask

    def dense(h, w, b):
        logits = h @ w[:v].T + b[:v]
        total = F.cross_entropy(logits[counted], targets[counted], reduction="sum")
        if reduction == "sum":
            return total
        denom = num_items if num_items is not None else max(int(counted.sum()), 1)
        return total / (float(denom) if not torch.is_tensor(denom) else float(denom.item()))

    def chunked(h, w, b):
        return chunked_cross_entropy(h, w, targets, mask if use_mask else None, chunk_size=chunk_size,
                                     reduction=reduction, num_items=num_items, student_lm_head_bias=b,
                                     vocab_size=v if pad else None, ignore_index=ignore_index)

    ref = _grads(dense, [hs, ws, bs])
    out = _grads(chunked, [hs, ws, bs])
    _assert_same(out, ref, rtol, atol)
    if pad:
        assert out[1][1][v:].abs().sum() == 0 and out[1][2][v:].abs().sum() == 0
        assert out[1][1][:v].abs().sum() > 0


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_cross_entropy_matches_dense(use_mask, chunk_size):
    _ce_case(use_mask=use_mask, chunk_size=chunk_size)
    _ce_case("sum", use_mask=use_mask, chunk_size=chunk_size)
    _ce_case(num_items=50, use_mask=use_mask, chunk_size=chunk_size, ignore_index=-1)
    _ce_case(num_items=torch.tensor(9), use_mask=use_mask, chunk_size=chunk_size, pad=7)


def test_cross_entropy_float32_and_padded_vocab():
    _ce_case(dtype=torch.float32, rtol=1e-5, atol=1e-5)
    _ce_case(dtype=torch.float32, rtol=1e-5, atol=1e-5, pad=5, reduction="sum")
    _ce_case(pad=11, use_mask=False)


def test_metrics_counts_match_dense():
    hs, ws, bs, mask, tl = _student(counted=17)
    v = tl.shape[-1]
    logits = hs @ ws.T + bs
    # top-k: teacher argmax = the stored id with the largest log-probability (k < V, and k = V)
    for k in (3, v):
        teacher = topk_from_logits(tl, k=k)
        m = {}
        chunked_topk_distillation_loss(hs, ws, teacher, mask, chunk_size=4, student_lm_head_bias=bs, metrics=m)
        t_top = teacher.indices.gather(-1, teacher.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        expected = ((logits.argmax(-1) == t_top) & mask).sum()
        assert m["top1_agreement"].dim() == 0 and m["top1_agreement"].is_floating_point()
        assert m["top1_agreement"].item() == expected.item()
        assert torch.equal(t_top, tl.argmax(-1))
        pre = TopKTeacher(teacher.indices[mask], teacher.logprobs[mask])
        m2 = {}
        with torch.no_grad():
            chunked_topk_distillation_loss(hs, ws, pre, mask, chunk_size=3, student_lm_head_bias=bs, metrics=m2)
        assert m2["top1_agreement"].item() == expected.item()
    # dense teacher
    hs2, ws2, ht2, wt2, bs2, bt2, mask2 = _inputs(bias=True)
    ls = hs2 @ ws2[: V - 4].T + bs2[: V - 4]
    lt = ht2 @ wt2[: V - 4].T + bt2[: V - 4]
    m = {}
    chunked_distillation_loss(hs2.requires_grad_(True), ws2, ht2, wt2, mask2, chunk_size=6,
                              student_lm_head_bias=bs2, teacher_lm_head_bias=bt2, vocab_size=V - 4, metrics=m)
    expected = ((ls.argmax(-1) == lt.argmax(-1)) & mask2).sum()
    assert expected.item() > 0
    assert m["top1_agreement"].dim() == 0 and m["top1_agreement"].item() == expected.item()
    # cross-entropy accuracy; make some rows right on purpose
    targets = torch.randint(0, v, hs.shape[:-1], generator=torch.Generator().manual_seed(3))
    targets[1] = logits[1].argmax(-1)
    targets[0, 0] = -100
    m = {}
    chunked_cross_entropy(hs, ws, targets, mask, chunk_size=5, student_lm_head_bias=bs, metrics=m)
    counted = mask & (targets != -100)
    expected = ((logits.argmax(-1) == targets) & counted).sum()
    assert expected.item() > 0
    assert m["accuracy"].dim() == 0 and m["accuracy"].item() == expected.item()


def test_new_errors():
    hs, ws, bs, mask, tl = _student()
    v = tl.shape[-1]
    teacher = topk_from_logits(tl, k=4)
    with pytest.raises(ValueError, match="indices"):
        chunked_topk_distillation_loss(hs, ws[: v - 1], teacher)  # ids can be >= vocab_size
    bad = TopKTeacher(teacher.indices.clone(), teacher.logprobs)
    bad.indices[tuple(mask.nonzero()[0].tolist())] = torch.tensor([v, 0, 1, 2])
    with pytest.raises(ValueError, match="indices"):
        chunked_topk_distillation_loss(hs, ws, bad, mask)
    with pytest.raises(ValueError, match="indices"):
        chunked_topk_distillation_loss(hs, ws, bad, mask, vocab_size=v - 5)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_topk_distillation_loss(hs, ws, TopKTeacher(teacher.indices[:2], teacher.logprobs[:2]), mask)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_topk_distillation_loss(hs, ws, TopKTeacher(teacher.indices[mask][1:], teacher.logprobs[mask][1:]),
                                       mask)
    with pytest.raises(NotImplementedError):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, reduction="avg")
    with pytest.raises(ValueError, match="bucket"):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, temperature=2.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, "kl")
    with pytest.raises(TypeError):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, "forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="missing"):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, missing="drop")
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_topk_distillation_loss(hs, ws, teacher, mask, vocab_size=v + 1)
    targets = torch.randint(0, v, hs.shape[:-1])
    targets[1, 2] = v
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hs, ws, targets)
    ok = targets.clone()
    ok[1, 2] = v - 1
    chunked_cross_entropy(hs, ws, ok)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hs, ws, ok, vocab_size=v - 1)  # v - 1 is out of range for a padded vocabulary
    neg = ok.clone()
    neg[0, 0] = -3  # negative but not ignore_index
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hs, ws, neg)
    m = torch.ones_like(mask)
    m[1, 2] = False
    chunked_cross_entropy(hs, ws, targets, m)  # the out-of-range target is not counted: fine
    with pytest.raises(NotImplementedError):
        chunked_cross_entropy(hs, ws, targets, m, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hs, ws, targets, m, reduction="avg")
    with pytest.raises(ValueError, match="targets shape"):
        chunked_cross_entropy(hs, ws, targets[:2], None)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hs, ws, targets, m, chunk_size=0)
    ht, wt = torch.randn(*hs.shape[:-1], 5, dtype=hs.dtype), torch.randn(v, 5, dtype=hs.dtype)
    with pytest.raises(ValueError, match="reduction"):
        chunked_distillation_loss(hs, ws, ht, wt, mask, reduction="avg")


# ---------------------------------------------------------------------------------------- chunk_size="auto"

def test_auto_chunk_size_fits_the_budget():
    from kdistill.losses.chunked import CHUNK_BUDGET_BYTES, WORKING_SET, auto_chunk_size

    v, h = 151936, 896 + 1536
    rows = auto_chunk_size(v, h)
    assert rows == 176 and rows % 8 == 0
    for r in (rows, rows + 8):  # the largest multiple of 8 that fits
        fits = 4 * r * (WORKING_SET["distillation"] * v + 2 * h) <= CHUNK_BUDGET_BYTES
        assert fits == (r == rows)
    assert auto_chunk_size(16384, h) == 1584
    assert auto_chunk_size(v, h, torch.float64) == 88         # float64 compute: half the rows
    assert auto_chunk_size(v, h, torch.bfloat16) == rows      # computed in float32 anyway
    assert auto_chunk_size(v, 896, kind="cross_entropy") > auto_chunk_size(v, 896, kind="topk") > rows
    assert auto_chunk_size(10**9, 8) == 1                     # never zero rows
    with pytest.raises(ValueError, match="unknown chunk kind"):
        auto_chunk_size(v, h, kind="nope")
    for bad in (0, -3, 2.5, True, "big"):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 1 or 'auto'"):
            chunked_distillation_loss(torch.zeros(2, H_S), torch.zeros(V, H_S), torch.zeros(2, H_T),
                                      torch.zeros(V, H_T), chunk_size=bad)


@pytest.mark.parametrize("entry", ["distillation", "topk", "cross_entropy"])
def test_auto_chunk_size_equals_explicit(entry, monkeypatch):
    """With a budget small enough to make several chunks, "auto" gives the loss and gradients of an explicit size
    (and of one single chunk)."""
    import kdistill.losses.chunked as chunked
    from kdistill.losses import TopKTeacher, chunked_cross_entropy, chunked_topk_distillation_loss

    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 4 * 5 * (chunked.WORKING_SET[entry] * V + 2 * (H_S + H_T)))
    hs, ws, ht, wt, bs, bt, mask = _inputs(bias=True)
    teacher = TopKTeacher(*reversed((ht @ wt.T).log_softmax(-1).topk(5, dim=-1)), 1.0)
    targets = torch.randint(0, V, mask.shape, generator=torch.Generator().manual_seed(1))

    def run(size):
        leaves = [x.detach().clone().requires_grad_(True) for x in (hs, ws, bs)]
        h, w, b = leaves
        if entry == "distillation":
            loss = chunked_distillation_loss(h, w, ht, wt, mask, "jsd", chunk_size=size, student_lm_head_bias=b,
                                             teacher_lm_head_bias=bt)
        elif entry == "topk":
            loss = chunked_topk_distillation_loss(h, w, teacher, mask, chunk_size=size, student_lm_head_bias=b)
        else:
            loss = chunked_cross_entropy(h, w, targets, mask, chunk_size=size, student_lm_head_bias=b)
        loss.backward()
        return [loss.detach()] + [x.grad for x in leaves]

    rows = chunked.auto_chunk_size(V, H_S + (H_T if entry == "distillation" else 0), kind=entry)
    assert 1 < rows < int(mask.sum())  # several chunks
    for reference in (run(rows), run(1000)):
        for a, b in zip(run("auto"), reference):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_second_backward_is_refused():
    hs, ws, ht, wt, _, _, mask = _inputs()
    hs.requires_grad_(True)
    loss = chunked_distillation_loss(hs, ws, ht, wt, mask, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
