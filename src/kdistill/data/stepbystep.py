"""Data for "distilling step-by-step" (Hsieh et al., 2023, "Distilling Step-by-Step! Outperforming
Larger Language Models with Less Training Data and Smaller Model Sizes", ACL Findings 2023).

A small student learns two views of every example: the *label view* ``label_prefix + input -> label``
and the *rationale view* ``rationale_prefix + input -> LLM rationale``, with
``loss = alpha * L_label + (1 - alpha) * L_rationale``. :func:`load_stepbystep` reads a local JSON
Lines / JSON file of one of the :data:`DATASETS` into :class:`RationaleExample` objects and
:func:`build_views` turns them into prompt / completion rows for kdistill's LM pipeline.

Row shapes and model inputs (``{x}`` is the row's field ``x``; the input never holds a task prefix):

``esnli``, ``anli``
    ``premise`` (str), ``hypothesis`` (str), ``label``: 0 / 1 / 2 (or the names ``"entailment"`` /
    ``"neutral"`` / ``"contradiction"``) -> ``entailment`` / ``neutral`` / ``contradiction``.
    Input: ``"premise: {premise}\\nhypothesis: {hypothesis}"``. The original code joins the two
    sentences with the tokenizer's EOS token (``"{premise}</s>{hypothesis}"`` for T5); an EOS in the
    middle of a decoder-LM prompt would mark a document end, so by default both are labelled instead.
    ``load_stepbystep(..., nli_separator="</s>")`` gives ``"{premise}</s>{hypothesis}"``, exactly the
    original input for T5. SNLI's ``-1`` ("no gold label") is out of range and reported.
``cqa``
    ``question`` (str), ``choices`` (exactly 5 strings), ``answer`` (str, one of the choices).
    Input, as in the original: ``"{question}\\nAnswer Choices:\\n(a) {c0}\\n(b) {c1}\\n(c) {c2}\\n(d) {c3}\\n(e) {c4}"``;
    label: the answer text.
``svamp``
    ``input`` (str, already ``"{Body}\\n{Question}"``) and ``label`` (str, an equation such as
    ``"( 84.0 / 2.0 )"``, kept verbatim; it must evaluate with
    :func:`kdistill.evaluation.accuracy.eval_equation`). Rows of the original ``SVAMP.json``
    (``Body``, ``Question``, ``Equation``) are read too, with the original's input
    ``"{Body}\\n{Question}"`` and label ``Equation``.
``generic``
    ``input`` (str), ``label`` (str), optional ``rationale`` (the LLM rationale) and ``llm_label``.

For every dataset but ``generic``, ``palm_rationale`` / ``palm_label`` (the teacher LLM's outputs as
released with the original code) become ``llm_rationale`` / ``llm_label``. These, ``rationale`` and
``llm_label`` are optional; when present they must be strings (``null`` means absent), and an empty or
whitespace-only value counts as missing (the original parser writes ``" "`` when it could not parse
the LLM output). Non-empty LLM values are kept verbatim, even when they are not a valid answer
(``"(some - 8)"`` on SVAMP): that is what training on LLM labels means. Keys of no shape (``id``,
CoS-E / e-SNLI human explanations, ``palm_output``) are ignored. Input and label text must not be
empty or whitespace-only.

Errors: as in :mod:`kdistill.data.records` every row is checked first and each problem is reported as
``"<file>:<line>: <reason>"`` in one :class:`~kdistill.data.records.DataValidationError`;
``skip_invalid=True`` returns the valid rows (the problems are in the returned list's ``skipped``) and
``limit`` keeps the first N valid examples.

Drop rules of :func:`build_views` (nothing is dropped at load time):

* ``label_type="llm"``: an example without an LLM label is dropped, and one warning with the count is
  logged (``on_missing_llm_label="raise"`` raises ``ValueError`` instead). If every example would be
  dropped, ``ValueError``. With ``label_type="gt"`` nothing is dropped.
* ``model_type="task_prefix"``: an example without an LLM rationale keeps its label view and loses only
  its rationale view (its row has no ``rationale_*`` keys); the count is logged.

In the released data as parsed by the original code: CQA train has 3 rows without a PaLM label (test: 0); SVAMP
train 13 without a PaLM label and 11 without a PaLM rationale (test: 2 and 2); e-SNLI valid 4 without a PaLM label.
Converted with kdistill's own parser (:mod:`kdistill.data.stepbystep_release`), CQA train has 284 rows without a
label: an answer that names two choices is unparsable there instead of a wrong label.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingFileError
from ..evaluation.accuracy import eval_equation
from .io import DataValidationError, by_line, read_json_rows
from .validation import string_field, type_name

__all__ = [
    "DATASETS",
    "LABEL_TYPES",
    "MODEL_TYPES",
    "NLI_LABELS",
    "LoadedRationales",
    "RationaleExample",
    "build_views",
    "format_cqa_input",
    "format_nli_input",
    "load_stepbystep",
]

logger = logging.getLogger(__name__)

DATASETS = ("esnli", "anli", "cqa", "svamp", "generic")
LABEL_TYPES = ("gt", "llm")
MODEL_TYPES = ("standard", "task_prefix")
NLI_LABELS = ("entailment", "neutral", "contradiction")  # index = the integer label
CQA_NUM_CHOICES = 5
_CHOICE_LETTERS = "abcde"


@dataclass(frozen=True)
class RationaleExample:
    """One validated example. ``input`` is the model input without a task prefix, ``label`` the
    ground-truth label as text, ``llm_label`` / ``llm_rationale`` the teacher LLM's outputs (``None``
    when missing), ``source`` ``"file:line"``."""

    input: str
    label: str
    llm_label: str | None
    llm_rationale: str | None
    source: str


class LoadedRationales(list):
    """A ``list`` of :class:`RationaleExample`; ``skipped`` holds the ``"file:line: reason"`` problems
    of the rows left out with ``skip_invalid=True`` (empty otherwise)."""

    def __init__(self, examples: Iterable[RationaleExample] = (), skipped: Iterable[str] = ()):
        super().__init__(examples)
        self.skipped: list[str] = list(skipped)


# ----------------------------------------------------------------------------------------------------
# Input formatting


def format_nli_input(premise: str, hypothesis: str, separator: str | None = None) -> str:
    """``"premise: {premise}\\nhypothesis: {hypothesis}"``, or ``premise + separator + hypothesis``
    when ``separator`` is given (the original joins with the tokenizer's EOS token)."""
    if separator is None:
        return f"premise: {premise}\nhypothesis: {hypothesis}"
    return f"{premise}{separator}{hypothesis}"


def format_cqa_input(question: str, choices: list[str]) -> str:
    """The original CQA input: the question, ``"Answer Choices:"`` and the choices as ``(a)``..``(e)``."""
    lines = [question, "Answer Choices:"]
    lines += [f"({letter}) {choice}" for letter, choice in zip(_CHOICE_LETTERS, choices)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Row conversion


def _text(row: Mapping, name: str, problems: list[str], dataset: str) -> str | None:
    return string_field(row, name, problems, dataset, nonblank=True)


def _optional_text(row: Mapping, name: str, problems: list[str]) -> str | None:
    """An optional LLM field: absent, ``null`` or blank -> ``None``; a non-string is a problem."""
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"field '{name}' must be a string, found {type_name(value)}")
        return None
    return value if value.strip() else None


def _nli_label(row: Mapping, problems: list[str], dataset: str) -> str | None:
    if "label" not in row:
        problems.append(f"missing required field 'label' (format '{dataset}')")
        return None
    value = row["label"]
    names = ", ".join(f"{i} {name}" for i, name in enumerate(NLI_LABELS))
    if isinstance(value, str):
        if value in NLI_LABELS:
            return value
        problems.append(f"field 'label' {value!r} is not one of {', '.join(NLI_LABELS)} "
                        f"(or an integer: {names})")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"field 'label' must be an integer ({names}), found {type_name(value)}")
        return None
    if not 0 <= value < len(NLI_LABELS):
        extra = " (SNLI's -1 means no gold label)" if value == -1 else ""
        problems.append(f"field 'label' {value} is out of range ({names}){extra}")
        return None
    return NLI_LABELS[value]


