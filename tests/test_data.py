"""Tests for kdistill.data: loading/validation, rendering/tokenisation and collation (offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kdistill.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    DataCollatorForDistillation,
    DataValidationError,
    EncodeStats,
    Example,
    encode_example,
    encode_examples,
    load_examples,
    load_rows,
    prompt_text,
    render_segments,
)
from kdistill.apps.tiny import iter_text, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca" / "alpaca_small_2000.jsonl"
ALPACA_GPT4 = DATA / "alpaca_gpt4_demo" / "alpaca_en_demo.jsonl"

GOOD = '{"instruction": "Say hi.", "input": "", "output": "Hi!"}'


# ----------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def texts():
    return list(iter_text(ALPACA))


@pytest.fixture(scope="module")
def chat_tok(texts):
    return train_tokenizer(texts, vocab_size=512, kind="decoder", chat_template=True)


@pytest.fixture(scope="module")
def plain_tok(texts):
    return train_tokenizer(texts, vocab_size=512, kind="decoder", chat_template=False)


@pytest.fixture(scope="module")
def t5_tok(texts):
    return train_tokenizer(texts, vocab_size=512, kind="t5")


@pytest.fixture(scope="module")
def alpaca_data():
    return load_examples(str(ALPACA))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def labelled(enc: dict) -> list[int]:
    return [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100]


def label_spans(enc: dict) -> list[list[int]]:
    """Contiguous runs of trainable tokens."""
    spans, current = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            assert lab == tok
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def alpaca(instruction="Name a colour.", inp="", output="Blue.", source="t:1"):
    return Example("alpaca", {"instruction": instruction, "input": inp, "output": output}, source)


def conversation(source="t:1"):
    return Example("messages", {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And times three?"},
        {"role": "assistant", "content": "Twelve."},
    ]}, source)


# ----------------------------------------------------------------------------------------------------
# records: validation


BAD_ROWS = [
    ('{"instruction": "a", "output": }', "auto", "malformed JSON: Expecting value"),
    ('["a", "b"]', "auto", "row is not a JSON object (found array)"),
    ('"just a string"', "auto", "row is not a JSON object (found string)"),
    ('{"question": "q", "answer": "a"}', "auto", "cannot detect the row format from its keys"),
    ('{"instruction": "a"}', "alpaca", "missing required field 'output'"),
    ('{"output": "a"}', "alpaca", "missing required field 'instruction'"),
    ('{"prompt": "p"}', "prompt_completion", "missing required field 'completion'"),
    ('{"instruction": "a"}', "messages", "missing required field 'messages'"),
    ('{"instruction": "a", "output": 3}', "auto", "field 'output' must be a string, found number"),
    ('{"instruction": ["a"], "output": "b"}', "auto", "field 'instruction' must be a string, found array"),
    ('{"instruction": "a", "input": {"x": 1}, "output": "b"}', "auto",
     "field 'input' must be a string, found object"),
    ('{"instruction": "a", "input": null, "output": "b"}', "auto", "field 'input' must be a string, found null"),
    ('{"prompt": null, "completion": "c"}', "auto", "field 'prompt' must be a string, found null"),
    ('{"instruction": "a", "output": "  \\n\\t"}', "auto", "field 'output' is empty or whitespace-only"),
    ('{"prompt": "p", "completion": ""}', "auto", "field 'completion' is empty or whitespace-only"),
    ('{"messages": "hello"}', "auto", "field 'messages' must be a non-empty list, found string"),
    ('{"messages": []}', "auto", "field 'messages' must be a non-empty list, found an empty list"),
    ('{"messages": ["hi", {"role": "assistant", "content": "x"}]}', "auto",
     "messages[0] must be an object with string 'role' and 'content', found string"),
    ('{"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}', "auto",
     "messages[0].role must be a string, found number"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "auto",
     "messages[0] is missing 'content'"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "auto",
     "messages[0].content must be a string, found number"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "auto",
     "messages[0] has unknown role 'bot' (allowed: system, user, assistant)"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}', "auto",
     "messages has no assistant message"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "u2"}]}', "auto", "last message must be from the assistant, found role 'user'"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]}', "auto",
     "messages[1] (assistant) content is empty or whitespace-only"),
]


@pytest.mark.parametrize("row, fmt, reason", BAD_ROWS, ids=[r[2][:40] for r in BAD_ROWS])
def test_each_problem_is_reported_with_file_and_line(tmp_path, row, fmt, reason):
    good = GOOD if fmt in ("auto", "alpaca") else {
        "prompt_completion": '{"prompt": "p", "completion": "c"}',
        "messages": '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}',
    }[fmt]
    path = write(tmp_path, "d.jsonl", f"{good}\n\n{row}\n{good}\n")
    with pytest.raises(DataValidationError) as info:
        load_examples(path, format=fmt)
    assert len(info.value.errors) == 1
    message = info.value.errors[0]
    assert message.startswith(f"{path}:3: "), message
    assert reason in message
    assert str(info.value) == message

    data = load_examples(path, format=fmt, skip_invalid=True)
    assert [e.source for e in data.examples] == [f"{path}:1", f"{path}:4"]
    assert data.skipped == [message]


def test_all_problems_of_a_file_are_reported_in_line_order(tmp_path):
    lines = [
        GOOD,                                           # 1
        '{"instruction": "a", "output": ""}',           # 2 empty output
        "",                                             # 3 blank, ignored
        "{not json",                                    # 4 malformed
        '{"prompt": "p", "completion": "c"}',           # 5 good
        "42",                                           # 6 not an object
        '{"messages": [{"role": "user", "content": "u"}]}',  # 7 no assistant
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    errors = info.value.errors
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (2, 4, 6, 7)]
    assert str(info.value).splitlines() == errors
    assert isinstance(info.value, ValueError)


def test_json_array_reports_the_line_where_each_element_starts(tmp_path):
    text = (
        "[\n"                                            # 1
        '  {"instruction": "a",\n'                       # 2  element 0 (good)
        '   "output": "b"},\n'                           # 3
        "  {\n"                                          # 4  element 1: empty output
        '    "instruction": "c",\n'                      # 5
        '    "output": "   "\n'                          # 6
        "  },\n"                                         # 7
        '  "a string",\n'                                # 8  element 2: not an object
        '  {"prompt": "p",\n'                            # 9  element 3 (good)
        '   "completion": "q"},\n'                       # 10
        '  {"messages": [\n'                             # 11 element 4: unknown role
        '     {"role": "robot", "content": "x"},\n'      # 12
        '     {"role": "assistant", "content": "y"}]}\n'  # 13
        "]\n"
    )
    path = write(tmp_path, "d.json", text)
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    errors = info.value.errors
    assert len(errors) == 3
    assert errors[0].startswith(f"{path}:4: ") and "field 'output' is empty" in errors[0]
    assert errors[1].startswith(f"{path}:8: ") and "not a JSON object (found string)" in errors[1]
    assert errors[2].startswith(f"{path}:11: ") and "unknown role 'robot'" in errors[2]

    data = load_examples(path, skip_invalid=True)
    assert [(e.kind, e.source) for e in data.examples] == [("alpaca", f"{path}:2"),
                                                          ("prompt_completion", f"{path}:9")]
    assert data.examples[0].fields == {"instruction": "a", "input": "", "output": "b"}


def test_malformed_json_array_element(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": }\n]\n'
    path = write(tmp_path, "d.json", text)
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:4: malformed JSON: Expecting value (line 5, column")

    path = write(tmp_path, "t.json", '[\n {"instruction": "a", "output": "b"},\n')
    with pytest.raises(DataValidationError, match="unterminated array"):
        load_examples(path)


def test_json_file_holding_json_lines_and_single_object(tmp_path):
    path = write(tmp_path, "lines.json", f'{GOOD}\n\n{{"prompt": "p", "completion": "c"}}\n{{"x": 1}}\n')
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:4"]
    data = load_examples(path, skip_invalid=True)
    assert [e.source for e in data.examples] == [f"{path}:1", f"{path}:3"]

    # a pretty-printed array saved as .jsonl, and a one-line array
    path = write(tmp_path, "arr.jsonl", f'[\n  {GOOD},\n  {GOOD}\n]\n')
    assert [e.source for e in load_examples(path).examples] == [f"{path}:2", f"{path}:3"]
    path = write(tmp_path, "arr.json", f'[{GOOD}, {GOOD}]')
    assert [e.source for e in load_examples(path).examples] == [f"{path}:1", f"{path}:1"]

    path = write(tmp_path, "one.json", '\n{\n  "prompt": "p",\n  "completion": "c"\n}\n')
    (example,) = load_examples(path).examples
    assert example.source == f"{path}:2" and example.fields == {"prompt": "p", "completion": "c"}


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("w.jsonl", "\n  \n\n"), ("a.json", " [ ] ")])
def test_empty_source_is_an_error(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(DataValidationError, match="no rows") as info:
        load_examples(path)
    assert info.value.errors[0].startswith(f"{path}:1: ")


def test_forced_format(tmp_path):
    path = write(tmp_path, "pc.jsonl", '{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(DataValidationError) as info:
        load_examples(path, format="alpaca")
    (error,) = info.value.errors
    assert error.startswith(f"{path}:1: ")
    assert "missing required field 'instruction'" in error and "missing required field 'output'" in error
    (example,) = load_examples(path, format="prompt_completion").examples
    assert example.kind == "prompt_completion"
    with pytest.raises(ValueError, match="format must be"):
        load_examples(path, format="sharegpt")


def test_auto_detection_and_messages_are_normalised(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "u", "name": "x"}, {"role": "assistant", "content": "a"}],
         "instruction": "ignored because messages wins"},
        {"instruction": "i", "output": "o"},
        {"prompt": "p", "completion": "c", "extra": 1},
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    examples = load_examples(path).examples
    assert [e.kind for e in examples] == ["messages", "alpaca", "prompt_completion"]
    assert examples[0].fields == {"messages": [{"role": "user", "content": "u"},
                                               {"role": "assistant", "content": "a"}]}
    assert examples[1].fields["input"] == ""
    assert examples[2].fields == {"prompt": "p", "completion": "c"}


def test_skip_invalid_and_limit(tmp_path):
    lines = [GOOD, '{"instruction": "a", "output": 1}', GOOD, GOOD, "[]"]
    path = write(tmp_path, "d.jsonl", "\n".join(lines))
    data = load_examples(path, skip_invalid=True, limit=2)
    assert [e.source for e in data.examples] == [f"{path}:1", f"{path}:3"]
    assert [s.split(": ")[0] for s in data.skipped] == [f"{path}:2", f"{path}:5"]
    # limit does not shorten validation: the bad row after the first two good ones still fails the load
    with pytest.raises(DataValidationError):
        load_examples(path, limit=1)
    # nothing valid at all is an error even when skipping
    path = write(tmp_path, "bad.jsonl", "1\n2\n")
    with pytest.raises(DataValidationError, match="no valid rows"):
        load_examples(path, skip_invalid=True)


def test_error_message_lists_first_fifty(tmp_path):
    path = write(tmp_path, "d.jsonl", "\n".join(["[]"] * 60))
    with pytest.raises(DataValidationError) as info:
        load_examples(path)
    assert len(info.value.errors) == 60
    lines = str(info.value).splitlines()
    assert len(lines) == 51 and lines[-1] == "and 10 more"
    assert lines[49].startswith(f"{path}:50: ")
    import pickle

    assert pickle.loads(pickle.dumps(info.value)).errors == info.value.errors


def test_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataValidationError, match=r"d\.jsonl:2: malformed JSON: file is not valid UTF-8"):
        load_examples(str(path))


def test_missing_local_file_does_not_try_the_hub(tmp_path, monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise AssertionError("hub must not be tried")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    for source in ("nope.jsonl", "data/nope.json", str(tmp_path / "missing"), "./rel/dir", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_examples(source)


def test_hub_ids_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return [{"prompt": "p", "completion": "c", "messages": None},
                {"prompt": "p", "completion": " ", "messages": None}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataValidationError) as info:
        load_examples("someorg/some-data", split="validation")
    assert calls == [("someorg/some-data", "validation")]
    assert info.value.errors == ["someorg/some-data[validation]:row 1: field 'completion' is empty or "
                                 "whitespace-only"]
    data = load_examples("tatsu-lab/alpaca", skip_invalid=True)
    assert calls[-1] == ("tatsu-lab/alpaca", "train")
    assert data.examples[0].source == "tatsu-lab/alpaca[train]:row 0"


def test_load_rows_validates_iterables_of_dicts():
    rows = iter([
        {"instruction": "i", "input": None, "output": "o"},  # None = absent column in Arrow
        {"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}]},
        {"prompt": "p", "completion": "c"},
    ])
    with pytest.raises(DataValidationError) as info:
        load_rows(rows, "org/ds[train]")
    assert info.value.errors == ["org/ds[train]:row 1: messages[1] has unknown role 'tool' "
                                 "(allowed: system, user, assistant)"]
    rows = [{"instruction": "i", "input": None, "output": "o"}, {"prompt": "p", "completion": "c"}]
    data = load_rows(rows, "org/ds[train]", limit=1)
    assert [(e.kind, e.source, e.fields["input"]) for e in data.examples] == [("alpaca", "org/ds[train]:row 0", "")]
    with pytest.raises(DataValidationError, match="no rows"):
        load_rows([], "org/empty[train]")


def test_local_dataset_folder_uses_load_dataset(tmp_path, monkeypatch):
    import datasets
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    data = load_examples(str(folder))
    assert [e.source for e in data.examples] == [f"{folder}[train]:row 0", f"{folder}[train]:row 1"]
    assert data.examples[1].fields == {"prompt": "c", "completion": "d"}


def test_real_datasets_load(alpaca_data):
    assert len(alpaca_data.examples) == 2000 and alpaca_data.skipped == []
    assert all(e.kind == "alpaca" for e in alpaca_data.examples)
    assert alpaca_data.examples[0].source == f"{ALPACA}:1"
    assert sum(1 for e in alpaca_data.examples if e.fields["input"]) == 753
    gpt4 = load_examples(str(ALPACA_GPT4))
    assert len(gpt4.examples) == 999
    assert gpt4.examples[-1].source == f"{ALPACA_GPT4}:999"
    assert len(load_examples(str(ALPACA), limit=10).examples) == 10


# ----------------------------------------------------------------------------------------------------
# formatting


def test_alpaca_prompts():
    ex = alpaca("Add the numbers.", "2 and 3", "5")
    assert ALPACA_PROMPT_WITH_INPUT.startswith("Below is an instruction that describes a task, paired with an input")
    assert render_segments(ex, None, template="alpaca") == [
        (ALPACA_PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3"), False), ("5", True)]
    assert render_segments(alpaca("Say hi.", "", "Hi"), None, template="alpaca")[0][0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="x").endswith("### Instruction:\nx\n\n### Response:\n")
    assert render_segments(ex, None, template="plain") == [("Add the numbers.\n\n2 and 3\n\n", False), ("5", True)]
    with pytest.raises(ValueError, match="template must be"):
        render_segments(ex, None, template="vicuna")


def test_alpaca_without_chat_template_masks_prompt(plain_tok, alpaca_data):
    eos = plain_tok.eos_token  # "<|endoftext|>"
    for ex in alpaca_data.examples[:40]:
        enc = encode_example(ex, plain_tok, max_length=4096)
        assert len(enc["input_ids"]) == len(enc["labels"])
        assert plain_tok.decode(labelled(enc)) == ex.fields["output"] + eos
        assert len(label_spans(enc)) == 1 and enc["labels"][-1] == plain_tok.eos_token_id
        first = next(i for i, l in enumerate(enc["labels"]) if l != -100)
        expected_prompt = (ALPACA_PROMPT_WITH_INPUT if ex.fields["input"] else ALPACA_PROMPT_NO_INPUT).format(
            **ex.fields)
        assert plain_tok.decode(enc["input_ids"][:first]) == expected_prompt
        assert all(l == -100 for l in enc["labels"][:first])


def test_alpaca_with_chat_template(chat_tok, alpaca_data):
    with_input = next(e for e in alpaca_data.examples if e.fields["input"])
    segments = render_segments(with_input, chat_tok)
    user = with_input.fields["instruction"] + "\n\n" + with_input.fields["input"]
    assert segments == [(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
                        (with_input.fields["output"] + "<|im_end|>\n", True)]
    for ex in alpaca_data.examples[:40]:
        enc = encode_example(ex, chat_tok, max_length=4096)
        assert chat_tok.decode(labelled(enc)) == ex.fields["output"] + "<|im_end|>\n"
        assert chat_tok.eos_token_id not in enc["input_ids"]  # no eos appended under a chat template
        assert len(label_spans(enc)) == 1
        first = next(i for i, l in enumerate(enc["labels"]) if l != -100)
        assert chat_tok.decode(enc["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    # an explicit non-chat template overrides the tokenizer's chat template
    enc = encode_example(alpaca(), chat_tok, template="alpaca")
    assert chat_tok.decode(labelled(enc)) == "Blue.<|endoftext|>"


def test_multi_turn_messages_train_on_every_assistant_turn(chat_tok, plain_tok):
    ex = conversation()
    segments = render_segments(ex, chat_tok)
    assert "".join(t for t, _ in segments) == chat_tok.apply_chat_template(ex.fields["messages"], tokenize=False)
    assert [t for t, trainable in segments if trainable] == ["Four.<|im_end|>\n", "Twelve.<|im_end|>\n"]
    enc = encode_example(ex, chat_tok)
    assert [chat_tok.decode(s) for s in label_spans(enc)] == ["Four.<|im_end|>\n", "Twelve.<|im_end|>\n"]

    # role-header fallback without a chat template
    segments = render_segments(ex, plain_tok)
    assert segments == [
        ("### System:\nBe brief.\n\n### User:\nWhat is two plus two?\n\n### Assistant:\n", False),
        ("Four.", True),
        ("\n\n### User:\nAnd times three?\n\n### Assistant:\n", False),
        ("Twelve.", True),
    ]
    enc = encode_example(ex, plain_tok)
    assert [plain_tok.decode(s) for s in label_spans(enc)] == ["Four.", "Twelve.<|endoftext|>"]
    assert prompt_text(ex, plain_tok).endswith("And times three?\n\n### Assistant:\n")


def test_prompt_completion_is_raw_text(chat_tok, plain_tok):
    ex = Example("prompt_completion", {"prompt": "The capital of France is", "completion": " Paris."}, "t:1")
    for tok in (chat_tok, plain_tok):
        assert render_segments(ex, tok) == [("The capital of France is", False), (" Paris.", True)]
        enc = encode_example(ex, tok)
        assert tok.decode(enc["input_ids"]) == "The capital of France is Paris.<|endoftext|>"
        assert tok.decode(labelled(enc)) == " Paris.<|endoftext|>"
    # forcing the chat template turns it into a user/assistant exchange
    enc = encode_example(ex, chat_tok, template="chat")
    assert chat_tok.decode(enc["input_ids"]).startswith("<|im_start|>user\nThe capital of France is<|im_end|>")
    assert chat_tok.decode(labelled(enc)) == " Paris.<|im_end|>\n"


def test_chat_template_required_for_template_chat(plain_tok):
    with pytest.raises(ValueError, match="no chat template"):
        render_segments(alpaca(), plain_tok, template="chat")


def test_prefix_inconsistent_chat_template_is_rejected(chat_tok):
    tok = copy.deepcopy(chat_tok)
    # renders the number of messages first, so shorter renders are never prefixes of longer ones
    tok.chat_template = ("{{ messages|length }}\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ValueError, match=r"conv\.jsonl:7: the chat template is not prefix-consistent"):
        render_segments(conversation(source="conv.jsonl:7"), tok)


def test_bos_is_prepended_for_non_chat_rendering(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.bos_token = "<|im_start|>"
    enc = encode_example(alpaca(), tok)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][0] == -100
    assert enc["input_ids"].count(tok.bos_token_id) == 1
    ex = Example("prompt_completion", {"prompt": "<|im_start|>Q", "completion": "A"}, "t:1")
    assert encode_example(ex, tok)["input_ids"].count(tok.bos_token_id) == 1  # text already starts with it


def test_truncation_and_dropped_rows(plain_tok):
    ex = alpaca(output="A fairly long answer with several words in it.")
    full = encode_example(ex, plain_tok, max_length=4096)
    n_prompt = sum(1 for l in full["labels"] if l == -100)
    cut = encode_example(ex, plain_tok, max_length=n_prompt + 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert len(labelled(cut)) == 3
    assert encode_example(ex, plain_tok, max_length=n_prompt) is None

    examples = [ex, alpaca(output="A"), ex]
    assert len(encode_example(examples[1], plain_tok)["input_ids"]) <= n_prompt + 3
    short_prompt = Example("prompt_completion", {"prompt": "Q", "completion": "A"}, "t:4")
    features, stats = encode_examples(examples + [short_prompt], plain_tok, max_length=n_prompt)
    assert stats == EncodeStats(total=4, truncated=3, dropped_no_target=3)
    assert stats.kept == 1 and len(features) == 1
    features, stats = encode_examples(examples, plain_tok, max_length=n_prompt + 3)
    assert (stats.truncated, stats.dropped_no_target, len(features)) == (2, 0, 3)


def test_t5_encoding(t5_tok, alpaca_data):
    eos = t5_tok.eos_token_id
    for ex in alpaca_data.examples[:20]:
        enc = encode_example(ex, t5_tok, is_encoder_decoder=True, max_length=4096)
        assert set(enc) == {"input_ids", "labels"}
        assert enc["input_ids"][-1] == eos and enc["labels"][-1] == eos
        assert enc["input_ids"].count(eos) == 1 and enc["labels"].count(eos) == 1
        assert t5_tok.decode(enc["labels"], skip_special_tokens=True) == ex.fields["output"]
        prompt = (ALPACA_PROMPT_WITH_INPUT if ex.fields["input"] else ALPACA_PROMPT_NO_INPUT).format(**ex.fields)
        assert t5_tok.decode(enc["input_ids"], skip_special_tokens=True) == prompt

    ex = alpaca(output="A fairly long answer with several words in it.")
    enc = encode_example(ex, t5_tok, is_encoder_decoder=True, max_length=8, max_target_length=4)
    assert len(enc["input_ids"]) == 8 and enc["input_ids"][-1] == eos
    assert len(enc["labels"]) == 4 and enc["labels"][-1] == eos
    _, stats = encode_examples([ex, alpaca()], t5_tok, is_encoder_decoder=True, max_length=8, max_target_length=4)
    assert stats == EncodeStats(total=2, truncated=2, dropped_no_target=0)


def test_t5_multi_turn_uses_last_assistant_turn_as_target(t5_tok):
    enc = encode_example(conversation(), t5_tok, is_encoder_decoder=True)
    assert t5_tok.decode(enc["labels"], skip_special_tokens=True) == "Twelve."
    source = t5_tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "### Assistant:\nFour.\n\n### User:\nAnd times three?" in source
    assert source.endswith("### Assistant:\n")


# ----------------------------------------------------------------------------------------------------
# collator


def test_collator_right_padding():
    collate = DataCollatorForDistillation(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_left_padding_and_multiple_of():
    collate = DataCollatorForDistillation(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]


def test_collator_seq2seq_labels_and_extra_keys():
    collate = DataCollatorForDistillation(pad_token_id=0, padding_side="left", label_padding_side="right")
    batch = collate([
        {"input_ids": [3, 4, 5, 1], "labels": [7, 1], "teacher_labels": [7, 7, 1], "index": 0},
        {"input_ids": [3, 1], "labels": [8, 8, 8, 8, 1], "teacher_labels": [1], "index": 1},
    ])
    assert batch["input_ids"].tolist() == [[3, 4, 5, 1], [0, 0, 3, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100, -100], [8, 8, 8, 8, 1]]
    assert batch["teacher_labels"].tolist() == [[7, 7, 1], [1, -100, -100]]
    assert batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="'token_type_ids'"):
        collate([{"input_ids": [1], "token_type_ids": [0]}])
    with pytest.raises(ValueError, match="same keys"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}])
    with pytest.raises(ValueError):
        DataCollatorForDistillation(pad_token_id=0, padding_side="middle")


def test_encoded_batches_run_through_tiny_models(chat_tok, t5_tok, alpaca_data):
    from kdistill.apps.tiny import build_model, decoder_config, t5_config

    examples = alpaca_data.examples[:4]
    features, _ = encode_examples(examples, chat_tok, max_length=64)
    batch = DataCollatorForDistillation(pad_token_id=chat_tok.pad_token_id)(features)
    model = build_model(decoder_config(chat_tok, hidden_size=32, num_layers=1))
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)

    features, _ = encode_examples(examples, t5_tok, is_encoder_decoder=True, max_length=64)
    batch = DataCollatorForDistillation(pad_token_id=t5_tok.pad_token_id)(features)
    assert batch["labels"].shape[1] == max(len(f["labels"]) for f in features)
    model = build_model(t5_config(t5_tok, d_model=32, num_layers=1))
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
