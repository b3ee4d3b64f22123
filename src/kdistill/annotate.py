"""Teacher annotation: have a teacher answer, label or explain every row, resumably.

Three tasks:

``output``
    The teacher's answer, for sequence-level KD (SeqKD: the student is then trained on the teacher's
    outputs). LM rows (alpaca / prompt_completion / messages) are by default sent as a chat: a
    :class:`~kdistill.generators.ChatClient` gets the messages (the row's final assistant turn, if any, is
    dropped), a :class:`~kdistill.generators.LocalTeacher` gets
    :func:`~kdistill.data.formatting.prompt_text`. Other rows are sent as their main text (see
    :data:`TEXT_KEYS`) unless a ``template`` says otherwise. An empty answer is ``unparsable``.
``label``
    Classification into a fixed label set (``labels``, required): the answer is read with
    :func:`parse_label`; no single label -> ``unparsable``.
``rationale``
    Few-shot chain of thought: the prompt asks for reasoning that ends with "So the answer is X"; the
    answer is split by :func:`parse_rationale` into ``rationale`` and ``label`` (validated against
    ``labels`` when given; free-form answers such as numbers or equations otherwise).

Prompts are Python ``str.format`` templates over the row's fields plus ``{text}`` (the row's main text:
:func:`main_text`), ``{labels}`` (comma-separated), ``{choices}`` (a row's ``choices`` list as
``"(a) ...\\n(b) ..."``) and ``{few_shot}`` (the rendered few-shot examples, ending in a blank line, or
empty). Defaults: :data:`LABEL_TEMPLATE`, :data:`RATIONALE_TEMPLATE` / :data:`RATIONALE_TEMPLATE_LABELS`.

Records (append-only JSON Lines at ``out_path``, one line per attempt)::

    {"key", "status": "ok" | "failed" | "unparsable", "task", "row": <the input row>, "prompt": <what the
     teacher was sent: a messages list (API) or a string (local model)>, "query"?: <the formatted template
     text, when a template made the prompt>, "teacher": <teacher id>, "params": <generation parameters>,
     "output": <raw answer text or null>, "label"?, "rationale"?, "error"?: <reason>, "time": <UTC ISO
     8601>, "elapsed_s"}

``key`` is the SHA-256 of the canonical JSON (sorted keys, no spaces) of ``{"row", "template", "teacher",
"params", "task", "labels", "few_shot", "prompt"}`` (``prompt``: what the teacher is sent, so a changed chat
template or rendering also counts), so changing any of them re-annotates. A rerun reads the file
first: a key whose LAST record is ``ok`` is skipped, ``failed`` / ``unparsable`` keys are tried again
(new records are appended; nothing is rewritten). Lines that cannot be read (a line cut short by a kill)
are ignored with a warning. Each record is one ``os.write`` of a full line on an ``O_APPEND`` descriptor,
under a lock, ``fsync``-ed every ``fsync_every`` records and at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdistill.errors import MissingFileError, UserError

__all__ = [
    "TASKS",
    "TEXT_KEYS",
    "LABEL_TEMPLATE",
    "RATIONALE_TEMPLATE",
    "RATIONALE_TEMPLATE_LABELS",
    "AnnotationAborted",
    "Summary",
    "add_parser",
    "annotate",
    "annotation_key",
    "export",
    "load_annotations",
    "main",
    "main_text",
    "match_label",
    "parse_label",
    "parse_rationale",
    "read_rows",
    "render_few_shot",
    "run_cli",
]

logger = logging.getLogger(__name__)

TASKS = ("output", "label", "rationale")
STATUSES = ("ok", "failed", "unparsable")
CHAT = "<chat>"  # the "template" of LM rows sent as a chat (output task default)

LABEL_TEMPLATE = (
    "Classify the text. Answer with exactly one of these labels: {labels}.\n\n"
    "{few_shot}Text: {text}\nLabel:"
)
RATIONALE_TEMPLATE = (
    "Answer the question. Reason step by step, then end with a sentence of the form "
    "\"So the answer is X.\"\n\n{few_shot}Q: {text}\nA:"
)
RATIONALE_TEMPLATE_LABELS = (
    "Answer the question. Reason step by step, then end with a sentence of the form "
    "\"So the answer is X.\" where X is one of: {labels}.\n\n{few_shot}Q: {text}\nA:"
)
# Keys tried, in order, for a row's main text ({text}); see main_text().
TEXT_KEYS = ("question", "instruction", "text", "sentence", "input", "prompt", "query")


class AnnotationAborted(RuntimeError):
    """The run stopped early (too many rows failed in a row, or a fatal teacher error); rerun to resume."""


# ----------------------------------------------------------------------------------------------------
# Parsing answers


def _norm(text: str) -> str:
    """Lower case, every non-alphanumeric character (punctuation, underscores) as a space, spaces collapsed."""
    return " ".join(re.sub(r"[\W_]+", " ", str(text).lower()).split())


def _check_labels(labels: Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, not one string")
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("labels is empty")
    seen: dict[str, str] = {}
    for label in labels:
        norm = _norm(label)
        if not norm:
            raise ValueError(f"label {label!r} has no letters or digits")
        if norm in seen:
            raise ValueError(f"labels {seen[norm]!r} and {label!r} are the same after normalisation "
                             f"(case and punctuation are ignored when answers are matched)")
        seen[norm] = label
    return labels


def _occurring_labels(text: str, labels: Sequence[str]) -> set[str]:
    """Labels that occur in ``text`` as whole words, ignoring occurrences inside a longer label's occurrence."""
    norm_text = _norm(text)
    spans: list[tuple[int, int, str]] = []
    for label in labels:
        pattern = r"(?<!\S)" + re.escape(_norm(label)) + r"(?!\S)"
        spans.extend((m.start(), m.end(), label) for m in re.finditer(pattern, norm_text))
    found = set()
    for start, end, label in spans:
        inside = any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
        if not inside:
            found.add(label)
    return found


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label ``answer`` names: an exact match ignoring case, punctuation and spacing, else the only label
    occurring in it as whole words; ``None`` when no label or several labels occur."""
    norm = _norm(answer)
    if not norm:
        return None
    for label in labels:
        if _norm(label) == norm:
            return label
    squashed = norm.replace(" ", "")
    for label in labels:
        if _norm(label).replace(" ", "") == squashed:
            return label
    found = _occurring_labels(answer, labels)
    return next(iter(found)) if len(found) == 1 else None


_ANSWER_FORM = re.compile(
    r"(?:\b(?:so|thus|therefore|hence)\s*,?\s+)?\b(?:the\s+)?(?:final\s+|correct\s+)?"
    r"(?:answer|label|category|class|classification|prediction)\s*(?:is\b|:|=)\s*:?\s*", re.I)
_RATIONALE_ANSWER = re.compile(
    r"(?:\b(?:so|thus|therefore|hence)\s*,?\s+)?\bthe\s+(?:final\s+)?answer\s+is\b\s*:?\s*", re.I)
_CONTINUATION = re.compile(r"(?m)^[ \t]*(?:Q|Question)[ \t]*:")  # a new few-shot block the model went on with
_CHOICE_MARKER = re.compile(r"\(([A-Za-z])\)\s*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _answer_text(rest: str) -> str:
    """The answer of a final-answer sentence: up to the end of the line and of the sentence, trimmed of
    surrounding whitespace, quotes, asterisks and final punctuation."""
    line = rest.split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    answer = line[:end.start()] if end else line
    return answer.strip().strip("*\"'`").strip().rstrip(".!?,;:").strip()


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a classification answer names, or ``None``.

    In order: the whole answer is a label (case, punctuation and spacing ignored: "Positive." -> positive);
    the last "the answer is X" / "Label: X" / "Answer: X" form names one label (X as above, or the only label
    occurring in X); exactly one label occurs in the whole answer as whole words (an occurrence inside a
    longer label's occurrence does not count: "noHate" is not "hate"). Otherwise ``None``.
    """
    labels = _check_labels(labels) or []
    if text is None:
        return None
    for label in labels:
        if _norm(label) == _norm(text):
            return label
    forms = list(_ANSWER_FORM.finditer(text))
    if forms:
        answer = _answer_text(text[forms[-1].end():])
        answer = _CHOICE_MARKER.sub("", answer, count=1) if _CHOICE_MARKER.match(answer) else answer
        label = match_label(answer, labels)
        if label is not None:
            return label
    return match_label(text, labels)


