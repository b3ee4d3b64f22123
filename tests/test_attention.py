"""Attention-map alignment: the KL between attention distributions, and the objective through the trainer."""

from __future__ import annotations

import pytest
import torch

from conftest import run_config
from kdistill.config import config_from_dict
from kdistill.losses import attention_kl
from kdistill.pipeline import prepare, run_training


def _maps(b, h, t, seed, causal=True):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, t, t, generator=g, dtype=torch.float64)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_the_formula_and_is_zero_for_equal_maps():
    s, t = _maps(2, 4, 5, 0), _maps(2, 4, 5, 1)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    expected, n = 0.0, 0
    for b in range(2):
        for q in range(5):
            if not mask[b, q]:
                continue
            per_head = [sum(float(t[b, h, q, k] * (t[b, h, q, k].log() - s[b, h, q, k].log()))
                            for k in range(5) if t[b, h, q, k] > 0) for h in range(4)]
            expected += sum(per_head) / 4
            n += 1
    assert attention_kl(s, t, mask).item() == pytest.approx(expected / n, rel=1e-10)
    assert attention_kl(t, t, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(attention_kl(s.float(), t.float())).all()  # causal zeros: no NaN


def test_attention_kl_averages_heads_when_counts_differ():
    s, t = _maps(2, 2, 4, 2), _maps(2, 6, 4, 3)
    got = attention_kl(s, t)
    assert got.item() == pytest.approx(attention_kl(s.mean(1, keepdim=True), t.mean(1, keepdim=True)).item())
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        attention_kl(s[:, :, :3], t)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_attention_loss_is_zero_when_the_student_is_the_teacher(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    raw = run_config(pair["teacher"], pair["teacher"], alpaca_small, tmp_path)
    raw["objectives"] = {"attention": {"weight": 1.0}}
    prepared = prepare(config_from_dict(raw))
    assert prepared.student.config._attn_implementation == "eager"
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    prepared.student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(prepared.student, dict(batch))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_attention_objective_trains_beside_ce_and_kd(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    raw = run_config(pair["teacher"], pair["student"], alpaca_small, tmp_path, max_steps=3)
    raw["objectives"] = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}, "attention": {"weight": 1.0}}
    summary = run_training(config_from_dict(raw))
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert all("loss/attention" in h and h["loss/attention"] > 0 for h in logged)


def test_attention_objective_refuses_sdpa(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["student"]["attn_implementation"] = "sdpa"
    raw["objectives"] = {"attention": {"weight": 1.0}}
    with pytest.raises(ValueError, match="only eager attention returns"):
        prepare(config_from_dict(raw))
