"""Loading and validating training records.

A data source is a local JSON Lines file, a local JSON file (an array of objects, a single object, or
JSON Lines saved under a ``.json`` name), or a Hugging Face ``datasets`` hub id / local dataset folder,
read by :mod:`kdistill.data.io` (which also defines :class:`DataValidationError`, re-exported here).
Every row becomes an :class:`Example` of one of three language-model kinds:

* ``alpaca``: ``{"instruction": str, "input": str (optional, default ""), "output": str}``
* ``prompt_completion``: ``{"prompt": str, "completion": str}``
* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  with at least one assistant message and the last message from the assistant.

and, for embedding (sentence-encoder) distillation, one of three more:

* ``triplet``: ``{"anchor": str, "positive": str, "negative": str | [str, ...] (optional)}``. The
  SimCSE names ``sent0`` / ``sent1`` / ``hard_neg`` and the fact-checking names ``consensus`` /
  ``supporting`` / ``refuting`` are accepted for the same three fields (one naming family per row).
  ``fields["negative"]`` is always a non-empty list of strings (several hard negatives) and is absent
  when the row has no negative: such a row is an (anchor, positive) pair, still of kind ``triplet``.
* ``pair_score``: ``{"sentence1": str, "sentence2": str, "score": number}`` (finite, not a boolean);
  the SICK names ``sentence_A`` / ``sentence_B`` / ``relatedness_score`` are accepted too.
  ``fields["score"]`` is a ``float``.
* ``sentence``: ``{"text": str}`` (or ``{"sentence": str}``).

Text fields of the embedding kinds must not be empty or whitespace-only. Keys that belong to no shape
(an STS-B ``genre``, a SICK ``entailment_label``) are ignored. Auto-detection tries the LM kinds first,
exactly as for LM-only data, then ``triplet``, ``pair_score`` and ``sentence`` by their keys.

The whole source is checked before anything is returned, so a bad row is reported before any training
starts. Each problem is reported as ``"<file>:<line>: <reason>"`` where ``<line>`` is the 1-based line
on which the row starts (also inside a multi-line JSON array). Rows from a hub dataset are located as
``"<hub_id>[<split>]:row <N>"`` with ``N`` the 0-based row index, so ``dataset[N]`` is the bad row.
All problems of one row are joined with ``"; "`` into one entry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdistill.data.io import DataValidationError, by_line, load_hub_dataset, looks_local, read_json_rows
from kdistill.errors import MissingFileError

__all__ = [
    "DataValidationError",
    "Example",
    "LoadedData",
    "EMBEDDING_FORMATS",
    "FORMATS",
    "LM_FORMATS",
    "ROLES",
    "load_examples",
    "load_hub_dataset",
    "load_rows",
    "looks_local",
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


@dataclass(frozen=True)
class Example:
    """One validated training record.

    ``fields`` by ``kind``: alpaca -> instruction, input, output; prompt_completion -> prompt,
    completion; messages -> messages (a list of ``{"role", "content"}`` dicts); triplet -> anchor,
    positive and, when the row has one, negative (a non-empty list of strings); pair_score ->
    sentence1, sentence2, score (a float); sentence -> text. Embedding rows are stored under these
    canonical names whatever alias names the row used.
    ``source`` says where the row came from (``"path:line"`` or ``"hub_id[split]:row N"``).
    """

    kind: str
    fields: dict
    source: str


@dataclass
class LoadedData:
    """The valid examples of a source and, with ``skip_invalid=True``, the rows that were left out."""

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------------------------------
# Row validation


def _type_name(value: Any) -> str:
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


def _string_field(row: Mapping, name: str, problems: list[str], fmt: str, *, required: bool = True,
                  nonblank: bool = False, default: str | None = None) -> str | None:
    if name not in row:
        if required:
            problems.append(f"missing required field '{name}' (format '{fmt}')")
            return None
        return default
    value = row[name]
    if not isinstance(value, str):
        problems.append(f"field '{name}' must be a string, found {_type_name(value)}")
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
        problems.append(f"field 'messages' must be a non-empty list, found {_type_name(messages)}")
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
                            f"found {_type_name(message)}")
            well_formed = False
            continue
        role, content = message.get("role"), message.get("content")
        ok = True
        for key, value in (("role", role), ("content", content)):
            if key not in message:
                problems.append(f"{where} is missing '{key}'")
                ok = False
            elif not isinstance(value, str):
                problems.append(f"{where}.{key} must be a string, found {_type_name(value)}")
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
        problems.append(f"{expected}, found {_type_name(value)}")
        return None
    if not value:
        problems.append(f"{expected}, found an empty list")
        return None
    clean: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{name}[{i}] must be a string, found {_type_name(item)}")
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
        problems.append(f"field '{name}' must be a number, found {_type_name(value)}")
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
        fields["anchor"] = _string_field(row, name["anchor"], problems, kind, nonblank=True)
        fields["positive"] = _string_field(row, name["positive"], problems, kind, nonblank=True)
        if name["negative"] in row:
            fields["negative"] = _negatives(row, name["negative"], problems)
    elif kind == "pair_score":
        fields["sentence1"] = _string_field(row, name["sentence1"], problems, kind, nonblank=True)
        fields["sentence2"] = _string_field(row, name["sentence2"], problems, kind, nonblank=True)
        fields["score"] = _score(row, name["score"], problems, kind)
    else:
        fields["text"] = _string_field(row, name["text"], problems, kind, nonblank=True)
    return fields


def _check_row(row: Any, fmt: str, require_response: bool = True) -> tuple[str | None, dict | None, list[str]]:
    """Validate one row. Returns ``(kind, fields, problems)``; kind/fields are None when invalid. With
    ``require_response=False`` (prompt-only data: generation, on-policy) LM rows may lack their answer: an alpaca
    ``output`` / a ``completion`` defaults to "", and a chat may end with a user turn."""
    problems: list[str] = []
    if not isinstance(row, Mapping):
        return None, None, [f"row is not a JSON object (found {_type_name(row)})"]
    kind = _detect_format(row) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(repr(k) for k in list(row)[:10]) or "none"
        return None, None, [f"cannot detect the row format from its keys ({keys}); expected {_SHAPES}"]
    if kind == "alpaca":
        instruction = _string_field(row, "instruction", problems, kind)
        inp = _string_field(row, "input", problems, kind, required=False, default="")
        output = _string_field(row, "output", problems, kind, nonblank=require_response,
                               required=require_response, default="")
        fields = {"instruction": instruction, "input": inp, "output": output}
    elif kind == "prompt_completion":
        prompt = _string_field(row, "prompt", problems, kind)
        completion = _string_field(row, "completion", problems, kind, nonblank=require_response,
                                   required=require_response, default="")
        fields = {"prompt": prompt, "completion": completion}
    elif kind == "messages":
        fields = {"messages": _check_messages(row, problems, require_response)}
    else:
        fields = _check_embedding_row(row, kind, problems)
    if problems:
        return None, None, problems
    return kind, fields, []


def _check_format_arg(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}; got {format!r}")


def _collect(rows: Iterable[tuple[str, Any]], fmt: str, skip_invalid: bool, limit: int | None,
             preliminary: list[str] | None = None, require_response: bool = True) -> LoadedData:
    """Validate ``(location, row)`` pairs; raise or skip according to ``skip_invalid``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    examples: list[Example] = []
    messages: list[str] = []
    for location, row in rows:
        kind, fields, row_problems = _check_row(row, fmt, require_response)
        if row_problems:
            messages.append(f"{location}: {'; '.join(row_problems)}")
        else:
            examples.append(Example(kind=kind, fields=fields, source=location))
    if preliminary:
        messages = by_line(list(preliminary) + messages)
    if messages and not skip_invalid:
        raise DataValidationError(messages)
    if messages and not examples:
        raise DataValidationError(messages + ["no valid rows are left after skipping the invalid ones"])
    if limit is not None:
        examples = examples[:limit]
    return LoadedData(examples=examples, skipped=messages)


