"""The judge's prompts and how its replies are read: scores per dimension (:func:`parse_judgement`) and
pairwise verdicts (:func:`parse_verdict`). Used by :mod:`kdistill.evaluation.judge`.

Score values: ints 0..5; integral floats (``4.0``) and integer strings (``"4"``) are accepted as that
integer; fractions (``4.5``), other strings, booleans, ``null`` and values outside 0..5 make the whole
judgement invalid (the template asks for integers, and a half point means the format was not followed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DIMENSIONS", "JUDGE_TEMPLATE", "MAX_SCORE", "MIN_SCORE", "PAIRWISE_TEMPLATE", "parse_judgement",
           "parse_verdict"]

DIMENSIONS = ("Correctness", "Completeness", "Relevance", "Fluency")
MIN_SCORE, MAX_SCORE = 0, 5

JUDGE_TEMPLATE = """You are a strict, impartial judge of answers to instructions.

[Instruction]
{instruction}

[Input]
{input}

[Reference answer]
{reference_output}

[Answer to judge]
{answer}
[End of answer]

Rate the answer to judge on each of these dimensions: {dimensions}. Use integers from 0 (worst) to 5 (best);
the reference answer shows what a good answer contains. Reply with strict JSON only, no other text, in exactly
this shape:
{json_example}"""

PAIRWISE_TEMPLATE = """You are a strict, impartial judge. Compare two answers to the same instruction.

[Instruction]
{instruction}

[Input]
{input}

[Reference answer]
{reference_output}

[Answer 1]
{answer_1}
[End of answer 1]

[Answer 2]
{answer_2}
[End of answer 2]

Which answer is better (more correct, complete, relevant and fluent)? Do not let the order of the answers or
their length alone decide. Reply with strict JSON only, no other text: {{"winner": "1"}}, {{"winner": "2"}} or
{{"winner": "tie"}}."""


def _json_objects(text: str):
    """Every JSON object in ``text``, in order of its opening brace (the first balanced ``{...}`` that parses
    first); ``` fences and surrounding prose are skipped over."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def _score(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        number = int(value)
    else:
        return None
    return number if MIN_SCORE <= number <= MAX_SCORE else None


def _lookup(obj: Mapping, dimensions: Sequence[str]) -> dict | None:
    lowered: dict[str, Any] = {}
    for key, value in obj.items():
        name = str(key).strip().lower()
        if name in lowered and lowered[name] != value:
            return None  # "Correctness": 4 and "correctness": 2: ambiguous
        lowered[name] = value
    scores = {}
    for dim in dimensions:
        name = dim.strip().lower()
        if name not in lowered:
            return None
        score = _score(lowered[name])
        if score is None:
            return None
        scores[dim] = score
    return scores


def parse_judgement(text: str | None, dimensions: Sequence[str] = DIMENSIONS) -> dict | None:
    """``{dimension: int score}`` from a judge's reply, or ``None`` when it is invalid.

    The first JSON object in the text that parses (inside ``` fences or prose too) is used; if it lacks the
    dimensions but holds a ``"scores"`` object, that one. Keys match the dimensions case-insensitively (extra
    keys such as an explanation are ignored). Invalid: no JSON object, a missing dimension, or a value that
    is not an integer 0..5 (see the module doc for what counts as an integer).
    """
    if not text or not dimensions:
        return None
    for obj in _json_objects(text):
        scores = _lookup(obj, dimensions)
        if scores is None:
            nested = next((v for k, v in obj.items() if str(k).strip().lower() == "scores"), None)
            if isinstance(nested, Mapping):
                scores = _lookup(nested, dimensions)
        return scores  # only the first object counts
    return None


def parse_verdict(text: str | None) -> str | None:
    """``"1"``, ``"2"`` or ``"tie"`` from a pairwise reply ``{"winner": ...}`` (first JSON object; key and
    value case-insensitive; ints 1/2 accepted); ``None`` when invalid."""
    if not text:
        return None
    for obj in _json_objects(text):
        value = next((v for k, v in obj.items() if str(k).strip().lower() == "winner"), None)
        if isinstance(value, bool):
            return None
        if isinstance(value, int) and value in (1, 2):
            return str(value)
        if isinstance(value, str):
            value = value.strip().lower()
            value = {"answer 1": "1", "answer 2": "2"}.get(value, value)
            if value in ("1", "2", "tie"):
                return value
        return None
    return None

