"""Zero-shot classification evaluation: metrics vs scikit-learn, tasks on the real files, both scorers, CLI."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from kdistill.evaluation.classify import (Task, add_parser, classification_metrics, climate_fever_task,
                                          custom_task, evaluate_classification, hate_speech_task, run_cli)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLIMATE = SHARED / "climate_fever" / "climate-fever.jsonl"
HATE = SHARED / "hate_speech_stormfront" / "sampled_train.jsonl"

FILLER = ["the", "models", "show", "that", "carbon", "levels", "rise", "every", "year", "in", "many", "regions",
          "scientists", "agree", "data", "from", "satellites", "measure", "heat", "waves"]


def synthetic_rows(n: int, seed: int) -> list[tuple[dict, str]]:
    """Claims of filler words; 'glacier' somewhere -> SUPPORTS, 'volcano' somewhere -> REFUTES."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "SUPPORTS" if i % 2 == 0 else "REFUTES"
        words = rng.sample(FILLER, rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), "glacier" if label == "SUPPORTS" else "volcano")
        rows.append(({"claim": " ".join(words)}, label))
    return rows


def synthetic_task() -> Task:
    return Task(name="synthetic", labels=["SUPPORTS", "REFUTES"],
                verbalizers={"SUPPORTS": "supported", "REFUTES": "refuted"},
                template="Claim: {claim}\nAnswer:", text_fields=["claim"], label_field="claim_label")