def parse_rationale(text: str, labels: Sequence[str] | None = None) -> tuple[str, str] | None:
    """Split a chain-of-thought answer into ``(rationale, label)``; ``None`` when it has no usable answer.

    1. The text is cut at the first line that starts a new few-shot block (``Q:`` / ``Question:``): models
       prompted few-shot often go on writing further examples after their answer.
    2. The LAST "the answer is" (optionally "So / Thus / Therefore / Hence ...", "final answer") marks the
       final answer sentence; ``rationale`` is the text before that sentence, stripped.
    3. The answer is the rest of that line up to the end of the sentence (a period followed by a space or
       the end, so "3.5" and "(84 / 2)" stay whole; "D.C." loses its final period), without final
       punctuation. A multiple-choice marker is removed: "(d) math problem" -> "math problem".
    4. ``None`` when there is no answer sentence, the answer is empty, it names several choices
       ("either (a) X or (e) Y"), its parentheses are unbalanced (output cut short), or, with ``labels``,
       it names no single label (see :func:`match_label`; the label is then returned as spelled in
       ``labels``).
    """
    if not text:
        return None
    cut = _CONTINUATION.search(text)
    body = text[:cut.start()] if cut else text
    matches = list(_RATIONALE_ANSWER.finditer(body))
    if not matches:
        return None
    final = matches[-1]
    rationale = body[:final.start()].strip()
    if rationale.startswith("A:"):
        rationale = rationale[2:].strip()
    answer = _answer_text(body[final.end():])
    markers = list(_CHOICE_MARKER.finditer(answer))
    if len(markers) > 1:
        return None
    if markers:
        answer = answer[markers[0].end():].strip() or answer
    if not answer or answer.count("(") != answer.count(")"):
        return None
    if labels is not None:
        label = match_label(answer, _check_labels(labels))
        if label is None:
            return None
        answer = label
    return rationale, answer


