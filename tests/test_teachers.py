"""The teacher-signal seam: the typed batch, sources checked against what objectives need, a new source plugged in."""

from __future__ import annotations

import pytest
import torch

from conftest import run_config
from kdistill.batch import Batch
from kdistill.config import config_from_dict
from kdistill.objectives import build_objectives
from kdistill.objectives.hidden import HiddenAlignmentConfig
from kdistill.objectives.kd import LogitKDConfig
from kdistill.pipeline import prepare
from kdistill.teachers import CachedTopK, DenseLogits, LiveTeacher, PrecomputedEmbeddings, TeacherSource
from kdistill.trainer import DistillTrainer


def test_batch_parse_sorts_the_collated_keys_into_views_texts_and_teacher_signals():
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
              "rationale_input_ids": ids, "rationale_attention_mask": mask, "rationale_labels": ids.clone(),
              "anchor_input_ids": ids, "anchor_attention_mask": mask,
              "teacher_topk_indices": torch.zeros(4, 2, dtype=torch.long), "teacher_anchor": torch.zeros(2, 8),
              "num_negatives": torch.tensor(1)}
    batch = Batch.parse(inputs)
    assert sorted(batch.views) == ["", "rationale"] and list(batch.texts) == ["anchor"]
    assert sorted(batch.teacher) == ["teacher_anchor", "teacher_topk_indices"] and list(batch.extra) == ["num_negatives"]
    assert batch.size == 2 and batch.sampled_by is None
    counts = batch.counts(encoder_decoder=False)
    assert counts.tokens == {"": 4, "rationale": 4} and counts.examples == 2  # 2 rows x (3 - 1) shifted labels
    assert batch.counts(encoder_decoder=True).tokens[""] == 6
    with pytest.raises(ValueError, match="rationale_labels without rationale_input_ids"):
        Batch.parse({"input_ids": ids, "labels": ids, "rationale_labels": ids})


def test_a_source_that_cannot_give_what_an_objective_needs_is_refused_before_training():
    objectives = build_objectives({"kd": LogitKDConfig(type="kd"), "hidden": HiddenAlignmentConfig(type="hidden")})
    needs = {name: o.teacher_needs for name, (o, _) in objectives.items()}
    with pytest.raises(ValueError, match="objective hidden needs the teacher's hidden_states, which the top-k "
                                         "teacher cache cannot give"):
        CachedTopK(1.0).check_covers(needs)
    with pytest.raises(ValueError, match="objective kd needs the teacher's tokens"):
        PrecomputedEmbeddings().check_covers(needs)
    LiveTeacher.__new__(LiveTeacher).check_covers(needs)  # a live model gives all of them (no model needed)


class ReplayedLogits(TeacherSource):
    """A source written outside the package: dense logits from a frozen model of its own (what a served teacher
    would return), with nothing else in kdistill changed."""

    name = "replayed logits"
    provides = frozenset({"tokens"})

    def __init__(self, model):
        self.model = model.eval()
        self.calls = 0

    def tokens(self, query):
        self.calls += 1
        view = query.tokens
        with torch.no_grad():
            logits = self.model(input_ids=view.input_ids, attention_mask=view.attention_mask).logits
        return DenseLogits(logits[:, :-1])


def test_a_new_source_plugs_into_the_trainer_and_gives_the_live_teachers_loss(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "divergence": "reverse_kl"}}
    prepared = prepare(config_from_dict(raw))
    live = prepared.trainer
    source = ReplayedLogits(prepared.teacher)
    replayed = DistillTrainer(model=prepared.student, args=live.args, teacher=source, objectives=live.objectives,
                              kd_vocab=live.kd_vocab, data_collator=live.data_collator)
    batch = live.data_collator([live.train_dataset[i] for i in range(4)])
    prepared.student.eval()
    with torch.no_grad():
        want = live.compute_loss(prepared.student, dict(batch))
        got = replayed.compute_loss(prepared.student, dict(batch))
    assert source.calls == 1  # once per view and micro-batch
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert want.item() > 0


def test_a_teacher_no_objective_reads_is_not_loaded(tiny_causal, alpaca_small, tmp_path, caplog):
    """A CE-only variant of a KD config (what `kdistill compare` trains as its baseline) keeps its teacher section;
    the teacher is then neither loaded nor run."""
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"ce": {"weight": 1.0}}
    with caplog.at_level("INFO", logger="kdistill.recipes.lm"):
        prepared = prepare(config_from_dict(raw))
    assert prepared.teacher is None and prepared.trainer.teacher is None
    assert "not loaded: no objective reads it" in caplog.text
    raw["objectives"] = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}
    assert prepare(config_from_dict(raw)).teacher is not None