def _convert_nli(row: Mapping, problems: list[str], dataset: str, separator: str | None):
    premise = _text(row, "premise", problems, dataset)
    hypothesis = _text(row, "hypothesis", problems, dataset)
    label = _nli_label(row, problems, dataset)
    if premise is None or hypothesis is None:
        return None, label
    return format_nli_input(premise, hypothesis, separator), label


def _convert_cqa(row: Mapping, problems: list[str]):
    question = _text(row, "question", problems, "cqa")
    answer = _text(row, "answer", problems, "cqa")
    choices = None
    if "choices" not in row:
        problems.append("missing required field 'choices' (format 'cqa')")
    elif not isinstance(row["choices"], (list, tuple)):
        problems.append(f"field 'choices' must be a list of {CQA_NUM_CHOICES} strings, "
                        f"found {type_name(row['choices'])}")
    elif len(row["choices"]) != CQA_NUM_CHOICES:
        problems.append(f"field 'choices' must hold exactly {CQA_NUM_CHOICES} choices, "
                        f"found {len(row['choices'])}")
    else:
        ok = True
        for i, choice in enumerate(row["choices"]):
            if not isinstance(choice, str):
                problems.append(f"choices[{i}] must be a string, found {type_name(choice)}")
                ok = False
            elif not choice.strip():
                problems.append(f"choices[{i}] is empty or whitespace-only")
                ok = False
        if ok:
            choices = list(row["choices"])
    if answer is not None and choices is not None and answer not in choices:
        problems.append(f"answer {answer!r} is not one of the choices")
    if question is None or choices is None:
        return None, answer
    return format_cqa_input(question, choices), answer


