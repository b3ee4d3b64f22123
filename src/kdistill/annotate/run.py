"""The annotation run: build every prompt, skip what is done, ask the teacher, append one record per answer."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kdistill.data.io import DataValidationError, read_rows
from kdistill.errors import UserError
from kdistill.generators import ChatError
from kdistill.jobs import RecordWriter, in_batches, load_records, now, run_concurrent

from .parse import check_labels
from .prompts import annotation_key, prompt_spec, render_few_shot
from .shapes import RowError
from .tasks import Task, get_task

__all__ = ["AnnotationAborted", "Summary", "annotate", "load_annotations"]

logger = logging.getLogger(__name__)


class AnnotationAborted(RuntimeError):
    """The run stopped early (too many rows failed in a row, or a fatal teacher error); rerun to resume."""


def load_annotations(out_path: str | os.PathLike, counts: dict | None = None) -> dict[str, dict]:
    """``{key: last record of that key}`` from an annotation file (ordered by each key's first record);
    ``{}`` when the file does not exist. Unreadable lines are ignored with a warning; ``counts`` (a dict, if given)
    receives the number of non-empty ``"lines"`` and of ``"unreadable"`` ones."""
    return load_records(out_path, counts)


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
    def __init__(self, teacher, task: Task, labels, writer, summary, bar, max_consecutive_failures):
        self.teacher, self.task, self.labels = teacher, task, labels
        self.writer, self.summary, self.bar = writer, summary, bar
        self.teacher_id, self.params = teacher.id, teacher.params
        self.max_consecutive = max_consecutive_failures
        self.consecutive = 0
        self.last_error = None

    def record(self, job: _Job, text: str | None, error: str | None, elapsed: float) -> None:
        record: dict[str, Any] = {"key": job.key, "status": "ok", "task": self.task.name, "row": job.row,
                                  "prompt": job.prompt}
        if job.query is not None and job.query != job.prompt:
            record["query"] = job.query
        record.update(teacher=self.teacher_id, params=self.params, output=text)
        if error is not None:
            record.update(status="failed", error=error)
        else:
            record.update(self.task.read(text, self.labels))
        record.update(time=now(), elapsed_s=round(elapsed, 3))
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
    return str(exc) if isinstance(exc, ChatError) else f"{type(exc).__name__}: {exc}"


def _run_threaded(run: _Run, jobs: list[_Job], concurrency: int) -> None:
    """One ``complete`` call per row, ``concurrency`` in flight; stops on a fatal error or too many failures."""
    def call(job: _Job):
        start = time.monotonic()
        try:
            return run.teacher.complete(job.prompt), None, time.monotonic() - start, None
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
            return None, _error_text(exc), time.monotonic() - start, exc

    fatal: list[BaseException] = []

    def on_result(job: _Job, result) -> bool:
        text, error, elapsed, exc = result
        run.record(job, text, error, elapsed)
        if not fatal and getattr(exc, "fatal", False):
            fatal.append(AnnotationAborted(f"stopped: {error}"))
        if not fatal and run.too_many_failures():
            fatal.append(run.abort_error())
        return bool(fatal)

    run_concurrent(jobs, call, on_result, concurrency, name="annotate")
    if fatal:
        raise fatal[0]


def _run_batched(run: _Run, jobs: list[_Job], batch_size: int) -> None:
    """``generate`` over batches of ``batch_size`` rows (shortest prompts first)."""
    jobs = sorted(jobs, key=lambda j: len(j.prompt) if isinstance(j.prompt, str) else 0)
    for chunk in in_batches(jobs, batch_size):
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
    :func:`kdistill.data.io.read_rows`. ``teacher``: a :class:`~kdistill.generators.ChatClient` (rows are sent
    by a pool of ``concurrency`` threads) or a :class:`~kdistill.generators.LocalTeacher` (batches of its
    ``batch_size``; ``concurrency`` is unused) or any object with ``id``, ``params``, ``render`` and
    ``complete(prompt)`` or ``generate(prompts)``. ``task``: ``output`` | ``label`` | ``rationale``
    (:mod:`kdistill.annotate`). ``template``: a ``str.format`` template, ``None`` for the task's default.
    ``labels``: the label set (required for ``label``, optional for ``rationale``). ``few_shot``: a string, or
    a list of example rows / strings (:func:`~kdistill.annotate.prompts.render_few_shot`), available to
    templates as ``{few_shot}``.

    Every row's prompt is built before anything is sent: problems raise one
    :class:`~kdistill.data.records.DataValidationError` listing ``location: reason`` for every bad row.
    Rows already ``ok`` in ``out_path`` are skipped; failed/unparsable ones are retried unless
    ``retry_failed=False``. The run stops with :class:`AnnotationAborted` (after writing what finished)
    on a fatal teacher error (HTTP 401/403/404) or after ``max_consecutive_failures`` failed rows in a row
    (``None``: never). Returns a :class:`Summary`, also printed to stderr when ``progress`` is true.
    """
    kind = get_task(task)
    labels = check_labels(labels)
    if kind.needs_labels and not labels:
        raise ValueError(f"task {task!r} needs a label set (labels=[...])")
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
            spec, used_template, query = prompt_spec(row, location, task, template, labels, few_shot_text,
                                                     few_shot is not None)
            prompt = teacher.render(spec)
        except (RowError, ValueError) as exc:
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
    existing = load_records(out_path)
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

    writer = RecordWriter(out_path, fsync_every)
    try:
        with tqdm(total=len(todo), desc=f"annotate ({task})", unit="row", disable=not progress,
                  dynamic_ncols=True) as bar:
            run = _Run(teacher, kind, labels, writer, summary, bar, max_consecutive_failures)
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
