"""Building what the teacher is sent: a row's main text, few-shot examples, templates, and the content key
of an annotation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kdistill.jobs import content_key

from .shapes import RowError, lm_example
from .tasks import get_task

__all__ = ["CHAT", "TEXT_KEYS", "annotation_key", "main_text", "prompt_spec", "render_few_shot"]

CHAT = "<chat>"  # the "template" of LM rows sent as a chat (output task default)
# Keys tried, in order, for a row's main text ({text}); see main_text().
TEXT_KEYS = ("question", "instruction", "text", "sentence", "input", "prompt", "query")


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
        blocks.append(get_task(task).few_shot_block(text, answer, item, i))
    blocks = [b for b in blocks if b]
    return "\n\n".join(blocks) + "\n\n" if blocks else ""


class _TemplateVars(dict):
    def __missing__(self, key):
        raise RowError(f"the template needs field {{{key}}}, which this row does not have "
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
    except RowError:
        raise
    except (ValueError, IndexError, AttributeError, KeyError) as exc:
        raise RowError(f"the template cannot be formatted: {type(exc).__name__}: {exc}") from None



def prompt_spec(row: Mapping, location: str, task: str, template: str | None, labels, few_shot_text: str,
                has_few_shot: bool) -> tuple[Any, str, str | None]:
    """``(prompt spec, template used, query)``: the spec is an LM Example (chat rendering) or a string.
    Raises :class:`~kdistill.annotate.shapes.RowError` when the row cannot be prompted."""
    if not isinstance(row, Mapping):
        raise RowError(f"row is not a JSON object (found {type(row).__name__})")
    kind = get_task(task)
    if template is None and kind.chat_rows:
        example = lm_example(row, location)
        if example is not None:
            if has_few_shot:
                raise RowError(f"few-shot examples need a template with {{few_shot}} for task {task!r} on LM rows")
            return example, CHAT, None
    if template is None:
        template = kind.default_template(labels)
    query = _format(template, row, labels, few_shot_text)
    if not query.strip():
        raise RowError("the prompt is empty")
    return query, template, query


def annotation_key(row: Any, *, task: str, template: str, teacher: str, params: Mapping,
                   labels: Sequence[str] | None = None, few_shot: Any = None, prompt: Any = None) -> str:
    """SHA-256 (hex) of the canonical JSON of what determines an annotation (see :mod:`kdistill.annotate`)."""
    return content_key({"row": row, "task": task, "template": template, "teacher": teacher, "params": dict(params),
                        "labels": list(labels) if labels is not None else None, "few_shot": few_shot,
                        "prompt": prompt})
