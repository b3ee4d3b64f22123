"""LLM-as-a-judge over ``kdistill generate`` outputs: per-answer scores and pairwise comparisons (the run;
the ``kdistill judge`` command line is :mod:`kdistill.evaluation.judge`, which re-exports these names).

Scores (:func:`judge_file`)
    Each answer row is sent to a judge (a :class:`~kdistill.generators.ChatClient`, so 429/5xx/timeouts are
    retried with backoff there) with a ``str.format`` template over ``{instruction}``, ``{input}``,
    ``{reference_output}``, ``{answer}``, ``{dimensions}`` (comma-separated names) and ``{json_example}``
    (e.g. ``{"Correctness": <0-5>, ...}``). Default: :data:`JUDGE_TEMPLATE`, dimensions
    :data:`DIMENSIONS`. The reply is read with :func:`parse_judgement`; an invalid reply is asked again
    (same request) up to ``max_invalid_retries`` times, then recorded as invalid.

Pairwise (:func:`judge_pairwise`)
    Rows of two answer files are matched by ``(instruction, input)``. Each pair is asked twice with
    :data:`PAIRWISE_TEMPLATE` (``{answer_1}``, ``{answer_2}``): A in position 1, then B in position 1. The
    judge answers ``{"winner": "1" | "2" | "tie"}`` (:func:`parse_verdict`). A row is won by A (or B) only
    when it wins in both orders; anything else (a tie, or position-inconsistent verdicts) is a tie. A row
    with an invalid verdict (after retries) is invalid. ``win_rate = (wins_A + 0.5 * ties) / valid rows``.

Cache (append-only JSON Lines at ``out_path``, a :mod:`kdistill.jobs` record store like the annotation files)::

    scores:   {"key", "status": "ok" | "unparsable" | "failed", "mode": "score", "judge": <model>,
               "answers_key": <the generate row's key>, "instruction", "input", "reference_output",
               "generate_output", "dimensions", "scores": {dim: int} | null, "raw": [reply per attempt],
               "attempts", "error"?, "time"}
    pairwise: {"key", "status", "mode": "pairwise", "judge", "instruction", "input", "answer_a", "answer_b",
               "verdicts": [<order A-first: "A"|"B"|"tie"|null>, <order B-first>], "result": "A"|"B"|"tie"|null,
               "raw": [[replies, order 1], [replies, order 2]], "attempts", "error"?, "time"}

``status``: ``ok`` = a valid judgement; ``unparsable`` = still invalid after the retries (the judge's
final word: kept on rerun, counted as invalid); ``failed`` = the request itself failed (ChatError after
the client's retries; redone on rerun, counted as invalid meanwhile). ``key`` =
:func:`kdistill.jobs.content_key` (SHA-256 of the canonical JSON) of (mode, judge model, the client's params,
template, dimensions, row content), so a change of any of them asks again. A rerun skips keys whose last
record is ``ok`` / ``unparsable``; a line cut short by a kill is ignored.

Replies are read by :mod:`kdistill.evaluation.judge_parse` (what counts as a valid score is described there).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from kdistill.errors import MissingFileError, UserError
from kdistill.generators import ChatError
from kdistill.jobs import RecordWriter, content_key, load_records, now, run_concurrent

from .judge_parse import (DIMENSIONS, JUDGE_TEMPLATE, MAX_SCORE, MIN_SCORE, PAIRWISE_TEMPLATE, parse_judgement,
                          parse_verdict)

__all__ = ["JudgeSummary", "PairwiseSummary", "judge_file", "judge_pairwise", "load_answers"]

# ----------------------------------------------------------------------------------------------------
# Files


def load_answers(path) -> list[dict]:
    """The rows of a ``generate`` output file (last record per key, in first-seen order)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"answers file not found: {str(path)!r}")
    rows = []
    counts: dict = {}
    records = load_records(path, counts)
    if counts["unreadable"] and records:
        print(f"note: {path}: {counts['unreadable']} unreadable line(s) skipped (cut short by a killed run; a "
              f"resumed kdistill generate rewrites those rows), {len(records)} record(s) read", file=sys.stderr)
    for record in records.values():
        if record.get("status") != "ok" or "generate_output" not in record:
            continue
        rows.append(record)
    if not rows:
        raise UserError(f"{path}: no answers to judge: {counts['lines']} non-empty line(s), {len(records)} "
                        f"record(s) of kdistill generate, none with status ok and a generate_output (write answers "
                        f"with kdistill generate --model M --data TEST --out {path.name})")
    return rows


