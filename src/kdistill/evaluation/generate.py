"""Generate a model's answers to a test set of instructions, resumably (``kdistill generate``).

:func:`generate_file` reads instruction rows (alpaca ``{instruction, input, output}``, prompt/completion, or
``messages``; validated by :func:`kdistill.data.records.load_examples`), generates an answer for each with a
:class:`~kdistill.generators.LocalTeacher` (batched, left padding, greedy unless ``temperature > 0``) and
appends one JSON line per row to ``out_path``::

    {"key", "status": "ok", "instruction", "input", "reference_output", "generate_output",
     "model": <model id>, "params": <generation parameters>, "chat_template": bool, "source": "file:line",
     "time": <UTC ISO 8601>}

``params`` are the :class:`~kdistill.generators.LocalTeacher` parameters (``max_new_tokens``, ``do_sample``, the
sampling ones, ``repetition_penalty``...) and ``stop_tokens``: the tokens beyond EOS that end an answer (by
default the chat template's end of turn, e.g. ``<|im_end|>``; ``--stop-token`` adds, ``--no-template-stop``
removes). The answer is the text before the first stop token.

Row shapes: alpaca -> its fields; prompt/completion -> ``instruction`` = prompt, ``input`` = "",
``reference_output`` = completion; messages -> ``instruction`` = the last user turn, ``input`` = "",
``reference_output`` = the final assistant turn ("" when there is none). The prompt the model sees is
:func:`kdistill.data.formatting.prompt_text` of the row: template ``"auto"`` (the tokenizer's chat template
when it has one, else the alpaca prompt) with ``chat_template=True``, template ``"alpaca"`` (no chat
template) with ``chat_template=False``.

``key`` = :func:`kdistill.jobs.content_key` (SHA-256 of the canonical JSON) of ``{instruction, input,
reference_output, occurrence, model, params, prompt}`` (``occurrence``: 0 for the first row with this
content, 1 for its first duplicate...; so every input row gets exactly one output row). The file is a
:mod:`kdistill.jobs` record store, as the annotation files are: a rerun skips keys already in the file and
ignores a line cut short by a kill; records are written (one ``os.write`` each) after every batch, so a
killed run loses at most the batch in flight.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kdistill.data.formatting import prompt_text
from kdistill.data.records import DataValidationError, Example, load_examples
from kdistill.entry import module_main
from kdistill.errors import UserError
from kdistill.generators import LocalTeacher, generation_params, lm_prompt_messages
from kdistill.generators.options import add_generation_arguments, local_options
from kdistill.jobs import RecordWriter, content_key, in_batches, load_records, now
from kdistill.models import require_generative

__all__ = ["GenerateSummary", "add_parser", "generate_file", "generation_key", "main", "row_fields", "run_cli"]

logger = logging.getLogger(__name__)

OUTPUT_FIELDS = ("instruction", "input", "reference_output", "generate_output")


@dataclass
class GenerateSummary:
    """``total`` input rows, ``generated`` in this run, ``skipped`` (already in the file)."""

    total: int = 0
    generated: int = 0
    skipped: int = 0
    out_path: str = ""

    def __str__(self) -> str:
        return (f"generate: {self.total} rows, {self.generated} generated, {self.skipped} already done "
                f"-> {self.out_path}")


def row_fields(example) -> dict:
    """``{instruction, input, reference_output}`` of an LM :class:`~kdistill.data.records.Example`."""
    f = example.fields
    if example.kind == "alpaca":
        return {"instruction": f["instruction"], "input": f.get("input") or "", "reference_output": f.get("output") or ""}
    if example.kind == "prompt_completion":
        return {"instruction": f["prompt"], "input": "", "reference_output": f.get("completion") or ""}
    if example.kind == "messages":
        messages = f["messages"]
        reference = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        users = [m["content"] for m in messages if m["role"] == "user"]
        return {"instruction": users[-1] if users else "", "input": "", "reference_output": reference}
    raise ValueError(f"{example.source}: not an instruction row (kind {example.kind!r}); "
                     f"use alpaca, prompt/completion or messages rows")


def _prompt(example, tokenizer, chat_template: bool) -> str:
    """The generation prompt of an example (its final response replaced by a placeholder, then cut off)."""
    kind, f = example.kind, example.fields
    if kind == "alpaca":
        ex = Example("alpaca", {**f, "input": f.get("input") or "", "output": "x"}, example.source)
    elif kind == "prompt_completion":
        ex = Example("prompt_completion", {**f, "completion": "x"}, example.source)
    else:
        ex = Example("messages", {"messages": lm_prompt_messages("messages", f)
                                  + [{"role": "assistant", "content": "x"}]}, example.source)
    return prompt_text(ex, tokenizer, "auto" if chat_template else "alpaca")


def generation_key(fields: dict, occurrence: int, model: str, params: dict, prompt: str) -> str:
    """The record key of one answer (see the module docstring)."""
    return content_key({**{k: fields[k] for k in ("instruction", "input", "reference_output")},
                        "occurrence": occurrence, "model": model, "params": dict(params), "prompt": prompt})


def _refuse_other_writers(records, out_path, model: str, params: dict) -> None:
    """An answers file holds one model's answers under one set of generation parameters: appending another's
    would silently mix two systems in one evaluation."""
    for record in records:
        if record.get("model") != model or record.get("params") != params:
            raise UserError(f"{out_path}: already holds answers of model {record.get('model')!r} with parameters "
                            f"{record.get('params')!r}, not {model!r} with {params!r}; write to another --out file")


def generate_file(model_path_or_model, data, out_path, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float | None = None, seed: int | None = None, batch_size: int = 8,
                  limit: int | None = None, chat_template: bool = True, progress: bool = True,
                  tokenizer=None, dtype=None, *, do_sample: bool | None = None, top_k: int | None = None,
                  repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                  stop_tokens=None, template_stop: bool = True) -> GenerateSummary:
    """Generate an answer for every instruction row of ``data`` into ``out_path`` (see the module doc).

    ``model_path_or_model``: a model folder / hub id, a loaded transformers model (pass ``tokenizer`` unless
    its ``name_or_path`` has one), or a :class:`~kdistill.generators.LocalTeacher` (its own generation
    parameters are then overridden by the ones given here; its stop tokens are kept, and ``stop_tokens`` /
    ``template_stop`` only apply to a teacher built here). The generation parameters are those of
    :class:`~kdistill.generators.LocalTeacher` (recorded in every record's ``params``, stop tokens included).
    Returns a :class:`GenerateSummary`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
           "do_sample": do_sample, "top_k": top_k, "repetition_penalty": repetition_penalty,
           "no_repeat_ngram_size": no_repeat_ngram_size}
    generation_params(**gen)  # bad values are refused before anything is read or loaded
    examples = load_examples(os.fspath(data), limit=limit, require_response=False, option="--data").examples
    if isinstance(model_path_or_model, (str, os.PathLike)):
        require_generative(os.fspath(model_path_or_model))
    if isinstance(model_path_or_model, LocalTeacher):
        teacher = model_path_or_model
        teacher.batch_size = int(batch_size)
    else:
        teacher = LocalTeacher(model_path_or_model, tokenizer=tokenizer, batch_size=batch_size, dtype=dtype,
                               stop_tokens=stop_tokens, template_stop=template_stop, **gen)
    params = generation_params(**{**teacher.params, **gen})
    out_path = Path(out_path)

    jobs = []  # (key, fields, prompt, source)
    seen: dict[str, int] = {}
    for example in examples:
        fields = row_fields(example)
        prompt = _prompt(example, teacher.tokenizer, chat_template)
        content = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        occurrence = seen.get(content, 0)
        seen[content] = occurrence + 1
        jobs.append((generation_key(fields, occurrence, teacher.id, params, prompt), fields, prompt, example.source))

    existing = load_records(out_path)
    _refuse_other_writers(existing.values(), out_path, teacher.id, params)
    done = set(existing)
    summary = GenerateSummary(total=len(jobs), out_path=str(out_path))
    todo = [job for job in jobs if job[0] not in done]
    summary.skipped = len(jobs) - len(todo)
    writer = RecordWriter(out_path, fsync_every=1)
    try:
        with tqdm(total=len(todo), desc="generate", unit="row", disable=not progress, dynamic_ncols=True) as bar:
            for chunk in in_batches(todo, batch_size):
                answers = teacher.generate([job[2] for job in chunk], **params)
                for (key, fields, _prompt_text, source), answer in zip(chunk, answers):
                    writer.write({"key": key, "status": "ok", **fields, "generate_output": answer,
                                  "model": teacher.id, "params": params, "chat_template": bool(chat_template),
                                  "source": source, "time": now()})
                    summary.generated += 1
                bar.update(len(chunk))
    finally:
        writer.close()
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model folder or hub id (transformers)")
    p.add_argument("--data", required=True, help="Instruction rows: alpaca, prompt/completion or messages (.jsonl/.json)")
    p.add_argument("--out", required=True, help="Append-only JSONL output; rerunning with the same file resumes")
    add_generation_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="Generation batch size (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="First N rows only")
    p.add_argument("--no-chat-template", action="store_true",
                   help="Do not use the tokenizer's chat template (alpaca-style prompt instead)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "auto"), help="Model dtype")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the top-level ``generate`` command; run it with :func:`run_cli`."""
    p = subparsers.add_parser("generate", help="Generate a model's answers to a test set (resumable JSONL).",
                              description="Generate answers to instruction rows into an append-only JSONL file; "
                                          "rerun the same command to resume.")
    _add_arguments(p)
    return p


def run_cli(args) -> int:
    """Run ``generate`` from parsed arguments. Exit code 0, or 2 on an error (printed to stderr)."""
    try:
        summary = generate_file(args.model, args.data, args.out, batch_size=args.batch_size, limit=args.limit,
                                chat_template=not args.no_chat_template, progress=not args.no_progress,
                                dtype=getattr(args, "dtype", None), **local_options(args))
    except (UserError, DataValidationError, FileNotFoundError, ValueError, TypeError, OSError) as exc:
        print(f"kdistill generate: error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdistill.evaluation.generate``: the same arguments as ``kdistill generate``."""
    return module_main("python -m kdistill.evaluation.generate", "Generate answers to a test set (resumable).", _add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