# ----------------------------------------------------------------------------------------------------
# Rows and prompts


class _RowError(ValueError):
    pass


def _format_choices(choices: Sequence) -> str:
    return "\n".join(f"({chr(ord('a') + i)}) {choice}" for i, choice in enumerate(choices))


def main_text(row: Mapping) -> str | None:
    """A row's main text, the ``{text}`` of templates (``None`` when there is none).

    The first string field of :data:`TEXT_KEYS`, with these shapes: ``question`` plus a ``choices`` list
    -> ``"{question}\\nAnswer Choices:\\n(a) ...\\n(b) ..."`` (the CommonsenseQA / CoS-E layout);
    ``instruction`` -> the instruction, then a blank line and the ``input`` when there is one; then
    ``premise`` + ``hypothesis`` -> ``"Premise: ...\\nHypothesis: ..."``, ``sentence1`` + ``sentence2``,
    and a ``messages`` list -> its last user message.
    """
    def s(key):
        value = row.get(key)
        return value if isinstance(value, str) and value.strip() else None

    for key in TEXT_KEYS:
        value = s(key)
        if value is None:
            continue
        if key == "question" and isinstance(row.get("choices"), (list, tuple)) and row["choices"]:
            return value + "\nAnswer Choices:\n" + _format_choices(row["choices"])
        if key == "instruction":
            return value + ("\n\n" + row["input"] if s("input") else "")
        return value
    if s("premise") and s("hypothesis"):
        return f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}"
    if s("sentence1") and s("sentence2"):
        return f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}"
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return None


def _lm_example(row: Mapping, location: str):
    """An LM Example holding the prompt part of ``row``; ``None`` when the row is not an LM row."""
    from kdistill.data.records import ROLES, Example

    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise _RowError("field 'messages' must be a non-empty list")
        clean = []
        for i, message in enumerate(messages):
            if not (isinstance(message, Mapping) and isinstance(message.get("content"), str)
                    and message.get("role") in ROLES):
                raise _RowError(f"messages[{i}] must be an object with a role ({', '.join(ROLES)}) and string "
                                f"content")
            clean.append({"role": message["role"], "content": message["content"]})
        if clean[-1]["role"] == "assistant":
            clean = clean[:-1]
        if not clean or clean[-1]["role"] != "user":
            raise _RowError("messages must end with a user turn (or a user turn and the assistant answer to "
                            "replace)")
        return Example("messages", {"messages": clean}, location)
    if "instruction" in row:
        instruction, inp = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise _RowError("fields 'instruction' and 'input' must be strings")
        return Example("alpaca", {"instruction": instruction, "input": inp}, location)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise _RowError("field 'prompt' must be a string")
        return Example("prompt_completion", {"prompt": row["prompt"]}, location)
    return None


def render_few_shot(few_shot, task: str = "rationale") -> str:
    """The ``{few_shot}`` text: ``""`` for none; a string as is; a list of strings (pre-written blocks) or
    of example rows, one block each, blocks separated by a blank line, ending with a blank line.

    Example rows: their main text (:func:`main_text`) and their ``answer`` (else ``label``, else
    ``output``); rationale rows also need ``rationale``. Blocks: rationale ``"Q: {text}\\nA: {rationale}
    So the answer is {answer}."``; label ``"Text: {text}\\nLabel: {answer}"``; output
    ``"Input: {text}\\nOutput: {answer}"``.
    """
    if few_shot is None:
        return ""
    if isinstance(few_shot, str):
        text = few_shot.strip()
        return text + "\n\n" if text else ""
    blocks = []
    for i, item in enumerate(few_shot):
        if isinstance(item, str):
            blocks.append(item.strip())
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"few_shot[{i}] must be a string or an object, found {type(item).__name__}")
        text = main_text(item)
        answer = next((item[k] for k in ("answer", "label", "output") if item.get(k) not in (None, "")), None)
        if text is None or answer is None:
            raise ValueError(f"few_shot[{i}] needs a text field ({', '.join(TEXT_KEYS)}) and an 'answer' "
                             f"(or 'label' / 'output')")
        if task == "rationale":
            if not isinstance(item.get("rationale"), str):
                raise ValueError(f"few_shot[{i}] needs a 'rationale' string for task 'rationale'")
            blocks.append(f"Q: {text}\nA: {item['rationale'].strip()} So the answer is {answer}.")
        elif task == "label":
            blocks.append(f"Text: {text}\nLabel: {answer}")
        else:
            blocks.append(f"Input: {text}\nOutput: {answer}")
    blocks = [b for b in blocks if b]
    return "\n\n".join(blocks) + "\n\n" if blocks else ""


