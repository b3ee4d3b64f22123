"""`kdistill eval lm`: token-level KD diagnostics of students against their teacher on held-out text.

For every response token of held-out instruction rows (label != -100; causal models after the next-token
shift, T5 on the decoder side) this measures, teacher vs each student:

    kl               KL(P_teacher || P_student)   forward KL, nats per token
    reverse_kl       KL(P_student || P_teacher)
    top1_agreement   fraction of tokens where argmax P_student == argmax P_teacher
    perplexity       exp(mean token NLL of the reference token) for the student (and the teacher)
    entropy_gap      mean student entropy - mean teacher entropy (nats; > 0: the student is less peaked)

All means are token-weighted over one data set: sums and token counts are accumulated over batches and
divided once at the end, so the batch size does not change the numbers. Both logit tensors are cut to the
shared tokenizer length (`kd_vocab_size`): rows of a padded embedding matrix past it are never real tokens.

The command evaluates several data sets (`--data` repeated) with the models loaded once and writes::

    {"kind": "lm", "max_length", "max_length_from", "vocab_size", "teacher": {"path"},
     "datasets": {name: {"data", "examples", "tokens", "skipped_invalid", "dropped_no_target", "truncated",
                         "teacher": {perplexity, nll, entropy}, "students": {name: {kl, reverse_kl, ...}}}}}

`max_length_from` says where the token limit came from: `--max-length`, `student config <path>` (the run's
`data.max_length` in the first student folder's kdistill_config.yaml), `teacher config <path>`, or `default`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from kdistill.config import CONFIG_FILENAME, ModelConfig
from kdistill.data import DataCollatorForDistillation, DataValidationError, LoadedData, encode_examples, load_examples
from kdistill.errors import ConfigError
from kdistill.evaluation.names import data_name, folder_name, named_paths
from kdistill.losses.divergences import forward_kl, reverse_kl
from kdistill.models import compare_tokenizers, kd_vocab_size, load_model, load_tokenizer
from kdistill.models.heads import align_positions
from kdistill.paths import check_output_dir, write_json_atomic

__all__ = ["DEFAULT_MAX_LENGTH", "add_parser", "eval_vocab_size", "format_table", "lm_diagnostics",
           "resolve_max_length", "run_cli"]

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 256
COUNTS = ("skipped_invalid", "dropped_no_target", "truncated")


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def eval_vocab_size(tokenizer, teacher, students: dict) -> int:
    """Vocabulary entries compared: the shared tokenizer length, checked against every model's output layer."""
    return min(kd_vocab_size(tokenizer, teacher, s) for s in students.values())


def _encode_data(data, tokenizer, max_length: int, limit: int | None, seq2seq: bool,
                 skip_invalid: bool) -> tuple[list[dict], dict[str, int]]:
    """Encoded rows and the counts of rows left out. `data`: a path / hub id, a `LoadedData`, a list of
    Examples, or already-encoded rows ({input_ids, labels})."""
    counts = dict.fromkeys(COUNTS, 0)
    if isinstance(data, (str, os.PathLike)):
        data = load_examples(os.fspath(data), limit=limit, skip_invalid=skip_invalid, option="--data")
    if isinstance(data, LoadedData):
        counts["skipped_invalid"] = len(data.skipped)
        data = data.examples
    examples = list(data)[:limit] if limit is not None else list(data)
    if examples and isinstance(examples[0], dict) and "input_ids" in examples[0]:
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in examples], counts
    rows, stats = encode_examples(examples, tokenizer, max_length=max_length, is_encoder_decoder=seq2seq)
    counts.update(dropped_no_target=stats.dropped_no_target, truncated=stats.truncated)
    return rows, counts


def _where(data) -> str:
    """The file (or hub id) `data` came from, for messages."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    examples = data.examples if isinstance(data, LoadedData) else data
    source = getattr(examples[0], "source", None) if examples else None
    return source.rpartition(":")[0] if source else "data"


def _logits_and_targets(model, batch: dict, vocab: int, seq2seq: bool):
    """(logits (N, V) float, targets (N,)) at the counted positions of one batch."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    if seq2seq:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits, targets = align_positions(out.logits, labels, seq2seq)
    mask = targets != IGNORE_INDEX
    return logits[..., :vocab][mask].float(), targets[mask]


def _entropy_sum(logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).sum())


