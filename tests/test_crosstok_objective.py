"""The crosstok objective (issue #17) through the trainer: the same-tokenizer reductions, refusals, and an
end-to-end run with two different tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_config
from kdistill.config import ConfigError, config_from_dict
from kdistill.data.cross_rows import CHUNK_KEYS, TEACHER_VIEW
from kdistill.losses.cross_tokenizer import alm_loss
from kdistill.models import VocabularyMismatchError
from kdistill.pipeline import prepare, run_training


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory, alpaca_small):
    """A teacher whose tokenizer (BPE, 300 entries, another seed) is not the tiny students'."""
    from kdistill.apps.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("other-vocab"), kind="causal", data=alpaca_small, vocab_size=300,
                          teacher_steps=60, seed=1, progress=False)["teacher"]


def _prepared(teacher, student, data, tmp_path, objectives, **training):
    raw = run_config(teacher, student, data, tmp_path / "out", **training)
    raw["objectives"] = objectives
    return prepare(config_from_dict(raw))


def _loss(prepared, rows=4):
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    prepared.student.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(prepared.student, batch)), batch


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gold_with_one_tokenizer_equals_the_same_tokenizer_divergence(divergence, tiny_causal, alpaca_small,
                                                                       tmp_path):
    kd = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                   {"kd": {"divergence": divergence}})
    gold = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                     {"x": {"type": "crosstok", "method": "gold", "divergence": divergence}})
    (kd_loss, kd_batch), (gold_loss, gold_batch) = _loss(kd), _loss(gold)
    assert torch.equal(kd_batch["input_ids"], gold_batch["input_ids"])
    assert torch.equal(gold_batch[f"{TEACHER_VIEW}_input_ids"], gold_batch["input_ids"])
    # every trained token is a one-token chunk on both sides, so gold compares every position kd does
    assert gold_loss == pytest.approx(kd_loss, rel=1e-5)


def test_alm_with_one_tokenizer_is_per_token_likelihood_matching(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                         {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}})
    loss, batch = _loss(prepared)
    from kdistill.models import load_model
    from kdistill.config import ModelConfig

    teacher = load_model(ModelConfig(name_or_path=tiny_causal["teacher"]))
    with torch.no_grad():
        s = prepared.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    chunks = batch[CHUNK_KEYS[0]][:, 1:]
    assert torch.equal(chunks >= 0, targets >= 0)  # one chunk per trained token
    mask = targets >= 0
    vocab = prepared.trainer.objectives["x"][0].vocab[0]
    ls = s[..., :vocab].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    lt = t[..., :vocab].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    by_hand = alm_loss(ls, lt, binarization_temperature=1.0, reduction="sum") / mask.sum()
    assert loss == pytest.approx(float(by_hand), rel=1e-5)


def test_different_tokenizers_are_aligned_per_row(other_vocab_teacher, tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path,
                         {"x": {"type": "crosstok", "method": "alm"}})
    row = prepared.trainer.train_dataset[0]
    assert row["input_ids"] != row[f"{TEACHER_VIEW}_input_ids"]
    s_chunks, t_chunks = row[CHUNK_KEYS[0]], row[CHUNK_KEYS[1]]
    assert set(c for c in s_chunks if c >= 0) == set(c for c in t_chunks if c >= 0) != set()
    from kdistill.models import load_tokenizer
    from kdistill.config import ModelConfig

    s_tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    t_tok = load_tokenizer(ModelConfig(name_or_path=other_vocab_teacher))
    for c in sorted(set(c for c in s_chunks if c >= 0))[:20]:  # each chunk spells the same text on both sides
        s_text = s_tok.decode([i for i, k in zip(row["input_ids"], s_chunks) if k == c])
        t_text = t_tok.decode([i for i, k in zip(row[f"{TEACHER_VIEW}_input_ids"], t_chunks) if k == c])
        assert s_text.strip() == t_text.strip(), (c, s_text, t_text)


def test_refusals(other_vocab_teacher, tiny_causal, alpaca_small, tmp_path):
    with pytest.raises(VocabularyMismatchError, match="crosstok"):
        _prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path, {"kd": {}})
    server = {"teacher": {"server": {"url": "http://h/v1", "model": "m"}}}
    for method, extra in (("alm", {"cache": {"dir": str(tmp_path / "c")}}), ("gold", server), ("uld", server)):
        raw = run_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "o")
        raw["objectives"] = {"x": {"type": "crosstok", "method": method}}
        raw.update(extra)
        with pytest.raises(ConfigError, match="needs a loaded teacher"):
            config_from_dict(raw)


def test_alm_from_a_served_teacher_equals_the_loaded_teacher(other_vocab_teacher, tiny_causal, alpaca_small,
                                                            tmp_path):
    """alm reads only the teacher's log-probs of its own tokens, which a server returns exactly."""
    from test_served_teacher import Served

    objectives = {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}}
    local, _ = _loss(_prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path, objectives))
    with Served(other_vocab_teacher) as server:
        raw = run_config(None, tiny_causal["student"], alpaca_small, tmp_path / "served")
        raw["teacher"] = {"tokenizer": other_vocab_teacher,
                          "server": {"url": server.url, "model": "teacher", "top_k": 4, "max_retries": 1}}
        raw["objectives"] = objectives
        served, _ = _loss(prepare(config_from_dict(raw)))
    assert served == pytest.approx(local, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alm", "gold"])
def test_training_across_tokenizers_moves_the_student_toward_the_teacher(method, other_vocab_teacher, tiny_causal,
                                                                        alpaca_small, tmp_path):
    rows = [json.loads(line) for line in alpaca_small.read_text().splitlines()]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    objectives = {"x": {"type": "crosstok", "method": method, "binarization_temperature": 1.0}}

    def held_out_loss(student):
        prepared = _prepared(other_vocab_teacher, student, held, tmp_path, objectives)
        trainer = prepared.trainer
        prepared.student.eval()
        with torch.no_grad():
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
            return float(trainer.compute_loss(prepared.student, batch))

    before = held_out_loss(tiny_causal["student"])
    raw = run_config(other_vocab_teacher, tiny_causal["student"], train, tmp_path / "trained", max_steps=40,
                     learning_rate=3e-3, per_device_train_batch_size=8)
    raw["objectives"] = objectives
    run_training(config_from_dict(raw), resume=False)
    after = held_out_loss(str(tmp_path / "trained"))
    assert after < 0.8 * before, (before, after)
