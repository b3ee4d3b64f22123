"""Hidden-state alignment: losses, layer maps, the `hidden` objective, its projections in training and export."""

from __future__ import annotations

import pytest
import torch

from conftest import run_config
from kdistill.batch import Batch
from kdistill.config import ConfigError, ModelConfig, config_from_dict
from kdistill.data import DataCollatorForDistillation, encode_examples, load_examples
from kdistill.losses import hidden_cosine, hidden_mse, layer_output_index, resolve_layer_map
from kdistill.models import load_model, load_tokenizer, shrink
from kdistill.objectives import StepBatch
from kdistill.objectives.hidden import HiddenAlignment, HiddenAlignmentConfig
from kdistill.teachers.live import LiveTeacher
from kdistill.pipeline import prepare, run_training


# --------------------------------------------------------------------------------------------------- losses
def test_hidden_losses_by_formula_and_masking():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    mse = ((s - t) ** 2).mean(-1)[mask].mean()
    cos = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1))[mask].mean()
    torch.testing.assert_close(hidden_mse(s, t, mask), mse)
    torch.testing.assert_close(hidden_cosine(s, t, mask), cos)
    torch.testing.assert_close(hidden_mse(s, t, mask, num_items=10), mse * 5 / 10)
    torch.testing.assert_close(hidden_mse(s, t, mask, reduction="sum"), mse * 5)
    assert hidden_mse(s, t, mask, reduction="none").shape == (2, 5)
    assert hidden_mse(s, s.clone(), mask).item() == 0.0
    assert hidden_cosine(s, 3 * s, mask).abs().item() < 1e-6           # scale-free
    assert hidden_mse(s.half(), t.half(), mask).dtype == torch.float32
    with pytest.raises(ValueError, match="project the student"):
        hidden_mse(s, t[..., :4])


