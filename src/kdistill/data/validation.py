"""Row validation: the shape of each record kind, checked field by field.

:func:`check_row` validates one row of any kind (``alpaca``, ``prompt_completion``, ``messages``,
``triplet``, ``pair_score``, ``sentence``; described in :mod:`kdistill.data.records`, which loads whole
sources with it) and returns every problem it finds as a short reason, without the row's location.
:func:`string_field` and :func:`type_name` are the small field helpers other row formats reuse
(:mod:`kdistill.data.stepbystep`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "EMBEDDING_FORMATS",
    "FORMATS",
    "LM_FORMATS",
    "ROLES",
    "check_format_arg",
    "check_row",
    "string_field",
    "type_name",
]

LM_FORMATS = ("alpaca", "prompt_completion", "messages")
EMBEDDING_FORMATS = ("triplet", "pair_score", "sentence")
FORMATS = LM_FORMATS + EMBEDDING_FORMATS
ROLES = ("system", "user", "assistant")
_SHAPES = ("'messages' (messages), 'instruction' + 'output' with optional 'input' (alpaca), "
           "'prompt' + 'completion' (prompt_completion), 'anchor' + 'positive' with optional 'negative' "
           "(triplet; also 'sent0'/'sent1'/'hard_neg' or 'consensus'/'supporting'/'refuting'), "
           "'sentence1' + 'sentence2' + 'score' (pair_score; also 'sentence_A'/'sentence_B'/"
           "'relatedness_score'), or 'text' (sentence; also 'sentence')")

# Embedding kinds: the accepted naming families, each mapping the row's keys to the canonical names.
# The first family of each kind holds the canonical names themselves.
_ALIASES: dict[str, tuple[dict[str, str], ...]] = {
    "triplet": (
        {"anchor": "anchor", "positive": "positive", "negative": "negative"},
        {"sent0": "anchor", "sent1": "positive", "hard_neg": "negative"},  # SimCSE
        {"consensus": "anchor", "supporting": "positive", "refuting": "negative"},
    ),
    "pair_score": (
        {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"},
        {"sentence_A": "sentence1", "sentence_B": "sentence2", "relatedness_score": "score"},  # SICK
    ),
    "sentence": ({"text": "text"}, {"sentence": "text"}),
}
# Keys whose presence makes auto-detection pick an embedding kind (after the LM kinds, in this order).
# Negatives and scores alone do not: they say too little about the row.
_DETECT_KEYS: tuple[tuple[str, frozenset], ...] = (
    ("triplet", frozenset({"anchor", "positive", "sent0", "sent1", "consensus", "supporting"})),
    ("pair_score", frozenset({"sentence1", "sentence2", "sentence_A", "sentence_B"})),
    ("sentence", frozenset({"text", "sentence"})),
)


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages ("null", "boolean", "number", "string", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _detect_format(row: Mapping) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row:  # an Alpaca row; without "output" it is reported as missing that field
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    for kind, keys in _DETECT_KEYS:
        if any(key in row for key in keys):
            return kind
    return None


def string_field(row: Mapping, name: str, problems: list[str], fmt: str, *, required: bool = True,
                 nonblank: bool = False, default: str | None = None) -> str | None:
    """The string ``row[name]``, or None after appending the reason to ``problems`` (missing when
    ``required``, not a string, or blank when ``nonblank``); ``default`` when absent and not required."""
    if name not in row:
        if required:
            problems.append(f"missing required field '{name}' (format '{fmt}')")
            return None
        return default
    value = row[name]
    if not isinstance(value, str):
        problems.append(f"field '{name}' must be a string, found {type_name(value)}")
        return None
    if nonblank and not value.strip():
        problems.append(f"field '{name}' is empty or whitespace-only")
        return None
    return value


def _check_messages(row: Mapping, problems: list[str], require_response: bool = True) -> list[dict] | None:
    if "messages" not in row:
        problems.append("missing required field 'messages' (format 'messages')")
        return None
    messages = row["messages"]
    if not isinstance(messages, (list, tuple)):
        problems.append(f"field 'messages' must be a non-empty list, found {type_name(messages)}")
        return None
    if not messages:
        problems.append("field 'messages' must be a non-empty list, found an empty list")
        return None
    clean: list[dict] = []
    well_formed = True
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            problems.append(f"{where} must be an object with string 'role' and 'content', "
                            f"found {type_name(message)}")
            well_formed = False
            continue
        role, content = message.get("role"), message.get("content")
        ok = True
        for key, value in (("role", role), ("content", content)):
            if key not in message:
                problems.append(f"{where} is missing '{key}'")
                ok = False
            elif not isinstance(value, str):
                problems.append(f"{where}.{key} must be a string, found {type_name(value)}")
                ok = False
        if ok and role not in ROLES:
            problems.append(f"{where} has unknown role {role!r} (allowed: {', '.join(ROLES)})")
            ok = False
        if ok and role == "assistant" and not content.strip():
            problems.append(f"{where} (assistant) content is empty or whitespace-only")
            ok = False
        well_formed &= ok
        if ok:
            clean.append({"role": role, "content": content})
    if not well_formed:
        return None
    if not require_response:
        if clean[-1]["role"] == "assistant" and not any(m["role"] == "user" for m in clean):
            problems.append("messages has no user turn to answer")
            return None
        return clean
    if not any(m["role"] == "assistant" for m in clean):
        problems.append("messages has no assistant message (nothing to train on; a chat row must end with the "
                        "assistant's answer)")
        return None
    if clean[-1]["role"] != "assistant":
        problems.append(f"last message must be from the assistant, found role {clean[-1]['role']!r} (a chat row "
                        f"ends with the assistant's answer, the turn that is trained)")
        return None
    return clean


def _family(row: Mapping, kind: str, problems: list[str]) -> dict[str, str] | None:
    """The naming family a row of an embedding kind uses (canonical when it uses none)."""
    families = _ALIASES[kind]
    used = [fam for fam in families if any(key in row for key in fam)]
    if len(used) > 1:
        names = "; ".join(
            "/".join(repr(k) for k in fam) + " (found " + ", ".join(repr(k) for k in fam if k in row) + ")"
            for fam in used)
        problems.append(f"row mixes field names of different '{kind}' conventions: {names}; "
                        f"use one naming per row")
        return None
    return used[0] if used else families[0]


def _negatives(row: Mapping, name: str, problems: list[str]) -> list[str] | None:
    value = row[name]
    expected = f"field '{name}' must be a string or a non-empty list of strings"
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"field '{name}' is empty or whitespace-only")
            return None
        return [value]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{expected}, found {type_name(value)}")
        return None
    if not value:
        problems.append(f"{expected}, found an empty list")
        return None
    clean: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{name}[{i}] must be a string, found {type_name(item)}")
        elif not item.strip():
            problems.append(f"{name}[{i}] is empty or whitespace-only")
        else:
            clean.append(item)
    return clean if len(clean) == len(value) else None


def _score(row: Mapping, name: str, problems: list[str], fmt: str) -> float | None:
    if name not in row:
        problems.append(f"missing required field '{name}' (format '{fmt}')")
        return None
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"field '{name}' must be a number, found {type_name(value)}")
        return None
    value = float(value)
    if not math.isfinite(value):
        problems.append(f"field '{name}' must be a finite number, found {value}")
        return None
    return value


def _check_embedding_row(row: Mapping, kind: str, problems: list[str]) -> dict | None:
    family = _family(row, kind, problems)
    if family is None:
        return None
    name = {canonical: key for key, canonical in family.items()}  # canonical -> the row's key
    fields: dict[str, Any] = {}
    if kind == "triplet":
        fields["anchor"] = string_field(row, name["anchor"], problems, kind, nonblank=True)
        fields["positive"] = string_field(row, name["positive"], problems, kind, nonblank=True)
        if name["negative"] in row:
            fields["negative"] = _negatives(row, name["negative"], problems)
    elif kind == "pair_score":
        fields["sentence1"] = string_field(row, name["sentence1"], problems, kind, nonblank=True)
        fields["sentence2"] = string_field(row, name["sentence2"], problems, kind, nonblank=True)
        fields["score"] = _score(row, name["score"], problems, kind)
    else:
        fields["text"] = string_field(row, name["text"], problems, kind, nonblank=True)
    return fields


def check_row(row: Any, fmt: str, require_response: bool = True) -> tuple[str | None, dict | None, list[str]]:
    """Validate one row. Returns ``(kind, fields, problems)``; kind/fields are None when invalid. With
    ``require_response=False`` (prompt-only data: generation, on-policy) LM rows may lack their answer: an alpaca
    ``output`` / a ``completion`` defaults to "", and a chat may end with a user turn."""
    problems: list[str] = []
    if not isinstance(row, Mapping):
        return None, None, [f"row is not a JSON object (found {type_name(row)})"]
    kind = _detect_format(row) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(repr(k) for k in list(row)[:10]) or "none"
        return None, None, [f"cannot detect the row format from its keys ({keys}); expected {_SHAPES}"]
    if kind == "alpaca":
        instruction = string_field(row, "instruction", problems, kind)
        inp = string_field(row, "input", problems, kind, required=False, default="")
        output = string_field(row, "output", problems, kind, nonblank=require_response,
                               required=require_response, default="")
        fields = {"instruction": instruction, "input": inp, "output": output}
    elif kind == "prompt_completion":
        prompt = string_field(row, "prompt", problems, kind)
        completion = string_field(row, "completion", problems, kind, nonblank=require_response,
                                   required=require_response, default="")
        fields = {"prompt": prompt, "completion": completion}
    elif kind == "messages":
        fields = {"messages": _check_messages(row, problems, require_response)}
    else:
        fields = _check_embedding_row(row, kind, problems)
    if problems:
        return None, None, problems
    return kind, fields, []


def check_format_arg(format: str) -> None:
    """Raise ValueError unless ``format`` is ``"auto"`` or one of :data:`FORMATS`."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}; got {format!r}")