def _convert_svamp(row: Mapping, problems: list[str]):
    if "input" not in row and "Body" in row:  # a record of the original SVAMP.json
        body = _text(row, "Body", problems, "svamp")
        question = _text(row, "Question", problems, "svamp")
        text = None if body is None or question is None else f"{body}\n{question}"
        label_key = "Equation"
    else:
        text = _text(row, "input", problems, "svamp")
        label_key = "label"
    label = _text(row, label_key, problems, "svamp")
    if label is not None and eval_equation(label) is None:
        problems.append(f"field '{label_key}' {label!r} is not an arithmetic expression "
                        f"(numbers, + - * /, parentheses)")
        label = None
    return text, label


def _convert(row: Any, dataset: str, nli_separator: str | None) -> tuple[dict | None, list[str]]:
    if not isinstance(row, Mapping):
        return None, [f"row is not a JSON object (found {type_name(row)})"]
    problems: list[str] = []
    if dataset in ("esnli", "anli"):
        text, label = _convert_nli(row, problems, dataset, nli_separator)
    elif dataset == "cqa":
        text, label = _convert_cqa(row, problems)
    elif dataset == "svamp":
        text, label = _convert_svamp(row, problems)
    else:
        text = _text(row, "input", problems, dataset)
        label = _text(row, "label", problems, dataset)
    if dataset == "generic":
        llm_label = _optional_text(row, "llm_label", problems)
        llm_rationale = _optional_text(row, "rationale", problems)
    else:
        llm_label = _optional_text(row, "palm_label", problems)
        llm_rationale = _optional_text(row, "palm_rationale", problems)
    if problems:
        return None, problems
    return {"input": text, "label": label, "llm_label": llm_label, "llm_rationale": llm_rationale}, []


# ----------------------------------------------------------------------------------------------------
# Public API