class _TemplateVars(dict):
    def __missing__(self, key):
        raise _RowError(f"the template needs field {{{key}}}, which this row does not have "
                        f"(row keys: {', '.join(k for k in self if not k.startswith('_')) or 'none'})")


def _format(template: str, row: Mapping, labels: Sequence[str] | None, few_shot_text: str) -> str:
    values = _TemplateVars(row)
    text = main_text(row)
    if not isinstance(row.get("text"), str) and text is not None:
        values["text"] = text
    if labels:
        values["labels"] = ", ".join(labels)
    if isinstance(row.get("choices"), (list, tuple)):
        values["choices"] = _format_choices(row["choices"])
    values["few_shot"] = few_shot_text
    try:
        return template.format_map(values)
    except _RowError:
        raise
    except (ValueError, IndexError, AttributeError, KeyError) as exc:
        raise _RowError(f"the template cannot be formatted: {type(exc).__name__}: {exc}") from None


def _prompt_spec(row: Mapping, location: str, task: str, template: str | None, labels, few_shot_text: str,
                 has_few_shot: bool) -> tuple[Any, str, str | None]:
    """``(prompt spec, template used, query)``: the spec is an LM Example (chat rendering) or a string."""
    if not isinstance(row, Mapping):
        raise _RowError(f"row is not a JSON object (found {type(row).__name__})")
    if template is None and task == "output":
        example = _lm_example(row, location)
        if example is not None:
            if has_few_shot:
                raise _RowError("few-shot examples need a template with {few_shot} for task 'output' on LM rows")
            return example, CHAT, None
        template = "{few_shot}{text}"
    if template is None:
        template = LABEL_TEMPLATE if task == "label" else (RATIONALE_TEMPLATE_LABELS if labels
                                                           else RATIONALE_TEMPLATE)
    query = _format(template, row, labels, few_shot_text)
    if not query.strip():
        raise _RowError("the prompt is empty")
    return query, template, query


def annotation_key(row: Any, *, task: str, template: str, teacher: str, params: Mapping,
                   labels: Sequence[str] | None = None, few_shot: Any = None, prompt: Any = None) -> str:
    """SHA-256 (hex) of the canonical JSON of what determines an annotation (see the module docstring)."""
    payload = {"row": row, "task": task, "template": template, "teacher": teacher, "params": dict(params),
               "labels": list(labels) if labels is not None else None, "few_shot": few_shot, "prompt": prompt}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_rows(source: str | os.PathLike, split: str = "train", limit: int | None = None
              ) -> list[tuple[str, dict]]:
    """``[(location, row)]`` from a local ``.jsonl`` / ``.json`` file (JSON Lines, an array or one object)
    or, when ``source`` is not a file, a Hugging Face dataset (``datasets.load_dataset(source, split=split)``).

    Locations are ``"file:line"`` / ``"id[split]:row N"``. Unreadable lines and non-object rows raise a
    :class:`~kdistill.data.records.DataValidationError` listing all of them. ``limit``: first N rows.
    """
    from kdistill.data.records import DataValidationError

    source = os.fspath(source)
    path = Path(source).expanduser()
    rows: list[tuple[str, Any]] = []
    errors: list[str] = []
    if path.is_file():
        text = path.read_text(encoding="utf-8-sig")
        whole = None
        if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
            try:
                whole = json.loads(text)
            except ValueError:
                whole = None
        if isinstance(whole, list):
            rows = [(f"{source}:row {i}", row) for i, row in enumerate(whole)]
        elif isinstance(whole, dict):
            rows = [(f"{source}:1", whole)]
        else:
            for number, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{source}:{number}", json.loads(line)))
                except ValueError as exc:
                    errors.append(f"{source}:{number}: malformed JSON: {exc}")
    elif path.is_dir() or not (source.startswith((".", "/", "~")) or source.lower().endswith((".json", ".jsonl"))):
        import datasets

        dataset = datasets.load_dataset(source, split=split)
        rows = [(f"{source}[{split}]:row {i}", dict(r)) for i, r in enumerate(dataset)]
    else:
        raise MissingFileError(f"data file not found: {source!r} (resolved to {str(path.resolve())!r})")
    errors += [f"{loc}: row is not a JSON object" for loc, row in rows if not isinstance(row, dict)]
    if errors:
        raise DataValidationError(errors)
    if not rows:
        raise DataValidationError([f"{source}: no rows"])
    return rows[:limit] if limit is not None else rows


# ----------------------------------------------------------------------------------------------------
# The annotation file


def _iter_records(path: Path, counts: dict | None = None) -> Iterator[dict]:
    """The readable records of an append-only file; `counts` (if given) receives "lines" (non-empty) and
    "unreadable"."""
    counts = {} if counts is None else counts
    counts.update(lines=0, unreadable=0)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                    or record.get("status") not in STATUSES:
                counts["unreadable"] += 1
                logger.warning("%s:%d: ignoring an unreadable annotation record (a line cut short when a run "
                               "was killed?)", path, number)
                continue
            yield record


