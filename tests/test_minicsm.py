"""The MiniCSM-style T5 recipe: contrastive triplets beside generation, and the full objective combination."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, SHARED_DATA
from kdistill.config import ModelConfig, config_from_dict, load_config
from kdistill.data.claims import write_recipe
from kdistill.models import load_model, load_tokenizer
from kdistill.pipeline import prepare, run_training

PAIRS = SHARED_DATA / "climate_fever" / "climate-fever_pairs.jsonl"


@pytest.fixture(scope="module")
def triplets(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("climate-fever")
    write_recipe(PAIRS, out)
    return out / "triplets.jsonl"


def triplet_accuracy(model, tokenizer, rows):
    """Fraction of triplets whose pooled encoder states put consensus closer to supporting than to refuting."""
    def encode(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
        with torch.no_grad():
            hidden = model.get_encoder()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    c, s, r = (encode([row[k] for row in rows]) for k in ("consensus", "supporting", "refuting"))
    return ((c * s).sum(-1) > (c * r).sum(-1)).float().mean().item()


def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batches_carry_generation_and_triplet_fields(tiny_t5, triplets, tmp_path):
    cfg = {"student": {"name_or_path": tiny_t5["student"]}, "data": {"train": str(triplets), "max_length": 96},
           "objectives": {"ce": {"weight": 1.0}, "triplet": {"weight": 0.5}},
           "training": {"output_dir": str(tmp_path), "max_steps": 1, "save_strategy": "no"}}
    trainer = prepare(config_from_dict(cfg)).trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert {"input_ids", "labels", "anchor_input_ids", "positive_input_ids", "negative_input_ids"} <= set(batch)
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_t5["student"]))
    rows = _rows(triplets)
    assert tok.decode(batch["anchor_input_ids"][0], skip_special_tokens=True) == rows[0]["consensus"]
    refuting = tok.decode(batch["negative_input_ids"][0], skip_special_tokens=True)
    assert len(refuting) > 20 and rows[0]["refuting"].startswith(refuting)  # long evidence: cut at max_length


@pytest.mark.slow
def test_triplet_objective_raises_triplet_accuracy_of_a_tiny_t5(tiny_t5, triplets, tmp_path):
    rows = _rows(triplets)
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_t5["student"]))
    before = triplet_accuracy(load_model(ModelConfig(name_or_path=tiny_t5["student"])), tok, rows)
    cfg = {"student": {"name_or_path": tiny_t5["student"]},
           "data": {"train": str(triplets), "max_length": 96, "max_target_length": 8},
           "objectives": {"ce": {"weight": 1.0}, "triplet": {"weight": 1.0}},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 40, "per_device_train_batch_size": 16,
                        "learning_rate": 3e-3, "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True}}
    summary = run_training(config_from_dict(cfg))
    after = triplet_accuracy(load_model(ModelConfig(name_or_path=summary["output_dir"])), tok, rows)
    assert after >= before + 0.15, (before, after)  # measured on the 58 training triplets: a learning test
    assert any("triplet/accuracy" in h for h in summary["log_history"])


@pytest.mark.slow
def test_the_tiny_minicsm_config_trains_every_term_end_to_end(tiny_t5, triplets, tmp_path):
    cfg = load_config(REPO / "examples" / "tiny" / "minicsm_t5.yaml", [
        f"teacher.name_or_path={tiny_t5['teacher']}", f"student.name_or_path={tiny_t5['student']}",
        f"data.train={triplets}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=12",
        "training.logging_steps=4", "training.disable_tqdm=true"])
    summary = run_training(cfg)
    logged = [h for h in summary["log_history"] if "loss" in h]
    terms = {"loss/ce", "loss/kd", "loss/hidden", "loss/triplet", "triplet/accuracy"}
    assert logged and all(terms <= set(h) for h in logged)
    for h in logged:
        weighted = h["loss/ce"] + h["loss/kd"] + h["loss/hidden"] + 0.5 * h["loss/triplet"]
        assert h["loss"] == pytest.approx(weighted, rel=1e-3)
    assert logged[-1]["loss/hidden"] < logged[0]["loss/hidden"]
