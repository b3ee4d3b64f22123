"""Embedding models: pooling, sentence-transformers round trip, shrinking, contrastive fine-tuning, STS CLI,
the quickstart smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from kdistill.config import config_from_dict
from kdistill.embedder import Embedder
from kdistill.models import shrink
from kdistill.pooling import last_token_index, pool
from kdistill.apps.tiny import build_model, decoder_config, iter_text, t5_config, train_tokenizer

NLI = SHARED_DATA / "nli_triplets" / "nli_triplets_snli_dev.jsonl"
STS_DEV = SHARED_DATA / "stsb" / "sts-dev.jsonl"


@pytest.fixture(scope="module")
def decoder_tok(shared_data):
    return train_tokenizer(iter_text(NLI, fields=("sent0", "sent1", "hard_neg")), vocab_size=400)


@pytest.fixture(scope="module")
def minilm():
    try:
        from kdistill.apps.quickstart import teacher_path

        return str(teacher_path())
    except Exception as exc:  # noqa: BLE001 - report why, and skip
        pytest.skip(f"all-MiniLM-L6-v2 package unavailable: {exc}")


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_mean_and_cls_pooling_ignore_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    normed = pool(hidden, mask, "mean", normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="pooling mode"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("side", ["right", "left"])
def test_eos_pooling_takes_the_appended_eos_state(decoder_tok, side):
    """The embedding of a padded text equals the EOS state of the same text run alone, either padding side."""
    model = build_model(decoder_config(decoder_tok), seed=3).model
    model.eval()
    tok = decoder_tok
    tok.padding_side = side
    embedder = Embedder(model, tok, pooling="eos", normalize=False, append_eos=True)
    texts = ["A man is playing a guitar on stage.", "Dogs run.", "The women are sitting at a table outside."]
    batch = embedder.tokenize(texts)
    assert all(batch["input_ids"][i][last_token_index(batch["attention_mask"])[i]] == tok.eos_token_id
               for i in range(3))
    with torch.no_grad():
        together = embedder(batch["input_ids"], batch["attention_mask"])
        for i, text in enumerate(texts):
            alone = embedder.tokenize([text])
            single = model(**alone).last_hidden_state[0, -1]
            torch.testing.assert_close(together[i], single, atol=1e-5, rtol=1e-4)
    tok.padding_side = "right"


def test_saved_student_loads_in_sentence_transformers_with_same_vectors(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher = Embedder.from_pretrained(minilm)
    student = Embedder(shrink(teacher.backbone, [0, 2, 4]), teacher.tokenizer, pooling="mean", normalize=True)
    student.save(tmp_path / "s")
    texts = ["A man is playing a flute.", "Three dogs are running in the snow.", "Short."]
    ours = Embedder.from_pretrained(str(tmp_path / "s")).encode(texts)
    st = SentenceTransformer(str(tmp_path / "s"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, st, atol=1e-5)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 3


def test_eos_student_loads_in_sentence_transformers_with_eos_appended(decoder_tok, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = build_model(decoder_config(decoder_tok), seed=4).model
    embedder = Embedder(model, decoder_tok, pooling="eos", normalize=True, append_eos=True)
    embedder.save(tmp_path / "e")
    texts = ["A child is climbing a tree.", "Two people talk."]
    ours = Embedder.from_pretrained(str(tmp_path / "e")).encode(texts)
    st = SentenceTransformer(str(tmp_path / "e"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, st, atol=1e-5)


def test_shrink_layer_selection_and_errors(decoder_tok):
    model = build_model(decoder_config(decoder_tok, num_layers=6), seed=0)
    model.eval()
    small = shrink(model, [0, 2, 4])
    assert small.config.num_hidden_layers == 3 and len(small.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    ids = torch.randint(0, len(decoder_tok), (2, 9))
    torch.testing.assert_close(shrink(model, list(range(6)))(ids).logits, model(ids).logits)
    assert len(model.model.layers) == 6, "the original is untouched"
    for bad, message in (([0, 6], "out of range"), ([1, 1], "duplicate"), ([], "at least one")):
        with pytest.raises(ValueError, match=message):
            shrink(model, bad)


def test_shrink_bert_and_t5(minilm, decoder_tok):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(minilm)
    small = shrink(bert, [1, 3, 5])
    assert small.config.num_hidden_layers == 3 and len(small.encoder.layer) == 3
    torch.testing.assert_close(small.encoder.layer[0].attention.self.query.weight,
                               bert.encoder.layer[1].attention.self.query.weight)
    t5tok = train_tokenizer(iter_text(NLI, fields=("sent0",)), vocab_size=300, kind="t5")
    t5 = build_model(t5_config(t5tok, num_layers=6), seed=0)
    s5 = shrink(t5, [2, 5], decoder_layers=[1])
    assert (s5.config.num_layers, s5.config.num_decoder_layers) == (2, 1)
    assert s5.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    loss = s5(input_ids=torch.randint(0, 300, (2, 7)), labels=torch.randint(0, 300, (2, 4))).loss
    assert torch.isfinite(loss)


def _triplet_accuracy(embedder, rows):
    a = embedder.encode([r["sent0"] for r in rows])
    p = embedder.encode([r["sent1"] for r in rows])
    n = embedder.encode([r["hard_neg"] for r in rows])
    return float(((a * p).sum(1) > (a * n).sum(1)).mean())


@pytest.mark.slow
def test_contrastive_lora_finetuning_of_a_tiny_decoder_raises_triplet_accuracy(decoder_tok, tmp_path):
    rows = [json.loads(line) for line in NLI.read_text().splitlines()]
    train, held_out = rows[:1200], rows[-400:]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
    base = tmp_path / "base"
    build_model(decoder_config(decoder_tok, hidden_size=64, num_layers=2), seed=0).save_pretrained(base)
    decoder_tok.save_pretrained(base)
    before = _triplet_accuracy(Embedder.from_pretrained(str(base)), held_out)
    cfg = config_from_dict({
        "task": "embedding",
        "student": {"name_or_path": str(base)},
        "embedding": {"pooling": "eos", "max_length": 64},
        "data": {"train": str(train_file)},
        "objectives": {"contrastive": {"weight": 1.0, "temperature": 0.05}},
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 32, "num_train_epochs": 2,
                     "learning_rate": 5e-3, "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True},
    })
    from kdistill.pipeline import run_training

    summary = run_training(cfg)
    trained = Embedder.from_pretrained(summary["output_dir"])
    assert trained.pooling == "eos" and trained.append_eos
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    after = _triplet_accuracy(trained, held_out)
    assert after > before + 0.05, (before, after)
    logged = [h for h in summary["log_history"] if "loss/contrastive" in h]
    assert logged and "contrastive/accuracy" in logged[-1]


def test_embedding_kd_projection_for_different_widths_is_not_exported(decoder_tok, tmp_path):
    from kdistill.pipeline import prepare, run_training

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": line}) + "\n"
                             for line in ["A dog runs.", "A cat sleeps on a mat.", "Two men talk.", "It rains."] * 4))
    paths = {}
    for name, width in (("teacher", 64), ("student", 32)):
        paths[name] = tmp_path / name
        build_model(decoder_config(decoder_tok, hidden_size=width), seed=1).save_pretrained(paths[name])
        decoder_tok.save_pretrained(paths[name])
    raw = {"task": "embedding", "teacher": {"name_or_path": str(paths["teacher"])},
           "student": {"name_or_path": str(paths["student"])}, "data": {"train": str(texts)},
           "objectives": {"kd": {"type": "embedding_kd", "loss": "cosine"}},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
                        "save_strategy": "no", "disable_tqdm": True}}
    prepared = prepare(config_from_dict(raw))
    projection = prepared.student.objective_parts["kd"].projection
    assert tuple(projection.weight.shape) == (64, 32)
    assert any(p is projection.weight for p in prepared.trainer.model.parameters())
    run_training(config_from_dict(raw))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("projection" in k or "objective_parts" in k for k in saved)


def test_eval_sts_cli_spearman_equals_sentence_transformers_evaluator(minilm, capsys, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    from kdistill.cli import main

    rows = [json.loads(line) for line in STS_DEV.read_text().splitlines()[:200]]
    assert main(["eval", "sts", "--model", minilm, "--data", str(STS_DEV), "--limit", "200",
                 "--out", str(tmp_path / "sts.json")]) == 0
    out = capsys.readouterr().out
    ours = float(out.split("spearman:")[1].split()[0])
    evaluator = EmbeddingSimilarityEvaluator([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
                                             [r["score"] / 5 for r in rows], name="dev")
    theirs = evaluator(SentenceTransformer(minilm, device="cpu"))
    spearman = next(v for k, v in theirs.items() if k.endswith("spearman_cosine"))
    assert ours == pytest.approx(100 * spearman, abs=0.01)  # the CLI prints two decimals


@pytest.mark.slow
def test_quickstart_smoke_run(minilm, tmp_path, capsys):
    from kdistill.apps.quickstart import run

    result = run(out_dir=tmp_path / "qs", max_steps=4, max_sentences=256, sts_limit=100,  # bundled STS pairs
                 batch_size=32)
    names = [r["name"] for r in result["reports"]]
    assert names == ["teacher", "student, shrunk, untrained", "student, distilled"]
    assert result["reports"][1]["layers"] == 3 and result["train_steps"] == 4
    assert (tmp_path / "qs" / "quickstart.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| teacher | 6 |" in out and "STS Spearman" in out and "bundled STS-B dev subset" in out
    assert result["sts_pairs"] == 100 and result["train_sentences"] == 256
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(result["student"], device="cpu").encode(["ok"]).shape == (1, 384)


def test_quickstart_refuses_tampered_teacher(monkeypatch, tmp_path):
    import kdistill.apps.quickstart as qs

    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"not the weights")

    class Package:
        @staticmethod
        def get_model_path():
            return str(fake)

    monkeypatch.setitem(__import__("sys").modules, qs.TEACHER_PACKAGE, Package)
    with pytest.raises(qs.TeacherUnavailable, match="refusing"):
        qs.teacher_path()