def load_annotations(out_path: str | os.PathLike, counts: dict | None = None) -> dict[str, dict]:
    """``{key: last record of that key}`` from an annotation file (ordered by each key's first record);
    ``{}`` when the file does not exist. Unreadable lines are ignored with a warning; ``counts`` (a dict, if given)
    receives the number of non-empty ``"lines"`` and of ``"unreadable"`` ones."""
    records: dict[str, dict] = {}
    for record in _iter_records(Path(out_path), counts):
        records[record["key"]] = record
    return records


class _Writer:
    """Appends records, one ``os.write`` of a whole line each, under a lock; fsync every N and at close."""

    def __init__(self, path: Path, fsync_every: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._fsync_every = max(int(fsync_every), 1)
        self._unsynced = 0
        if os.fstat(self._fd).st_size:
            with path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a line cut short by a kill: end it, so it stays one bad line
                    os.write(self._fd, b"\n")

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            self._unsynced += 1
            if self._unsynced >= self._fsync_every:
                os.fsync(self._fd)
                self._unsynced = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


# ----------------------------------------------------------------------------------------------------
# The runner


@dataclass
class Summary:
    """Counts of one :func:`annotate` run. ``total`` = distinct rows (keys) in the input; ``done``,
    ``failed``, ``unparsable`` = results of this run; ``skipped_done`` = rows already ``ok`` in the file;
    ``skipped_failed`` = failed/unparsable rows left alone (``retry_failed=False``); ``duplicates`` =
    input rows identical to an earlier one (annotated once)."""

    done: int = 0
    failed: int = 0
    unparsable: int = 0
    skipped_done: int = 0
    total: int = 0
    skipped_failed: int = 0
    duplicates: int = 0

    def __str__(self) -> str:
        text = (f"annotate: {self.done} done, {self.failed} failed, {self.unparsable} unparsable, "
                f"{self.skipped_done} skipped (already done), {self.total} total")
        if self.skipped_failed:
            text += f", {self.skipped_failed} failed/unparsable not retried"
        if self.duplicates:
            text += f", {self.duplicates} duplicate rows"
        return text


@dataclass
class _Job:
    key: str
    row: Any
    prompt: Any
    query: str | None
    location: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _locate(rows) -> list[tuple[str, Any]]:
    if isinstance(rows, (str, os.PathLike)):
        return read_rows(rows)
    located = []
    for i, row in enumerate(rows):
        if isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], str):
            located.append(row)
        elif hasattr(row, "kind") and hasattr(row, "fields"):  # an Example
            located.append((getattr(row, "source", f"rows[{i}]"), dict(row.fields)))
        else:
            located.append((f"rows[{i}]", row))
    return located


class _Run:
    def __init__(self, teacher, task, labels, writer, summary, bar, max_consecutive_failures):
        self.teacher, self.task, self.labels = teacher, task, labels
        self.writer, self.summary, self.bar = writer, summary, bar
        self.teacher_id, self.params = teacher.id, teacher.params
        self.max_consecutive = max_consecutive_failures
        self.consecutive = 0
        self.last_error = None

    def record(self, job: _Job, text: str | None, error: str | None, elapsed: float) -> None:
        record: dict[str, Any] = {"key": job.key, "status": "ok", "task": self.task, "row": job.row,
                                  "prompt": job.prompt}
        if job.query is not None and job.query != job.prompt:
            record["query"] = job.query
        record.update(teacher=self.teacher_id, params=self.params, output=text)
        if error is not None:
            record.update(status="failed", error=error)
        elif self.task == "output":
            if not text or not text.strip():
                record.update(status="unparsable", error="empty answer")
        elif self.task == "label":
            label = parse_label(text, self.labels)
            if label is None:
                record.update(status="unparsable", error=f"the answer names no single label of: "
                                                         f"{', '.join(self.labels)}")
            else:
                record["label"] = label
        else:
            parsed = parse_rationale(text, self.labels)
            if parsed is None:
                reason = "no final answer sentence ('So the answer is X') with one answer"
                if self.labels:
                    reason += f" from: {', '.join(self.labels)}"
                record.update(status="unparsable", error=reason)
            else:
                record.update(rationale=parsed[0], label=parsed[1])
        record.update(time=_now(), elapsed_s=round(elapsed, 3))
        self.writer.write(record)
        status = record["status"]
        if status == "ok":
            self.summary.done += 1
        elif status == "failed":
            self.summary.failed += 1
        else:
            self.summary.unparsable += 1
        self.consecutive = self.consecutive + 1 if status == "failed" else 0
        self.last_error = record.get("error")
        self.bar.update(1)
        self.bar.set_postfix(failed=self.summary.failed, unparsable=self.summary.unparsable, refresh=False)

    def too_many_failures(self) -> bool:
        return self.max_consecutive is not None and self.consecutive >= self.max_consecutive

    def abort_error(self) -> AnnotationAborted:
        return AnnotationAborted(f"stopped after {self.consecutive} rows in a row failed (last error: "
                                 f"{self.last_error}); fix the cause and rerun to resume")