def lm_diagnostics(teacher, students: dict, tokenizer, data, max_length: int = DEFAULT_MAX_LENGTH,
                   batch_size: int = 8, limit: int | None = None, progress: bool = True,
                   skip_invalid: bool = False) -> dict:
    """Token-level diagnostics of each student against `teacher` on one data set (see the module docstring).

    `data`: a .jsonl/.json file (or hub id) of instruction rows, a `LoadedData` (from `load_examples`), a list of
    `Example`s, or encoded rows with `input_ids`/`labels`. `students`: name -> model (same tokenizer as the
    teacher). `skip_invalid`: for a path, skip invalid rows (counted) instead of refusing the file. Returns one
    data set's entry: `examples` and `tokens` evaluated, the rows left out (`skipped_invalid`; `dropped_no_target`:
    no response token left within `max_length`; `truncated`: cut, counting the dropped ones), `teacher`
    (perplexity, nll, entropy) and `students` (name -> kl, reverse_kl, top1_agreement, perplexity, nll, entropy,
    entropy_gap); plus `data` when `data` is a path.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not students:
        raise ValueError("pass at least one student")
    seq2seq = _is_seq2seq(teacher)
    for name, student in students.items():
        if _is_seq2seq(student) != seq2seq:
            raise ValueError(f"student {name!r} and the teacher are not both causal or both encoder-decoder")
    vocab = eval_vocab_size(tokenizer, teacher, students)
    rows, counts = _encode_data(data, tokenizer, max_length, limit, seq2seq, skip_invalid)
    if not rows:
        raise DataValidationError([f"{_where(data)}: no example to evaluate" + (
            f": all {counts['dropped_no_target']} dropped because the prompt fills max_length {max_length} (raise "
            f"--max-length)" if counts["dropped_no_target"] else "")])
    collate = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)

    models = [teacher, *students.values()]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    tokens = 0
    t_nll = t_ent = 0.0
    acc = {name: {"kl": 0.0, "reverse_kl": 0.0, "agree": 0, "nll": 0.0, "entropy": 0.0} for name in students}
    n_batches = -(-len(rows) // batch_size)
    try:
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(rows), batch_size)):
                batch = collate(rows[start:start + batch_size])
                t_logits, targets = _logits_and_targets(teacher, batch, vocab, seq2seq)
                n = int(targets.numel())
                if n == 0:
                    continue
                tokens += n
                t_nll += float(F.cross_entropy(t_logits, targets, reduction="sum"))
                t_ent += _entropy_sum(t_logits)
                t_top = t_logits.argmax(-1)
                for name, student in students.items():
                    s_logits, s_targets = _logits_and_targets(student, batch, vocab, seq2seq)
                    if not torch.equal(s_targets.to(targets.device), targets):
                        raise RuntimeError("student and teacher targets differ; tokenisation mismatch")
                    s_logits = s_logits.to(t_logits.device)
                    a = acc[name]
                    a["kl"] += float(forward_kl(s_logits, t_logits, reduction="sum"))
                    a["reverse_kl"] += float(reverse_kl(s_logits, t_logits, reduction="sum"))
                    a["agree"] += int((s_logits.argmax(-1) == t_top).sum())
                    a["nll"] += float(F.cross_entropy(s_logits, targets, reduction="sum"))
                    a["entropy"] += _entropy_sum(s_logits)
                if progress:
                    print(f"\reval lm: batch {b + 1}/{n_batches}, {tokens} tokens", end="", file=sys.stderr,
                          flush=True)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    if progress:
        print(file=sys.stderr)
    if tokens == 0:
        raise ValueError("no response tokens to evaluate")

    teacher_nll = t_nll / tokens
    teacher_entropy = t_ent / tokens
    result = {"data": os.fspath(data)} if isinstance(data, (str, os.PathLike)) else {}
    result.update(examples=len(rows), tokens=tokens, **counts)
    result["teacher"] = {"perplexity": math.exp(teacher_nll), "nll": teacher_nll, "entropy": teacher_entropy}
    result["students"] = {}
    for name, a in acc.items():
        nll = a["nll"] / tokens
        entropy = a["entropy"] / tokens
        result["students"][name] = {
            "kl": a["kl"] / tokens,
            "reverse_kl": a["reverse_kl"] / tokens,
            "top1_agreement": a["agree"] / tokens,
            "perplexity": math.exp(nll),
            "nll": nll,
            "entropy": entropy,
            "entropy_gap": entropy - teacher_entropy,
        }
    return result


def format_table(result: dict) -> str:
    """Markdown table, teacher row first."""
    lines = ["| model | KL(t||s) | reverse KL | top-1 agreement | perplexity | entropy | entropy gap |",
             "|---|---|---|---|---|---|---|"]
    t = result["teacher"]
    lines.append(f"| teacher | - | - | - | {t['perplexity']:.3f} | {t['entropy']:.4f} | - |")
    for name, s in result["students"].items():
        lines.append(f"| {name} | {s['kl']:.4f} | {s['reverse_kl']:.4f} | {s['top1_agreement']:.4f} | "
                     f"{s['perplexity']:.3f} | {s['entropy']:.4f} | {s['entropy_gap']:+.4f} |")
    return "\n".join(lines)


def add_parser(eval_subparsers) -> None:
    """Register `lm` under `kdistill eval`."""
    p = eval_subparsers.add_parser("lm", help="Token-level KD diagnostics (KL, agreement, perplexity, entropy) "
                                              "of students against a teacher on held-out instruction data")
    p.add_argument("--teacher", required=True, help="Teacher model (hub id or folder); its tokenizer is used")
    p.add_argument("--student", action="append", required=True, metavar="NAME=PATH",
                   help="A student, NAME=PATH or a bare PATH (named after its folder); repeat for several")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="Held-out instruction rows (.jsonl/.json or hub id), NAME=PATH or a bare PATH (named after "
                        "its file stem); repeat for several data sets (the models are loaded once)")
    p.add_argument("--max-length", type=int, default=None,
                   help="Tokens per example (default: the run's data.max_length from the first student folder's "
                        f"{CONFIG_FILENAME}, else the teacher folder's, else {DEFAULT_MAX_LENGTH})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="First N valid examples of each data set only")
    p.add_argument("--skip-invalid", action="store_true",
                   help="Skip invalid rows (counted and listed) instead of refusing the file")
    p.add_argument("--out", default="eval_lm.json", help="Where to write the JSON results (default: eval_lm.json)")
    p.set_defaults(eval_func=run_cli)


def _run_max_length(folder: str) -> tuple[int, Path] | None:
    """`data.max_length` of the kdistill_config.yaml a `kdistill train` run saved in `folder`, if there is one."""
    path = Path(folder).expanduser() / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not readable YAML ({reason}); pass --max-length") from None
    data = config.get("data") if isinstance(config, dict) else None
    value = data.get("max_length") if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: data.max_length: expected a positive integer, got {value!r}; pass --max-length")
    return value, path


def resolve_max_length(given: int | None, student_paths: list[str], teacher_path: str) -> tuple[int, str]:
    """(max_length, where it came from): `given` (--max-length); else the run's data.max_length saved in the first
    student folder; else in the teacher folder; else DEFAULT_MAX_LENGTH."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"--max-length: must be >= 1, got {given}")
        return given, "--max-length"
    for role, folder in (("student", student_paths[0] if student_paths else None), ("teacher", teacher_path)):
        found = _run_max_length(folder) if folder else None
        if found:
            return found[0], f"{role} config {found[1]}"
    return DEFAULT_MAX_LENGTH, "default"