def _refuse_other_judges(records, out_path, judge: str, mode: str) -> None:
    """A judgement file holds one judge's verdicts of one mode; mixing in another's would average two judges."""
    for record in records:
        if record.get("judge") != judge or record.get("mode") != mode:
            raise UserError(f"{out_path}: already holds {record.get('mode')} judgements by {record.get('judge')!r}, "
                            f"not {mode} judgements by {judge!r}; write to another --out file")


def _check_template(template: str, fields: Sequence[str]) -> None:
    try:
        template.format(**{name: "x" for name in fields})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"judge template cannot be formatted with the fields {', '.join(fields)}: "
                         f"{type(exc).__name__}: {exc} (write literal braces as {{{{ and }}}})") from None


def _ask(client, prompt: str, parse: Callable[[str], Any], max_invalid_retries: int):
    """``(parsed | None, replies, error | None)``: ask, re-asking while the reply is invalid."""
    replies: list[str] = []
    for _ in range(max_invalid_retries + 1):
        try:
            reply = client.complete([{"role": "user", "content": prompt}])
        except ChatError as exc:
            return None, replies, str(exc)
        replies.append(reply)
        parsed = parse(reply)
        if parsed is not None:
            return parsed, replies, None
    return None, replies, None


# ----------------------------------------------------------------------------------------------------
# Scores


@dataclass
class JudgeSummary:
    """Scores of one answers file: ``means`` per dimension over valid judgements (``None`` when none is
    valid), ``valid``, ``invalid`` (unparsable after retries, or the request failed; ``failed`` counts the
    latter), ``total`` rows; ``judged`` = asked in this run, ``cached`` = taken from the file."""

    answers: str = ""
    dimensions: list = field(default_factory=list)
    means: dict = field(default_factory=dict)
    valid: int = 0
    invalid: int = 0
    failed: int = 0
    total: int = 0
    judged: int = 0
    cached: int = 0

    def __str__(self) -> str:
        means = ", ".join(f"{d}={'n/a' if m is None else f'{m:.3f}'}" for d, m in self.means.items())
        return f"{self.answers}: {means}; valid {self.valid}/{self.total} (invalid {self.invalid})"


def _judge_into(out_path, todo, work, concurrency, progress, label) -> dict:
    """Run ``work(job) -> record`` over the pending jobs, ``concurrency`` at a time, appending each record to
    `out_path` as it completes; return the last record per key."""
    with RecordWriter(out_path, fsync_every=1) as writer, \
            tqdm(total=len(todo), desc=label, unit="row", disable=not progress or not todo, dynamic_ncols=True) as bar:

        def on_result(job, record: dict) -> None:
            writer.write(record)
            bar.update(1)

        run_concurrent(todo, work, on_result, concurrency, name="judge")
    return load_records(out_path)


