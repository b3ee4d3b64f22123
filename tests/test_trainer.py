"""DistillTrainer: the loss it computes, normalisation under accumulation, end-to-end distillation, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_config
from kdistill.config import config_from_dict
from kdistill.data import DataCollatorForDistillation, encode_examples, load_examples
from kdistill.models import load_model, load_tokenizer
from kdistill.config import ModelConfig
from kdistill.pipeline import prepare, run_training


def _batch(pair, data, n=6, max_length=64, seq2seq=False):
    tok = load_tokenizer(ModelConfig(name_or_path=pair["student"]))
    examples = load_examples(str(data), limit=n).examples
    rows, _ = encode_examples(examples, tok, max_length=max_length, is_encoder_decoder=seq2seq)
    return DataCollatorForDistillation(pad_token_id=tok.pad_token_id)(rows)


def _shifted_logits(model, batch, seq2seq):
    """Logits aligned with their targets, computed independently of the trainer."""
    with torch.no_grad():
        if seq2seq:
            dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=dec).logits
            return logits, batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1], batch["labels"][:, 1:]


def held_out_kl(teacher_path, student, batch, seq2seq=False):
    """Mean over response tokens of KL(P_teacher || P_student), by the explicit formula."""
    teacher = load_model(ModelConfig(name_or_path=teacher_path))
    t_logits, targets = _shifted_logits(teacher, batch, seq2seq)
    s_logits, _ = _shifted_logits(student, batch, seq2seq)
    mask = targets.ne(-100)
    vocab = min(t_logits.shape[-1], s_logits.shape[-1])
    lt = t_logits[mask][:, :vocab].double().log_softmax(-1)
    ls = s_logits[mask][:, :vocab].double().log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_compute_loss_is_weighted_ce_plus_kd_by_hand(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    seq2seq = kind == "t5"
    raw = run_config(pair["teacher"], pair["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"ce": {"weight": 0.3}, "kd": {"weight": 0.7, "divergence": "reverse_kl",
                                                       "temperature": 2.0}}
    prepared = prepare(config_from_dict(raw))
    trainer = prepared.trainer
    batch = _batch(pair, alpaca_small, seq2seq=seq2seq)
    student = prepared.student
    student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
    s_logits, targets = _shifted_logits(student, batch, seq2seq)
    t_logits, _ = _shifted_logits(prepared.teacher, batch, seq2seq)
    mask = targets.ne(-100)
    ce = F.cross_entropy(s_logits[mask].double(), targets[mask])
    vocab = trainer.kd_vocab
    assert vocab == len(prepared.tokenizer) < t_logits.shape[-1]  # the teacher's padded rows are cut
    ls = (s_logits[mask][:, :vocab].double() / 2).log_softmax(-1)
    lt = (t_logits[mask][:, :vocab].double() / 2).log_softmax(-1)
    rkl = (ls.exp() * (ls - lt)).sum(-1).mean() * 4
    expected = 0.3 * ce + 0.7 * rkl
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def _one_sgd_step(pair, data, tmp_path, batch_size, accumulation):
    raw = run_config(pair["teacher"], pair["student"], data, tmp_path, per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                     lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    prepared = prepare(config_from_dict(raw))
    before = {n: p.detach().clone() for n, p in prepared.student.named_parameters()}
    prepared.trainer.train()
    deltas = {n: (p.detach() - before[n]) for n, p in prepared.student.named_parameters()}
    loss = prepared.trainer.state.log_history[0]["loss"]
    return deltas, loss


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_gradient_accumulation_matches_full_batch(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    full, loss_full = _one_sgd_step(pair, alpaca_small, tmp_path / "full", batch_size=8, accumulation=1)
    accum, loss_accum = _one_sgd_step(pair, alpaca_small, tmp_path / "accum", batch_size=4, accumulation=2)
    assert loss_full == pytest.approx(loss_accum, rel=1e-5)
    worst = max((full[n] - accum[n]).abs().max().item() for n in full)
    biggest = max(full[n].abs().max().item() for n in full)
    assert biggest > 1e-4, "the step changed nothing: the comparison would be vacuous"
    assert worst < 1e-5, f"accumulated update differs from the full-batch update by {worst}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_kd_moves_student_toward_teacher_more_than_ce(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    seq2seq = kind == "t5"
    held_out = _batch(pair, alpaca_small, n=200, seq2seq=seq2seq)
    held_out = {k: v[-16:] for k, v in held_out.items()}  # the last rows: never reached in 32 steps x 4

    def train(objectives, name):
        raw = run_config(pair["teacher"], pair["student"], alpaca_small, tmp_path / name, max_steps=32,
                         learning_rate=3e-3, logging_steps=8)
        raw["data"]["limit"] = 128
        raw["objectives"] = objectives
        if "kd" not in objectives:
            del raw["teacher"]
        summary = run_training(config_from_dict(raw))
        return load_model(ModelConfig(name_or_path=summary["output_dir"])), summary

    initial = load_model(ModelConfig(name_or_path=pair["student"]))
    kl_initial = held_out_kl(pair["teacher"], initial, held_out, seq2seq)
    kd_student, kd_summary = train({"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}, "kd")
    ce_student, _ = train({"ce": {"weight": 1.0}}, "ce")
    kl_kd = held_out_kl(pair["teacher"], kd_student, held_out, seq2seq)
    kl_ce = held_out_kl(pair["teacher"], ce_student, held_out, seq2seq)
    assert kl_kd < 0.8 * kl_initial, (kl_initial, kl_kd)
    assert kl_kd < kl_ce, (kl_kd, kl_ce)
    # every term is logged separately
    logged = [h for h in kd_summary["log_history"] if "loss" in h]
    assert logged and all({"loss/ce", "loss/kd", "kd/top1_agreement"} <= set(h) for h in logged)
    for h in logged:
        assert h["loss"] == pytest.approx(0.5 * h["loss/ce"] + 0.5 * h["loss/kd"], rel=1e-3, abs=1e-4)


def test_lora_adapter_saved_and_reloaded_gives_same_logits(tiny_causal, alpaca_small, tmp_path):
    from kdistill.models import load_student

    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "lora",
                     max_steps=3, learning_rate=1e-2)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    prepared = prepare(config_from_dict(raw))
    trainable = [n for n, p in prepared.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = run_training(config_from_dict(raw), resume=False)
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "kdistill_config.yaml").exists()
    batch = _batch(tiny_causal, alpaca_small, n=3)
    reloaded = load_student(out)
    reloaded.eval()
    base = load_model(ModelConfig(name_or_path=tiny_causal["student"]))
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        untouched = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(got, untouched, atol=1e-4), "LoRA training changed nothing"
    # merged export equals the adapter model
    raw["lora"]["merge"] = True
    raw["training"]["output_dir"] = str(tmp_path / "merged")
    from kdistill.models import save_student

    save_student(reloaded, load_tokenizer(ModelConfig(name_or_path=str(out))), tmp_path / "merged",
                 merge_lora=True)
    merged = load_student(tmp_path / "merged")
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged_logits, got, atol=1e-5, rtol=1e-5)
    assert summary["global_step"] == 3


def test_lora_logits_survive_save_reload_exactly(tiny_causal, alpaca_small, tmp_path):
    from kdistill.models import apply_lora, load_student, save_student
    from kdistill.config import LoraConfig

    model = apply_lora(load_model(ModelConfig(name_or_path=tiny_causal["student"])),
                       LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    batch = _batch(tiny_causal, alpaca_small, n=3)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_student(model, load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"])), tmp_path / "a")
    reloaded = load_student(tmp_path / "a")
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_summary_and_config_written(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "out")
    run_training(config_from_dict(raw))
    summary = json.loads((tmp_path / "out" / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 2
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists() or (tmp_path / "out" / "tokenizer_config.json").exists()