def _error_text(exc: BaseException) -> str:
    from kdistill.generators import ChatError

    return str(exc) if isinstance(exc, ChatError) else f"{type(exc).__name__}: {exc}"


def _run_threaded(run: _Run, jobs: list[_Job], concurrency: int) -> None:
    def call(job: _Job):
        start = time.monotonic()
        try:
            return run.teacher.complete(job.prompt), None, time.monotonic() - start, None
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
            return None, _error_text(exc), time.monotonic() - start, exc

    fatal: BaseException | None = None
    pending = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="annotate")
    in_flight: dict = {}

    def submit() -> None:
        job = next(pending, None)
        if job is not None:
            in_flight[pool.submit(call, job)] = job

    interrupted = True
    try:
        for _ in range(concurrency):
            submit()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                text, error, elapsed, exc = future.result()
                run.record(job, text, error, elapsed)
                if fatal is None and getattr(exc, "fatal", False):
                    fatal = AnnotationAborted(f"stopped: {error}")
                if fatal is None and run.too_many_failures():
                    fatal = run.abort_error()
                if fatal is None:
                    submit()
        interrupted = False
    finally:
        # On an interrupt do not wait here for requests in flight (their rows are simply redone next run).
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    if fatal is not None:
        raise fatal


def _run_batched(run: _Run, jobs: list[_Job], batch_size: int) -> None:
    jobs = sorted(jobs, key=lambda j: len(j.prompt) if isinstance(j.prompt, str) else 0)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        began = time.monotonic()
        try:
            texts, error = run.teacher.generate([j.prompt for j in chunk]), None
        except Exception as exc:  # noqa: BLE001 - recorded as failed for each row of the batch
            texts, error = [None] * len(chunk), _error_text(exc)
        elapsed = (time.monotonic() - began) / len(chunk)
        for job, text in zip(chunk, texts):
            run.record(job, text, error, elapsed)
        if run.too_many_failures():
            raise run.abort_error()


def annotate(rows, teacher, task: str, out_path: str | os.PathLike, template: str | None = None,
             labels: Sequence[str] | None = None, few_shot=None, concurrency: int = 4, retry_failed: bool = True,
             progress: bool = True, *, fsync_every: int = 32, max_consecutive_failures: int | None = 50
             ) -> Summary:
    """Annotate ``rows`` with ``teacher`` into the append-only JSON Lines file ``out_path``; resumable.

    ``rows``: a list of row dicts (or ``(location, row)`` pairs, or Examples), or a path read with
    :func:`read_rows`. ``teacher``: a :class:`~kdistill.generators.ChatClient` (rows are sent by a pool of
    ``concurrency`` threads) or a :class:`~kdistill.generators.LocalTeacher` (batches of its ``batch_size``;
    ``concurrency`` is unused) or any object with ``id``, ``params``, ``render`` and ``complete(prompt)``
    or ``generate(prompts)``. ``task``: ``output`` | ``label`` | ``rationale`` (module docstring).
    ``template``: a ``str.format`` template, ``None`` for the task's default. ``labels``: the label set
    (required for ``label``, optional for ``rationale``). ``few_shot``: a string, or a list of example
    rows / strings (:func:`render_few_shot`), available to templates as ``{few_shot}``.

    Every row's prompt is built before anything is sent: problems raise one
    :class:`~kdistill.data.records.DataValidationError` listing ``location: reason`` for every bad row.
    Rows already ``ok`` in ``out_path`` are skipped; failed/unparsable ones are retried unless
    ``retry_failed=False``. The run stops with :class:`AnnotationAborted` (after writing what finished)
    on a fatal teacher error (HTTP 401/403/404) or after ``max_consecutive_failures`` failed rows in a row
    (``None``: never). Returns a :class:`Summary`, also printed to stderr when ``progress`` is true.
    """
    from tqdm.auto import tqdm

    from kdistill.data.records import DataValidationError

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    labels = _check_labels(labels)
    if task == "label" and not labels:
        raise ValueError("task 'label' needs a label set (labels=[...])")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not (hasattr(teacher, "generate") or hasattr(teacher, "complete")):
        raise TypeError("teacher must have generate(prompts) (LocalTeacher) or complete(prompt) (ChatClient)")
    out_path = Path(out_path)
    few_shot_text = render_few_shot(few_shot, task)
    teacher_id, params = teacher.id, teacher.params

    jobs: list[_Job] = []
    problems: list[str] = []
    for location, row in _locate(rows):
        try:
            spec, used_template, query = _prompt_spec(row, location, task, template, labels, few_shot_text,
                                                      few_shot is not None)
            prompt = teacher.render(spec)
        except (_RowError, ValueError) as exc:
            problems.append(f"{location}: {exc}")
            continue
        key = annotation_key(row, task=task, template=used_template, teacher=teacher_id, params=params,
                             labels=labels, few_shot=few_shot, prompt=prompt)
        jobs.append(_Job(key, row, prompt, query, location))
    if problems:
        raise DataValidationError(problems)

    summary = Summary()
    unique: dict[str, _Job] = {}
    for job in jobs:
        if job.key in unique:
            summary.duplicates += 1
        else:
            unique[job.key] = job
    summary.total = len(unique)
    existing = load_annotations(out_path)
    others = sum(1 for r in existing.values() if r.get("teacher") != teacher_id or r.get("params") != params
                 or r.get("task") != task)
    if others:
        raise UserError(f"{out_path}: already holds {others} annotation(s) made with another teacher, task or "
                        f"generation parameters (this run: teacher {teacher_id!r}, task {task!r}, parameters "
                        f"{params!r}); one file holds one configuration: choose another --out")
    todo = []
    for key, job in unique.items():
        last = existing.get(key)
        if last is None:
            todo.append(job)
        elif last["status"] == "ok":
            summary.skipped_done += 1
        elif retry_failed:
            todo.append(job)
        else:
            summary.skipped_failed += 1

    writer = _Writer(out_path, fsync_every)
    try:
        with tqdm(total=len(todo), desc=f"annotate ({task})", unit="row", disable=not progress,
                  dynamic_ncols=True) as bar:
            run = _Run(teacher, task, labels, writer, summary, bar, max_consecutive_failures)
            if todo:
                if hasattr(teacher, "generate"):
                    _run_batched(run, todo, int(getattr(teacher, "batch_size", 8)))
                else:
                    _run_threaded(run, todo, concurrency)
    finally:
        writer.close()
        if progress:
            print(summary, file=sys.stderr, flush=True)
        else:
            logger.debug("%s -> %s", summary, out_path)
    return summary