# ----------------------------------------------------------------------------------------------------
# Public API


def load_rows(rows: Iterable[Mapping], name: str, format: str = "auto", skip_invalid: bool = False,
              limit: int | None = None, require_response: bool = True) -> LoadedData:
    """Validate in-memory rows (e.g. from a ``datasets.Dataset``) into examples.

    Each row is located as ``f"{name}:row {i}"`` (``i`` 0-based). Keys whose value is ``None`` are
    dropped first: Arrow-backed datasets fill absent columns with ``None``, so ``None`` means "absent".
    """
    _check_format_arg(format)

    def located():
        for i, row in enumerate(rows):
            if isinstance(row, Mapping):
                row = {k: v for k, v in row.items() if v is not None}
            yield f"{name}:row {i}", row

    data = _collect(located(), format, skip_invalid, limit, require_response=require_response)
    if not data.examples and not data.skipped:
        raise DataValidationError([f"{name}: dataset contains no rows"])
    return data


def load_examples(source: str, format: str = "auto", split: str = "train", skip_invalid: bool = False,
                  limit: int | None = None, option: str | None = None, subset: str | None = None,
                  require_response: bool = True) -> LoadedData:
    """Load and validate a whole data source.

    ``source``: a local ``.jsonl`` / ``.json`` file, or (when it is not an existing file) a Hugging Face
    dataset id or local dataset folder read with ``datasets.load_dataset(source, split=split)``.
    ``format``: ``"auto"`` (detected per row from its keys) or one of ``alpaca``, ``prompt_completion``,
    ``messages``, ``triplet``, ``pair_score``, ``sentence`` (every row must then have that shape).

    Every row is checked. With problems and ``skip_invalid=False`` a :class:`DataValidationError` lists
    them all; with ``skip_invalid=True`` the valid rows are returned and the problems are in
    ``LoadedData.skipped``. ``limit`` keeps the first N valid examples (validation still covers all rows).
    ``option``: the flag or config key that names ``source`` (e.g. ``"data.train"``); a hub id that cannot be
    loaded (offline, unreachable, unknown) raises :class:`~kdistill.errors.HubUnavailableError` naming it.
    ``subset``: the hub dataset's configuration name, if it has several (``load_dataset(source, subset)``).
    ``require_response=False`` accepts prompt-only LM rows (see ``_check_row``).
    """
    _check_format_arg(format)
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file():
        rows, parse_errors = read_json_rows(path)
        return _collect(rows, format, skip_invalid, limit, preliminary=parse_errors,
                        require_response=require_response)
    if path.is_dir() or not looks_local(source):
        dataset = load_hub_dataset(source, split, option, subset)
        name = f"{source}[{subset}:{split}]" if subset else f"{source}[{split}]"
        return load_rows(dataset, name, format=format, skip_invalid=skip_invalid, limit=limit,
                         require_response=require_response)
    raise MissingFileError(f"data file not found: {source!r} (resolved to {str(path.resolve())!r}); "
                            f"it looks like a local path, so it was not looked up on the Hugging Face hub")
