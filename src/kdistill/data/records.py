"""Loading and validating training records.

A data source is a local JSON Lines file, a local JSON file (an array of objects, a single object, or
JSON Lines saved under a ``.json`` name), or a Hugging Face ``datasets`` hub id / local dataset folder,
read by :mod:`kdistill.data.io` (which also defines :class:`DataValidationError`, re-exported here);
each row is checked by :mod:`kdistill.data.validation` (whose format names are re-exported here).
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

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdistill.data.io import DataValidationError, by_line, load_hub_dataset, looks_local, read_json_rows
from kdistill.data.validation import EMBEDDING_FORMATS, FORMATS, LM_FORMATS, ROLES, check_format_arg, check_row
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
# Loading (each row is validated by kdistill.data.validation.check_row)


def _collect(rows: Iterable[tuple[str, Any]], fmt: str, skip_invalid: bool, limit: int | None,
             preliminary: list[str] | None = None, require_response: bool = True) -> LoadedData:
    """Validate ``(location, row)`` pairs; raise or skip according to ``skip_invalid``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    examples: list[Example] = []
    messages: list[str] = []
    for location, row in rows:
        kind, fields, row_problems = check_row(row, fmt, require_response)
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
    check_format_arg(format)

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
    ``require_response=False`` accepts prompt-only LM rows (see :func:`kdistill.data.validation.check_row`).
    """
    check_format_arg(format)
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