# ----------------------------------------------------------------------------------------------------
# Export

EXPORT_FORMATS = ("auto", "alpaca", "messages")


def _lm_kind(row: Mapping) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    return None


def _prompt_messages(record: dict) -> list[dict]:
    row = record["row"]
    kind = _lm_kind(row)
    if kind is not None and "query" not in record:
        from kdistill.generators import lm_prompt_messages

        fields = dict(row)
        if kind == "alpaca":
            fields.setdefault("input", "")
        return lm_prompt_messages(kind, fields)
    return [{"role": "user", "content": _query(record)}]


def _query(record: dict) -> str:
    if "query" in record:
        return record["query"]
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _export_output(record: dict, format: str) -> dict:
    row, answer = record["row"], (record.get("output") or "").strip()
    kind = _lm_kind(row)
    if format == "messages":
        return {"messages": _prompt_messages(record) + [{"role": "assistant", "content": answer}]}
    if kind == "alpaca":
        return {**row, "input": row.get("input") or "", "output": answer}
    if kind == "prompt_completion":
        if format == "auto":
            return {**row, "completion": answer}
        return {"instruction": row["prompt"], "input": "", "output": answer}
    if kind == "messages":
        messages = _prompt_messages(record)
        if format == "auto":
            return {**row, "messages": messages + [{"role": "assistant", "content": answer}]}
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ValueError("a conversation with a system turn or several turns cannot be written as an alpaca "
                             "row; export with format='messages' (or 'auto')")
        return {"instruction": messages[0]["content"], "input": "", "output": answer}
    return {"instruction": _query(record), "input": "", "output": answer}


