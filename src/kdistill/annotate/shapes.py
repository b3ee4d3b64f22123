"""The language-model row shapes (alpaca, prompt_completion, messages) on both sides of an annotation: the
prompt part of an input row (:func:`lm_example`) and the dataset row an ``output`` record becomes
(:func:`output_row`)."""

from __future__ import annotations

from collections.abc import Mapping

from kdistill.data.records import ROLES, Example
from kdistill.generators import lm_prompt_messages

__all__ = ["EXPORT_FORMATS", "RowError", "lm_example", "lm_kind", "output_row"]

EXPORT_FORMATS = ("auto", "alpaca", "messages")


class RowError(ValueError):
    """A row that cannot be turned into a prompt; the message says why (the caller adds the location)."""


def lm_kind(row: Mapping) -> str | None:
    """The LM kind of a row by its keys (``messages``, ``instruction``, ``prompt``), else ``None``."""
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    return None


def lm_example(row: Mapping, location: str) -> Example | None:
    """An LM Example holding the prompt part of ``row``; ``None`` when the row is not an LM row."""
    kind = lm_kind(row)
    if kind == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise RowError("field 'messages' must be a non-empty list")
        clean = []
        for i, message in enumerate(messages):
            if not (isinstance(message, Mapping) and isinstance(message.get("content"), str)
                    and message.get("role") in ROLES):
                raise RowError(f"messages[{i}] must be an object with a role ({', '.join(ROLES)}) and string "
                               f"content")
            clean.append({"role": message["role"], "content": message["content"]})
        if clean[-1]["role"] == "assistant":
            clean = clean[:-1]
        if not clean or clean[-1]["role"] != "user":
            raise RowError("messages must end with a user turn (or a user turn and the assistant answer to "
                           "replace)")
        return Example("messages", {"messages": clean}, location)
    if kind == "alpaca":
        instruction, inp = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise RowError("fields 'instruction' and 'input' must be strings")
        return Example("alpaca", {"instruction": instruction, "input": inp}, location)
    if kind == "prompt_completion":
        if not isinstance(row["prompt"], str):
            raise RowError("field 'prompt' must be a string")
        return Example("prompt_completion", {"prompt": row["prompt"]}, location)
    return None


def _query(record: dict) -> str:
    if "query" in record:
        return record["query"]
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _prompt_messages(record: dict) -> list[dict]:
    row = record["row"]
    kind = lm_kind(row)
    if kind is not None and "query" not in record:
        fields = dict(row)
        if kind == "alpaca":
            fields.setdefault("input", "")
        return lm_prompt_messages(kind, fields)
    return [{"role": "user", "content": _query(record)}]


def output_row(record: dict, format: str) -> dict:
    """The dataset row of an ``ok`` output record in ``format`` (one of :data:`EXPORT_FORMATS`; see
    :func:`kdistill.annotate.export`)."""
    row, answer = record["row"], (record.get("output") or "").strip()
    kind = lm_kind(row)
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