# ----------------------------------------------------------------------------------------------- layer maps
def test_resolve_layer_map():
    assert resolve_layer_map("uniform", 3, 6) == [(0, 1), (1, 3), (2, 5)]   # 1-based: student 3 <-> teacher 6
    assert resolve_layer_map("uniform", 2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map("uniform", 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert resolve_layer_map([[0, 2], [1, 3]], 2, 4) == [(0, 2), (1, 3)]
    assert resolve_layer_map([[-1, -1], [0, -4]], 2, 4) == [(1, 3), (0, 0)]
    with pytest.raises(ValueError, match=r"\[2, 1\].*student layer 2"):
        resolve_layer_map([[0, 0], [2, 1]], 2, 4)
    with pytest.raises(ValueError, match=r"\[0, -5\].*teacher layer -5"):
        resolve_layer_map([[0, -5]], 2, 4)
    with pytest.raises(ValueError, match="unknown spec"):
        resolve_layer_map("skip", 2, 4)
    assert layer_output_index(0) == 1  # hidden_states[0] is the embedding output


def test_config_validates_layer_map(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"hidden": {"layer_map": [[0, 1], [1]]}}
    with pytest.raises(ConfigError, match=r"objectives.hidden.layer_map: \[1\]"):
        config_from_dict(raw)
    raw["objectives"] = {"hidden": {"hidden_loss": "l1"}}
    with pytest.raises(ConfigError, match="hidden_loss"):
        config_from_dict(raw)


# ------------------------------------------------------------------------------------- the objective itself
def _batch(path, data, n=4, seq2seq=False):
    tok = load_tokenizer(ModelConfig(name_or_path=path))
    examples = load_examples(str(data), limit=n).examples
    rows, _ = encode_examples(examples, tok, max_length=48, is_encoder_decoder=seq2seq)
    return dict(DataCollatorForDistillation(pad_token_id=tok.pad_token_id)(rows))


def _forward(model, inputs, seq2seq):
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "output_hidden_states": True, "use_cache": False}
    if seq2seq:
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    with torch.no_grad():
        return model(**kwargs)


def _hidden_loss(student, teacher, inputs, seq2seq, encoder_only=None, **cfg):
    """The objective's loss (or, with `encoder_only`, its T5 encoder term) on a batch."""
    objective = HiddenAlignment("hidden", HiddenAlignmentConfig(type="hidden", **cfg))
    objective.setup(student, teacher)
    source = LiveTeacher(teacher)
    source.setup(encoder_decoder=seq2seq, chunked=False, outputs=frozenset({"hidden_states"}))
    parsed = Batch.parse(inputs)
    batch = StepBatch(parsed, parsed.counts(seq2seq), teacher=source, encoder_decoder=seq2seq,
                      student_forward=lambda tokens: {"outputs": _forward(student, tokens.tensors(), seq2seq)})
    batch.counts.tokens[""] = 1
    loss, metrics = objective(batch)
    return objective, (metrics["encoder"] if encoder_only else loss)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_hidden_loss_zero_when_student_is_the_teachers_layers(kind, tiny_causal, tiny_t5, alpaca_small):
    pair = tiny_causal if kind == "causal" else tiny_t5
    seq2seq = kind == "t5"
    teacher = load_model(ModelConfig(name_or_path=pair["teacher"])).eval()
    inputs = _batch(pair["teacher"], alpaca_small, seq2seq=seq2seq)
    # the teacher itself, uniform map = identity (the last entries are both the final-norm outputs)
    objective, loss = _hidden_loss(teacher, teacher, inputs, seq2seq)
    assert len(objective.projections) == 0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # its first two layers: layer 0 of the shrunk copy is the teacher's layer 0 (intermediate: not normed). T5:
    # encoder term only, as the decoder cross-attends to the (different) final encoder output of each model
    student = shrink(teacher, [0, 1]).eval()
    for hidden_loss in ("mse", "cosine"):
        _, loss = _hidden_loss(student, teacher, inputs, seq2seq, layer_map=[[0, 0]], hidden_loss=hidden_loss,
                               encoder_only=True if seq2seq else None)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # and a mismatched pair is not zero
    _, loss = _hidden_loss(student, teacher, inputs, seq2seq, layer_map=[[0, 1]],
                           encoder_only=True if seq2seq else None)
    assert loss.item() > 1e-3


def test_projection_only_when_widths_differ_and_t5_maps(tiny_causal, tiny_t5):
    teacher = load_model(ModelConfig(name_or_path=tiny_causal["teacher"]))
    student = load_model(ModelConfig(name_or_path=tiny_causal["student"]))
    objective = HiddenAlignment("hidden", HiddenAlignmentConfig(type="hidden"))
    objective.setup(student, teacher)
    assert objective.layer_maps == {"decoder": [(0, 1), (1, 3)]}
    proj = objective.projections["decoder_0_1"]
    assert (proj.in_features, proj.out_features) == (student.config.hidden_size, teacher.config.hidden_size)
    assert proj.bias is None and set(objective.projections) == {"decoder_0_1", "decoder_1_3"}

    t5_teacher = load_model(ModelConfig(name_or_path=tiny_t5["teacher"]))
    t5_student = load_model(ModelConfig(name_or_path=tiny_t5["student"]))
    objective = HiddenAlignment("hidden", HiddenAlignmentConfig(type="hidden", decoder_layer_map=[[-1, -1]]))
    objective.setup(t5_student, t5_teacher)
    assert objective.layer_maps == {"encoder": [(0, 1), (1, 3)], "decoder": [(1, 3)]}
    objective = HiddenAlignment("hidden", HiddenAlignmentConfig(type="hidden", encoder_layer_map=[[0, 9]]))
    with pytest.raises(ValueError, match=r"hidden \(encoder\).*\[0, 9\]"):
        objective.setup(t5_student, t5_teacher)


# ------------------------------------------------------------------------------------------- in training
def test_projection_trained_and_excluded_from_saved_student(tiny_causal, alpaca_small, tmp_path):
    from kdistill.models import load_student

    out = tmp_path / "out"
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, out, max_steps=2)
    raw["objectives"] = {"ce": {}, "hidden": {"weight": 1.0}}
    prepared = prepare(config_from_dict(raw))
    trainer, student = prepared.trainer, prepared.student
    proj_names = [n for n, _ in student.named_parameters() if n.startswith("objective_parts.")]
    assert proj_names == ["objective_parts.hidden.projections.decoder_0_1.weight",
                          "objective_parts.hidden.projections.decoder_1_3.weight"]
    before = student.get_parameter(proj_names[0]).detach().clone()
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(student.get_parameter(n)) in optimized for n in proj_names)
    assert not torch.equal(before, student.get_parameter(proj_names[0]))  # trained

    from kdistill.models import save_student
    from kdistill.trainer import without_objective_parts

    with without_objective_parts(student):
        save_student(student, prepared.tokenizer, out)
    assert hasattr(student, "objective_parts")  # restored after saving
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "objective_parts" in k or "projections" in k]
    reloaded, info = load_student(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = _batch(tiny_causal["student"], alpaca_small, n=3)
    student.eval()
    reloaded.eval()
    with torch.no_grad():
        want = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        got = reloaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # trainer.save_model (an export) also leaves them out
    trainer.save_model(str(tmp_path / "export"))
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "objective_parts" in k]


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_end_to_end_ce_kd_hidden(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    raw = run_config(pair["teacher"], pair["student"], alpaca_small, tmp_path / "run", max_steps=5,
                     learning_rate=3e-3)
    raw["data"]["limit"] = 40
    raw["objectives"] = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}, "hidden": {"weight": 1.0}}
    summary = run_training(config_from_dict(raw), resume=False)
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert len(logged) == 5
    assert all({"loss/ce", "loss/kd", "loss/hidden"} <= set(h) for h in logged)
    if kind == "t5":
        for h in logged:
            assert h["loss/hidden"] == pytest.approx(h["hidden/encoder"] + h["hidden/decoder"], rel=1e-4, abs=1e-6)
    for h in logged:
        assert h["loss"] == pytest.approx(0.5 * h["loss/ce"] + 0.5 * h["loss/kd"] + h["loss/hidden"],
                                          rel=1e-3, abs=1e-4)
    assert logged[-1]["loss/hidden"] < logged[0]["loss/hidden"], [h["loss/hidden"] for h in logged]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "objective_parts" in k]


