"""Turning an annotation file into a clean dataset (:func:`export`), and the provenance and answer statistics
that go beside it (:func:`output_stats`, :func:`write_stats`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from kdistill.data.answer_stats import answer_stats
from kdistill.errors import MissingFileError
from kdistill.jobs import load_records

from .shapes import EXPORT_FORMATS
from .tasks import get_task

__all__ = ["EXPORT_FORMATS", "export", "output_stats", "stats_path", "write_stats"]


def _write_atomic(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


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
    _write_atomic(dest, "".join(lines))
    return len(lines)


def output_stats(out_path: str | os.PathLike) -> dict:
    """Provenance and answer statistics of an annotation file (task ``output``)::

        {"teacher", "task", "params", "rows", "ok", "failed", "unparsable",
         "answers": kdistill.data.answer_stats.answer_stats(...)}

    ``rows`` counts the keys in the file, ``ok`` / ``failed`` / ``unparsable`` their last status. The answers
    measured are every answer the teacher gave (ok and unparsable rows, so empty answers count; failed rows
    have none), stripped of surrounding whitespace as :func:`export` writes them. ``teacher``, ``task`` and
    ``params`` are the file's configuration (``None`` for an empty file)."""
    records = load_records(out_path)
    statuses = Counter(record["status"] for record in records.values())
    first = next(iter(records.values()), {})
    answers = [str(record.get("output") or "").strip() for record in records.values()
               if record["status"] != "failed"]
    return {"teacher": first.get("teacher"), "task": first.get("task"), "params": first.get("params"),
            "rows": len(records), "ok": statuses["ok"], "failed": statuses["failed"],
            "unparsable": statuses["unparsable"], "answers": answer_stats(answers)}


def stats_path(export_path: str | os.PathLike) -> Path:
    """Where the statistics of an export go: ``<export path>.stats.json``."""
    return Path(os.fspath(export_path) + ".stats.json")


def write_stats(stats: dict, export_path: str | os.PathLike) -> Path:
    """Write ``stats`` (:func:`output_stats`) beside an export, atomically; returns the path."""
    path = stats_path(export_path)
    _write_atomic(path, json.dumps(stats, indent=2, ensure_ascii=False, default=str) + "\n")
    return path