def export(out_path: str | os.PathLike, dest: str | os.PathLike, format: str = "auto") -> int:
    """Write the clean dataset of an annotation file to ``dest`` (JSON Lines, written atomically); returns the
    number of rows written. Only keys whose last record is ``ok`` are written, each once, in the order of
    their first record.

    Task ``output`` (rows for SeqKD with ``kdistill train``; the answer is stripped of surrounding
    whitespace): ``format="auto"`` keeps each row's shape with the teacher's answer as its response
    (alpaca ``output``, prompt_completion ``completion``, messages: a final assistant turn, replacing the
    row's own); rows that are not LM rows become alpaca rows whose ``instruction`` is the prompt text.
    ``"alpaca"`` writes every row as ``{instruction, input, output}`` (single-turn conversations only);
    ``"messages"`` writes ``{"messages": [...prompt turns, assistant answer]}``.
    Tasks ``label`` / ``rationale``: the original row plus ``llm_label`` (and ``llm_rationale``);
    ``format`` does not apply.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    out_path, dest = Path(out_path), Path(dest)
    if not out_path.is_file():
        raise MissingFileError(f"annotation file not found: {str(out_path)!r}")
    lines = []
    for record in load_annotations(out_path).values():
        if record["status"] != "ok":
            continue
        task = record.get("task", "output")
        if task == "output":
            row = _export_output(record, format)
        else:
            row = {**record["row"], "llm_label": record.get("label")}
            if task == "rationale":
                row["llm_rationale"] = record.get("rationale")
        lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    return len(lines)


# ----------------------------------------------------------------------------------------------------
# Command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Rows to annotate: a local .jsonl/.json file or a HF dataset id")
    p.add_argument("--split", default="train", help="Dataset split for a HF dataset id (default: train)")
    p.add_argument("--out", required=True,
                   help="Append-only JSONL annotation file; rerunning with the same file resumes")
    p.add_argument("--task", choices=TASKS, default="output",
                   help="output: the teacher's answer (SeqKD); label: classify into --labels; "
                        "rationale: chain of thought ending in 'So the answer is X'")
    p.add_argument("--labels", default=None, help="Comma-separated label set, e.g. hate,noHate")
    p.add_argument("--template-file", default=None,
                   help="A str.format prompt template over the row's fields plus {text}, {labels}, {choices}, "
                        "{few_shot} (default: a template per task; LM rows are sent as a chat for 'output')")
    p.add_argument("--few-shot-file", default=None,
                   help="Few-shot examples: a .jsonl/.json list of rows (text + answer [+ rationale]) or a text "
                        "file used verbatim as {few_shot}")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--model", default=None, help="Local teacher: a model folder or hub id (transformers)")
    teacher.add_argument("--base-url", default=None,
                         help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (needs --api-model)")
    p.add_argument("--api-model", default=None, help="Model name served at --base-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="Environment variable holding the API key (default: OPENAI_API_KEY; unset = no key)")
    p.add_argument("--timeout", type=float, default=60.0, help="Seconds per request socket operation (default: 60)")
    p.add_argument("--max-retries", type=int, default=5, help="Retries on 429/5xx/timeouts (default: 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="First retry delay in seconds (doubles; default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="Answer length limit (API: max_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling top_p")
    p.add_argument("--seed", type=int, default=None, help="Sampling seed")
    p.add_argument("--concurrency", type=int, default=4, help="Parallel API requests (default: 4)")
    p.add_argument("--batch-size", type=int, default=8, help="Local model generation batch size (default: 8)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "auto"),
                   help="Local model dtype")
    p.add_argument("--raw-prompt", action="store_true",
                   help="Local model: send template prompts as raw text, not wrapped in the chat template")
    p.add_argument("--limit", type=int, default=None, help="Annotate the first N rows only")
    p.add_argument("--no-retry-failed", action="store_true", help="Do not retry failed/unparsable rows")
    p.add_argument("--export", default=None, metavar="PATH", help="Then write the clean dataset (ok rows) here")
    p.add_argument("--export-format", choices=EXPORT_FORMATS, default="auto",
                   help="Row shape of --export for task 'output' (default: auto = the row's own shape)")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``annotate`` on an ``argparse`` subparsers object; run it with :func:`run_cli`."""
    p = subparsers.add_parser(
        "annotate", help="Have a teacher (local model or OpenAI-compatible API) answer, label or explain rows.",
        description="Annotate rows with a teacher into an append-only JSONL file; rerun the same command to "
                    "resume (rows already ok are skipped, failed/unparsable ones are retried).")
    _add_arguments(p)
    return p


def _read_few_shot(path: str):
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        return [row for _, row in read_rows(p)]
    return p.read_text(encoding="utf-8")


def _teacher_from_args(args):
    from kdistill.generators import ChatClient, LocalTeacher

    if args.model:
        return LocalTeacher(args.model, batch_size=args.batch_size, dtype=args.dtype,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, chat=False if args.raw_prompt else "auto")
    if not args.api_model:
        raise ValueError("--base-url needs --api-model (the model name served there)")
    params: dict[str, Any] = {"max_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.top_p is not None:
        params["top_p"] = args.top_p
    if args.seed is not None:
        params["seed"] = args.seed
    return ChatClient(args.base_url, args.api_model, api_key_env=args.api_key_env, timeout=args.timeout,
                      max_retries=args.max_retries, backoff=args.backoff, params=params)


def run_cli(args) -> int:
    """Run ``annotate`` from parsed arguments. Exit code: 0 when no row failed, 1 when some failed (rerun to
    retry them), 2 on an error before or during the run (printed to stderr)."""
    from kdistill.data.records import DataValidationError
    from kdistill.generators import ChatError

    try:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
        if args.task == "label" and not labels:
            raise ValueError("--task label needs --labels (comma-separated label set)")
        template = None
        if args.template_file:
            template = Path(args.template_file).read_text(encoding="utf-8")
            if template.endswith("\n"):
                template = template[:-1]
        few_shot = _read_few_shot(args.few_shot_file) if args.few_shot_file else None
        rows = read_rows(args.data, split=args.split, limit=args.limit)
        teacher = _teacher_from_args(args)
        summary = annotate(rows, teacher, args.task, args.out, template=template, labels=labels,
                           few_shot=few_shot, concurrency=args.concurrency, retry_failed=not args.no_retry_failed,
                           progress=not args.no_progress)
        if args.no_progress:
            print(summary)
        if args.export:
            n = export(args.out, args.export, format=args.export_format)
            print(f"exported {n} rows to {args.export}")
    except (DataValidationError, ChatError, AnnotationAborted, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"kdistill annotate: error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    from kdistill.cli import module_main

    return module_main("python -m kdistill.annotate", "Annotate rows with a teacher (resumable); see kdistill.annotate.", _add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