# ----------------------------------------------------------------------------------------------------
# metrics


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = ["a", "b", "c"]
    golds = ["a", "a", "b", "b", "c", "c", "a", "b", "c", "a"]
    preds = ["a", "b", "b", None, "a", "a", "a", None, "b", "b"]  # 'c' never predicted, two invalid
    m = classification_metrics(golds, preds, labels)
    sk_preds = ["__invalid__" if p is None else p for p in preds]
    assert m["n"] == 10 and m["invalid"] == 2
    assert m["accuracy"] == pytest.approx(accuracy_score(golds, sk_preds))
    assert m["macro_f1"] == pytest.approx(f1_score(golds, sk_preds, labels=labels, average="macro",
                                                   zero_division=0))
    p, r, f, s = precision_recall_fscore_support(golds, sk_preds, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        c = m["per_class"][label]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert m["per_class"]["c"]["precision"] == 0.0 and m["per_class"]["c"]["f1"] == 0.0
    assert m["confusion_matrix"] == confusion_matrix(golds, sk_preds, labels=labels).tolist()
    assert sum(map(sum, m["confusion_matrix"])) == 8  # invalid left out of the matrix

    # no invalid: plain sklearn agreement
    preds2 = ["a", "b", "b", "b", "c", "a", "a", "c", "c", "a"]
    m2 = classification_metrics(golds, preds2, labels)
    assert m2["accuracy"] == pytest.approx(accuracy_score(golds, preds2))
    assert m2["macro_f1"] == pytest.approx(f1_score(golds, preds2, average="macro"))
    assert m2["confusion_matrix"] == confusion_matrix(golds, preds2, labels=labels).tolist()
    with pytest.raises(ValueError):
        classification_metrics(["z"], ["a"], labels)


# ----------------------------------------------------------------------------------------------------
# tasks on the real files


def test_climate_fever_and_hate_speech_load():
    if not CLIMATE.is_file() or not HATE.is_file():
        pytest.skip("shared data not found")
    binary = climate_fever_task().load(CLIMATE)
    assert {g for _, g in binary} == {"SUPPORTS", "REFUTES"}
    assert set(binary.excluded) == {"NOT_ENOUGH_INFO", "DISPUTED"}
    assert len(binary) + sum(binary.excluded.values()) == 304
    assert len(binary) == sum(1 for line in CLIMATE.open() if json.loads(line)["claim_label"] in ("SUPPORTS", "REFUTES"))
    full = climate_fever_task(all_labels=True).load(CLIMATE)
    assert len(full) == 304 and full.excluded == {}
    assert "Claim: " in climate_fever_task().prompt(binary[0][0])

    hate = hate_speech_task().load(HATE)
    assert len(hate) == 1914 and {g for _, g in hate} == {"hate", "noHate"} and hate.excluded == {}
    assert len(hate_speech_task().load(HATE, limit=7)) == 7

    task = custom_task("hate,noHate", "Post: {text}\nChoices: {labels}\nAnswer:")
    assert task.text_fields == ["text"] and task.prompt({"text": "hi"}) == "Post: hi\nChoices: hate, noHate\nAnswer:"
    assert len(task.load(HATE, limit=5)) == 5


# ----------------------------------------------------------------------------------------------------
# tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """An untrained tiny causal LM and T5 sharing a tokenizer trained on the synthetic claims."""
    from kdistill.apps.tiny import build_model, decoder_config, t5_config, train_tokenizer

    texts = [f"Claim: {f['claim']}\nAnswer: supported refuted" for f, _ in synthetic_rows(200, 99)]
    texts += FILLER + ["supported", "refuted", "not enough info", "hate", "not hate"]
    out = tmp_path_factory.mktemp("classify-models")
    paths = {}
    for kind in ("causal", "t5"):
        tok = train_tokenizer(texts, vocab_size=300, kind="decoder" if kind == "causal" else "t5")
        cfg = (decoder_config(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1) if kind == "causal"
               else t5_config(tok, d_model=32, num_layers=2, num_heads=2, d_kv=16))
        path = out / kind
        build_model(cfg, seed=0).save_pretrained(path)
        tok.save_pretrained(path)
        paths[kind] = str(path)
    return paths


def _finetune(path: str, rows, steps: int, lr: float = 3e-3):
    """Plain torch loop: teach the model to continue each prompt with its gold verbaliser."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    task = synthetic_task()
    s2s = "t5" in Path(path).name
    model = (AutoModelForSeq2SeqLM if s2s else AutoModelForCausalLM).from_pretrained(path)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    rng = random.Random(0)
    pad = tok.pad_token_id
    for _ in range(steps):
        batch = rng.sample(rows, 16)
        prompts = [list(tok(task.prompt(f), add_special_tokens=s2s)["input_ids"]) for f, _ in batch]
        conts = [list(tok(" " + task.verbalizers[g], add_special_tokens=False)["input_ids"]) for _, g in batch]
        if s2s:
            ew, dw = max(map(len, prompts)), max(map(len, conts))
            enc = torch.full((16, ew), pad); mask = torch.zeros((16, ew), dtype=torch.long)
            labels = torch.full((16, dw), -100)
            for r, (p, c) in enumerate(zip(prompts, conts)):
                enc[r, :len(p)] = torch.tensor(p); mask[r, :len(p)] = 1; labels[r, :len(c)] = torch.tensor(c)
            loss = model(input_ids=enc, attention_mask=mask, labels=labels).loss
        else:
            seqs = [p + c for p, c in zip(prompts, conts)]
            w = max(map(len, seqs))
            inp = torch.full((16, w), pad); mask = torch.zeros((16, w), dtype=torch.long)
            labels = torch.full((16, w), -100)
            for r, (p, s) in enumerate(zip(prompts, seqs)):
                inp[r, :len(s)] = torch.tensor(s); mask[r, :len(s)] = 1
                labels[r, len(p):len(s)] = torch.tensor(s[len(p):])
            loss = model(input_ids=inp, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_loglik_ranks_trained_label(tiny_models, kind):
    task = synthetic_task()
    train, held_out = synthetic_rows(200, 1), synthetic_rows(40, 2)
    untrained = evaluate_classification(tiny_models[kind], None, task, examples=held_out, progress=False)
    assert untrained["accuracy"] < 0.9 and untrained["invalid"] == 0
    model, tok = _finetune(tiny_models[kind], train, steps=40 if kind == "causal" else 25)
    res = evaluate_classification(model, tok, task, examples=held_out, batch_size=8, progress=False)
    assert res["accuracy"] >= 0.9, res["confusion_matrix"]
    assert res["invalid"] == 0 and res["n"] == 40 and len(res["examples"]) == 20
    assert set(res["examples"][0]["scores"]) == {"SUPPORTS", "REFUTES"}
    # batching does not change the scores; length normalisation is an option
    res1 = evaluate_classification(model, tok, task, examples=held_out[:6], batch_size=1, progress=False)
    for a, b in zip(res1["examples"], res["examples"][:6]):
        for label in task.labels:
            assert a["scores"][label] == pytest.approx(b["scores"][label], abs=1e-4)
    norm = evaluate_classification(model, tok, task, examples=held_out[:6], length_normalize=True, progress=False)
    assert norm["length_normalize"] is True


def test_generate_counts_garbage_as_invalid(tiny_models):
    from kdistill.generators import LocalTeacher

    task = synthetic_task()
    rows = synthetic_rows(6, 3)
    res = evaluate_classification(tiny_models["causal"], None, task, scorer="generate", examples=rows,
                                  batch_size=4, progress=False, max_new_tokens=8)
    teacher = LocalTeacher(tiny_models["causal"], batch_size=4, max_new_tokens=8, chat=False)
    outputs = teacher.generate([task.prompt(f) for f, _ in rows])
    from kdistill.annotate import parse_label

    expected_invalid = sum(parse_label(o, ["supported", "refuted"]) is None
                           and parse_label(o, task.labels) is None for o in outputs)
    assert [e["output"] for e in res["examples"]] == outputs
    assert res["invalid"] == expected_invalid > 0
    assert all(e["pred"] is None for e in res["examples"]
               if parse_label(e["output"], ["supported", "refuted"]) is None
               and parse_label(e["output"], task.labels) is None)
    assert sum(map(sum, res["confusion_matrix"])) == 6 - res["invalid"]


def hate_args_list(tiny_models, tmp_path) -> list[str]:
    return ["classify", "--model", tiny_models["causal"], "--task", "custom", "--data", str(HATE), "--labels",
            "hate,noHate", "--limit", "4", "--scorer", "generate", "--out", str(tmp_path / "h.json")]


def test_run_cli_writes_json_and_table(tiny_models, tmp_path, capsys):
    if not CLIMATE.is_file():
        pytest.skip("shared data not found")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="eval_kind"))
    out = tmp_path / "res.json"
    args = parser.parse_args(["classify", "--model", tiny_models["causal"], "--task", "climate_fever",
                              "--data", str(CLIMATE), "--limit", "12", "--batch-size", "4", "--out", str(out)])
    assert args.eval_func is run_cli
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    for word in ("accuracy", "macro-F1", "SUPPORTS", "REFUTES", "confusion matrix", "invalid", "precision"):
        assert word in printed
    result = json.loads(out.read_text())
    assert result["task"] == "climate_fever" and result["n"] == 12 and result["scorer"] == "loglik"
    assert len(result["confusion_matrix"]) == 2 and result["invalid"] == 0

    hate_args = parser.parse_args(hate_args_list(tiny_models, tmp_path))
    code = run_cli(hate_args)
    result = json.loads((tmp_path / "h.json").read_text())  # written in any case
    assert result["n"] == 4
    # the tiny model's answers name no label: more invalid than --max-invalid-fraction (0.5) exits 1 (#12)
    assert code == (1 if result["invalid"] > 2 else 0)
    lenient = parser.parse_args([*hate_args_list(tiny_models, tmp_path), "--max-invalid-fraction", "1.0"])
    assert run_cli(lenient) == 0
