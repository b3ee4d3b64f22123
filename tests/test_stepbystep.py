"""Distilling step-by-step through the trainer: the two-view loss, LLM labels, end-to-end runs on CQA and SVAMP."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA
from kdistill.config import config_from_dict
from kdistill.pipeline import prepare, run_training

CQA_TRAIN = SHARED_DATA / "dsbs_cqa" / "cqa_train.jsonl"
CQA_TEST = SHARED_DATA / "dsbs_cqa" / "cqa_test.jsonl"
SVAMP_TRAIN = SHARED_DATA / "dsbs_svamp" / "svamp_train.jsonl"
SVAMP_TEST = SHARED_DATA / "dsbs_svamp" / "svamp_test.jsonl"


def sbs_config(student, train, dataset, out, eval_file=None, alpha=0.5, **stepbystep):
    return {
        "student": {"name_or_path": student},
        "data": {"train": str(train), "eval": str(eval_file) if eval_file else None, "max_length": 96,
                 "max_target_length": 64, "limit": 64, "eval_limit": 24},
        "stepbystep": {"dataset": dataset, "max_new_tokens": 12, **stepbystep},
        "objectives": {"ce": {"weight": alpha}, "rationale": {"type": "ce", "view": "rationale",
                                                              "weight": 1 - alpha}},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 2,
                     "learning_rate": 1e-3, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True},
    }


def _view_ce(model, batch, prefix, seq2seq):
    ids, mask, labels = (batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"])
    with torch.no_grad():
        if seq2seq:
            logits = model(input_ids=ids, attention_mask=mask,
                           decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            labels = labels[:, 1:]
    keep = labels.ne(-100)
    return F.cross_entropy(logits[keep].double(), labels[keep])


@pytest.mark.parametrize("kind", ["t5", "causal"])
def test_loss_is_alpha_label_plus_one_minus_alpha_rationale(kind, tiny_t5, tiny_causal, tmp_path):
    pair = tiny_t5 if kind == "t5" else tiny_causal
    seq2seq = kind == "t5"
    prepared = prepare(config_from_dict(sbs_config(pair["student"], CQA_TRAIN, "cqa", tmp_path, alpha=0.3)))
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert {"input_ids", "labels", "rationale_input_ids", "rationale_labels"} <= set(batch)
    model = prepared.student
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
    expected = 0.3 * _view_ce(model, batch, "", seq2seq) + 0.7 * _view_ce(model, batch, "rationale_", seq2seq)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    tok = prepared.tokenizer
    first = [t for t in batch["rationale_input_ids"][0].tolist() if t != tok.pad_token_id]
    assert tok.decode(first).startswith("[rationale] ")
    assert tok.decode([t for t in batch["input_ids"][0].tolist() if t != tok.pad_token_id]).startswith("[label] ")


def _label_targets(prepared):
    tok = prepared.tokenizer
    return [tok.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True).strip()
            for row in prepared.trainer.train_dataset.rows]


def test_label_type_llm_trains_on_the_llm_labels(tiny_t5, tmp_path):
    rows = [json.loads(line) for line in CQA_TRAIN.read_text().splitlines()[:64]]
    differ = [i for i, r in enumerate(rows) if r["palm_label"].strip() and r["palm_label"] != r["answer"]]
    assert differ, "the slice must contain rows where the LLM disagrees with the ground truth"
    gt = _label_targets(prepare(config_from_dict(sbs_config(tiny_t5["student"], CQA_TRAIN, "cqa", tmp_path))))
    llm = _label_targets(prepare(config_from_dict(sbs_config(tiny_t5["student"], CQA_TRAIN, "cqa", tmp_path,
                                                             label_type="llm"))))
    assert gt == [r["answer"] for r in rows]
    assert llm == [r["palm_label"] for r in rows]


def test_standard_model_type_trains_the_label_view_only(tiny_t5, tmp_path):
    cfg = sbs_config(tiny_t5["student"], CQA_TRAIN, "cqa", tmp_path, model_type="standard")
    prepared = prepare(config_from_dict(cfg))
    row = prepared.trainer.train_dataset.rows[0]
    assert all(t == -100 for t in row["rationale_labels"])
    assert not prepared.tokenizer.decode(row["input_ids"]).startswith("[label]")


@pytest.mark.slow
@pytest.mark.parametrize("kind, dataset, train, test", [
    ("t5", "cqa", CQA_TRAIN, CQA_TEST), ("causal", "svamp", SVAMP_TRAIN, SVAMP_TEST),
    ("t5", "svamp", SVAMP_TRAIN, SVAMP_TEST), ("causal", "cqa", CQA_TRAIN, CQA_TEST)])
def test_end_to_end_on_a_slice(kind, dataset, train, test, tiny_t5, tiny_causal, tmp_path):
    pair = tiny_t5 if kind == "t5" else tiny_causal
    cfg = sbs_config(pair["student"], train, dataset, tmp_path / "out", eval_file=test)
    cfg["training"].update(max_steps=8, logging_steps=4)
    cfg["data"]["max_length"] = 256  # a causal LM sees question, five choices and answer in one sequence
    summary = run_training(config_from_dict(cfg))
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert all({"loss/ce", "loss/rationale"} <= set(h) for h in logged)
    assert logged[-1]["loss/rationale"] < logged[0]["loss/rationale"]
    accuracy = summary["label_accuracy"]
    assert accuracy["total"] == 24 and 0.0 <= accuracy["accuracy"] <= 1.0
    assert len(accuracy["examples"]) == 20 and all("prediction" in e for e in accuracy["examples"])
