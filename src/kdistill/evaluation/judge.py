"""``kdistill judge`` / ``python -m kdistill.evaluation.judge``: LLM-as-a-judge over ``kdistill generate`` outputs.

The command line (arguments, one summary JSON beside each judgement file, exit codes). The judging itself, per-answer
scores (:func:`judge_file`) and pairwise comparisons (:func:`judge_pairwise`), and the cache format are in
:mod:`kdistill.evaluation.judge_run`; replies are read by :mod:`kdistill.evaluation.judge_parse`. Both are
re-exported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kdistill.entry import module_main
from kdistill.errors import UserError
from kdistill.generators import ChatClient, ChatError

from .judge_parse import DIMENSIONS, JUDGE_TEMPLATE, PAIRWISE_TEMPLATE, parse_judgement, parse_verdict
from .judge_run import JudgeSummary, PairwiseSummary, judge_file, judge_pairwise, load_answers

__all__ = ["DIMENSIONS", "JUDGE_TEMPLATE", "PAIRWISE_TEMPLATE", "JudgeSummary", "PairwiseSummary", "add_parser",
           "judge_file", "judge_pairwise", "load_answers", "main", "parse_judgement", "parse_verdict", "run_cli"]

# ----------------------------------------------------------------------------------------------------
# Command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--answers", nargs="+", metavar="FILE", help="generate output file(s) to score")
    what.add_argument("--pairwise", nargs=2, metavar=("A", "B"), help="Compare two generate output files")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", required=True, help="Judge model name served at --base-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="Environment variable holding the API key (default: OPENAI_API_KEY; unset = no key)")
    p.add_argument("--template-file", default=None,
                   help="Own judge template (str.format; scores: {instruction} {input} {reference_output} {answer} "
                        "{dimensions} {json_example}; pairwise: {answer_1} {answer_2} instead of {answer})")
    p.add_argument("--dimensions", default=None,
                   help=f"Comma-separated score dimensions (default: {','.join(DIMENSIONS)})")
    p.add_argument("--concurrency", type=int, default=4, help="Parallel requests (default: 4)")
    p.add_argument("--max-invalid-retries", type=int, default=2,
                   help="Re-asks when a reply is not valid JSON scores (default: 2)")
    p.add_argument("--out", default=None,
                   help="Append-only JSONL cache of judgements (default: <answers>.judge.jsonl beside each file, "
                        "<A>.vs.<B>.pairwise.jsonl for --pairwise)")
    p.add_argument("--timeout", type=float, default=60.0, help="Seconds per request socket operation (default: 60)")
    p.add_argument("--max-retries", type=int, default=5, help="Retries on 429/5xx/timeouts (default: 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="First retry delay in seconds (default: 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="Judge temperature (default: 0)")
    p.add_argument("--max-tokens", type=int, default=512, help="Judge reply length limit (default: 512)")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the top-level ``judge`` command; run it with :func:`run_cli`."""
    p = subparsers.add_parser("judge", help="Score generate outputs (or compare two) with an LLM judge.",
                              description="LLM-as-a-judge over generate output files; judgements are cached in "
                                          "an append-only JSONL file, so a rerun resumes.")
    _add_arguments(p)
    return p


def _write_summary(summary, path: Path, **about) -> None:
    """The judgement's numbers as JSON beside its JSONL (``<out>.json``), where ``kdistill report`` finds them."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**dataclasses.asdict(summary), **about}, indent=2, default=str) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")


def run_cli(args) -> int:
    """Run ``judge``. Prints per answers file the mean of each dimension and valid/total (pairwise: the win
    rate of A and wins/ties/losses). Exit code 0, 1 when some judgement is invalid, 2 on an error."""
    try:
        client = ChatClient(args.base_url, args.api_model, api_key_env=args.api_key_env, timeout=args.timeout,
                            max_retries=args.max_retries, backoff=args.backoff,
                            params={"temperature": args.temperature, "max_tokens": args.max_tokens})
        template = None
        if args.template_file:
            template = Path(args.template_file).read_text(encoding="utf-8")
        progress = not args.no_progress
        invalid = 0
        if args.pairwise:
            a, b = args.pairwise
            out = args.out or str(Path(a).with_name(f"{Path(a).stem}.vs.{Path(b).stem}.pairwise.jsonl"))
            summary = judge_pairwise(a, b, out, client, template=template or PAIRWISE_TEMPLATE,
                                     max_invalid_retries=args.max_invalid_retries, concurrency=args.concurrency,
                                     progress=progress)
            print(summary)
            _write_summary(summary, Path(out).with_suffix(".json"), answers=[a, b], judge=client.id)
            invalid += summary.invalid
        else:
            dims = [d.strip() for d in args.dimensions.split(",") if d.strip()] if args.dimensions else DIMENSIONS
            for answers in args.answers:
                out = args.out or str(Path(answers).with_name(f"{Path(answers).stem}.judge.jsonl"))
                summary = judge_file(answers, out, client, template=template or JUDGE_TEMPLATE, dimensions=dims,
                                     max_invalid_retries=args.max_invalid_retries, concurrency=args.concurrency,
                                     progress=progress)
                print(summary)
                _write_summary(summary, Path(out).with_suffix(".json"), answers=[answers], judge=client.id)
                invalid += summary.invalid
    except (UserError, ChatError, FileNotFoundError, ValueError, TypeError, OSError) as exc:
        print(f"kdistill judge: error: {exc}", file=sys.stderr)
        return 2
    return 1 if invalid else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdistill.evaluation.judge``: the same arguments as ``kdistill judge``."""
    return module_main("python -m kdistill.evaluation.judge", "LLM-as-a-judge over generate outputs (resumable).", _add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