def load_stepbystep(path: str | os.PathLike, dataset: str, skip_invalid: bool = False,
                    limit: int | None = None, *, nli_separator: str | None = None) -> LoadedRationales:
    """Load and validate a local ``.jsonl`` / ``.json`` file of ``dataset`` (one of :data:`DATASETS`).

    Every row is checked. With problems and ``skip_invalid=False`` a
    :class:`~kdistill.data.records.DataValidationError` lists them all (``"file:line: reason"``); with
    ``skip_invalid=True`` the valid examples are returned, the problems in ``.skipped`` (and a warning
    is logged). ``limit`` keeps the first N valid examples (validation still covers all rows).
    ``nli_separator`` (esnli / anli only): join premise and hypothesis with it instead of labelling them.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}")
    if nli_separator is not None and dataset not in ("esnli", "anli"):
        raise ValueError(f"nli_separator applies to esnli / anli only, not {dataset!r}")
    file = Path(os.fspath(path)).expanduser()
    if not file.is_file():
        raise MissingFileError(f"data file not found: {str(path)!r} (resolved to {str(file.resolve())!r})")
    rows, parse_errors = read_json_rows(file)
    examples: list[RationaleExample] = []
    messages: list[str] = []
    for location, row in rows:
        fields, problems = _convert(row, dataset, nli_separator)
        if problems:
            messages.append(f"{location}: {'; '.join(problems)}")
        else:
            examples.append(RationaleExample(source=location, **fields))
    if parse_errors:
        messages = by_line(list(parse_errors) + messages)
    if messages and not skip_invalid:
        raise DataValidationError(messages)
    if messages and not examples:
        raise DataValidationError(messages + ["no valid rows are left after skipping the invalid ones"])
    if messages:
        logger.warning("%s: skipped %d invalid row(s) of %d; first: %s", file, len(messages),
                       len(messages) + len(examples), messages[0])
    if limit is not None:
        examples = examples[:limit]
    return LoadedRationales(examples, skipped=messages)


def build_views(examples: Iterable[RationaleExample], label_type: str = "gt", model_type: str = "task_prefix",
                label_prefix: str = "[label] ", rationale_prefix: str = "[rationale] ", *,
                prompt_suffix: str = "", on_missing_llm_label: str = "drop") -> list[dict]:
    """One prompt / completion row per (kept) example.

    ``model_type="task_prefix"``: ``{"prompt": label_prefix + input + prompt_suffix, "completion": label,
    "rationale_prompt": rationale_prefix + input + prompt_suffix, "rationale_completion": llm_rationale}``
    (the two ``rationale_*`` keys are absent for an example without an LLM rationale).
    ``model_type="standard"``: ``{"prompt": input + prompt_suffix, "completion": label}`` (no prefix,
    no rationale). ``label`` is the ground truth (``label_type="gt"``) or the LLM's label
    (``label_type="llm"``; examples without one are dropped, or ``on_missing_llm_label="raise"``).
    ``prompt_suffix`` (default none, as in the original T5 setup) goes between the input and the
    completion, e.g. ``"\\n"`` for a decoder LM, whose prompt and completion are joined with nothing
    between them.
    """
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be one of {', '.join(LABEL_TYPES)}; got {label_type!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
    if on_missing_llm_label not in ("drop", "raise"):
        raise ValueError(f"on_missing_llm_label must be 'drop' or 'raise'; got {on_missing_llm_label!r}")
    examples = list(examples)
    rows: list[dict] = []
    missing_label: list[str] = []
    no_rationale = 0
    for ex in examples:
        if not isinstance(ex, RationaleExample):
            raise TypeError(f"build_views takes RationaleExample objects, got {type(ex).__name__}")
        if label_type == "llm":
            if ex.llm_label is None:
                missing_label.append(ex.source)
                continue
            completion = ex.llm_label
        else:
            completion = ex.label
        if model_type == "standard":
            rows.append({"prompt": ex.input + prompt_suffix, "completion": completion})
            continue
        row = {"prompt": label_prefix + ex.input + prompt_suffix, "completion": completion}
        if ex.llm_rationale is None:
            no_rationale += 1
        else:
            row["rationale_prompt"] = rationale_prefix + ex.input + prompt_suffix
            row["rationale_completion"] = ex.llm_rationale
        rows.append(row)
    if missing_label:
        shown = ", ".join(missing_label[:5]) + (" ..." if len(missing_label) > 5 else "")
        if on_missing_llm_label == "raise":
            raise ValueError(f"label_type='llm': {len(missing_label)} example(s) have no LLM label: {shown}")
        if not rows:
            raise ValueError(f"label_type='llm': none of the {len(examples)} examples has an LLM label")
        logger.warning("label_type='llm': dropped %d of %d example(s) without an LLM label (%s)",
                       len(missing_label), len(examples), shown)
    if no_rationale:
        logger.warning("model_type='task_prefix': %d of %d kept example(s) have no LLM rationale; they are "
                       "trained on the label view only", no_rationale, len(rows))
    return rows
