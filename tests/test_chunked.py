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