def _explain(max_length: int, origin: str) -> str:
    if origin == "--max-length":
        return f"max_length {max_length} (--max-length)"
    if origin == "default":
        return (f"max_length {max_length} (default: no {CONFIG_FILENAME} with data.max_length in the first student's "
                f"or the teacher's folder; pass --max-length to match the run)")
    return f"max_length {max_length} (the run's data.max_length, from the {origin})"


def _describe(name: str, entry: dict, skipped: list[str]) -> str:
    text = (f"{name} ({entry['data']}): {entry['examples']} examples, {entry['tokens']} response tokens; "
            f"{entry['skipped_invalid']} skipped invalid, {entry['dropped_no_target']} dropped (no response token "
            f"left within max_length), {entry['truncated']} truncated")
    for message in skipped[:3]:
        text += f"\n  skipped: {message}"
    if len(skipped) > 3:
        text += f"\n  skipped: ... and {len(skipped) - 3} more"
    return text


def run_cli(args) -> int:
    datasets = named_paths(args.data, data_name)
    student_paths = named_paths(args.student, folder_name)
    out = Path(args.out)
    check_output_dir(out.parent, "--out")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    max_length, origin = resolve_max_length(args.max_length, list(student_paths.values()), args.teacher)
    print(_explain(max_length, origin))
    loaded = {name: load_examples(path, limit=args.limit, skip_invalid=args.skip_invalid, option="--data")
              for name, path in datasets.items()}  # every file checked before a model is loaded

    teacher_cfg = ModelConfig(name_or_path=args.teacher)
    tokenizer = load_tokenizer(teacher_cfg)
    teacher = load_model(teacher_cfg, role="teacher")
    students = {}
    for name, path in student_paths.items():
        cfg = ModelConfig(name_or_path=path)
        try:
            student_tok = load_tokenizer(cfg)
        except (OSError, ValueError):
            student_tok = None  # a folder without tokenizer files: assume the teacher's
        if student_tok is not None:
            compare_tokenizers(tokenizer, student_tok)
        students[name] = load_model(cfg)
    result = {"kind": "lm", "max_length": max_length, "max_length_from": origin,
              "vocab_size": eval_vocab_size(tokenizer, teacher, students), "teacher": {"path": args.teacher},
              "datasets": {}}
    for name, path in datasets.items():
        entry = lm_diagnostics(teacher, students, tokenizer, loaded[name], max_length=max_length,
                               batch_size=args.batch_size)
        result["datasets"][name] = {"data": path, **entry}
        print(_describe(name, result["datasets"][name], loaded[name].skipped))
        print(format_table(entry))
        write_json_atomic(out, result)  # after every data set: a failure in a later one keeps the earlier results
    print(f"results: {out}")
    return 0