def judge_file(answers_path, out_path, client, model_name: str | None = None, template: str = JUDGE_TEMPLATE,
               dimensions: Sequence[str] = DIMENSIONS, max_invalid_retries: int = 2, concurrency: int = 4,
               progress: bool = True) -> JudgeSummary:
    """Score every row of a ``generate`` output file with the judge ``client`` (see the module doc).

    ``model_name``: the judge's name in records and cache keys (default: ``client.id``). Returns a
    :class:`JudgeSummary` over all rows of the file (judged now or cached in ``out_path``).
    """
    if isinstance(dimensions, str):
        raise TypeError("dimensions must be a list of names, not one string")
    dimensions = [str(d).strip() for d in dimensions]
    if not dimensions or any(not d for d in dimensions):
        raise ValueError("dimensions must be a non-empty list of non-empty names")
    if len({d.lower() for d in dimensions}) != len(dimensions):
        raise ValueError(f"dimensions repeat (case-insensitively): {dimensions}")
    if concurrency < 1 or max_invalid_retries < 0:
        raise ValueError("concurrency must be >= 1 and max_invalid_retries >= 0")
    _check_template(template, ("instruction", "input", "reference_output", "answer", "dimensions", "json_example"))
    judge = model_name or client.id
    params = dict(getattr(client, "params", {}) or {})
    json_example = "{" + ", ".join(f'"{d}": <{MIN_SCORE}-{MAX_SCORE}>' for d in dimensions) + "}"
    out_path = Path(out_path)

    jobs, keys = [], []
    for row in load_answers(answers_path):
        content = {k: row.get(k) or "" for k in ("instruction", "input", "reference_output", "generate_output")}
        key = content_key({"mode": "score", "judge": judge, "params": params, "template": template,
                    "dimensions": dimensions, "row": content})
        keys.append(key)
        prompt = template.format(instruction=content["instruction"], input=content["input"] or "(none)",
                                 reference_output=content["reference_output"], answer=content["generate_output"],
                                 dimensions=", ".join(dimensions), json_example=json_example)
        jobs.append((key, row.get("key"), content, prompt))

    existing = load_records(out_path)
    _refuse_other_judges(existing.values(), out_path, judge, "score")
    unique = {job[0]: job for job in jobs}
    todo = [job for key, job in unique.items()
            if key not in existing or existing[key]["status"] == "failed"]

    def work(job) -> dict:
        key, answers_key, content, prompt = job
        start = time.monotonic()
        scores, replies, error = _ask(client, prompt, lambda text: parse_judgement(text, dimensions),
                                      max_invalid_retries)
        record = {"key": key, "status": "ok" if scores is not None else ("failed" if error else "unparsable"),
                  "mode": "score", "judge": judge, "answers_key": answers_key, **content,
                  "dimensions": dimensions, "scores": scores, "raw": replies, "attempts": len(replies),
                  "time": now(), "elapsed_s": round(time.monotonic() - start, 3)}
        if error:
            record["error"] = error
        return record

    records = _judge_into(out_path, todo, work, concurrency, progress, "judge")
    summary = JudgeSummary(answers=str(answers_path), dimensions=list(dimensions), total=len(keys),
                           judged=len(todo), cached=len(unique) - len(todo))
    sums = {d: 0 for d in dimensions}
    for key in keys:
        record = records.get(key)
        if record is not None and record["status"] == "ok":
            summary.valid += 1
            for d in dimensions:
                sums[d] += record["scores"][d]
        else:
            summary.invalid += 1
            if record is None or record["status"] == "failed":
                summary.failed += 1
    summary.means = {d: (sums[d] / summary.valid if summary.valid else None) for d in dimensions}
    return summary


# ----------------------------------------------------------------------------------------------------
# Pairwise


@dataclass
class PairwiseSummary:
    """``wins_a`` / ``ties`` / ``wins_b`` over ``valid`` rows, ``invalid`` rows, ``total`` rows present in
    both files, ``win_rate`` of A = ``(wins_a + 0.5 * ties) / valid`` (``None`` when no row is valid)."""

    answers_a: str = ""
    answers_b: str = ""
    wins_a: int = 0
    ties: int = 0
    wins_b: int = 0
    valid: int = 0
    invalid: int = 0
    total: int = 0
    only_a: int = 0
    only_b: int = 0
    win_rate: float | None = None

    def __str__(self) -> str:
        rate = "n/a" if self.win_rate is None else f"{self.win_rate:.3f}"
        return (f"{self.answers_a} vs {self.answers_b}: win rate {rate}; wins/ties/losses "
                f"{self.wins_a}/{self.ties}/{self.wins_b}; valid {self.valid}/{self.total} (invalid {self.invalid})")


