"""The annotation tasks, one small class each, and the table :data:`TASKS` that names them.

A task says what the teacher is asked by default (:meth:`Task.default_template`), how a few-shot example row
is shown to it (:meth:`Task.few_shot_block`), what is read from its answer (:meth:`Task.read`) and what an
``ok`` record becomes in the exported dataset (:meth:`Task.export_row`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .parse import parse_label, parse_rationale
from .shapes import output_row

__all__ = ["LABEL_TEMPLATE", "RATIONALE_TEMPLATE", "RATIONALE_TEMPLATE_LABELS", "TASKS", "Task", "get_task"]

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


class Task:
    """One annotation task. ``chat_rows``: LM rows are sent as a chat when no template is given;
    ``needs_labels``: a label set is required."""

    name = ""
    chat_rows = False
    needs_labels = False

    def default_template(self, labels: Sequence[str] | None) -> str:
        raise NotImplementedError

    def few_shot_block(self, text: str, answer: Any, item: Mapping, index: int) -> str:
        raise NotImplementedError

    def read(self, text: str, labels: Sequence[str] | None) -> dict:
        """The fields an answer adds to its record: what was read, or ``status: unparsable`` and ``error``."""
        raise NotImplementedError

    def export_row(self, record: dict, format: str) -> dict:
        """The dataset row of an ``ok`` record: the input row plus ``llm_label`` (labelling tasks)."""
        return {**record["row"], "llm_label": record.get("label")}


class OutputTask(Task):
    """The teacher's answer (SeqKD); an empty answer is unparsable."""

    name = "output"
    chat_rows = True

    def default_template(self, labels):
        return "{few_shot}{text}"

    def few_shot_block(self, text, answer, item, index):
        return f"Input: {text}\nOutput: {answer}"

    def read(self, text, labels):
        if not text or not text.strip():
            return {"status": "unparsable", "error": "empty answer"}
        return {}

    def export_row(self, record, format):
        return output_row(record, format)


class LabelTask(Task):
    """One label of a fixed label set (:func:`~kdistill.annotate.parse.parse_label`)."""

    name = "label"
    needs_labels = True

    def default_template(self, labels):
        return LABEL_TEMPLATE

    def few_shot_block(self, text, answer, item, index):
        return f"Text: {text}\nLabel: {answer}"

    def read(self, text, labels):
        label = parse_label(text, labels)
        if label is None:
            return {"status": "unparsable", "error": f"the answer names no single label of: {', '.join(labels)}"}
        return {"label": label}


class RationaleTask(Task):
    """Few-shot chain of thought ending in "So the answer is X"
    (:func:`~kdistill.annotate.parse.parse_rationale`)."""

    name = "rationale"

    def default_template(self, labels):
        return RATIONALE_TEMPLATE_LABELS if labels else RATIONALE_TEMPLATE

    def few_shot_block(self, text, answer, item, index):
        if not isinstance(item.get("rationale"), str):
            raise ValueError(f"few_shot[{index}] needs a 'rationale' string for task 'rationale'")
        return f"Q: {text}\nA: {item['rationale'].strip()} So the answer is {answer}."

    def read(self, text, labels):
        parsed = parse_rationale(text, labels)
        if parsed is None:
            reason = "no final answer sentence ('So the answer is X') with one answer"
            if labels:
                reason += f" from: {', '.join(labels)}"
            return {"status": "unparsable", "error": reason}
        return {"rationale": parsed[0], "label": parsed[1]}

    def export_row(self, record, format):
        return {**super().export_row(record, format), "llm_rationale": record.get("rationale")}


_TABLE: dict[str, Task] = {task.name: task for task in (OutputTask(), LabelTask(), RationaleTask())}
TASKS = tuple(_TABLE)


def get_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None
