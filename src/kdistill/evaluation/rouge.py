"""`kdistill eval rouge`: ROUGE-1/2/L of generated answers against their references.

Reads `kdistill generate` output files (JSONL records with `reference_output` and `generate_output`; the last
record of a key counts, as everywhere in :mod:`kdistill.jobs`) and scores every answer with Google's
`rouge-score` package (`RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)`, its default tokenizer:
lower-cased ASCII letters and digits). Per answers file it reports the mean F1 x 100 over the scored answers and
the counts of what was left out::

    {"kind": "rouge", "datasets": {dataset: {"models": {name: {"rouge1", "rouge2", "rougeL", "answers",
                                                               "empty_answers", "no_reference", "not_ok"}}}}}

`answers`: rows scored; `empty_answers`: of those, answers that are empty (F1 0); `no_reference`: rows without a
reference (skipped); `not_ok`: records whose status is not ok (skipped). The data set of a file is `--dataset`,
else the stem of its first row's `source` (`data/test.jsonl:3` -> `test`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kdistill.errors import MissingFileError, UserError
from kdistill.evaluation.names import data_name, named_paths
from kdistill.paths import check_output_dir, write_json_atomic

__all__ = ["METRICS", "add_parser", "answers_dataset", "format_table", "rouge_report", "rouge_scores", "run_cli"]

METRICS = ("rouge1", "rouge2", "rougeL")
HOW_TO_WRITE = "write answers with kdistill generate --model M --data TEST --out FILE"


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("kdistill eval rouge needs the rouge-score package: pip install 'kdistill[eval]'") from None
    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def _read(path) -> tuple[list[dict], int]:
    """(the last record of each key, in first-seen order; unreadable lines skipped). A line that is JSON but not a
    generate record, or an ok record without text answers, is an error naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"answers file not found: {str(path)!r}")
    records: dict[object, dict] = {}
    unreadable = 0
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                unreadable += 1  # a line cut short by a killed run; a resumed generate rewrites that row
                continue
            where = f"{path}:{number}"
            if not isinstance(record, dict) or "status" not in record:
                raise UserError(f"{where}: not a kdistill generate record (no 'status'); {HOW_TO_WRITE}")
            if record["status"] == "ok":
                for key in ("generate_output", "reference_output"):
                    if not isinstance(record.get(key, ""), (str, type(None))):
                        raise UserError(f"{where}: {key} is {type(record[key]).__name__}, not text")
                if "generate_output" not in record:
                    raise UserError(f"{where}: a record with status ok but no 'generate_output'; {HOW_TO_WRITE}")
            records[record.get("key", ("line", number))] = record
    if not records:
        raise UserError(f"{path}: no kdistill generate records ({unreadable} unreadable line(s)); {HOW_TO_WRITE}")
    if unreadable:
        print(f"note: {path}: {unreadable} unreadable line(s) skipped (cut short by a killed run?)", file=sys.stderr)
    return list(records.values()), unreadable


def answers_dataset(path) -> str:
    """The data set an answers file belongs to: the stem of its first record's `source` file (else its own stem)."""
    source = _read(path)[0][0].get("source")
    return data_name(source.rpartition(":")[0] or source) if isinstance(source, str) and source \
        else data_name(os.fspath(path))


def rouge_scores(answers_path) -> dict:
    """ROUGE of one `kdistill generate` output file: `{rouge1, rouge2, rougeL}` (mean F1 x 100 over the answers
    that have a reference) and the counts `answers`, `empty_answers`, `no_reference`, `not_ok` (see the module
    docstring). Raises a UserError when no answer can be scored."""
    scorer = _scorer()
    records, _ = _read(answers_path)
    sums = dict.fromkeys(METRICS, 0.0)
    counts = {"answers": 0, "empty_answers": 0, "no_reference": 0, "not_ok": 0}
    for record in records:
        if record["status"] != "ok":
            counts["not_ok"] += 1
            continue
        reference = record.get("reference_output") or ""
        if not reference.strip():
            counts["no_reference"] += 1
            continue
        answer = record["generate_output"] or ""
        counts["answers"] += 1
        counts["empty_answers"] += int(not answer.strip())
        scores = scorer.score(reference, answer)  # (target, prediction)
        for metric in METRICS:
            sums[metric] += scores[metric].fmeasure
    if not counts["answers"]:
        raise UserError(f"{answers_path}: no answer to score: {counts['no_reference']} row(s) without a "
                        f"reference_output, {counts['not_ok']} not ok")
    return {**{m: 100.0 * sums[m] / counts["answers"] for m in METRICS}, **counts}


def rouge_report(answers: dict[str, str], dataset: str | None = None) -> dict:
    """`{"kind": "rouge", "datasets": ...}` for `{model name: answers file}`; each file goes under `dataset`, else
    under :func:`answers_dataset` of it."""
    report: dict = {"kind": "rouge", "datasets": {}}
    for name, path in answers.items():
        group = report["datasets"].setdefault(dataset or answers_dataset(path), {"models": {}})
        group["models"][name] = rouge_scores(path)
    return report


def format_table(entry: dict) -> str:
    """Markdown table of one data set's models."""
    lines = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | answers | empty | no reference | not ok |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in entry["models"].items():
        lines.append(f"| {name} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} | {m['answers']} | "
                     f"{m['empty_answers']} | {m['no_reference']} | {m['not_ok']} |")
    return "\n".join(lines)


def add_parser(eval_subparsers) -> None:
    """Register `rouge` under `kdistill eval`."""
    p = eval_subparsers.add_parser("rouge", help="ROUGE-1/2/L F1 of generated answers against their references "
                                                 "(kdistill generate output; needs pip install 'kdistill[eval]')")
    p.add_argument("--answers", action="append", required=True, metavar="NAME=FILE",
                   help="A kdistill generate output file, NAME=FILE or a bare FILE (named after its stem); repeat "
                        "for several models")
    p.add_argument("--dataset", default=None,
                   help="Data set name for all files (default: the stem of each file's first row's source file)")
    p.add_argument("--out", default="rouge.json", help="Where to write the JSON results (default: rouge.json)")


def run_cli(args) -> int:
    out = Path(args.out)
    check_output_dir(out.parent, "--out")
    report = rouge_report(named_paths(args.answers, data_name), args.dataset)
    for dataset, entry in report["datasets"].items():
        print(f"{dataset}:")
        print(format_table(entry))
    write_json_atomic(out, report)
    print(f"results: {out}")
    return 0