def _one_sgd_step(pair, data, tmp_path, batch_size, accumulation):
    raw = run_config(pair["teacher"], pair["student"], data, tmp_path, per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                     lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    raw["objectives"] = {"hidden": {"hidden_loss": "cosine"}}
    prepared = prepare(config_from_dict(raw))
    assert "hidden_states" in prepared.trainer.model_outputs
    before = {n: p.detach().clone() for n, p in prepared.student.named_parameters()}
    prepared.trainer.train()
    deltas = {n: (p.detach() - before[n]) for n, p in prepared.student.named_parameters()}
    return deltas, prepared.trainer.state.log_history[0]["loss/hidden"]


def test_hidden_normalised_by_global_positions_under_accumulation(tiny_t5, alpaca_small, tmp_path):
    full, loss_full = _one_sgd_step(tiny_t5, alpaca_small, tmp_path / "full", batch_size=8, accumulation=1)
    accum, loss_accum = _one_sgd_step(tiny_t5, alpaca_small, tmp_path / "accum", batch_size=4, accumulation=2)
    assert loss_full == pytest.approx(loss_accum, rel=1e-5)
    worst = max((full[n] - accum[n]).abs().max().item() for n in full)
    assert max(full[n].abs().max().item() for n in full) > 1e-4
    assert worst < 1e-5, worst


def test_hidden_states_requested_only_when_needed(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"ce": {}, "kd": {}}
    trainer = prepare(config_from_dict(raw)).trainer
    assert not trainer.model_outputs
    with torch.no_grad():
        outputs = trainer.step_batch(trainer.model, _batch(tiny_causal["student"], alpaca_small, n=2)).student_outputs
    assert outputs.hidden_states is None  # the student's forward did not ask for them