def _by_prompt(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault((row.get("instruction") or "", row.get("input") or ""), row)
    return out


def judge_pairwise(answers_a, answers_b, out_path, client, model_name: str | None = None,
                   template: str = PAIRWISE_TEMPLATE, max_invalid_retries: int = 2, concurrency: int = 4,
                   progress: bool = True) -> PairwiseSummary:
    """Compare two ``generate`` output files row by row, in both answer orders (see the module doc)."""
    if concurrency < 1 or max_invalid_retries < 0:
        raise ValueError("concurrency must be >= 1 and max_invalid_retries >= 0")
    _check_template(template, ("instruction", "input", "reference_output", "answer_1", "answer_2"))
    judge = model_name or client.id
    params = dict(getattr(client, "params", {}) or {})
    rows_a, rows_b = _by_prompt(load_answers(answers_a)), _by_prompt(load_answers(answers_b))
    shared = [k for k in rows_a if k in rows_b]
    out_path = Path(out_path)

    jobs = []
    for instruction, inp in shared:
        a, b = rows_a[(instruction, inp)]["generate_output"], rows_b[(instruction, inp)]["generate_output"]
        reference = rows_a[(instruction, inp)].get("reference_output") or ""
        key = content_key({"mode": "pairwise", "judge": judge, "params": params, "template": template,
                    "instruction": instruction, "input": inp, "reference_output": reference, "a": a, "b": b})
        prompts = [template.format(instruction=instruction, input=inp or "(none)", reference_output=reference,
                                   answer_1=first, answer_2=second) for first, second in ((a, b), (b, a))]
        jobs.append((key, instruction, inp, a, b, prompts))

    existing = load_records(out_path)
    _refuse_other_judges(existing.values(), out_path, judge, "pairwise")
    todo = [job for job in jobs if job[0] not in existing or existing[job[0]]["status"] == "failed"]

    def work(job) -> dict:
        key, instruction, inp, a, b, prompts = job
        start = time.monotonic()
        verdicts, raw, error = [], [], None
        for order, prompt in enumerate(prompts):
            verdict, replies, error = _ask(client, prompt, parse_verdict, max_invalid_retries)
            raw.append(replies)
            if verdict is None:
                verdicts.append(None)
                break
            mapping = {"1": "A", "2": "B"} if order == 0 else {"1": "B", "2": "A"}
            verdicts.append(mapping.get(verdict, "tie"))
        if len(verdicts) == 2 and None not in verdicts:
            result = verdicts[0] if verdicts[0] == verdicts[1] and verdicts[0] != "tie" else "tie"
            status = "ok"
        else:
            result, status = None, "failed" if error else "unparsable"
        record = {"key": key, "status": status, "mode": "pairwise", "judge": judge, "instruction": instruction,
                  "input": inp, "answer_a": a, "answer_b": b, "verdicts": verdicts, "result": result, "raw": raw,
                  "attempts": sum(len(r) for r in raw), "time": now(),
                  "elapsed_s": round(time.monotonic() - start, 3)}
        if error:
            record["error"] = error
        return record

    records = _judge_into(out_path, todo, work, concurrency, progress, "judge (pairwise)")
    summary = PairwiseSummary(answers_a=str(answers_a), answers_b=str(answers_b), total=len(jobs),
                              only_a=len(rows_a) - len(shared), only_b=len(rows_b) - len(shared))
    for job in jobs:
        record = records.get(job[0])
        if record is None or record["status"] != "ok":
            summary.invalid += 1
            continue
        summary.valid += 1
        if record["result"] == "A":
            summary.wins_a += 1
        elif record["result"] == "B":
            summary.wins_b += 1
        else:
            summary.ties += 1
    if summary.valid:
        summary.win_rate = (summary.wins_a + 0.5 * summary.ties) / summary.valid
    return summary
