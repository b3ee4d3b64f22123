"""Turning an annotation file into a clean dataset (:func:`export`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdistill.errors import MissingFileError
from kdistill.jobs import load_records

from .shapes import EXPORT_FORMATS
from .tasks import get_task

__all__ = ["EXPORT_FORMATS", "export"]


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
    for record in load_records(out_path).values():
        if record["status"] != "ok":
            continue
        row = get_task(record.get("task", "output")).export_row(record, format)
        lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    return len(lines)
