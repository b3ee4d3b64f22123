"""``kdistill annotate`` / ``python -m kdistill.annotate``: the command line of :func:`~kdistill.annotate.annotate`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kdistill.data.answer_stats import format_stats
from kdistill.data.io import DataValidationError, read_rows
from kdistill.entry import module_main
from kdistill.generators import ChatClient, ChatError, LocalTeacher
from kdistill.generators.options import add_generation_arguments, api_params, local_options

from .export import export, output_stats, write_stats
from .run import AnnotationAborted, annotate
from .shapes import EXPORT_FORMATS
from .tasks import TASKS

__all__ = ["add_parser", "main", "report_answers", "run_cli"]

logger = logging.getLogger(__name__)


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
    add_generation_arguments(p, api=True)
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
    if args.model:
        return LocalTeacher(args.model, batch_size=args.batch_size, dtype=args.dtype,
                            chat=False if args.raw_prompt else "auto", **local_options(args))
    if not args.api_model:
        raise ValueError("--base-url needs --api-model (the model name served there)")
    params = api_params(args)
    return ChatClient(args.base_url, args.api_model, api_key_env=args.api_key_env, timeout=args.timeout,
                      max_retries=args.max_retries, backoff=args.backoff, params=params)


def report_answers(out_path, export_path=None) -> dict:
    """Print the answer statistics of an output-task annotation file (a WARNING with the reasons when they look
    degenerate) and, with an export path, write them beside it (:func:`~kdistill.annotate.export.write_stats`)."""
    stats = output_stats(out_path)
    answers = stats["answers"]
    print(f"answers: {format_stats(answers)}")
    if answers["degenerate"]:
        logger.warning("%s: the teacher's answers look degenerate for sequence-level KD: %s (did generation stop at "
                       "the end of the answer? see --stop-token, --max-new-tokens)", out_path,
                       "; ".join(answers["reasons"]))
    if export_path:
        print(f"answer statistics written to {write_stats(stats, export_path)}")
    return stats


def run_cli(args) -> int:
    """Run ``annotate`` from parsed arguments. Exit code: 0 when no row failed, 1 when some failed (rerun to
    retry them), 2 on an error before or during the run (printed to stderr)."""
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
        rows = read_rows(args.data, split=args.split, limit=args.limit, option="--data")
        teacher = _teacher_from_args(args)
        summary = annotate(rows, teacher, args.task, args.out, template=template, labels=labels,
                           few_shot=few_shot, concurrency=args.concurrency, retry_failed=not args.no_retry_failed,
                           progress=not args.no_progress)
        if args.no_progress:
            print(summary)
        if args.export:
            n = export(args.out, args.export, format=args.export_format)
            print(f"exported {n} rows to {args.export}")
        if args.task == "output":
            report_answers(args.out, args.export)
    except (DataValidationError, ChatError, AnnotationAborted, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"kdistill annotate: error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdistill.annotate``: the same arguments as ``kdistill annotate``."""
    return module_main("python -m kdistill.annotate", "Annotate rows with a teacher (resumable); see kdistill.annotate.",
                       _add_arguments, run_cli, argv)
